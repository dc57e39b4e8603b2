"""The attention's renderers and buffer sizes: the row blocks that produce K and V pack K^T and V^T
(pack_kv), and the fused attention runs query rows against them (canao_kernels.h: attention_rows,
attention_rows_i8), so the scores never reach memory and no transpose copies."""

from __future__ import annotations

from ...errors import CanaoError
from ..ir import SEQ, Op
from .address import cexpr
from .plan import ARGS, kt_buffer, vt_buffer

ATT_ROWS = 18  # query rows per sweep of the fused attention over the keys: ATT_QB * ATT_QG in canao_kernels.h
ATT_MAX_HEAD_DIM = 256  # ATT_MAX_D in canao_kernels.h


def attention_dims(g, op: Op) -> tuple[int, int]:
    """(heads, head size) of an attention op."""
    shape = g.tensors[op.inputs[0]].shape
    return (shape[-3] if len(shape) >= 3 else 1), shape[-1]


class AttentionSizes:
    """K^T / V^T buffers and the per-thread scratch at the artifact's longest sequence, per precision
    of the attention's products (the layouts of canao_kernels.h)."""

    def __init__(self, g, target, max_seq: int, precision: str):
        self.g, self.t, self.max_seq, self.precision = g, target, max_seq, precision

    def key_panel_floats(self) -> int:
        """Keys rounded up to whole panels of ATT_KP = 2 vectors (canao_kernels.h): the length of a
        row of scores and of K^T; V^T's rows (whole vectors) are no longer."""
        kp = 2 * self.t.vl
        return -(-self.max_seq // kp) * kp

    def value_keys_i8(self) -> int:
        """Keys rounded up to whole integer vectors (ATT_KB = 4 vectors of bytes): int8 V^T rows."""
        kb = 4 * self.t.vl
        return -(-self.max_seq // kb) * kb

    def scratch_floats(self, ops: list[Op]) -> int:
        """ATT_ROWS query rows of scores and the same rows packed for the score tiles (canao_kernels.h);
        int8: also ATT_ROWS rows of quantized probabilities and the quantized queries (bytes)."""
        dims = [attention_dims(self.g, op)[1] for op in ops if op.kind == "attention"]
        if not dims:
            return 16
        if self.precision == "int8":
            d4 = -(-max(dims) // 4) * 4
            extra_bytes = ATT_ROWS * self.value_keys_i8() + (ATT_ROWS + 1) * d4
            return ATT_ROWS * self.key_panel_floats() + -(-extra_bytes // 4) + 16
        return ATT_ROWS * (self.key_panel_floats() + max(dims)) + 16

    def buffer_bytes(self, op: Op, which: str) -> int:
        """K^T ("kt") / V^T ("vt") buffer of one attention at the maximum length."""
        heads, d = attention_dims(self.g, op)
        sp = self.key_panel_floats()
        if self.precision == "fp32":
            return heads * d * sp * 4

        def round64(n: int) -> int:
            return -(-n // 64) * 64
        if which == "kt":  # int8 panels, then a scale and a sum per key
            return round64(heads * sp * (-(-d // 4) * 4)) + heads * sp * 8
        sv4 = self.value_keys_i8()  # int8 V^T rows, then a scale per key
        return round64(heads * d * sv4) + heads * sv4 * 4


def head_strides(gen, op: Op, name: str) -> tuple[str, str]:
    shape, st = gen.g.tensors[name].shape, gen.views[name].strides
    if cexpr(st[-1]) != "1" or shape[-2] != SEQ:
        raise CanaoError(f"codegen: {op.source}: attention operand {name} has an unsupported layout")
    return (cexpr(st[-3]) if len(shape) >= 3 and shape[-3] != 1 else "0"), cexpr(st[-2])


def render_pack_kv(gen, k, plan) -> str:
    op = k.op
    heads, d = attention_dims(gen.g, op)
    kh, ks = head_strides(gen, op, op.inputs[1])
    vh, vs = head_strides(gen, op, op.inputs[2])
    kp, vp = gen.addr.ptr(gen.views[op.inputs[1]], plan), gen.addr.ptr(gen.views[op.inputs[2]], plan)
    if gen.attention_precision == "int8":
        kb, vb = (f"(arena + {plan.offsets[b]})" for b in (kt_buffer(op), vt_buffer(op)))
        return f"""/* int8 K^T panels of {op.inputs[1]} and V^T of {op.inputs[2]} (a scale per key) for the
 * attention {op.output} (next phase), rows r0..r1 */
static void {k.name}({ARGS}) {{
    attention_pack_kv_i8(S, {heads}, {d}, {kp}, {kh}, {ks}, {vp}, {vh}, {vs}, {kb}, {vb}, {gen.t.int8_wmax}.0f, r0, r1);
}}"""
    kt = f"((float *)(arena + {plan.offsets[kt_buffer(op)]}))"
    vt = f"((float *)(arena + {plan.offsets[vt_buffer(op)]}))"
    return f"""/* K^T panels of {op.inputs[1]} and V^T of {op.inputs[2]} for the attention {op.output}
 * (next phase), rows r0..r1 */
static void {k.name}({ARGS}) {{
    attention_pack_kv(S, {heads}, {d}, {kp}, {kh}, {ks}, {kt},
                      {vp}, {vh}, {vs}, {vt}, r0, r1);
}}"""


def render_attention(gen, k, plan) -> str:
    g, op = gen.g, k.op
    q, _, v, *extra = op.inputs
    score = op.attrs["score"]
    bias = "NULL"
    if score != ("in", 0):
        if len(extra) != 1 or score not in (("add", ("in", 0), ("in", 1)), ("add", ("in", 1), ("in", 0))):
            raise CanaoError(f"codegen: {op.source}: attention score expression {score} is not supported")
        st = gen.views[extra[0]].strides
        if g.tensors[extra[0]].shape[-1] != SEQ or cexpr(st[-1]) != "1":
            raise CanaoError(f"codegen: {op.source}: attention bias must be one value per key")
        bias = gen.addr.ptr(gen.views[extra[0]], plan)
    hs, ss = {}, {}
    for name in (q, op.output):
        hs[name], ss[name] = head_strides(gen, op, name)
    heads, d = attention_dims(g, op)
    p = {name: gen.addr.ptr(gen.views[name], plan) for name in (q, op.output)}
    if gen.attention_precision == "int8":
        kb, vb = (f"(arena + {plan.offsets[b]})" for b in (kt_buffer(op), vt_buffer(op)))
        return f"""/* {op.output}: fused attention with int8 products, {heads} heads of {d}, score {score},
 * query rows r0..r1 from {op.source} */
static void {k.name}({ARGS}) {{
    attention_rows_i8(S, {heads}, {d}, {p[q]}, {hs[q]}, {ss[q]}, {kb}, {vb},
                      {p[op.output]}, {hs[op.output]}, {ss[op.output]}, {bias}, scratch, r0, r1);
}}"""
    kt = f"((float *)(arena + {plan.offsets[kt_buffer(op)]}))"
    vt = f"((float *)(arena + {plan.offsets[vt_buffer(op)]}))"
    return f"""/* {op.output}: fused attention, {heads} heads of {d}, score {score}, query rows r0..r1
 * from {op.source} */
static void {k.name}({ARGS}) {{
    attention_rows(S, {heads}, {d}, {p[q]}, {hs[q]}, {ss[q]}, {kt}, {vt},
                   {p[op.output]}, {hs[op.output]}, {ss[op.output]}, {bias}, scratch, r0, r1);
}}"""
