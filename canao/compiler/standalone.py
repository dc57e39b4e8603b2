"""Running an artifact's standalone `canao-run` program on this machine (no ctypes, no Python in the loop).

The same program runs on a phone or board (canao.device drives it over ssh/adb); here it runs
directly for a host artifact, or under a `launcher` such as ["qemu-aarch64", "-cpu", "max"] for an
ARM artifact. With launcher=None an artifact for another architecture gets qemu-<arch> -cpu max
when it is on PATH; launcher=[] runs the program directly.

    run_local(artifact_dir, ids, token_type_ids=None, attention_mask=None) -> (start_logits, end_logits)
    bench_local(artifact_dir, seq, threads=1, runs=20, warmup=5) -> canao-run's JSON report (a dict)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import CanaoError
from .artifact import RUNNER, WEIGHTS, open_build
from .targets import TARGETS, host_arch, is_cross


def launcher_for(manifest: dict, launcher: list[str] | None = None) -> list[str]:
    """The command prefix that runs this artifact's canao-run here."""
    if launcher is not None:
        return list(launcher)
    target = TARGETS[manifest["target"]["name"]]
    if not is_cross(target):
        return []
    qemu = shutil.which(f"qemu-{target.arch}")
    if not qemu:
        raise CanaoError(f"the artifact is built for {target.arch} and this machine is {host_arch()}: run it on the "
                         f"device, or install qemu-user (Debian package qemu-user) to run it under qemu-{target.arch}")
    return [qemu, "-cpu", "max"]


def _command(folder: Path, launcher: list[str] | None, check: bool) -> tuple[dict, list[str]]:
    folder, manifest = open_build(folder, check=check, here=False)  # an x86-64 artifact: this CPU's build
    runner = folder / manifest.get("runner", RUNNER)
    if not runner.exists():
        raise CanaoError(f"{folder} has no {RUNNER} (built by an older canao); recompile it with `canao compile`")
    return manifest, [*launcher_for(manifest, launcher), str(runner.resolve()), str((folder / WEIGHTS).resolve())]


def _call(cmd: list[str], timeout: float | None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CanaoError(f"{RUNNER} took longer than {timeout} s: {' '.join(cmd)}") from None
    except OSError as exc:
        raise CanaoError(f"cannot start {cmd[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise CanaoError(lines[-1] if lines else f"{RUNNER} exited with status {proc.returncode}")
    return proc.stdout


def _int64_2d(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=np.int64)
    return a[None] if a.ndim == 1 else a


def run_local(artifact_dir, ids, token_type_ids=None, attention_mask=None, threads: int | None = None,
              launcher: list[str] | None = None, timeout: float | None = None, check: bool = True):
    """The artifact's outputs for int64 [batch, seq] inputs (or [seq]), as float32 [batch, seq] arrays, from canao-run."""
    folder = Path(artifact_dir)
    manifest, cmd = _command(folder, launcher, check)
    ids = _int64_2d(ids)
    if ids.ndim != 2:
        raise CanaoError(f"input ids must be [batch, seq], got shape {ids.shape}")
    batch, seq = ids.shape
    with tempfile.TemporaryDirectory(prefix="canao-run-") as tmp:
        tmp = Path(tmp)
        files = {"--ids": ids}
        for opt, x in (("--type-ids", token_type_ids), ("--mask", attention_mask)):
            if x is not None:
                files[opt] = _int64_2d(x)
                if files[opt].shape != ids.shape:
                    raise CanaoError(f"{opt[2:]} has shape {files[opt].shape}, input ids {ids.shape}")
        for opt, x in files.items():
            cmd += [opt, str(tmp / (opt[2:] + ".i64"))]
            x.tofile(tmp / (opt[2:] + ".i64"))
        cmd += ["--batch", str(batch), "--seq", str(seq), "--out", str(tmp / "out.f32")]
        if threads:
            cmd += ["--threads", str(threads)]
        _call(cmd, timeout)
        out = np.fromfile(tmp / "out.f32", np.float32)
    n = len(manifest.get("outputs", ["start_logits", "end_logits"]))
    if out.size != n * batch * seq:
        raise CanaoError(f"{RUNNER} wrote {out.size} floats, expected {n} outputs x {batch} x {seq}")
    return tuple(out.reshape(n, batch, seq))


def bench_local(artifact_dir, seq: int, threads: int = 1, runs: int = 20, warmup: int = 5,
                launcher: list[str] | None = None, timeout: float | None = None) -> dict:
    """canao-run --bench: latency of one [1, seq] input on random ids, as its JSON report."""
    _, cmd = _command(Path(artifact_dir), launcher, check=True)
    cmd += ["--bench", "--seq", str(seq), "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup)]
    out = _call(cmd, timeout).strip()
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise CanaoError(f"{RUNNER} --bench printed no JSON: {out[:200]!r}") from None


class RunnerModel:
    """CompiledModel's run() over canao-run (for an artifact this process cannot load: another ISA under qemu)."""

    def __init__(self, folder, threads: int | None = None, launcher: list[str] | None = None):
        self.path = Path(folder)
        self.manifest, _ = _command(self.path, launcher, check=True)
        self.threads, self.launcher = threads, launcher

    def run(self, input_ids, token_type_ids=None, attention_mask=None, as_torch: bool | None = None):
        torch_in = as_torch if as_torch is not None else type(input_ids).__module__.startswith("torch")
        outs = run_local(self.path, input_ids, token_type_ids, attention_mask, threads=self.threads,
                         launcher=self.launcher, check=False)
        if torch_in:
            import torch

            return tuple(torch.from_numpy(np.array(o)) for o in outs)
        return outs

    __call__ = run
