"""The artifact folder: generated C, shared library, the canao-run program, packed weights, manifest.json.

An artifact is native code: loading one runs its library. The manifest records the target
ISA, precision, maximum length and a SHA-256 of every file (the library, the weights, the
runner and the tokenizer the apps read), and loading refuses a folder whose manifest lacks
them, lists a file that is missing or changed, or holds a file it does not list. That
catches corruption and accidents, not an attacker who rewrites the manifest too: load
artifacts you built or got from a source you trust.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from pathlib import Path

from .. import __version__
from ..errors import CanaoError
from ..fileio import atomic_write_bytes, atomic_write_text, file_digest
from .targets import TARGETS, X86_64, X86_VARIANTS, host_arch, is_cross, missing_features

MANIFEST = "manifest.json"
LIBRARY = "libcanao_model.so"
RUNNER = "canao-run"  # standalone C runner (kernels/canao_run.c); the only executable of a cross build
WEIGHTS = "weights.bin"
WEIGHTS_MAGIC = b"CANAOW01"
HEADER_BYTES = 64
FORMAT = 2  # 2: the tokenizer files are checksummed too, and every file must be listed


sha256 = file_digest  # an artifact's checksums


def begin_folder(out) -> tuple[Path, Path]:
    """(final, partial): the artifact is built in `partial` and renamed by finish_folder, so a failed
    build never leaves a half artifact at `final`. An existing folder that is not an artifact is refused."""
    final = Path(out)
    if final.exists() and not (final / MANIFEST).exists():
        raise CanaoError(f"{final} exists and is not a canao artifact; choose another --out")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return final, partial


def finish_folder(partial: Path, final: Path, info: dict) -> dict:
    """Write the manifest (checksums of everything in `partial`) and move the artifact into place."""
    manifest = write_manifest(partial, info)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return manifest


def write_weights(path: Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(WEIGHTS_MAGIC + b"\0" * (HEADER_BYTES - len(WEIGHTS_MAGIC)))
        f.write(blob)


def write_manifest(folder: Path, info: dict) -> dict:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    # a multi-target artifact lists its builds (sub-folders) by the checksum of their manifests,
    # which checksum everything in them
    files += sorted(f"{p.name}/{MANIFEST}" for p in folder.iterdir() if p.is_dir() and p.name in X86_VARIANTS)
    manifest = {"format": FORMAT, "canao_version": __version__, **info,
                "checksums": {name: sha256(folder / name) for name in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path, check: bool = True, here: bool = True) -> dict:
    """The manifest, after checking the folder is complete, unmodified and (here=True) runs on this CPU."""
    path = folder / MANIFEST
    if not path.exists():
        raise CanaoError(f"{folder} is not a canao artifact (no {MANIFEST}); build one with `canao compile`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CanaoError(f"{path} is corrupted (not valid JSON); rebuild the artifact with `canao compile`") from None
    if manifest.get("format") != FORMAT:
        raise CanaoError(f"{folder}: artifact format {manifest.get('format')} is not {FORMAT}; rebuild it")
    if manifest.get("target", {}).get("name") == X86_64:
        if here and host_arch() != "x86_64":
            raise CanaoError(f"{folder} holds x86-64 builds, and this machine is {host_arch()}")
        if check:
            check_files(folder, manifest, None)
        return manifest
    target = TARGETS.get(manifest.get("target", {}).get("name"))
    if target is None:
        raise CanaoError(f"{folder}: unknown target in manifest; rebuild the artifact")
    if here and is_cross(target):
        raise CanaoError(f"{folder} was built for {target.arch} (target {target.name}), not this {host_arch()} "
                         f"machine; run it on the device with canao-run ({folder / RUNNER} "
                         f"{folder / WEIGHTS} --help), or under qemu with canao.compiler.standalone")
    missing = missing_features(target) if here else []
    if missing:
        raise CanaoError(f"{folder} was built for {target.name}, but this CPU lacks {', '.join(missing)}; "
                         f"recompile it here with `canao compile --target host`")
    if check:
        check_files(folder, manifest, target)
    return manifest


def check_files(folder: Path, manifest: dict, target) -> None:
    sums = manifest.get("checksums")
    if not isinstance(sums, dict) or not sums:
        raise CanaoError(f"{folder}: the manifest has no checksums, so its native code cannot be checked; rebuild "
                         f"the artifact with `canao compile` (an artifact is code: load only ones you trust)")
    if target is None:  # multi-target: its builds' manifests, each checked when that build is loaded
        needed = [f"{v}/{MANIFEST}" for v in manifest["target"].get("variants", [])]
        listed = {n.split("/")[0] for n in sums}
    else:
        needed = [WEIGHTS, RUNNER] + ([] if is_cross(target) else [LIBRARY])
        listed = set(sums)
    unlisted = [n for n in needed if n not in sums]
    unlisted += sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in listed)
    if unlisted:
        raise CanaoError(f"{folder}: {', '.join(unlisted)} not covered by the manifest's checksums; the artifact was "
                         f"changed after it was built: rebuild it with `canao compile`")
    for name, digest in sums.items():
        file = folder / name
        nested = target is None and name.count("/") == 1 and name.split("/")[0] in X86_VARIANTS \
            and name.endswith("/" + MANIFEST)
        if (Path(name).name != name and not nested) or not file.is_file():
            raise CanaoError(f"{folder}: {name} is missing; the artifact is incomplete")
        if sha256(file) != digest:
            raise CanaoError(f"{folder}: {name} does not match its checksum; the artifact is corrupted, rebuild it")


def pick_build(folder: Path, flags=None) -> Path:
    """The folder whose code runs: the artifact itself, or, for a multi-target (x86-64) artifact, the
    widest of its builds this CPU runs ($CANAO_X86_VARIANT picks one by name), or, given a device's
    CPU flags, the widest that device runs."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return folder  # read_manifest names the problem
    if not isinstance(manifest, dict) or manifest.get("target", {}).get("name") != X86_64:
        return folder
    variants = [v for v in manifest["target"].get("variants", []) if v in X86_VARIANTS]
    if flags is not None:
        name = next((v for v in variants if set(TARGETS[v].features) <= set(flags)), None)
        if name is None:
            raise CanaoError(f"{folder}: the device runs none of its builds ({', '.join(variants)}); it needs at "
                             f"least AVX2 + FMA")
        return folder / name
    forced = os.environ.get("CANAO_X86_VARIANT")
    if forced:
        if forced not in variants:
            raise CanaoError(f"CANAO_X86_VARIANT={forced}: {folder} has builds for {', '.join(variants)}")
        lacking = missing_features(TARGETS[forced])
        if lacking:
            raise CanaoError(f"CANAO_X86_VARIANT={forced}: this CPU lacks {', '.join(lacking)}")
        return folder / forced
    for name in variants:
        if not missing_features(TARGETS[name]):
            return folder / name
    raise CanaoError(f"{folder}: this CPU runs none of its builds ({', '.join(variants)}); it needs at least AVX2 + FMA")


