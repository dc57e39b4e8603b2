"""Targets are data: the ISA features a build needs, its compiler flags and vector shape."""

from __future__ import annotations

from dataclasses import dataclass
import platform

from ..cpuinfo import host_cpuinfo
from ..errors import CanaoError


@dataclass(frozen=True)
class Target:
    name: str
    features: tuple[str, ...]   # /proc/cpuinfo flags the generated code executes
    cflags: tuple[str, ...]
    vec_header: str             # the kernels' vector layer for this ISA
    vl: int                     # fp32 lanes per vector register
    gemm_mr: int                # default microkernel rows (the tuner may pick others)
    gemm_nr: int                # default microkernel columns (a multiple of vl)
    int8_wmax: int = 63         # int8 weight range: 63 where u8 x s8 pair sums saturate at 16 bits (vpmaddubsw)
    bf16_dot: bool = False      # vdpbf16ps: bf16 activations x bf16 weights, fp32 accumulation
    int8_tile: tuple = (4, 16)  # default int8 register tile (rows, columns)
    int8_act_offset: int = 128  # added to int8 activations: u8 for vpmaddubsw/vpdpbusd; 0 where sdot takes s8 x s8
    arch: str = "x86_64"        # the machine the code runs on (platform.machine())
    cc: str = ""                # cross compiler, when arch is not the host's ($CANAO_<NAME>_CC overrides)


TARGETS = {
    "avx512": Target("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
                     ("-march=x86-64-v4", "-mtune=znver3", "-mprefer-vector-width=512"), "vec_avx512.h", 16, 8, 32,
                     int8_tile=(8, 32)),
    # Zen 4 / Sapphire Rapids class: VNNI (vpdpbusd, full-range int8 weights) and AVX512-BF16
    "avx512_vnni": Target("avx512_vnni", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_vnni",
                                          "avx512_bf16"),
                          ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mtune=znver3",
                           "-mprefer-vector-width=512"), "vec_avx512.h", 16, 8, 32, 127, True, (8, 32)),
    "avx2": Target("avx2", ("avx2", "fma"), ("-march=x86-64-v3", "-mtune=znver3"), "vec_avx2.h", 8, 6, 16),
    # ARMv8.2-A phones and boards (Cortex-A55/A76 and later): NEON, and sdot for int8 (s8 x s8, so the
    # activations need no offset and the weights use the full int8 range). Cross-compiled, run by canao-run.
    "aarch64": Target("aarch64", ("asimd", "asimddp"), ("-march=armv8.2-a+dotprod", "-mtune=cortex-a76"),
                      "vec_neon.h", 4, 6, 16, int8_wmax=127, int8_tile=(4, 16), int8_act_offset=0,
                      arch="aarch64", cc="aarch64-linux-gnu-gcc"),
}


# the x86 targets, widest first: the host picks the first it runs, and `--target x86-64` writes one
# artifact with a build for each, the first the CPU runs picked at load ($CANAO_X86_VARIANT forces one)
X86_64 = "x86-64"
X86_VARIANTS = ("avx512_vnni", "avx512", "avx2")


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def is_cross(target: Target) -> bool:
    """Code for another machine: compiled here, run there (or under qemu) by canao-run."""
    return target.arch != host_arch()


def cpu_flags() -> set[str]:
    """The ISA flags of this machine's CPU (x86 flags, ARM Features)."""
    return set(host_cpuinfo()["flags"])


def cpu_model() -> str:
    """The processor's name, recorded with every timing and tuning result."""
    return host_cpuinfo()["cpu_model"] or platform.processor() or platform.machine()


def host_target() -> Target:
    """The widest target this CPU runs."""
    flags = cpu_flags()
    if host_arch() == "aarch64":
        if set(TARGETS["aarch64"].features) <= flags:
            return TARGETS["aarch64"]
        raise CanaoError("this ARM CPU lacks the dot-product instructions (asimddp) canao's aarch64 target needs")
    for name in X86_VARIANTS:
        if set(TARGETS[name].features) <= flags:
            return TARGETS[name]
    raise CanaoError("this CPU has neither AVX-512 nor AVX2+FMA; canao's x86 code generator needs one of them")


def get_target(name: str) -> Target:
    if name == "host":
        return host_target()
    if name not in TARGETS:
        raise CanaoError(f"unknown target '{name}'; choose host, {X86_64} (every x86 build, picked at load) "
                         f"or one of {sorted(TARGETS)}")
    return TARGETS[name]


def missing_features(target: Target) -> list[str]:
    if is_cross(target):
        return sorted(target.features)
    return sorted(set(target.features) - cpu_flags())
