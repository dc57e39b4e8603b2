"""Constant folding: scalars pushed into weights, LayerNorm affines into the linears they feed,
parallel projections packed."""

from __future__ import annotations

import numpy as np

from ..ir import Graph, Mapping, Op, VIEW_KINDS


def _single_use(g: Graph, name: str) -> bool:
    return len(g.consumers(name)) == 1 and name not in g.outputs


def _linear_consts(g: Graph, name: str) -> set[str] | None:
    """Constants c_i such that `name` is linear in them jointly (scaling all scales the
    value), found through views, adds and const-weight matmuls; None if there are none."""
    if g.is_const(name):
        return {name}
    op = g.producer(name)
    if op is None or not _single_use(g, name):
        return None
    if op.mapping in VIEW_KINDS:
        return _linear_consts(g, op.inputs[0])
    if op.kind == "matmul" and "epilogue" not in op.attrs and g.is_const(op.inputs[1]):
        return {op.inputs[1]}
    if op.kind == "ew" and op.attrs["expr"] == ("add", ("in", 0), ("in", 1)):
        parts = [_linear_consts(g, i) for i in op.inputs]
        return None if None in parts else parts[0] | parts[1]
    return None


def _scalar_factor(op: Op):
    """(input, c) when op computes input * c for a scalar constant c."""
    if op.kind != "ew" or len(op.inputs) != 1:
        return None
    e = op.attrs["expr"]
    if e[0] == "mul" and e[1] == ("in", 0) and e[2][0] == "const":
        return op.inputs[0], e[2][1]
    if e[0] == "mul" and e[2] == ("in", 0) and e[1][0] == "const":
        return op.inputs[0], e[1][1]
    if e[0] == "div" and e[1] == ("in", 0) and e[2][0] == "const":
        return op.inputs[0], 1.0 / e[2][1]
    return None


def fold_scalar_into_weights(g: Graph) -> Graph:
    """x * c where x = matmul(a, b) and a (or b) is linear in constants: scale those
    constants instead (attention's 1/sqrt(d) lands in the Q projection)."""
    for op in list(g.ops):
        found = _scalar_factor(op)
        if not found:
            continue
        src, c = found
        mm = g.producer(src)
        if mm is None or mm.kind != "matmul" or not _single_use(g, src):
            continue
        consts = _linear_consts(g, mm.inputs[0]) or _linear_consts(g, mm.inputs[1])
        if not consts:
            continue
        for name in consts:
            g.consts[name] = (g.consts[name] * np.float32(c)).astype(np.float32)
        g.ops.remove(op)
        g.replace_uses(op.output, src)
    return g


def _bias_of(g: Graph, mm: Op) -> Op | None:
    users = g.consumers(mm.output)
    if len(users) == 1 and mm.output not in g.outputs:
        e = users[0]
        if e.kind == "ew" and e.attrs["expr"] == ("add", ("in", 0), ("in", 1)) and e.inputs[0] == mm.output \
                and g.is_const(e.inputs[1]) and g.consts[e.inputs[1]].ndim == 1:
            return e
    return None


def pack_parallel_matmuls(g: Graph) -> Graph:
    """Matmuls reading the same activation with constant weights (Q, K, V) become one
    matmul over the concatenated weights; each old result is a slice of the packed one."""
    groups: dict[str, list[Op]] = {}
    for op in g.ops:
        if op.kind == "matmul" and "epilogue" not in op.attrs and g.is_const(op.inputs[1]) \
                and g.consts[op.inputs[1]].ndim == 2:
            groups.setdefault(op.inputs[0], []).append(op)
    for x, mms in groups.items():
        if len(mms) < 2:
            continue
        biases = [_bias_of(g, mm) for mm in mms]
        widths = [g.consts[mm.inputs[1]].shape[1] for mm in mms]
        w = g.add_const("packed_w", np.concatenate([g.consts[mm.inputs[1]] for mm in mms], axis=1))
        shape = (*g.tensors[mms[0].output].shape[:-1], sum(widths))
        packed = g.new_tensor("packed", shape)
        new_ops = [Op("matmul", Mapping.MATMUL, [x, w], packed, {}, mms[0].source)]
        result = packed
        if any(biases):
            bias = np.concatenate([g.consts[b.inputs[1]] if b else np.zeros(n, np.float32)
                                   for b, n in zip(biases, widths)])
            result = g.new_tensor("packed_biased", shape)
            new_ops.append(Op("ew", Mapping.BROADCAST, [packed, g.add_const("packed_b", bias)], result,
                              {"expr": ("add", ("in", 0), ("in", 1))}, mms[0].source))
        start = 0
        for mm, b, n in zip(mms, biases, widths):
            old = b.output if b else mm.output
            new_ops.append(Op("slice", Mapping.RESHAPE, [result], old,
                              {"dim": len(shape) - 1, "start": start, "stop": start + n}, mm.source))
            start += n
        at = g.ops.index(mms[0])
        dead = {id(o) for o in mms} | {id(b) for b in biases if b}
        g.ops = [o for o in g.ops[:at] if id(o) not in dead] + new_ops + [o for o in g.ops[at:] if id(o) not in dead]
    return g.prune()


def fold_layernorm_affine(g: Graph) -> Graph:
    """LayerNorm(x) = gamma * xhat + beta feeding only linears: gamma and beta move into them
    (W' = diag(gamma) W, b' = b + beta W), exact in real arithmetic, and the LayerNorm keeps
    xhat (attrs["affine"] False: the kernel skips the multiply-add). A LayerNorm whose output
    also reaches a residual add (every one inside a post-LN BERT layer) keeps its affine: the
    add needs gamma * xhat + beta itself. In the encoders it is the last one, before the QA head."""
    for ln in [op for op in g.ops if op.kind == "layernorm" and op.attrs.get("affine", True)]:
        y, gamma, beta = ln.output, ln.inputs[1], ln.inputs[2]
        users = g.consumers(y)
        if not (g.is_const(gamma) and g.is_const(beta)) or y in g.outputs or not users or not all(
                u.kind == "matmul" and "epilogue" not in u.attrs and u.inputs[0] == y and y not in u.inputs[1:]
                and g.is_const(u.inputs[1]) and g.consts[u.inputs[1]].ndim == 2 for u in users):
            continue
        gv, bv = g.consts[gamma].astype(np.float64), g.consts[beta].astype(np.float64)
        for mm in users:
            w = g.consts[mm.inputs[1]].astype(np.float64)
            shift = bv @ w
            mm.inputs[1] = g.add_const("ln_folded_w", gv[:, None] * w)
            bias = _bias_of(g, mm)
            if bias is not None:
                bias.inputs[1] = g.add_const("ln_folded_b", g.consts[bias.inputs[1]] + shift)
            else:  # a bias add of its own, for the epilogue pass to take
                out = g.new_tensor("ln_shifted", g.tensors[mm.output].shape)
                g.replace_uses(mm.output, out)
                g.ops.insert(g.ops.index(mm) + 1, Op("ew", Mapping.BROADCAST, [mm.output, g.add_const("ln_folded_b", shift)],
                                                    out, {"expr": ("add", ("in", 0), ("in", 1))}, mm.source))
        ln.inputs[1] = g.add_const("ln_ones", np.ones_like(g.consts[gamma]))
        ln.inputs[2] = g.add_const("ln_zeros", np.zeros_like(g.consts[beta]))
        ln.attrs["affine"] = False
    return g.prune()