def open_build(folder: Path, check: bool = True, here: bool = True) -> tuple[Path, dict]:
    """(folder of the build that runs here, its manifest), after checking the artifact (and, for a
    multi-target one, its own manifest as well as the picked build's)."""
    folder = Path(folder)
    build = pick_build(folder)
    if build != folder:
        read_manifest(folder, check=check, here=here)
    return build, read_manifest(build, check=check, here=here)


def add_files(folder: Path, files: dict) -> dict:
    """Copy files ({name: source}: the tokenizer the apps read) into a finished artifact and add their
    checksums to its manifest (after checking the rest, so a changed artifact is never blessed)."""
    folder = Path(folder)
    manifest = read_manifest(folder, here=False)
    for name, src in files.items():
        shutil.copyfile(src, folder / name)
        manifest["checksums"][name] = sha256(folder / name)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_library(folder: Path) -> ctypes.CDLL:
    """The artifact's shared library, loaded from a copy named by its checksum. The dynamic loader keeps
    a library per path for the life of the process: loading a rebuilt artifact from the same folder would
    otherwise run the old code."""
    from ..paths import cache_root

    lib = Path(folder) / LIBRARY
    data = lib.read_bytes()
    copy = cache_root() / "loaded" / f"{hashlib.sha256(data).hexdigest()[:32]}.so"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(copy, data)  # whole or absent: a crash never leaves a truncated library there
    # RTLD_LOCAL + a private copy of each symbol: several artifacts can be open at once
    return ctypes.CDLL(str(copy), mode=os.RTLD_LOCAL)
