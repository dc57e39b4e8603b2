"""measure(): an artifact's latency on a device, timed by the artifact's own standalone `canao-run`.

The artifact folder's `canao-run` (a C program, no Python on the device) and weights.bin are copied
to the device, `canao-run weights.bin --bench --seq S ...` runs there and prints one JSON line; the
result gets what was measured where (device spec, uname -m, CPU model). Before anything is copied
the artifact is checked against the device: the runner's ELF architecture and the target's ISA
flags against `uname -m` and /proc/cpuinfo there.

Within one process a device connection is opened once and an artifact (by checksum) is copied once
per device; everything copied is removed at exit (or by close()).
"""

from __future__ import annotations

import atexit
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

from ..errors import CanaoError
from .transport import DEFAULT_TIMEOUT, Transport, _last_line, open_transport

RUNNER = "canao-run"
WEIGHTS = "weights.bin"
MANIFEST = "manifest.json"
BENCH_KEYS = ("seq", "threads", "runs", "warmup", "median_ms", "p90_ms", "p95_ms", "min_ms", "mean_ms")
KEEP_ARTIFACTS = 4  # copies kept per device: a search measures many candidates, a phone's storage is finite

# e_machine of an ELF header -> the `uname -m` that runs it
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0x03: "i686", 0xF3: "riscv64"}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

_transports: dict[str, Transport] = {}
_pushed: dict[str, OrderedDict] = {}  # device spec -> {artifact key: remote folder}


def close() -> None:
    """Remove everything copied to devices and close their connections."""
    while _transports:
        spec, t = _transports.popitem()
        _pushed.pop(spec, None)
        t.cleanup()


atexit.register(close)


def get_device(spec: str) -> Transport:
    """The process's open transport for `spec` (opened, and the device inspected, on first use)."""
    spec = (spec or "local").strip()
    if spec not in _transports:
        t = open_transport(spec)
        try:
            t.probe()
        except BaseException:
            t.cleanup()
            raise
        _transports[spec] = t
        _pushed[spec] = OrderedDict()
    return _transports[spec]


def read_manifest(folder: Path) -> dict:
    """The manifest, without the host-CPU check of compiler.artifact (the device, not this host, runs it)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CanaoError(f"{folder} is not a canao artifact (no {MANIFEST}); build one with `canao compile`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CanaoError(f"{path} is corrupted (not valid JSON); rebuild the artifact with `canao compile`") from None


def elf_arch(path: Path) -> str | None:
    """The architecture an ELF executable is for, or None (not ELF: a script runs anywhere)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    machine = int.from_bytes(head[18:20], order)
    return _ELF_MACHINES.get(machine, f"ELF machine {machine:#x}")


def target_arch(target: dict) -> str:
    """`uname -m` a manifest target needs: the x86 targets (avx2, avx512*) x86_64, the ARM ones aarch64."""
    name = str(target.get("name", ""))
    arch = target.get("arch")
    if not arch:
        try:
            from ..compiler.targets import TARGETS

            arch = getattr(TARGETS.get(name), "arch", None)
        except ImportError:
            arch = None
    if arch:
        return _ARCH_ALIASES.get(arch, arch)
    if name.startswith(("avx", "sse", "x86")):
        return "x86_64"
    if name.startswith(("aarch64", "arm", "neon", "sve")):
        return "aarch64"
    raise CanaoError(f"the artifact's target '{name}' is unknown to this canao; rebuild the artifact with `canao compile`")


def check_compatible(folder: Path, manifest: dict, info: dict) -> None:
    """Refuse (before copying anything) an artifact the device cannot execute."""
    target = manifest.get("target") or {}
    name = target.get("name", "?")
    dev_arch = _ARCH_ALIASES.get(info["arch"], info["arch"])
    need = elf_arch(folder / RUNNER) or target_arch(target)
    if need != dev_arch:
        fix = ("recompile it for x86 (`canao compile --target host` on an x86 machine, or avx2/avx512)"
               if dev_arch == "x86_64" else f"recompile it with the {dev_arch} target"
               if dev_arch == "aarch64" else "canao has no target for it")
        raise CanaoError(f"{folder} was built for {name} ({need}), but {info['spec']} is {info['arch']}; {fix}")
    # targets name the /proc/cpuinfo flags (x86) or Features (ARM) their code executes
    flags = set(info.get("flags") or [])
    missing = sorted(set(target.get("features", [])) - flags) if flags else []
    if missing:
        fix = (f"recompile it with --target {best_x86_target(flags)}" if dev_arch == "x86_64"
               else "canao has no target for this CPU")
        raise CanaoError(f"{folder} was built for {name}, but the CPU of {info['spec']} lacks {', '.join(missing)}; {fix}")


