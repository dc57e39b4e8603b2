"""C code generation: one readable C file per model, calling into the kernel headers.

A plan first (codegen.plan: the kernels in order, their phases, every buffer's live range and arena
offset), then one renderer per kernel kind writes each kernel's C over a range of rows [r0, r1):

    matmul     codegen.gemm      register-blocked tiles per weight format (fp32, bf16, bf16 pairs, int8),
                                 the fused epilogue applied before the only store
    layernorm  codegen.rowwise   its prologue (residual, bias, embedding rows through the token index)
                                 read as it fills the row
    ew         codegen.rowwise   loose elementwise expressions (the attention mask)
    pack_kt    codegen.attention K^T / V^T packed by the row blocks that produce K and V
    attention  codegen.attention query rows against them: no transpose or reshape ever copies

Weights are packed into one blob as the kernels read them (codegen.weights); addresses and fused
expressions come from codegen.address. The runtime (canao_runtime.c) hands row blocks to its threads
(canao_pool.h); a phase starts when every row block of the last one is done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ...errors import CanaoError
from ..ir import SEQ, Graph
from ..targets import Target
from .address import Addressing, cexpr
from .attention import ATT_MAX_HEAD_DIM, ATT_ROWS, AttentionSizes, attention_dims, render_attention, render_pack_kv
from .gemm import TILE_SOURCES, Schedule, matmul_label, render_matmul
from .layout import assign_layouts
from .memory import Plan
from .plan import ARGS, CALL_ARGS, Kernel, Planner, ProgramPlan, kt_buffer, vt_buffer
from .rowwise import render_elementwise, render_layernorm
from .weights import WeightBlob

PRECISIONS = ("fp32", "bf16", "int8")
ATTENTION_PRECISIONS = ("fp32", "int8")
RENDERERS = {"layernorm": render_layernorm, "attention": render_attention, "ew": render_elementwise,
             "pack_kt": render_pack_kv}  # and matmul: render_matmul (it also reports its tile and scratch)


def default_attention(precision: str) -> str:
    """int8 products in the attention of int8 models (canao_kernels.h: attention_rows_i8), fp32 otherwise."""
    return "int8" if precision == "int8" else "fp32"


@dataclass
class Program:
    source: str
    weights: bytes
    plan: Plan
    scratch_floats: int  # per thread
    kernels: list[str] = field(default_factory=list)
    phases: int = 1
    attention: str = "fp32"  # precision of the attention's products


class _Gen:
    """The context the renderers read (graph, target, views, addressing, weight blob, schedules) and
    the assembly of the C file."""

    def __init__(self, g: Graph, target: Target, max_seq: int, schedules: dict[str, Schedule], block_rows: int,
                 precision: str = "fp32", attention: str | None = None):
        if precision not in PRECISIONS:
            raise CanaoError(f"codegen: unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
        attention = attention or default_attention(precision)
        if attention not in ATTENTION_PRECISIONS:
            raise CanaoError(f"codegen: unknown attention precision '{attention}'; choose one of "
                             f"{', '.join(ATTENTION_PRECISIONS)}")
        self.g, self.t, self.max_seq, self.schedules, self.block_rows = g, target, max_seq, schedules, block_rows
        self.precision, self.attention_precision = precision, attention
        self.views = assign_layouts(g)
        self.blob = WeightBlob()
        self.addr = Addressing(g, self.views, self.blob)
        self.kernel_ops = [op for op in g.compute_ops() if not op.attrs.get("inline")]
        if any(attention_dims(g, op)[1] > ATT_MAX_HEAD_DIM for op in self.kernel_ops if op.kind == "attention"):
            self.attention_precision = "fp32"  # the int8 attention's per-key buffers stop at ATT_MAX_D
        self.att = AttentionSizes(g, target, max_seq, self.attention_precision)
        self.planner = Planner(g, self.views, self.kernel_ops, self.addr.row_dim)

    def buffer_bytes(self, name: str) -> int:
        if name.endswith(("__kt", "__vt")):
            op = next(o for o in self.kernel_ops if name in (kt_buffer(o), vt_buffer(o)))
            return self.att.buffer_bytes(op, name[-2:])
        return self.g.tensors[name].nbytes(self.max_seq)

    def plan(self) -> ProgramPlan:
        return self.planner.plan(self.buffer_bytes)

    def label(self, kn: Kernel) -> str:
        """What CANAO_PROFILE prints for a kernel: its name, and a GEMM's shape and tile."""
        return matmul_label(self, kn) if kn.kind == "matmul" else kn.name

    def input_rows(self, name: str) -> int:
        """Rows of the smallest table the input indexes (ids must lie below it); 0 if it indexes none."""
        rows = [self.g.consts[op.inputs[0]].shape[0] for op in self.g.ops
                if op.kind == "gather" and op.attrs.get("index") == "tensor" and op.inputs[1] == name]
        return min(rows, default=0)

    def program(self) -> Program:
        g = self.g
        pp = self.plan()
        kernels, phases, plan = pp.kernels, pp.phases, pp.arena
        sources, tiles, q_scratch = [], set(), 0
        for kn in kernels:
            if kn.kind == "matmul":
                src, tile, floats = render_matmul(self, kn, plan)
                tiles.add(tile)
                q_scratch = max(q_scratch, floats)
            else:
                src = RENDERERS[kn.kind](self, kn, plan)
            sources.append(src)
        bodies = share_bodies(sources, [kn.name for kn in kernels])
        copies = []
        for i, name in enumerate(g.outputs):
            shape = g.tensors[name].shape
            if [d for d in shape if d != 1] != [SEQ]:
                raise CanaoError(f"codegen: output {i} has shape {shape}; only per-token outputs are supported")
            st = cexpr(self.views[name].strides[shape.index(SEQ)])
            copies.append(f"        for (long s = r0; s < r1; s++) outputs[{i}][s] = {self.addr.ptr(self.views[name], plan)}[s * {st}];")
        cases = []
        for ph in range(phases):
            calls = [f"        KCALL({i}, {kn.name}({CALL_ARGS}));" for i, kn in enumerate(kernels) if kn.phase == ph]
            if ph == phases - 1:
                calls += copies
            cases.append(f"    case {ph}:\n" + "\n".join(calls) + "\n        break;")
        scratch = max(self.att.scratch_floats(self.kernel_ops), q_scratch)
        tile_src = "\n\n".join(TILE_SOURCES[kind](mr, nr, self.t.vl) for kind, mr, nr in sorted(tiles))
        mrs = sorted({mr for _, mr, _ in tiles} | {self.t.gemm_mr})
        quantum = int(np.lcm.reduce(mrs))
        quantum = quantum if quantum <= 24 else max(mrs)
        # rounded up, not down: 128 rows in one block, not 120 + 8 (every block re-reads the weights;
        # BERT-base at sequence 128 ran 8 % slower in two blocks)
        block_rows = -(-self.block_rows // quantum) * quantum
        barriers = sum(1 for kn in kernels[1:] if kn.phase != kernels[kernels.index(kn) - 1].phase)
        src = f"""/* Generated by canao for target {self.t.name}: {len(kernels)} kernels in {phases} phases, max sequence {self.max_seq},
 * precision {self.precision}, attention products {self.attention_precision}.
 * W: packed weights (weights.bin); arena: activations, placed by liveness ({plan.peak_bytes} bytes peak).
 * The runtime (canao_runtime.c) runs each phase's kernels on row blocks [r0, r1) taken by the
 * threads in any order; a phase starts when every block of the last one is done ({barriers} joins per forward pass). */
#include "{self.t.vec_header}"
#include "canao_kernels.h"
_Static_assert(CANAO_ACT_OFFSET == {self.t.int8_act_offset}, "int8 column sums assume another activation offset");
_Static_assert(ATT_ROWS == {ATT_ROWS} && ATT_KP == 2 * VL, "the attention scratch and K^T panels were sized for other tiles");

#define SCRATCH_FLOATS {scratch}L
const long canao_max_seq = {self.max_seq}, canao_arena_bytes = {plan.peak_bytes}, canao_scratch_floats = SCRATCH_FLOATS;
const long canao_weight_bytes = {len(self.blob.data)}, canao_num_outputs = {len(g.outputs)};
const long canao_block_rows = {block_rows}, canao_row_quantum = {quantum};
const int canao_num_phases = {phases};
const char canao_target[] = "{self.t.name}";
const long canao_vocab_size = {self.input_rows('input_ids')}, canao_type_vocab_size = {self.input_rows('token_type_ids')};

/* CANAO_PROFILE=1: the runtime times every kernel call (canao_runtime.c prints the table at close) */
const int canao_num_kernels = {len(kernels)};
const char *const canao_kernel_names[] = {{{", ".join(chr(34) + self.label(kn) + chr(34) for kn in kernels)}}};
extern int canao_profiling;
long canao_profile_begin(void);
void canao_profile_end(int kernel, long t0);
#define KCALL(i, call) do {{ if (__builtin_expect(canao_profiling, 0)) {{ const long t0_ = canao_profile_begin(); call; \\
    canao_profile_end(i, t0_); }} else {{ call; }} }} while (0)

{tile_src}

{chr(10).join(chr(10) + b for b in bodies)}

void canao_phase(int phase, const float *W, char *arena, float *scratch, long S, long r0, long r1,
                 const int64_t *input_ids, const int64_t *token_type_ids, const int64_t *attention_mask,
                 float *const *outputs) {{
    switch (phase) {{
{chr(10).join(cases)}
    }}
}}
"""
        return Program(src, bytes(self.blob.data), plan, scratch, [kn.name for kn in kernels], phases,
                       self.attention_precision)


_CONST_PTR = re.compile(r"\(\(const (\w+) \*\)\(W \+ \d+\)\)|\(\(float \*\)\(arena \+ \d+\)\)|\(W \+ \d+\)")


def share_bodies(sources: list[str], names: list[str]) -> list[str]:
    """Kernels that differ only in their buffers' addresses (the same layer shape, layer after
    layer) share one body: each kernel becomes a comment and a call passing its addresses.
    A third of the C for a 12-layer model, so the C compiler has a twelfth of the GEMMs to build."""
    shared: dict[str, str] = {}
    out, defs = [], []
    for src, name in zip(sources, names):
        head, sep, body = src.partition(f"static void {name}({ARGS}) {{")
        if not sep:
            out.append(src)
            continue
        args, types = [], []

        def param(m):
            args.append(m.group(0))
            types.append(f"const {m.group(1)} *" if m.group(1) else
                         "float *" if "arena" in m.group(0) else "const float *")
            return f"p{len(args) - 1}"
        generic = _CONST_PTR.sub(param, body)
        sig = ", ".join(f"{t}p{i}" for i, t in enumerate(types))
        key = sig + "|" + generic
        if key not in shared:
            shared[key] = f"body{len(shared):03d}"
            defs.append(f"static void {shared[key]}({ARGS}{', ' if sig else ''}{sig}) {{" + generic)
        out.append(f"{head}static void {name}({ARGS}) {{\n    {shared[key]}({CALL_ARGS}"
                   f"{', ' if args else ''}{', '.join(args)});\n}}")
    return defs + out


def generate(g: Graph, target: Target, max_seq: int, schedules: dict[str, Schedule] | None = None,
             block_rows: int = 128, precision: str = "fp32", attention: str | None = None) -> Program:
    """attention: precision of the attention's two products (ATTENTION_PRECISIONS; default: default_attention)."""
    return _Gen(g, target, max_seq, schedules or {}, block_rows, precision, attention).program()


def plan_program(g: Graph, target: Target, max_seq: int, precision: str = "fp32",
                 attention: str | None = None) -> ProgramPlan:
    """The plan generate() renders (kernels, phases, live ranges, arena), without rendering it."""
    return _Gen(g, target, max_seq, {}, 128, precision, attention).plan()
