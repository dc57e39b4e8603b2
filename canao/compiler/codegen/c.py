"""C code generation: one readable C file per model, calling into the kernel headers.

Every fused IR operator becomes one C function over a range of rows [r0, r1) of the
sequence. Matmuls get a register-blocked tile loop specialised to their shape,
schedule (from the tuner) and precision (fp32; bf16 weights; int8 with per-channel
weights and per-row activation scales), with the epilogue expression applied to the
accumulators before the only store; LayerNorms read their prologue expression
(residual, bias, embedding rows through the token index) as they fill the row;
attention runs query rows against a K^T that the row blocks producing K packed, so no
transpose or reshape ever copies.

Kernels are grouped into phases: within a phase every kernel reads only the rows of
its inputs that the same row block wrote, so a row block runs through the whole phase
without synchronisation; a kernel that reads across rows (attention reads all keys)
starts a new phase, which begins when every row block of the last one is done. The runtime
hands row blocks to its threads (canao_pool.h).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import sympy

from ...errors import CanaoError
from ..ir import SEQ, Graph, Op
from ..targets import Target
from .layout import S, View, assign_layouts
from .memory import Plan, plan_arena

ARGS = "const float *W, char *arena, float *scratch, long S, long r0, long r1, const int64_t *input_ids, " \
       "const int64_t *token_type_ids, const int64_t *attention_mask"
CALL_ARGS = "W, arena, scratch, S, r0, r1, input_ids, token_type_ids, attention_mask"
PRECISIONS = ("fp32", "bf16", "int8")
ATTENTION_PRECISIONS = ("fp32", "int8")
ATT_MAX_HEAD_DIM = 256  # ATT_MAX_D in canao_kernels.h


def default_attention(precision: str) -> str:
    """int8 products in the attention of int8 models (canao_kernels.h: attention_rows_i8), fp32 otherwise."""
    return "int8" if precision == "int8" else "fp32"

VEC_FN = {"add": "vadd", "sub": "vsub", "mul": "vmul", "div": "vdiv", "gelu": "vgelu"}
SCALAR_OP = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
ATT_ROWS = 18  # query rows per sweep of the fused attention over the keys: ATT_QB * ATT_QG in canao_kernels.h


@dataclass
class Schedule:
    """How one GEMM runs (the tuner searches these per kernel signature)."""
    mr: int        # tile rows
    nr: int        # tile columns (a multiple of the vector length)
    kc: int = 384  # K block: a panel's block (kc x nr floats) stays in L1/L2


@dataclass
class Kernel:
    """One step of the forward pass, before its C body exists: what it reads and writes
    decides its phase (barriers) and the arena plan, which its body then addresses."""
    name: str
    kind: str                  # an Op kind, or "pack_kt"
    op: Op
    writes: str                # base buffer
    reads: list                # (base buffer, aligned): aligned = row r reads only row r
    partitioned: bool          # runs on row blocks; else whole, by the block starting at row 0
    phase: int = 0
    also_writes: list = field(default_factory=list)  # more buffers, written like `writes`


@dataclass
class Program:
    source: str
    weights: bytes
    plan: Plan
    scratch_floats: int  # per thread
    kernels: list[str] = field(default_factory=list)
    phases: int = 1
    attention: str = "fp32"  # precision of the attention's products


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
        self.q_scratch_floats = 0  # per-thread room for a row block's quantized activations
        self.views = assign_layouts(g)
        self.kernel_ops = [op for op in g.compute_ops() if not op.attrs.get("inline")]
        if any(self.attention_dims(op)[1] > ATT_MAX_HEAD_DIM for op in self.kernel_ops if op.kind == "attention"):
            self.attention_precision = "fp32"  # the int8 attention's per-key buffers stop at ATT_MAX_D
        self.blob = bytearray()
        self.const_off: dict[str, int] = {}  # const name (or name@packed) -> float offset in W
        self.tiles: set[tuple[str, int, int]] = set()  # (kind, mr, nr)

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

    def blob_array(self, key: str, arr: np.ndarray, ctype: str) -> str:
        """Store any array (int8 panels, int32 column sums, bf16) 64-byte aligned; a typed C pointer."""
        if key not in self.const_off:
            self.blob += b"\0" * (-len(self.blob) % 64)
            self.const_off[key] = len(self.blob) // 4
            self.blob += np.ascontiguousarray(arr).tobytes()
        return f"((const {ctype} *)(W + {self.const_off[key]}))"

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

    def schedule(self, op: Op) -> Schedule:
        return self.schedules.get(op.output) or Schedule(self.t.gemm_mr, self.t.gemm_nr)

    @staticmethod
    def rows_guard(k: Kernel, full: str) -> str:
        """An unpartitioned kernel runs whole, in the block that starts at row 0."""
        return "" if k.partitioned else f"    if (r0 != 0) return;\n    r0 = 0; r1 = {full};\n"

    def tile_fn(self, kind: str, mr: int, nr: int) -> str:
        return TILE_SOURCES[kind](mr, nr, self.t.vl)

    def matmul(self, k: Kernel, plan: Plan) -> str:
        g, op = self.g, k.op
        a_name, w_name = op.inputs[:2]
        kk, n = g.consts[w_name].shape
        mode = self.gemm_mode(kk, n)
        sch = self.gemm_schedule(op)
        self.tiles.add((mode, sch.mr, sch.nr))
        out_shape = g.tensors[op.output].shape
        a_ptr, a_cs = self.row_access(a_name, out_shape[:-1] + (kk,), "", plan, op.source)
        if a_cs != 1 and kk != 1:
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
        pre_code = "\n".join(" " * 20 + p for p in pre)
        kc = min(kk, sch.kc)
        w = g.consts[w_name]
        if mode == "int8":
            panels, colsum, scales = quantize_int8(w, sch.nr, self.t.int8_wmax, self.t.int8_act_offset)
            weights = (f"    const int8_t *P = {self.blob_array(w_name + f'@q{sch.nr}', panels, 'int8_t')};\n"
                       f"    const int32_t *CS = {self.blob_array(w_name + f'@cs{sch.nr}', colsum, 'int32_t')};\n"
                       f"    const float *SW = {self.blob_array(w_name + f'@sw{sch.nr}', scales, 'float')};\n")
            body = gemm_loop_int8(sch, kk, n, pre_code, expr)
            act = (f"u8 = q + {self.t.int8_act_offset}, minus the column sums" if self.t.int8_act_offset
                   else "s8, no offset")
            what = (f"int8: weights per-column symmetric in [-{self.t.int8_wmax}, {self.t.int8_wmax}], activations per row "
                    f"({act}), int32 accumulation")
            self.q_scratch_floats = max(self.q_scratch_floats, 2 * self.max_seq + 32 + self.max_seq * (-(-kk // 4)))
        elif mode == "bf16dot":
            weights = f"    const uint16_t *P = {self.blob_array(w_name + f'@bp{sch.nr}', pack_bf16_pairs(w, sch.nr), 'uint16_t')};\n"
            body = gemm_loop_bf16dot(sch, kk, n, pre_code, expr)
            what = "bf16 activations x bf16 weights (vdpbf16ps), fp32 accumulation"
            self.q_scratch_floats = max(self.q_scratch_floats, self.max_seq * (-(-kk // 2)) + 32)
        elif mode == "bf16":
            self.q_scratch_floats = max(self.q_scratch_floats, packed_a_floats(sch, kk, self.max_seq))
            weights = f"    const uint16_t *P = {self.blob_array(w_name + f'@b{sch.nr}', to_bf16(pack_panels(w, sch.nr)), 'uint16_t')};\n"
            body = gemm_loop(sch, kk, n, pre_code, expr, "_bf16")
            what = "bf16 weights widened to fp32 in registers, fp32 activations and accumulation"
        else:
            self.q_scratch_floats = max(self.q_scratch_floats, packed_a_floats(sch, kk, self.max_seq))
            weights = f"    const float *P = {self.weight(w_name, sch.nr)};\n"
            body = gemm_loop(sch, kk, n, pre_code, expr)
            what = "fp32"
        header = f"""/* {op.output}: [{self.rows_expr(out_shape)} x {kk}] x [{kk} x {n}] (packed {sch.nr}-column panels), epilogue {op.attrs.get('epilogue', 'none')}
 * from {op.source}
 * {what}
 * schedule: {sch.mr}x{sch.nr} tiles, K in blocks of {kc}; rows r0..r1 (a row block: its A block stays in L2,
 * a panel's K block in L1 while every tile of the block uses it). */
