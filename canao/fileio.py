"""Files that survive crashes, and checksums: one helper for every stage.

`atomic_write_bytes`/`atomic_write_text`/`atomic_save_tensors` write to a temporary file
in the same folder, fsync it, rename it over the target and fsync the folder, so a reader
sees the old file or the new one, never a part of either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode open() would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, not around every write
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file of torch tensors or numpy arrays (never a pickle), written atomically."""
    values = list(tensors.values())
    if values and type(values[0]).__module__.startswith("torch"):
        from safetensors.torch import save
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    else:
        import numpy as np
        from safetensors.numpy import save
        data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


@contextlib.contextmanager
def locked(path: str | Path):
    """An exclusive lock on PATH.lock (across processes) for a read-modify-write of PATH."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str):
    """Hold FOLDER/.canao-lock for a long job writing into `folder`: a second job on the same folder (a
    resume started twice, two searches with one --out) is refused instead of interleaving its writes.
    The kernel drops the lock when the process dies, so a crash never leaves the folder locked."""
    from .errors import CanaoError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".canao-lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CanaoError(f"{folder} is in use by another canao {what} (process holding {folder / '.canao-lock'}); "
                         "wait for it to finish, or choose another --out") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def read_json_object(path: str | Path, what: str, valid=lambda data: True) -> dict:
    """A JSON object file (a database canao keeps), or {} when absent. A file that is not a valid one is
    moved aside to PATH.corrupt-<time> and named on stderr, never overwritten: its data stays recoverable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and valid(data):
            return data
        why = "not a " + what + " of this version"
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a torn write by an older canao, a disk error
        why = f"unreadable: {exc}"
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
    print(f"canao: {path} is {why}; kept it as {aside} and started a new {what}", file=sys.stderr)
    return {}


def update_json_object(path: str | Path, what: str, update, valid=lambda data: True) -> dict:
    """Under the file's lock: re-read it (so entries another process wrote meanwhile are kept), apply
    update(data) in place, write it atomically; returns the merged data."""
    with locked(path):
        data = read_json_object(path, what, valid)
        update(data)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
