"""Invoking the system C compiler, with a cache keyed by the exact sources and flags."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import CanaoError
from .targets import Target

KERNEL_DIR = Path(__file__).parent / "kernels"
SUPPORT_FILES = ("canao.h", "canao_kernels.h", "canao_runtime.c", "vec_avx2.h", "vec_avx512.h")
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-std=gnu11",
              "-Werror=incompatible-pointer-types", "-Werror=int-conversion")


def cache_dir() -> Path:
    root = Path(os.environ.get("CANAO_CACHE", Path.home() / ".cache" / "canao"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise CanaoError("no C compiler found: install gcc (or set CC)")
    return cc


def _run_cc(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip())
        raise CanaoError(f"C compilation failed: {first}")


def _runtime_object(source_dir: Path, flags: list[str]) -> Path:
    """canao_runtime.c compiled once per (runtime sources, flags): it is the same in every artifact."""
    key = hashlib.sha256(" ".join([compiler(), *flags]).encode())
    for name in ("canao_runtime.c", "canao.h"):
        key.update((source_dir / name).read_bytes())
    obj = cache_dir() / "build" / f"runtime-{key.hexdigest()[:24]}.o"
    if not obj.exists():
        obj.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_o = Path(tmp) / "runtime.o"
            _run_cc([compiler(), *[f for f in flags if f != "-shared"], "-c", "-I", str(source_dir),
                     str(source_dir / "canao_runtime.c"), "-o", str(tmp_o)])
            shutil.move(str(tmp_o), obj)
    return obj


def build_library(source_dir: Path, target: Target, out: Path) -> Path:
    """Compile model.c + the runtime in source_dir into the shared library `out`."""
    flags = [*BASE_FLAGS, *target.cflags]
    key = hashlib.sha256(" ".join([compiler(), *flags]).encode())
    for name in ("model.c", *SUPPORT_FILES):
        key.update((source_dir / name).read_bytes())
    cached = cache_dir() / "build" / f"{key.hexdigest()[:24]}.so"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        runtime = _runtime_object(source_dir, flags)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_so = Path(tmp) / "lib.so"
            _run_cc([compiler(), *flags, "-I", str(source_dir), str(source_dir / "model.c"), str(runtime),
                     "-o", str(tmp_so), "-lm"])
            shutil.move(str(tmp_so), cached)
    shutil.copyfile(cached, out)
    return out


def copy_support_files(dest: Path) -> None:
    for name in SUPPORT_FILES:
        shutil.copyfile(KERNEL_DIR / name, dest / name)
