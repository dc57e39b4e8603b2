"""C code generation: one readable C file per model, calling into the kernel headers.

Every fused IR operator becomes one C function. Matmuls get a register-blocked
tile loop specialised to their shape and schedule, with the epilogue expression
applied to the accumulators before the only store; LayerNorms read their
prologue expression (residual, bias, embedding rows through the token index)
as they fill the row; attention calls the fused kernel with the strides the
layout pass derived, so no transpose or reshape ever copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy

from ...errors import CanaoError
from ..ir import SEQ, Graph, Op
from ..targets import Target
from .layout import S, View, assign_layouts
from .memory import Plan, plan_arena

ARGS = "const float *W, char *arena, float *scratch, long S, const int64_t *input_ids, " \
       "const int64_t *token_type_ids, const int64_t *attention_mask"
VEC_FN = {"add": "vadd", "sub": "vsub", "mul": "vmul", "div": "vdiv", "gelu": "vgelu"}
SCALAR_OP = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass
class Schedule:
    mr: int        # tile rows
    nr: int        # tile columns (a multiple of the vector length)
    kc: int = 384  # K block: a panel's block (kc x nr floats) stays in L1
    mc: int = 288  # row block: A's block (mc x kc floats) stays in L2


@dataclass
class Program:
    source: str
    weights: bytes
    plan: Plan
    scratch_floats: int  # per thread
    kernels: list[str] = field(default_factory=list)


def cexpr(e) -> str:
    return sympy.ccode(sympy.expand(e))


def _float(c: float) -> str:
    return repr(float(np.float32(c))) + "f"


def pack_panels(w: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> [ceil(N/nr), K, nr], zero-padded: a microkernel reads one panel sequentially."""
    k, n = w.shape
    panels = -(-n // nr)
    padded = np.zeros((k, panels * nr), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, nr).transpose(1, 0, 2))


