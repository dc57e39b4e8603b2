"""The plan of a generated program, before any C exists: its kernels in order, their phases, every
buffer's live range and its place in the arena. Data you can print (`ProgramPlan.describe`) and test.

Kernels are grouped into phases: within a phase every kernel reads only the rows of its inputs that
the same row block wrote, so a row block runs through the whole phase without synchronisation; a
kernel that reads across rows (attention reads all keys) starts a new phase, which begins when every
row block of the last one is done. Buffers live in the same phase never share memory (blocks of one
phase run in any order on any thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import CanaoError
from ..ir import SEQ, Graph, Op
from .layout import View
from .memory import Plan, plan_arena

# every kernel's C signature, and the call the phase switch makes
ARGS = "const float *W, char *arena, float *scratch, long S, long r0, long r1, const int64_t *input_ids, " \
       "const int64_t *token_type_ids, const int64_t *attention_mask"
CALL_ARGS = "W, arena, scratch, S, r0, r1, input_ids, token_type_ids, attention_mask"
KINDS = ("matmul", "layernorm", "attention", "ew")  # op kinds with a renderer (plus "pack_kt")


def kt_buffer(op: Op) -> str:
    """The attention's K^T buffer (packed by the blocks that produce K)."""
    return f"{op.output}__kt"


def vt_buffer(op: Op) -> str:
    """The attention's V^T buffer."""
    return f"{op.output}__vt"


@dataclass
class Kernel:
    """One step of the forward pass, before its C body exists: what it reads and writes
    decides its phase and the arena plan, which its body then addresses."""
    name: str
    kind: str                  # an Op kind, or "pack_kt"
    op: Op
    writes: str                # base buffer
    reads: list                # (base buffer, aligned): aligned = row r reads only row r
    partitioned: bool          # runs on row blocks; else whole, by the block starting at row 0
    phase: int = 0
    also_writes: list = field(default_factory=list)  # more buffers, written like `writes`


@dataclass
class ProgramPlan:
    kernels: list[Kernel]
    phases: int
    live: dict[str, tuple[int, int]]   # buffer -> [first, last] phase
    sizes: dict[str, int]              # buffer -> bytes at the longest sequence
    arena: Plan                        # buffer -> byte offset, peak

    def describe(self) -> str:
        """One line per kernel: phase, name, what it writes (at which arena offset) and reads."""
        lines = [f"{len(self.kernels)} kernels in {self.phases} phases, arena peak {self.arena.peak_bytes} bytes"]
        for kn in self.kernels:
            writes = ", ".join(f"{w}@{self.arena.offsets.get(w, '-')}" for w in [kn.writes, *kn.also_writes])
            reads = ", ".join(b + ("" if aligned else "*") for b, aligned in kn.reads)
            lines.append(f"  phase {kn.phase}  {kn.name:<16} writes {writes}  reads {reads}")
        return "\n".join(lines)


def rows_guard(k: Kernel, full: str) -> str:
    """An unpartitioned kernel runs whole, in the block that starts at row 0."""
    return "" if k.partitioned else f"    if (r0 != 0) return;\n    r0 = 0; r1 = {full};\n"


