"""Renderers of the row-wise kernels: LayerNorm (its fused prologue read as the row fills) and the loose
elementwise expressions left after fusion (the attention mask)."""

from __future__ import annotations

from ..ir import SEQ
from .address import cexpr, cfloat
from .plan import ARGS, rows_guard


def render_layernorm(gen, k, plan) -> str:
    g, op, addr = gen.g, k.op, gen.addr
    x, gamma, beta, *extra = op.inputs
    out_shape = g.tensors[op.output].shape
    n = out_shape[-1]
    pre: list[str] = []
    leaves = addr.leaf_loads(op, {0: x, **{i + 1: e for i, e in enumerate(extra)}}, out_shape, "r", plan, pre)
    expr = addr.vexpr(op.attrs.get("prologue", ("in", 0)), leaves)
    out = gen.views[op.output]
    rd = addr.row_dim(out_shape, op.source)
    ldy = cexpr(out.strides[rd]) if rd is not None else "0"
    pre_code = "\n".join(" " * 8 + p for p in pre)
    # folded into the next linear (passes.fold_layernorm_affine): normalise only
    affine = f"{addr.weight(gamma)}, {addr.weight(beta)}" if op.attrs.get("affine", True) else "NULL, NULL"
    return f"""/* {op.output}: LayerNorm over {n} of prologue {op.attrs.get('prologue', 'x')}, in one pass over the row
 * from {op.source} */
static void {k.name}({ARGS}) {{
{rows_guard(k, addr.rows_expr(out_shape))}    const int N = {n};
    float *Y = {addr.ptr(out, plan)};
    (void)S;
    for (long r = r0; r < r1; r++) {{
        float *y = Y + r * {ldy};
{pre_code}
        for (int c = 0; c < N; c += VL) {{
            const int n = N - c;
            vstore_n(y + c, {expr}, n);
        }}
        layernorm_row(y, N, {affine}, {cfloat(op.attrs['eps'])});
    }}
}}"""


def render_elementwise(gen, k, plan) -> str:
    """A loose elementwise expression (the attention mask): tiny, so plain scalar loops."""
    g, op, addr = gen.g, k.op, gen.addr
    shape = g.tensors[op.output].shape
    idx = [f"i{d}" for d in range(len(shape))]
    seq_dim = shape.index(SEQ) if SEQ in shape else None
    loops = "".join(f"{'    ' * (d + 1)}for (long i{d} = {'r0' if d == seq_dim else 0}; "
                    f"i{d} < {'r1' if d == seq_dim else s}; i{d}++)\n" for d, s in enumerate(shape))

    def at(name):
        st = addr.aligned_strides(name, shape) if name != op.output else gen.views[name].strides
        terms = [f"{i} * {cexpr(s)}" for i, s in zip(idx, st) if cexpr(s) != "0"]
        return f"{addr.ptr(gen.views[name], plan)}[{' + '.join(terms) or '0'}]"
    expr = addr.sexpr(op.attrs["expr"], {i: at(n) for i, n in enumerate(op.inputs)})
    guard = "" if k.partitioned else "    if (r0 != 0) return;\n"
    return f"""/* {op.output}: elementwise {op.attrs['expr']}
 * from {op.source} */
static void {k.name}({ARGS}) {{
{guard}    (void)S; (void)r0; (void)r1;
{loops}{'    ' * (len(shape) + 1)}{at(op.output)} = {expr};
}}"""