static void {k.name}({ARGS}) {{
{self.rows_guard(k, self.rows_expr(out_shape))}    const long lda = {lda}, ldc = {ldc};
    const float *A = {a_ptr};
{weights}    float *C = {self.ptr(c_view, plan)};
    (void)S; (void)scratch;
"""
        return header + body + "}"

    def gemm_schedule(self, op: Op) -> Schedule:
        kk, n = self.g.consts[op.inputs[1]].shape
        if self.gemm_mode(kk, n) in ("f32", "bf16") or op.output in self.schedules:
            return self.schedule(op)
        return Schedule(*self.t.int8_tile, kk)

    def label(self, kn: Kernel) -> str:
        """What CANAO_PROFILE prints for a kernel: its name, and a GEMM's shape and tile."""
        if kn.kind != "matmul":
            return kn.name
        kk, n = self.g.consts[kn.op.inputs[1]].shape
        sch = self.gemm_schedule(kn.op)
        epi = " " + kn.op.attrs["epilogue"][0] if kn.op.attrs.get("epilogue") else ""
        return f"{kn.name} K{kk} N{n} {sch.mr}x{sch.nr}/{min(kk, sch.kc)}{epi}"

    def gemm_mode(self, k: int, n: int) -> str:
        return gemm_mode(self.precision, self.t, n)

    def layernorm(self, k: Kernel, plan: Plan) -> str:
        g, op = self.g, k.op
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
        # folded into the next linear (passes.fold_layernorm_affine): normalise only
        affine = f"{self.weight(gamma)}, {self.weight(beta)}" if op.attrs.get("affine", True) else "NULL, NULL"
        return f"""/* {op.output}: LayerNorm over {n} of prologue {op.attrs.get('prologue', 'x')}, in one pass over the row
 * from {op.source} */
static void {k.name}({ARGS}) {{
{self.rows_guard(k, self.rows_expr(out_shape))}    const int N = {n};
    float *Y = {self.ptr(out, plan)};
    (void)S;
    for (long r = r0; r < r1; r++) {{
        float *y = Y + r * {ldy};
{pre_code}
        for (int c = 0; c < N; c += VL) {{
            const int n = N - c;
            vstore_n(y + c, {expr}, n);
        }}
        layernorm_row(y, N, {affine}, {_float(op.attrs['eps'])});
    }}
}}"""

    def head_strides(self, op: Op, name: str) -> tuple[str, str]:
        shape, st = self.g.tensors[name].shape, self.views[name].strides
        if cexpr(st[-1]) != "1" or shape[-2] != SEQ:
            raise CanaoError(f"codegen: {op.source}: attention operand {name} has an unsupported layout")
        return (cexpr(st[-3]) if len(shape) >= 3 and shape[-3] != 1 else "0"), cexpr(st[-2])

    def attention_dims(self, op: Op) -> tuple[int, int]:
        shape = self.g.tensors[op.inputs[0]].shape
        return (shape[-3] if len(shape) >= 3 else 1), shape[-1]

    def kt_buffer(self, op: Op) -> str:
        return f"{op.output}__kt"

    def vt_buffer(self, op: Op) -> str:
        return f"{op.output}__vt"

    def key_panel_floats(self) -> int:
        """Keys rounded up to whole panels of ATT_KP = 2 vectors (canao_kernels.h): the length of a
        row of scores and of K^T; V^T's rows (whole vectors) are no longer."""
        kp = 2 * self.t.vl
        return -(-self.max_seq // kp) * kp

    def value_keys_i8(self) -> int:
        """Keys rounded up to whole integer vectors (ATT_KB = 4 vectors of bytes): int8 V^T rows."""
        kb = 4 * self.t.vl
        return -(-self.max_seq // kb) * kb

    def attention_scratch_floats(self) -> int:
        """ATT_ROWS query rows of scores and the same rows packed for the score tiles (canao_kernels.h);
        int8: also ATT_ROWS rows of quantized probabilities and the quantized queries (bytes)."""
        dims = [self.attention_dims(op)[1] for op in self.kernel_ops if op.kind == "attention"]
        if not dims:
            return 16
        if self.attention_precision == "int8":
            d4 = -(-max(dims) // 4) * 4
            extra_bytes = ATT_ROWS * self.value_keys_i8() + (ATT_ROWS + 1) * d4
            return ATT_ROWS * self.key_panel_floats() + -(-extra_bytes // 4) + 16
        return ATT_ROWS * (self.key_panel_floats() + max(dims)) + 16

    def attention_buffer_bytes(self, op: Op, which: str) -> int:
        """K^T / V^T buffer of one attention at the maximum length (canao_kernels.h layouts)."""
        heads, d = self.attention_dims(op)
        sp = self.key_panel_floats()
        if self.attention_precision == "fp32":
            return heads * d * sp * 4
        def round64(n: int) -> int:
            return -(-n // 64) * 64
        if which == "kt":  # int8 panels, then a scale and a sum per key
            return round64(heads * sp * (-(-d // 4) * 4)) + heads * sp * 8
        sv4 = self.value_keys_i8()  # int8 V^T rows, then a scale per key
        return round64(heads * d * sv4) + heads * sv4 * 4

    def pack_kt(self, k: Kernel, plan: Plan) -> str:
        op = k.op
        heads, d = self.attention_dims(op)
        kh, ks = self.head_strides(op, op.inputs[1])
        vh, vs = self.head_strides(op, op.inputs[2])
        kp, vp = self.ptr(self.views[op.inputs[1]], plan), self.ptr(self.views[op.inputs[2]], plan)
        if self.attention_precision == "int8":
            kb, vb = (f"(arena + {plan.offsets[b]})" for b in (self.kt_buffer(op), self.vt_buffer(op)))
            return f"""/* int8 K^T panels of {op.inputs[1]} and V^T of {op.inputs[2]} (a scale per key) for the
 * attention {op.output} (next phase), rows r0..r1 */
static void {k.name}({ARGS}) {{
    attention_pack_kv_i8(S, {heads}, {d}, {kp}, {kh}, {ks}, {vp}, {vh}, {vs}, {kb}, {vb}, {self.t.int8_wmax}.0f, r0, r1);
}}"""
        kt = f"((float *)(arena + {plan.offsets[self.kt_buffer(op)]}))"
        vt = f"((float *)(arena + {plan.offsets[self.vt_buffer(op)]}))"
        return f"""/* K^T panels of {op.inputs[1]} and V^T of {op.inputs[2]} for the attention {op.output}
 * (next phase), rows r0..r1 */
static void {k.name}({ARGS}) {{
    attention_pack_kv(S, {heads}, {d}, {kp}, {kh}, {ks}, {kt},
                      {vp}, {vh}, {vs}, {vt}, r0, r1);
}}"""

    def attention(self, k: Kernel, plan: Plan) -> str:
        g, op = self.g, k.op
        q, _, v, *extra = op.inputs
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
        for name in (q, op.output):
            hs[name], ss[name] = self.head_strides(op, name)
        heads, d = self.attention_dims(op)
        p = {name: self.ptr(self.views[name], plan) for name in (q, op.output)}
        if self.attention_precision == "int8":
            kb, vb = (f"(arena + {plan.offsets[b]})" for b in (self.kt_buffer(op), self.vt_buffer(op)))
            return f"""/* {op.output}: fused attention with int8 products, {heads} heads of {d}, score {score},
 * query rows r0..r1 from {op.source} */
static void {k.name}({ARGS}) {{
    attention_rows_i8(S, {heads}, {d}, {p[q]}, {hs[q]}, {ss[q]}, {kb}, {vb},
                      {p[op.output]}, {hs[op.output]}, {ss[op.output]}, {bias}, scratch, r0, r1);
}}"""
        kt = f"((float *)(arena + {plan.offsets[self.kt_buffer(op)]}))"
        vt = f"((float *)(arena + {plan.offsets[self.vt_buffer(op)]}))"
        return f"""/* {op.output}: fused attention, {heads} heads of {d}, score {score}, query rows r0..r1
 * from {op.source} */
static void {k.name}({ARGS}) {{
    attention_rows(S, {heads}, {d}, {p[q]}, {hs[q]}, {ss[q]}, {kt}, {vt},
                   {p[op.output]}, {hs[op.output]}, {ss[op.output]}, {bias}, scratch, r0, r1);
}}"""

    def elementwise(self, k: Kernel, plan: Plan) -> str:
        """A loose elementwise expression (the attention mask): tiny, so plain scalar loops."""
        g, op = self.g, k.op
        shape = g.tensors[op.output].shape
        idx = [f"i{d}" for d in range(len(shape))]
        seq_dim = shape.index(SEQ) if SEQ in shape else None
        loops = "".join(f"{'    ' * (d + 1)}for (long i{d} = {'r0' if d == seq_dim else 0}; "
                        f"i{d} < {'r1' if d == seq_dim else s}; i{d}++)\n" for d, s in enumerate(shape))

        def at(name):
            st = self.aligned_strides(name, shape) if name != op.output else self.views[name].strides
            terms = [f"{i} * {cexpr(s)}" for i, s in zip(idx, st) if cexpr(s) != "0"]
            return f"{self.ptr(self.views[name], plan)}[{' + '.join(terms) or '0'}]"
        expr = self.sexpr(op.attrs["expr"], {i: at(n) for i, n in enumerate(op.inputs)})
        guard = "" if k.partitioned else "    if (r0 != 0) return;\n"
        return f"""/* {op.output}: elementwise {op.attrs['expr']}
 * from {op.source} */
static void {k.name}({ARGS}) {{
{guard}    (void)S; (void)r0; (void)r1;
{loops}{'    ' * (len(shape) + 1)}{at(op.output)} = {expr};
}}"""

    def input_rows(self, name: str) -> int:
        """Rows of the smallest table the input indexes (ids must lie below it); 0 if it indexes none."""
        rows = [self.g.consts[op.inputs[0]].shape[0] for op in self.g.ops
                if op.kind == "gather" and op.attrs.get("index") == "tensor" and op.inputs[1] == name]
        return min(rows, default=0)

    # -- phases, liveness, program -------------------------------------------
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
                out.insert(at, Kernel(f"pack_{len(out)}", "pack_kt", op, self.kt_buffer(op),
                                      [(kbase, True), (vbase, True)], True, also_writes=[self.vt_buffer(op)]))
                writer = {w: i for i, kn in enumerate(out) for w in [kn.writes, *kn.also_writes]}
                reads = [(b, part and self.seq_pos(q, rank) == rank - 2) for b in self.bases(q)]
                reads += [(self.kt_buffer(op), False), (self.vt_buffer(op), False)]
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
            if op.kind not in ("matmul", "layernorm", "attention", "ew"):
                raise CanaoError(f"codegen: no kernel for unfused {op.kind} at {op.source}")
            out.append(Kernel("", op.kind, op, self.views[op.output].base, reads, part))
            writer[out[-1].writes] = len(out) - 1
        for i, kn in enumerate(out):
            kn.name = f"k{i:03d}_{kn.kind}"
        return out

    def assign_phases(self, kernels: list[Kernel]) -> int:
        """A new phase (a barrier) before a kernel that reads, across rows, what this phase wrote."""
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
        """[first, last] phase of every buffer: blocks of one phase run in any order on any
        thread, so buffers live in the same phase never share memory."""
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

    def buffer_bytes(self, name: str) -> int:
        if name.endswith(("__kt", "__vt")):
            op = next(o for o in self.kernel_ops if name in (self.kt_buffer(o), self.vt_buffer(o)))
            return self.attention_buffer_bytes(op, name[-2:])
        return self.g.tensors[name].nbytes(self.max_seq)

    def program(self) -> Program:
        g = self.g
        kernels = self.kernels()
        phases = self.assign_phases(kernels)
        live = self.liveness(kernels, phases)
        plan = plan_arena({name: self.buffer_bytes(name) for name in live}, live)
        gens = {"matmul": self.matmul, "layernorm": self.layernorm, "attention": self.attention,
                "ew": self.elementwise, "pack_kt": self.pack_kt}
        bodies = share_bodies([gens[kn.kind](kn, plan) for kn in kernels], [kn.name for kn in kernels])
        copies = []
        for i, name in enumerate(g.outputs):
            shape = g.tensors[name].shape
            if [d for d in shape if d != 1] != [SEQ]:
                raise CanaoError(f"codegen: output {i} has shape {shape}; only per-token outputs are supported")
            st = cexpr(self.views[name].strides[shape.index(SEQ)])
            copies.append(f"        for (long s = r0; s < r1; s++) outputs[{i}][s] = {self.ptr(self.views[name], plan)}[s * {st}];")
        cases = []
        for ph in range(phases):
            calls = [f"        KCALL({i}, {kn.name}({CALL_ARGS}));" for i, kn in enumerate(kernels) if kn.phase == ph]
            if ph == phases - 1:
                calls += copies
            cases.append(f"    case {ph}:\n" + "\n".join(calls) + "\n        break;")
        scratch = max(self.attention_scratch_floats(), self.q_scratch_floats)
        tiles = "\n\n".join(self.tile_fn(*t) for t in sorted(self.tiles))
        mrs = sorted({mr for _, mr, _ in self.tiles} | {self.t.gemm_mr})
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
const long canao_weight_bytes = {len(self.blob)}, canao_num_outputs = {len(g.outputs)};
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

{tiles}

{chr(10).join(chr(10) + b for b in bodies)}

void canao_phase(int phase, const float *W, char *arena, float *scratch, long S, long r0, long r1,
                 const int64_t *input_ids, const int64_t *token_type_ids, const int64_t *attention_mask,
                 float *const *outputs) {{
    switch (phase) {{
{chr(10).join(cases)}
    }}
}}
"""
        return Program(src, bytes(self.blob), plan, scratch, [kn.name for kn in kernels], phases,
                       self.attention_precision)


def tile_source(mr: int, nr: int, vl: int, bf16: bool = False) -> str:
    """The register tile: mr x nr accumulators; one K step = nr/vl loads, mr broadcasts, mr*nr/vl FMAs.
    A comes packed [K][mr] (one sequential stream for the broadcasts, whatever the row stride).
    bf16: the panel holds bf16 weights, widened to fp32 as they are loaded."""
    nv = nr // vl
    wtype, suffix, load = ("uint16_t", "_bf16", "vload_bf16") if bf16 else ("float", "", "vload")
    lines = [f"/* {mr} x {nr} register tile: acc = Ap[K][{mr}] x panel[K][{nr}] */",
             f"static inline __attribute__((always_inline)) void tile_{mr}x{nr}{suffix}"
             f"(const float *Ap, const {wtype} *w, int K, vf acc[{mr}][{nv}]) {{"]
    for r in range(mr):
        lines.append("    " + " ".join(f"vf c{r}_{j} = vzero();" for j in range(nv)))
    lines.append("#pragma GCC unroll 4")
    lines.append(f"    for (int k = 0; k < K; k++, w += {nr}, Ap += {mr}) {{")
    lines.append("        " + " ".join(f"vf b{j} = {load}(w + {j * vl});" for j in range(nv)))
    for r in range(mr):
        body = " ".join(f"c{r}_{j} = vfma(x{r}, b{j}, c{r}_{j});" for j in range(nv))
        lines.append(f"        vf x{r} = vset1(Ap[{r}]); {body}")
    lines.append("    }")
    for r in range(mr):
        lines.append("    " + " ".join(f"acc[{r}][{j}] = c{r}_{j};" for j in range(nv)))
    lines.append("}")
    return "\n".join(lines)


def packed_a_floats(sch: Schedule, k: int, rows: int) -> int:
    """Per-thread scratch for a row block's A, packed per row tile: [rows/mr][kc][mr] floats."""
    return (-(-rows // sch.mr) * sch.mr) * min(k, sch.kc) + 64


def _pair_tile(mr: int, nr: int, vl: int, int8: bool) -> str:
    """Tiles whose K step covers a group of activations broadcast as one 32-bit value:
    int8 (4 u8 activations x 4 s8 weights per lane, s32 accumulators) or bf16 pairs (vdpbf16ps)."""
    nv = nr // vl
    g, at, wt, acc_t, zero, dot, name = (4, "uint8_t", "int8_t", "vi", "vizero()", "vdot_u8s8", "tileq") if int8 else \
        (2, "uint16_t", "uint16_t", "vf", "vzero()", "vdot_bf16", "tilebd")
    lines = [f"/* {mr} x {nr} {'int8' if int8 else 'bf16-pair'} tile over K/{g} steps (rows past m repeat the last) */",
             f"static inline __attribute__((always_inline)) void {name}_{mr}x{nr}"
             f"(const {at} *A, long lda, int m, const {wt} *w, int KG, {acc_t} acc[{mr}][{nv}]) {{"]
    for r in range(mr):
        lines.append(f"    const {at} *a{r} = A + (long)MIN({r}, m - 1) * lda;")
    for r in range(mr):
        lines.append("    " + " ".join(f"{acc_t} c{r}_{j} = {zero};" for j in range(nv)))
    lines.append("#pragma GCC unroll 4")
    lines.append(f"    for (int k = 0; k < KG; k++, w += {g * nr}) {{")
    lines.append("        " + " ".join(f"vi b{j} = viload(w + {j * g * vl});" for j in range(nv)))
    for r in range(mr):
        body = " ".join(f"c{r}_{j} = {dot}(c{r}_{j}, x{r}, b{j});" for j in range(nv))
        lines.append(f"        vi x{r} = vibcast4(a{r} + {g} * k); {body}")
    lines.append("    }")
    for r in range(mr):
        lines.append("    " + " ".join(f"acc[{r}][{j}] = c{r}_{j};" for j in range(nv)))
    lines.append("}")
    return "\n".join(lines)


TILE_SOURCES = {
    "f32": tile_source,
    "bf16": lambda mr, nr, vl: tile_source(mr, nr, vl, bf16=True),
    "int8": lambda mr, nr, vl: _pair_tile(mr, nr, vl, True),
    "bf16dot": lambda mr, nr, vl: _pair_tile(mr, nr, vl, False),
}


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


def gemm_mode(precision: str, target: Target, n: int) -> str:
    """f32 | bf16 (weights only) | bf16dot | int8. Outputs narrower than a vector (the QA head) stay fp32."""
    if precision == "fp32" or n < target.vl:
        return "f32"
    if precision == "bf16":
        return "bf16dot" if target.bf16_dot else "bf16"
    return "int8"


def quantize_int8(w: np.ndarray, nr: int, wmax: int, act_offset: int = 128):
    """Per-column symmetric int8 in [-wmax, wmax], packed [N/nr][K/4][nr][4] (4 K values of a column
    in one 32-bit lane); the column sums times the activation offset (128 for u8 activations, 0 where
    the dot product is s8 x s8); the column scales."""
    k, n = w.shape
    scale = np.abs(w).max(axis=0) / wmax
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -wmax, wmax).astype(np.int8)
    kp, panels = -(-k // 4) * 4, -(-n // nr)
    qp = np.zeros((kp, panels * nr), np.int8)
    qp[:k, :n] = q
    packed = np.ascontiguousarray(qp.reshape(kp // 4, 4, panels, nr).transpose(2, 0, 3, 1))
    colsum = (act_offset * qp.astype(np.int32).sum(axis=0)).astype(np.int32)
    scales = np.ones(panels * nr, np.float32)
    scales[:n] = scale
    return packed, colsum, scales


def to_bf16(w: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def pack_bf16_pairs(w: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> bf16 [N/nr][K/2][nr][2] (vdpbf16ps reads a column's two K values per lane)."""
    k, n = w.shape
    kp, panels = -(-k // 2) * 2, -(-n // nr)
    padded = np.zeros((kp, panels * nr), np.float32)
    padded[:k, :n] = w
    return np.ascontiguousarray(to_bf16(padded).reshape(kp // 2, 2, panels, nr).transpose(2, 0, 3, 1))


def prefetch_setup(mr: int, panel_bytes: str, indent: int) -> str:
    """Before the panel loop: how many cache lines of the next panel each row tile prefetches."""
    pad = " " * indent
    return (f"{pad}const int tiles = (int)((r1 - r0 + {mr - 1}) / {mr});\n"
            f"{pad}const long pf_lines = ({panel_bytes} + 63) / 64, pf_step = (pf_lines + tiles - 1) / tiles;\n")


def prefetch_next(mr: int, next_panel: str, indent: int) -> str:
    """In the row-tile loop: this tile's slice of the next panel into L2. The weights are read once per
    forward pass, from memory: without it the first tile of every panel waits for them."""
    pad = " " * indent
    return (f"{pad}if (p + 1 < NP) {{\n"
            f"{pad}    const char *nxt = (const char *)({next_panel});\n"
            f"{pad}    const long l0 = (i0 - r0) / {mr} * pf_step;\n"
            f"{pad}    for (long l = l0; l < MIN(l0 + pf_step, pf_lines); l++) __builtin_prefetch(nxt + l * 64, 0, 2);\n"
            f"{pad}}}\n")


def gemm_loop_int8(sch: Schedule, k: int, n: int, pre_code: str = "", expr: str = "x") -> str:
    """int8 GEMM over rows r0..r1: quantize the block's activation rows (per-row scale) into the thread's
    scratch, then s32 tiles; the epilogue removes the +128 offset's column sums and rescales."""
    kp = -(-k // 4) * 4
    return f"""    const int K = {k}, KP = {kp}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    float *SA = scratch;
    uint8_t *AQ = (uint8_t *)(scratch + (r1 - r0 + 15) / 16 * 16);
    for (long r = r0; r < r1; r++) SA[r - r0] = quantize_row_u8(A + r * lda, K, AQ + (r - r0) * KP, KP);
{prefetch_setup(sch.mr, f"(long)KP * {sch.nr}", 4)}    for (int p = 0; p < NP; p++)
        for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
            const int m = (int)MIN({sch.mr}, r1 - i0);
{prefetch_next(sch.mr, f"P + (long)(p + 1) * KP * {sch.nr}", 12)}            vi acc[{sch.mr}][{sch.nr} / VL];
            tileq_{sch.mr}x{sch.nr}(AQ + (i0 - r0) * KP, KP, m, P + (long)p * KP * {sch.nr}, KP / 4, acc);
#pragma GCC unroll {sch.mr}
            for (int r = 0; r < {sch.mr}; r++) {{
                if (r >= m) break;
                const long row = i0 + r;
                const vf sa = vset1(SA[row - r0]);
{pre_code}
#pragma GCC unroll 8
                for (int j = 0; j < {sch.nr} / VL; j++) {{
                    const int c = p * {sch.nr} + j * VL, n = N - c;
                    if (n <= 0) break;
                    vf x = vmul(vcvt_i32(visub(acc[r][j], viload(CS + c))), vmul(sa, vload(SW + c)));
                    x = {expr};
                    vstore_n(C + row * ldc + c, x, n);
                }}
            }}
        }}
"""


def gemm_loop_bf16dot(sch: Schedule, k: int, n: int, pre_code: str = "", expr: str = "x") -> str:
    """bf16 x bf16 GEMM over rows r0..r1 (vdpbf16ps): the block's activation rows become bf16 in scratch."""
    kp = -(-k // 2) * 2
    return f"""    const int K = {k}, KP = {kp}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    uint16_t *AB = (uint16_t *)scratch;
    for (long r = r0; r < r1; r++) convert_row_bf16(A + r * lda, K, AB + (r - r0) * KP, KP);
{prefetch_setup(sch.mr, f"(long)KP * {sch.nr} * 2", 4)}    for (int p = 0; p < NP; p++)
        for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
            const int m = (int)MIN({sch.mr}, r1 - i0);
{prefetch_next(sch.mr, f"P + (long)(p + 1) * KP * {sch.nr}", 12)}            vf acc[{sch.mr}][{sch.nr} / VL];
            tilebd_{sch.mr}x{sch.nr}(AB + (i0 - r0) * KP, KP, m, P + (long)p * KP * {sch.nr}, KP / 2, acc);
#pragma GCC unroll {sch.mr}
            for (int r = 0; r < {sch.mr}; r++) {{
                if (r >= m) break;
                const long row = i0 + r;
{pre_code}
#pragma GCC unroll 8
                for (int j = 0; j < {sch.nr} / VL; j++) {{
                    const int c = p * {sch.nr} + j * VL, n = N - c;
                    if (n <= 0) break;
                    vf x = acc[r][j];
                    x = {expr};
                    vstore_n(C + row * ldc + c, x, n);
                }}
            }}
        }}
"""


def gemm_loop(sch: Schedule, k: int, n: int, pre_code: str = "", expr: str = "x", tile_suffix: str = "") -> str:
    """The body of a GEMM over rows r0..r1: C = epilogue(A[rows, K] x P), given A, lda, P, C, ldc in scope."""
    kc = min(k, sch.kc)
    nv_expr = f"{sch.nr} / VL"
    esize = 2 if tile_suffix == "_bf16" else 4
    return f"""    const int K = {k}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    float *AP = scratch;  /* the block's A, packed per row tile: [tile][{kc}][{sch.mr}] */
    for (int k0 = 0; k0 < K; k0 += {kc}) {{
        const int kc = MIN({kc}, K - k0), last = k0 + kc == K;
        for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
            const int m = (int)MIN({sch.mr}, r1 - i0);
            float *dst = AP + (i0 - r0) / {sch.mr} * {kc * sch.mr}L;
            for (int r = 0; r < {sch.mr}; r++) {{  /* rows past m repeat the last */
                const float *src = A + (i0 + MIN(r, m - 1)) * lda + k0;
                for (int k = 0; k < kc; k++) dst[k * {sch.mr} + r] = src[k];
            }}
        }}
{prefetch_setup(sch.mr, f"(long)kc * {sch.nr} * {esize}", 8)}        for (int p = 0; p < NP; p++)
            for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
                const int m = (int)MIN({sch.mr}, r1 - i0);
{prefetch_next(sch.mr, f"P + ((long)(p + 1) * K + k0) * {sch.nr}", 16)}                vf acc[{sch.mr}][{nv_expr}];
                tile_{sch.mr}x{sch.nr}{tile_suffix}(AP + (i0 - r0) / {sch.mr} * {kc * sch.mr}L, P + ((long)p * K + k0) * {sch.nr}, kc, acc);
#pragma GCC unroll {sch.mr}
                for (int r = 0; r < {sch.mr}; r++) {{
                    if (r >= m) break;
                    const long row = i0 + r;
{pre_code}
#pragma GCC unroll 8
                    for (int j = 0; j < {nv_expr}; j++) {{
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
"""


def generate(g: Graph, target: Target, max_seq: int, schedules: dict[str, Schedule] | None = None,
             block_rows: int = 128, precision: str = "fp32", attention: str | None = None) -> Program:
    """attention: precision of the attention's two products (ATTENTION_PRECISIONS; default: default_attention)."""
    return _Gen(g, target, max_seq, schedules or {}, block_rows, precision, attention).program()
