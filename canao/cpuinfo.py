"""What a CPU is, from /proc/cpuinfo text: its ISA flags, a readable name and its core count.

One parser for this machine (the compiler's host target, the name recorded with every timing) and
for a device's /proc/cpuinfo read over ssh or adb (canao.device)."""

from __future__ import annotations

import functools
from pathlib import Path

# ARM Ltd. (implementer 0x41) core part numbers, for a readable CPU name on boards and phones.
_ARM_PARTS = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
              0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
              0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd40: "Neoverse-V1", 0xd41: "Cortex-A78",
              0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2",
              0xd49: "Neoverse-N2", 0xd4d: "Cortex-A715", 0xd4e: "Cortex-X3", 0xd4f: "Neoverse-V2",
              0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4"}


def parse_cpuinfo(text: str) -> dict:
    """x86 flags / arm Features, a CPU name and the core count from /proc/cpuinfo text."""
    info = {"flags": [], "cpu_model": None, "cores": 0}
    parts = []
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        key = key.lower()
        if key == "processor":
            info["cores"] += 1
        elif key in ("flags", "features") and not info["flags"]:
            info["flags"] = value.split()
        elif key == "model name" and not info["cpu_model"]:
            info["cpu_model"] = value
        elif key == "hardware" and not info["cpu_model"]:
            info["cpu_model"] = value
        elif key == "cpu part":
            try:
                parts.append(int(value, 16))
            except ValueError:
                pass
    if not info["cpu_model"] and parts:
        # big.LITTLE: name each core type once, in the order the kernel lists them
        names = [_ARM_PARTS.get(p, f"ARM part {p:#x}") for p in dict.fromkeys(parts)]
        info["cpu_model"] = " + ".join(names)
    return info


@functools.lru_cache(maxsize=1)
def host_cpuinfo() -> dict:
    """parse_cpuinfo of this machine ({"flags": [], "cpu_model": None, "cores": 0} without /proc/cpuinfo)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return parse_cpuinfo("")