class Planner:
    def __init__(self, g: Graph, views: dict[str, View], kernel_ops: list[Op], row_dim):
        self.g, self.views, self.kernel_ops, self.row_dim = g, views, kernel_ops, row_dim

    def bases(self, name: str) -> list[str]:
        """The materialised buffers a read of `name` touches (an inlined gather is read through its index)."""
        base = self.views[name].base
        p = self.g.producer(base)
        if p is not None and p.attrs.get("inline"):
            return [b for x in p.inputs for b in self.bases(x)]
        return [base]

    def seq_pos(self, name: str, rank: int):
        """Position of the sequence dim of `name`, right-aligned to `rank` dims (None if it has none)."""
        shape = self.g.tensors[name].shape
        return rank - len(shape) + shape.index(SEQ) if SEQ in shape else None

    def kernels(self) -> list[Kernel]:
        g = self.g
        out: list[Kernel] = []
        writer: dict[str, int] = {}
        for op in self.kernel_ops:
            shape = g.tensors[op.output].shape
            rank = len(shape)
            if op.kind == "attention":
                part = len(shape) >= 2 and shape[-2] == SEQ
                q, kk, v, *extra = op.inputs
                (kbase,), (vbase,) = self.bases(kk), self.bases(v)
                if kbase not in writer or vbase not in writer:
                    raise CanaoError(f"codegen: {op.source}: attention keys and values must come from kernels")
                # K^T and packed V are written by the row blocks that produce K and V (one kernel, two buffers)
                at = max(writer[kbase], writer[vbase]) + 1
                out.insert(at, Kernel(f"pack_{len(out)}", "pack_kt", op, kt_buffer(op),
                                      [(kbase, True), (vbase, True)], True, also_writes=[vt_buffer(op)]))
                writer = {w: i for i, kn in enumerate(out) for w in [kn.writes, *kn.also_writes]}
                reads = [(b, part and self.seq_pos(q, rank) == rank - 2) for b in self.bases(q)]
                reads += [(kt_buffer(op), False), (vt_buffer(op), False)]
                reads += [(b, False) for x in extra for b in self.bases(x)]
            else:
                if op.kind == "ew":
                    row = shape.index(SEQ) if SEQ in shape else None
                    operands = op.inputs
                else:
                    row = self.row_dim(shape, op.source)
                    row = row if row is not None and shape[row] == SEQ else None
                    operands = [op.inputs[0], *op.inputs[3:]] if op.kind == "layernorm" else \
                        [op.inputs[0], *op.inputs[2:]]
                    if op.kind == "matmul" and not g.is_const(op.inputs[1]):
                        raise CanaoError(f"codegen: no kernel for unfused {op.kind} at {op.source}")
                part = row is not None
                reads = [(b, part and self.seq_pos(x, rank) == row) for x in operands for b in self.bases(x)]
            if op.kind not in KINDS:
                raise CanaoError(f"codegen: no kernel for unfused {op.kind} at {op.source}")
            out.append(Kernel("", op.kind, op, self.views[op.output].base, reads, part))
            writer[out[-1].writes] = len(out) - 1
        for i, kn in enumerate(out):
            kn.name = f"k{i:03d}_{kn.kind}"
        return out

    def assign_phases(self, kernels: list[Kernel]) -> int:
        """A new phase before a kernel that reads, across rows, what this phase wrote."""
        phase, written, whole = 0, set(), set()
        for kn in kernels:
            clash = any(b in written and (not aligned or b in whole or not kn.partitioned) for b, aligned in kn.reads)
            if clash:
                phase, written, whole = phase + 1, set(), set()
            kn.phase = phase
            written.update([kn.writes, *kn.also_writes])
            if not kn.partitioned:
                whole.update([kn.writes, *kn.also_writes])
        # the outputs are copied row by row at the end of the last phase
        if any(b in whole for name in self.g.outputs for b in self.bases(name)):
            phase += 1
        return phase + 1

    def liveness(self, kernels: list[Kernel], phases: int) -> dict[str, tuple[int, int]]:
        """[first, last] phase of every buffer."""
        live = {}
        for kn in kernels:
            for w in [kn.writes, *kn.also_writes]:
                live.setdefault(w, (kn.phase, kn.phase))
        for kn in kernels:
            for b, _ in kn.reads:
                if b in live:
                    live[b] = (live[b][0], max(live[b][1], kn.phase))
        for name in self.g.outputs:
            for b in self.bases(name):
                live[b] = (live[b][0], phases - 1)
        return live

    def plan(self, buffer_bytes) -> ProgramPlan:
        """buffer_bytes(name) -> bytes of a buffer at the longest sequence."""
        kernels = self.kernels()
        phases = self.assign_phases(kernels)
        live = self.liveness(kernels, phases)
        sizes = {name: buffer_bytes(name) for name in live}
        return ProgramPlan(kernels, phases, live, sizes, plan_arena(sizes, live))