def device_build(folder: Path, spec: str) -> Path:
    """The build a device runs: the artifact itself, or the build of an x86-64 (multi-target) artifact
    that the device's CPU flags pick, as loading picks on this machine."""
    from ..compiler import artifact
    from ..compiler.targets import X86_64

    manifest = read_manifest(folder)
    if (manifest.get("target") or {}).get("name") != X86_64:
        return folder
    info = get_device(spec).probe()
    if _ARCH_ALIASES.get(info["arch"], info["arch"]) != "x86_64":
        raise CanaoError(f"{folder} holds x86-64 builds, but {info['spec']} is {info['arch']}; recompile it with "
                         f"the target of that device")
    artifact.read_manifest(folder, here=False)  # every build's manifest against the top one's checksums
    return artifact.pick_build(folder, flags=info.get("flags") or [])


def best_x86_target(flags) -> str:
    """The widest x86 target whose features a device's flags include (what to recompile for)."""
    from ..compiler.targets import TARGETS, X86_VARIANTS

    flags = set(flags)
    for name in X86_VARIANTS:
        if set(TARGETS[name].features) <= flags:
            return name
    raise CanaoError("the device's CPU has neither AVX-512 nor AVX2+FMA; canao's x86 code generator needs one of them")


def device_target(info: dict) -> str:
    """The canao target to compile for a probed device (its widest one), or a CanaoError."""
    arch = _ARCH_ALIASES.get(info["arch"], info["arch"])
    if arch == "x86_64":
        return best_x86_target(info.get("flags", []))
    from ..compiler.targets import TARGETS

    flags = set(info.get("flags") or [])
    for name, t in TARGETS.items():
        if getattr(t, "arch", "x86_64") == arch and (not flags or set(t.features) <= flags):
            return name
    raise CanaoError(f"canao has no target for {info['spec']} ({info['arch']}, {info.get('cpu_model') or 'unknown CPU'}); "
                     f"x86_64 (AVX2 or AVX-512) and aarch64 (ARMv8.2 dot product) devices are supported")


def _file_key(folder: Path, manifest: dict, names: list[str]) -> str:
    """The copied files' identity: their manifest checksums, or their bytes when the manifest lacks one."""
    h = hashlib.sha256()
    sums = manifest.get("checksums", {})
    for name in names:
        digest = sums.get(name)
        if digest is None:
            from ..compiler.artifact import sha256

            digest = sha256(folder / name)
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()[:16]


_verified: set[tuple] = set()


def _verify(path: Path, digest: str | None) -> None:
    """What goes to the device is what was compiled: a file is hashed once per process (per size and mtime)."""
    if not digest:
        return
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns, digest)
    if stamp in _verified:
        return
    from ..compiler.artifact import sha256

    if sha256(path) != digest:
        raise CanaoError(f"{path.parent}: {path.name} does not match its checksum; the artifact is corrupted, recompile it")
    _verified.add(stamp)


def stage(artifact_dir, spec: str = "local", files: list[str] | None = None) -> tuple[Transport, str]:
    """Check the artifact against the device and copy its runner files there (once per process).
    Returns the transport and the folder on the device that holds them."""
    folder = device_build(Path(artifact_dir), spec)
    manifest = read_manifest(folder)
    if not (folder / RUNNER).is_file():
        raise CanaoError(f"{folder} has no {RUNNER} (the standalone runner); it was compiled by an older canao: "
                         f"recompile it with `canao compile`")
    names = files or [RUNNER, WEIGHTS]
    for name in names:
        if not (folder / name).is_file():
            raise CanaoError(f"{folder}: {name} is missing; the artifact is incomplete, recompile it")
    t = get_device(spec)
    check_compatible(folder, manifest, t.probe())
    for name in names:
        _verify(folder / name, manifest.get("checksums", {}).get(name))
    key = _file_key(folder, manifest, names)
    pushed = _pushed[t.spec]
    if key in pushed:
        pushed.move_to_end(key)
        return t, pushed[key]
    while len(pushed) >= KEEP_ARTIFACTS:
        t.remove(pushed.popitem(last=False)[1])
    remote = t.push([folder / n for n in names], key)
    pushed[key] = remote
    return t, remote


