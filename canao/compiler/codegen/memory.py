"""Static memory plan: one arena, buffers placed by liveness so dead ones are reused."""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 64


@dataclass
class Plan:
    offsets: dict[str, int]  # buffer -> byte offset in the arena
    peak_bytes: int
    naive_bytes: int         # what one buffer per tensor would take


def plan_arena(sizes: dict[str, int], live: dict[str, tuple[int, int]]) -> Plan:
    """First-fit by decreasing size over [first write, last read] intervals (inclusive)."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    offsets = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        first, last = live[name]
        need = (sizes[name] + ALIGN - 1) // ALIGN * ALIGN
        clashes = sorted((o, e) for o, e, f, l in placed if not (l < first or last < f))
        at = 0
        for o, e in clashes:
            if at + need <= o:
                break
            at = max(at, e)
        offsets[name] = at
        placed.append((at, at + need, first, last))
    peak = max((e for _, e, _, _ in placed), default=0)
    return Plan(offsets, peak, sum((s + ALIGN - 1) // ALIGN * ALIGN for s in sizes.values()))
