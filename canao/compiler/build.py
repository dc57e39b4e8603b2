"""Invoking the system C compiler, with a cache keyed by the exact sources and flags."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import CanaoError
from ..paths import cache_dir
from .targets import Target, is_cross

KERNEL_DIR = Path(__file__).parent / "kernels"
SUPPORT_FILES = ("canao.h", "canao_kernels.h", "canao_runtime.c", "canao_run.c", "canao_pool.h", "canao_weights.h",
                 "canao_stats.h", "vec_avx2.h", "vec_avx512.h", "vec_neon.h")
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-std=gnu11",
              "-Werror=incompatible-pointer-types", "-Werror=int-conversion")


@functools.lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """A digest of what decides the code canao generates (kernels, code generator, passes, targets):
    timings and builds stored under another fingerprint came from other code and are not reused."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted([*KERNEL_DIR.iterdir(), *(root / "codegen").glob("*.py"), *(root / "passes").glob("*.py"),
                        *(root / "decoder").glob("*.py"), root / "targets.py"]):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def compiler(target: Target | None = None) -> str:
    """The C compiler for `target` (the host's by default; a cross compiler for another machine)."""
    if target is not None and is_cross(target):
        env = f"CANAO_{target.name.upper()}_CC"
        cc = os.environ.get(env) or target.cc
        found = shutil.which(cc)
        if not found:
            package = f"gcc-{cc[:-4]}" if cc.endswith("-gcc") else cc
            raise CanaoError(f"cross compiler {cc} for target {target.name} not found: install the Debian package "
                             f"{package} (apt-get install {package}) or set ${env}")
        return found
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise CanaoError("no C compiler found: install gcc (or set CC)")
    return cc


def _run_cc(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip())
        raise CanaoError(f"C compilation failed: {first}")


def object_flags(target: Target) -> list[str]:
    """Flags of every object: position-independent where a shared library links them (host targets)."""
    drop = {"-shared", "-fPIC"} if is_cross(target) else {"-shared"}
    return [*(f for f in BASE_FLAGS if f not in drop), *target.cflags]


def _cached(kind: str, cc: str, flags: list[str], inputs: list[Path], suffix: str, make) -> Path:
    """Build once per (compiler, flags, input bytes): make(tmp_path) writes the file, kept in the cache."""
    key = hashlib.sha256(" ".join([kind, cc, *flags]).encode())
    for path in inputs:
        key.update(path.read_bytes())
    out = cache_dir() / "build" / f"{kind}-{key.hexdigest()[:24]}{suffix}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # built in the cache's own folder and renamed: the file at `out` is whole or absent, whatever
        # stops the build (a copy across filesystems could leave a truncated library there)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            tmp_out = Path(tmp) / f"out{suffix}"
            make(tmp_out)
            os.replace(tmp_out, out)
    return out


def _object(source_dir: Path, name: str, target: Target, headers: tuple[str, ...]) -> Path:
    cc, flags = compiler(target), object_flags(target)
    inputs = [source_dir / name, *(source_dir / h for h in headers)]
    return _cached(Path(name).stem, cc, flags, inputs, ".o",
                   lambda o: _run_cc([cc, *flags, "-c", "-I", str(source_dir), str(source_dir / name), "-o", str(o)]))


def build_artifact(source_dir: Path, target: Target, library: str | None, runner: str) -> list[str]:
    """Compile model.c, the runtime (the same in every artifact: compiled once per flags) and canao_run.c in
    source_dir into the shared library `library` (host targets; None skips it) and the standalone
    program `runner` (statically linked for another machine). Returns the names written."""
    cc = compiler(target)
    model = _object(source_dir, "model.c", target, tuple(SUPPORT_FILES))
    runtime = _object(source_dir, "canao_runtime.c", target, ("canao.h", "canao_pool.h", "canao_weights.h"))
    main = _object(source_dir, "canao_run.c", target, ("canao.h", "canao_stats.h"))
    written = []
    if library and not is_cross(target):
        lib = _cached("lib", cc, [], [model, runtime], ".so",
                      lambda o: _run_cc([cc, "-shared", "-pthread", str(model), str(runtime), "-o", str(o), "-lm"]))
        shutil.copyfile(lib, source_dir / library)
        written.append(library)
    link = ["-static"] if is_cross(target) else []
    exe = _cached("run", cc, link, [model, runtime, main], "",
                  lambda o: _run_cc([cc, *link, "-pthread", str(model), str(runtime), str(main), "-o", str(o), "-lm"]))
    shutil.copyfile(exe, source_dir / runner)
    os.chmod(source_dir / runner, 0o755)
    written.append(runner)
    return written


def copy_support_files(dest: Path) -> None:
    for name in SUPPORT_FILES:
        shutil.copyfile(KERNEL_DIR / name, dest / name)