def run_runner(t: Transport, remote: str, args: list[str], timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run `./canao-run ARGS` in `remote` on the device; its stdout, or a CanaoError with its stderr line."""
    rc, out, err = t.run([f"./{RUNNER}", *args], timeout=timeout, cwd=remote)
    if rc == 0:
        return out
    line = _last_line(err) or _last_line(out) or "no message"
    sig = rc - 128 if rc > 128 else -rc if rc < 0 else 0
    if sig == 4:
        raise CanaoError(f"{RUNNER} on {t.spec} hit an illegal instruction (SIGILL): the CPU lacks an instruction "
                         f"the artifact uses; recompile it for that CPU's ISA")
    if sig:
        raise CanaoError(f"{RUNNER} on {t.spec} was killed by signal {sig} ({line}); "
                         f"check the device's free memory (`free`) and logs")
    if "GLIBC_" in line or "ld-linux" in line or (rc == 127 and "no such file or directory" in line.lower()):
        raise CanaoError(f"{RUNNER} cannot start on {t.spec}: {line}; the device's C library differs from this "
                         f"machine's (a host build links glibc dynamically): compile on a machine like the device")
    if rc in (126, 127):
        raise CanaoError(f"{RUNNER} could not be started on {t.spec}: {line}; its folder {remote} must allow "
                         f"executables (not mounted noexec) and the binary must match the device")
    raise CanaoError(f"{RUNNER} on {t.spec} failed (exit {rc}): {line}")


def measure(artifact_dir, device: str = "local", seq: int = 128, threads: int = 1, runs: int = 20, warmup: int = 5,
            timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Latency of one batch-1 inference at `seq` tokens on `device`, timed on the device by canao-run:
    {"seq", "threads", "runs", "warmup", "median_ms", "p90_ms", "p95_ms", "min_ms", "mean_ms", "target",
     "device": {"spec", "transport", "arch", "cpu_model", "cores", "product"}, "artifact", "precision"}."""
    folder = device_build(Path(artifact_dir), device)
    manifest = read_manifest(folder)
    max_seq = manifest.get("max_seq")
    if seq < 1 or (max_seq and seq > max_seq):
        raise CanaoError(f"--seq {seq} is outside the artifact's 1..{max_seq}; recompile with a larger --max-seq")
    for name, value in (("threads", threads), ("runs", runs)):
        if value < 1:
            raise CanaoError(f"--{name} {value} must be at least 1")
    if warmup < 0:
        raise CanaoError(f"--warmup {warmup} must be 0 or more")
    t, remote = stage(folder, device)
    out = run_runner(t, remote, [WEIGHTS, "--bench", "--seq", str(seq), "--threads", str(threads),
                                 "--warmup", str(warmup), "--runs", str(runs)], timeout=timeout)
    return _describe(parse_bench(out, t.spec), t, folder, manifest)


def _describe(result: dict, t: Transport, folder: Path, manifest: dict) -> dict:
    """A runner's result with the device it ran on and the artifact it timed."""
    info = t.probe()
    result["device"] = {k: info.get(k) for k in ("spec", "transport", "arch", "cpu_model", "cores", "product")}
    result["artifact"] = str(folder)
    result["precision"] = manifest.get("precision")
    result.setdefault("target", (manifest.get("target") or {}).get("name"))
    return result


DECODE_KEYS = ("context", "threads", "steps", "decode_ms_median", "decode_ms_p90", "tokens_per_s", "ttft_ms_median")


def measure_decode(artifact_dir, device: str = "local", context: int = 64, threads: int = 1, steps: int = 32,
                   warmup: int = 4, ttft_prompt: int = 128, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Decode speed of a decoder artifact on `device`, timed there by its canao-run --bench-decode:
    per-token milliseconds after a `context`-token prefill, tokens/s, and time to first token."""
    folder = device_build(Path(artifact_dir), device)
    manifest = read_manifest(folder)
    if manifest.get("kind") != "decoder":
        raise CanaoError(f"{folder} is an encoder artifact; measure it with --seq, not as a decoder")
    limit = int(manifest.get("max_seq") or 0)
    if context < 1 or context + warmup + steps > limit or ttft_prompt > limit:
        raise CanaoError(f"context {context} + {warmup + steps} steps (or a {ttft_prompt}-token prompt) do not fit "
                         f"the artifact's context of {limit}; recompile with a larger --max-seq")
    t, remote = stage(folder, device)
    out = run_runner(t, remote, [WEIGHTS, "--bench-decode", "--context", str(context), "--threads", str(threads),
                                 "--steps", str(steps), "--warmup", str(warmup), "--ttft-prompt", str(ttft_prompt)],
                     timeout=timeout)
    return _describe(parse_bench(out, t.spec, DECODE_KEYS), t, folder, manifest)


def parse_bench(stdout: str, spec: str, keys: tuple[str, ...] = BENCH_KEYS) -> dict:
    """canao-run --bench's (or --bench-decode's) one JSON line, the last line of its stdout, checked for
    the fields it promises."""
    line = _last_line(stdout)
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        raise CanaoError(f"{RUNNER} on {spec} printed no JSON result (last line: {line[:120]!r}); "
                         f"the artifact's runner is not the one this canao expects, recompile it") from None
    missing = [k for k in keys if k not in result] if isinstance(result, dict) else list(keys)
    if missing:
        raise CanaoError(f"{RUNNER} on {spec} left out {', '.join(missing)} from its result; recompile the artifact")
    return result