class _Gen:
    def __init__(self, g: Graph, target: Target, max_seq: int, schedules: dict[str, Schedule]):
        self.g, self.t, self.max_seq, self.schedules = g, target, max_seq, schedules
        self.views = assign_layouts(g)
        self.kernel_ops = [op for op in g.compute_ops() if not op.attrs.get("inline")]
        self.blob = bytearray()
        self.const_off: dict[str, int] = {}  # const name (or name@packed) -> float offset in W
        self.tiles: set[tuple[int, int]] = set()

    # -- weights ----------------------------------------------------------
    def weight(self, name: str, packed_nr: int = 0) -> str:
        key = f"{name}@{packed_nr}"
        if key not in self.const_off:
            arr = self.g.consts[name]
            arr = pack_panels(arr, packed_nr) if packed_nr else arr
            self.blob += b"\0" * (-len(self.blob) % 64)
            self.const_off[key] = len(self.blob) // 4
            self.blob += np.ascontiguousarray(arr, np.float32).tobytes()
        return f"(W + {self.const_off[key]})"

    # -- addressing -------------------------------------------------------
    def base_ptr(self, base: str, plan: Plan) -> str:
        if base in self.g.inputs:
            return base
        if self.g.is_const(base):
            return self.weight(base)
        return f"((float *)(arena + {plan.offsets[base]}))"

    def ptr(self, view: View, plan: Plan) -> str:
        off = cexpr(view.offset)
        return self.base_ptr(view.base, plan) if off == "0" else f"({self.base_ptr(view.base, plan)} + {off})"

    def aligned_strides(self, name: str, out_shape: tuple) -> list:
        """`name`'s strides broadcast against the output's dims (right-aligned)."""
        shape, strides = self.g.tensors[name].shape, self.views[name].strides
        lead = len(out_shape) - len(shape)
        return [sympy.Integer(0) if i < lead or shape[i - lead] == 1 else strides[i - lead]
                for i in range(len(out_shape))]

    def row_dim(self, shape: tuple, where: str) -> int | None:
        big = [i for i, d in enumerate(shape[:-1]) if d != 1]
        if len(big) > 1:
            raise CanaoError(f"codegen: {where}: output {shape} has several row dims")
        return big[0] if big else None

    def row_access(self, name: str, out_shape: tuple, row: str, plan: Plan, where: str):
        """(C pointer to the row's first element, column stride 0|1) for a leaf read per row."""
        st = self.aligned_strides(name, out_shape)
        rd = self.row_dim(out_shape, where)
        if st[-1] not in (0, 1):
            raise CanaoError(f"codegen: {where}: operand {name} is not contiguous along its last dim")
        rs = cexpr(st[rd]) if rd is not None else "0"
        producer = self.g.producer(self.views[name].base)
        view = self.views[name]
        if producer is not None and producer.kind == "gather":  # read the table row through the index
            width = self.g.tensors[producer.output].shape[-1]
            if cexpr(view.offset) != "0" or rs != str(width):
                raise CanaoError(f"codegen: {where}: strided read of an inlined gather")
            table = self.weight(producer.inputs[0])
            if producer.attrs["index"] == "iota":
                index = row
            else:
                ix = self.views[producer.inputs[1]]
                ist = self.aligned_strides(producer.inputs[1], out_shape[:-1])
                index = f"{self.ptr(ix, plan)}[{row} * {cexpr(ist[rd]) if rd is not None else 0}]"
            return f"{table} + {index} * {width}", st[-1]
        return (f"{self.ptr(view, plan)} + {row} * {rs}" if row else self.ptr(view, plan)), st[-1]

    # -- expressions --------------------------------------------------------
    def vexpr(self, e, leaves: dict[int, str]) -> str:
        if e[0] == "in":
            return leaves[e[1]]
        if e[0] == "const":
            return f"vset1({_float(e[1])})"
        if e[0] not in VEC_FN:
            raise CanaoError(f"codegen: '{e[0]}' inside a vector kernel is not supported")
        return f"{VEC_FN[e[0]]}({', '.join(self.vexpr(x, leaves) for x in e[1:])})"

    def sexpr(self, e, leaves: dict[int, str]) -> str:
        if e[0] == "in":
            return leaves[e[1]]
        if e[0] == "const":
            return _float(e[1])
        args = [self.sexpr(x, leaves) for x in e[1:]]
        if e[0] in SCALAR_OP:
            return f"({args[0]} {SCALAR_OP[e[0]]} {args[1]})"
        return {"gelu": f"sgelu({args[0]})", "to_float": f"((float){args[0]})"}[e[0]]

    def leaf_loads(self, op: Op, slots: dict[int, str], out_shape, row, plan, pre: list[str]) -> dict[int, str]:
        """Declare one row pointer per leaf (into `pre`) and return each leaf's vector load at column c."""
        loads = {}
        for slot, name in slots.items():
            p, cs = self.row_access(name, out_shape, row, plan, op.source)
            pre.append(f"const float *in{slot} = {p};")
            loads[slot] = f"vload_n(in{slot} + c, n)" if cs == 1 else f"vset1(in{slot}[0])"
        return loads

    # -- kernels ------------------------------------------------------------
    def rows_expr(self, shape) -> str:
        rd = self.row_dim(shape, "")
        return "1" if rd is None else ("S" if shape[rd] == SEQ else str(shape[rd]))

    def tile_fn(self, mr: int, nr: int) -> str:
        nv = nr // self.t.vl
        lines = [f"/* {mr} x {nr} register tile: acc += A[m rows, K] * panel[K, {nr}] (rows past m repeat the last) */",
                 f"static inline __attribute__((always_inline)) void tile_{mr}x{nr}"
                 f"(const float *A, long lda, int m, const float *w, int K, vf acc[{mr}][{nv}]) {{"]
        for r in range(mr):
            lines.append(f"    const float *a{r} = A + (long)MIN({r}, m - 1) * lda;")
        for r in range(mr):
            lines.append("    " + " ".join(f"vf c{r}_{j} = vzero();" for j in range(nv)))
        lines.append("    for (int k = 0; k < K; k++, w += %d) {" % nr)
        lines.append("        " + " ".join(f"vf b{j} = vload(w + {j * self.t.vl});" for j in range(nv)))
        for r in range(mr):
            body = " ".join(f"c{r}_{j} = vfma(x{r}, b{j}, c{r}_{j});" for j in range(nv))
            lines.append(f"        vf x{r} = vset1(a{r}[k]); {body}")
        lines.append("    }")
        for r in range(mr):
            lines.append("    " + " ".join(f"acc[{r}][{j}] = c{r}_{j};" for j in range(nv)))
        lines.append("}")
        return "\n".join(lines)

    def matmul(self, fn: str, op: Op, plan: Plan) -> str:
        g = self.g
        a_name, w_name = op.inputs[:2]
        k, n = g.consts[w_name].shape
        sch = self.schedules.get(op.output) or Schedule(self.t.gemm_mr, self.t.gemm_nr)
        self.tiles.add((sch.mr, sch.nr))
        nv = sch.nr // self.t.vl
        out_shape = g.tensors[op.output].shape
        a_ptr, a_cs = self.row_access(a_name, out_shape[:-1] + (k,), "", plan, op.source)
        if a_cs != 1 and k != 1:
            raise CanaoError(f"codegen: {op.source}: matmul input is not contiguous along K")
        rd = self.row_dim(g.tensors[a_name].shape, op.source)
        lda = cexpr(self.views[a_name].strides[rd]) if rd is not None else "0"
        c_view = self.views[op.output]
        ldc = cexpr(c_view.strides[self.row_dim(out_shape, op.source)]) if self.row_dim(out_shape, "") is not None else "0"
        pre: list[str] = []
        leaves = {0: "x"}
        leaves.update(self.leaf_loads(op, {i + 1: name for i, name in enumerate(op.inputs[2:])},
                                      out_shape, "row", plan, pre))
        expr = self.vexpr(op.attrs.get("epilogue", ("in", 0)), leaves)
        pre_code = "\n".join(" " * 24 + p for p in pre)
        kc = min(k, sch.kc)
        return f"""/* {op.output}: [{self.rows_expr(out_shape)} x {k}] x [{k} x {n}] (packed {sch.nr}-column panels), epilogue {op.attrs.get('epilogue', 'none')}
 * from {op.source}
 * schedule: {sch.mr}x{sch.nr} tiles; K in blocks of {kc}, rows in blocks of {sch.mc} (A block stays in L2,
 * a panel's K block in L1); threads split the panels (or the rows when panels are few). */
static void {fn}({ARGS}) {{
    const long M = {self.rows_expr(out_shape)}, lda = {lda}, ldc = {ldc};
    const int K = {k}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    const float *A = {a_ptr};
    const float *P = {self.weight(w_name, sch.nr)};
    float *C = {self.ptr(c_view, plan)};
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    int p_begin = 0, p_end = NP;
    long r_begin = 0, r_end = M;
    if (NP >= 2 * T || M <= {sch.mr}) {{ p_begin = NP * t / T; p_end = NP * (t + 1) / T; }}
    else {{ const long MB = (M + {sch.mr - 1}) / {sch.mr}; r_begin = MB * t / T * {sch.mr}; r_end = MIN(M, MB * (t + 1) / T * {sch.mr}); }}
    for (int k0 = 0; k0 < K; k0 += {kc}) {{
        const int kc = MIN({kc}, K - k0), last = k0 + kc == K;
        for (long ic = r_begin; ic < r_end; ic += {sch.mc})
            for (int p = p_begin; p < p_end; p++)
                for (long i0 = ic; i0 < MIN(ic + {sch.mc}, r_end); i0 += {sch.mr}) {{
                    const int m = (int)MIN({sch.mr}, r_end - i0);
                    vf acc[{sch.mr}][{nv}];
                    tile_{sch.mr}x{sch.nr}(A + i0 * lda + k0, lda, m, P + ((long)p * K + k0) * {sch.nr}, kc, acc);
#pragma GCC unroll {sch.mr}
                    for (int r = 0; r < {sch.mr}; r++) {{
                        if (r >= m) break;
                        const long row = i0 + r;
{pre_code}
#pragma GCC unroll {nv}
                        for (int j = 0; j < {nv}; j++) {{
                            const int c = p * {sch.nr} + j * VL, n = N - c;
                            if (n <= 0) break;
                            vf x = acc[r][j];
                            if (k0 > 0) x = vadd(x, vload_n(C + row * ldc + c, n));
                            if (last) x = {expr};
                            vstore_n(C + row * ldc + c, x, n);
                        }}
                    }}
                }}
    }}
#pragma omp barrier
}}"""

    def layernorm(self, fn: str, op: Op, plan: Plan) -> str:
        g = self.g
        x, gamma, beta, *extra = op.inputs
        out_shape = g.tensors[op.output].shape
        n = out_shape[-1]
        pre: list[str] = []
        leaves = self.leaf_loads(op, {0: x, **{i + 1: e for i, e in enumerate(extra)}}, out_shape, "r", plan, pre)
        expr = self.vexpr(op.attrs.get("prologue", ("in", 0)), leaves)
        out = self.views[op.output]
        rd = self.row_dim(out_shape, op.source)
        ldy = cexpr(out.strides[rd]) if rd is not None else "0"
        pre_code = "\n".join(" " * 8 + p for p in pre)
        return f"""/* {op.output}: LayerNorm over {n} of prologue {op.attrs.get('prologue', 'x')}, in one pass over the row
 * from {op.source} */
static void {fn}({ARGS}) {{
    const long M = {self.rows_expr(out_shape)};
    const int N = {n};
    float *Y = {self.ptr(out, plan)};
#pragma omp for schedule(static)
    for (long r = 0; r < M; r++) {{
        float *y = Y + r * {ldy};
{pre_code}
        for (int c = 0; c < N; c += VL) {{
            const int n = N - c;
            vstore_n(y + c, {expr}, n);
        }}
        layernorm_row(y, N, {self.weight(gamma)}, {self.weight(beta)}, {_float(op.attrs['eps'])});
    }}
}}"""

    def attention(self, fn: str, op: Op, plan: Plan) -> str:
        g = self.g
        q, k, v, *extra = op.inputs
        score = op.attrs["score"]
        bias = "NULL"
        if score != ("in", 0):
            if len(extra) != 1 or score not in (("add", ("in", 0), ("in", 1)), ("add", ("in", 1), ("in", 0))):
                raise CanaoError(f"codegen: {op.source}: attention score expression {score} is not supported")
            st = self.views[extra[0]].strides
            if g.tensors[extra[0]].shape[-1] != SEQ or cexpr(st[-1]) != "1":
                raise CanaoError(f"codegen: {op.source}: attention bias must be one value per key")
            bias = self.ptr(self.views[extra[0]], plan)
        hs, ss = {}, {}
        for name in (q, k, v, op.output):
            shape, st = g.tensors[name].shape, self.views[name].strides
            if cexpr(st[-1]) != "1" or shape[-2] != SEQ:
                raise CanaoError(f"codegen: {op.source}: attention operand {name} has an unsupported layout")
            hs[name] = cexpr(st[-3]) if len(shape) >= 3 and shape[-3] != 1 else "0"
            ss[name] = cexpr(st[-2])
        shape = g.tensors[q].shape
        heads = shape[-3] if len(shape) >= 3 else 1
        d = shape[-1]
        p = {name: self.ptr(self.views[name], plan) for name in (q, k, v, op.output)}
        return f"""/* {op.output}: fused attention, {heads} heads of {d}, score {score}
 * from {op.source} */
static void {fn}({ARGS}) {{
    attention((int)S, {heads}, {d}, {p[q]}, {hs[q]}, {ss[q]}, {p[k]}, {hs[k]}, {ss[k]},
              {p[v]}, {hs[v]}, {ss[v]}, {p[op.output]}, {hs[op.output]}, {ss[op.output]},
              {bias}, scratch, SCRATCH_FLOATS);
}}"""

    def elementwise(self, fn: str, op: Op, plan: Plan) -> str:
        """A loose elementwise expression (the attention mask): tiny, so plain scalar loops."""
        g = self.g
        shape = g.tensors[op.output].shape
        idx = [f"i{d}" for d in range(len(shape))]
        loops = "".join(f"{'    ' * (d + 1)}for (long i{d} = 0; i{d} < {'S' if s == SEQ else s}; i{d}++)\n"
                        for d, s in enumerate(shape))
        def at(name):
            st = self.aligned_strides(name, shape) if name != op.output else self.views[name].strides
            terms = [f"{i} * {cexpr(s)}" for i, s in zip(idx, st) if cexpr(s) != "0"]
            return f"{self.ptr(self.views[name], plan)}[{' + '.join(terms) or '0'}]"
        expr = self.sexpr(op.attrs["expr"], {k: at(n) for k, n in enumerate(op.inputs)})
        return f"""/* {op.output}: elementwise {op.attrs['expr']}
 * from {op.source} */
static void {fn}({ARGS}) {{
#pragma omp single
    {{
{loops}{'    ' * (len(shape) + 1)}{at(op.output)} = {expr};
    }}
}}"""

    # -- whole program -------------------------------------------------------
    def liveness(self) -> dict[str, tuple[int, int]]:
        live = {}
        for i, op in enumerate(self.kernel_ops):
            live.setdefault(op.output, (i, i))
        base_of = {name: v.base for name, v in self.views.items()}

        def bases(name):  # an inlined gather is read through its index, so its index is what is live
            p = self.g.producer(base_of[name])
            return [b for x in p.inputs for b in bases(x)] if p is not None and p.attrs.get("inline") else [base_of[name]]

        for i, op in enumerate(self.kernel_ops):
            for name in op.inputs:
                for b in bases(name):
                    if b in live:
                        live[b] = (live[b][0], max(live[b][1], i))
        end = len(self.kernel_ops)
        for name in self.g.outputs:
            b = base_of[name]
            live[b] = (live[b][0], end)
        return live

    def program(self) -> Program:
        g = self.g
        live = self.liveness()
        sizes = {name: g.tensors[name].nbytes(self.max_seq) for name in live}
        plan = plan_arena(sizes, live)
        bodies, calls = [], []
        for i, op in enumerate(self.kernel_ops):
            fn = f"k{i:03d}_{op.kind}"
            gen = {"matmul": self.matmul, "layernorm": self.layernorm, "attention": self.attention,
                   "ew": self.elementwise}.get(op.kind)
            if gen is None or (op.kind == "matmul" and not g.is_const(op.inputs[1])):
                raise CanaoError(f"codegen: no kernel for unfused {op.kind} at {op.source}")
            bodies.append(gen(fn, op, plan))
            calls.append(f"        {fn}(W, arena, scratch, S, input_ids, token_type_ids, attention_mask);")
        copies = []
        for i, name in enumerate(g.outputs):
            shape = g.tensors[name].shape
            if [d for d in shape if d != 1] != [SEQ]:
                raise CanaoError(f"codegen: output {i} has shape {shape}; only per-token outputs are supported")
            st = cexpr(self.views[name].strides[shape.index(SEQ)])
            copies.append(f"            for (long s = 0; s < S; s++) outputs[{i}][s] = {self.ptr(self.views[name], plan)}[s * {st}];")
        heads_d = [g.tensors[op.inputs[0]].shape[-1] for op in self.kernel_ops if op.kind == "attention"]
        sp = -(-self.max_seq // self.t.vl) * self.t.vl
        scratch = (max(heads_d, default=0) + 4) * sp + 16
        tiles = "\n\n".join(self.tile_fn(mr, nr) for mr, nr in sorted(self.tiles | {(self.t.gemm_mr, self.t.gemm_nr)}))
        src = f"""/* Generated by canao for target {self.t.name}: {len(self.kernel_ops)} kernels, max sequence {self.max_seq}.
 * W: packed weights (weights.bin); arena: activations, placed by liveness ({plan.peak_bytes} bytes peak). */
#include "{self.t.vec_header}"
#include "canao_kernels.h"

#define SCRATCH_FLOATS {scratch}L
const long canao_max_seq = {self.max_seq}, canao_arena_bytes = {plan.peak_bytes}, canao_scratch_floats = SCRATCH_FLOATS;
const long canao_weight_bytes = {len(self.blob)}, canao_num_outputs = {len(g.outputs)};
const char canao_target[] = "{self.t.name}";

{tiles}

{chr(10).join(chr(10) + b for b in bodies)}

void canao_forward(const float *W, char *arena, float *scratch, int threads, long S, const int64_t *input_ids,
                   const int64_t *token_type_ids, const int64_t *attention_mask, float *const *outputs) {{
#pragma omp parallel num_threads(threads)
    {{
{chr(10).join(calls)}
#pragma omp single
        {{
{chr(10).join(copies)}
        }}
    }}
}}
"""
        return Program(src, bytes(self.blob), plan, scratch,
                       [f"k{i:03d}_{op.kind}" for i, op in enumerate(self.kernel_ops)])


def generate(g: Graph, target: Target, max_seq: int, schedules: dict[str, Schedule] | None = None) -> Program:
    return _Gen(g, target, max_seq, schedules or {}).program()
