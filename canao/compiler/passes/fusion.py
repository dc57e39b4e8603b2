"""LP-Fusion: rules on mapping types that merge operators into kernels.

No rule names a model's subgraph. Each says which mapping types may be merged
and under what condition (single use, no recomputation):
  elementwise* -> elementwise        one expression (bias, GELU, scale, casts, adds)
  matmul -> elementwise              the expression runs in the matmul's epilogue
  elementwise -> row reduction       the expression runs in the reduction's prologue
  matmul -> elementwise -> row softmax -> matmul
                                     one attention kernel; scores stay in registers/L1
  gather -> row kernel               rows are read through the index, never copied
"""

from __future__ import annotations

from ..ir import Graph, Mapping, Op, VIEW_KINDS, broadcast_mapping, renumber, substitute


def _sole_user(g: Graph, name: str) -> Op | None:
    users = g.consumers(name)
    if len(users) == 1 and name not in g.outputs and users[0].inputs.count(name) == 1:
        return users[0]
    return None


def _same_size(g: Graph, a: str, b: str) -> bool:
    # equal element counts at an arbitrary length: fusing repeats no work
    return g.tensors[a].numel(97) == g.tensors[b].numel(97)


def _absorb(host_expr, host_inputs: list[str], slot: int, inner: Op):
    """Substitute `inner`'s expression for input `slot` of host_expr; returns (expr, inputs)."""
    inputs = [i for k, i in enumerate(host_inputs) if k != slot]
    old_index = {k: inputs.index(i) for k, i in enumerate(host_inputs) if k != slot}
    expr = renumber(substitute(host_expr, slot, ("in", -1)), {**old_index, -1: -1})
    inner_index = {}
    for k, name in enumerate(inner.inputs):
        if name not in inputs:
            inputs.append(name)
        inner_index[k] = inputs.index(name)
    return substitute(expr, -1, renumber(inner.attrs["expr"], inner_index)), inputs


def compose_elementwise(g: Graph) -> Graph:
    """An elementwise op feeding one elementwise op of the same size becomes part of it."""
    changed = True
    while changed:
        changed = False
        for op in g.ops:
            if op.kind != "ew":
                continue
            for slot, name in enumerate(op.inputs):
                inner = g.producer(name)
                if inner is not None and inner.kind == "ew" and _sole_user(g, name) is op \
                        and _same_size(g, name, op.output):
                    op.attrs["expr"], op.inputs = _absorb(op.attrs["expr"], op.inputs, slot, inner)
                    op.mapping = broadcast_mapping([g.tensors[i] for i in op.inputs], g.tensors[op.output])
                    g.ops.remove(inner)
                    changed = True
                    break
            if changed:
                break
    return g


def fuse_attention(g: Graph) -> Graph:
    """matmul(q, kT) -> elementwise (per-key operands only) -> softmax -> matmul(., v)."""
    for out_mm in [op for op in g.ops if op.kind == "matmul"]:
        sm = g.producer(out_mm.inputs[0])
        if sm is None or sm.kind != "softmax" or _sole_user(g, sm.output) is not out_mm:
            continue
        score = g.producer(sm.inputs[0])
        expr, extra = ("in", 0), []
        if score is not None and score.kind == "ew" and _sole_user(g, score.output) is sm:
            scores_mm = [g.producer(i) for i in score.inputs]
            slot = next((k for k, p in enumerate(scores_mm) if p is not None and p.kind == "matmul"), None)
            if slot is None:
                continue
            others = [i for k, i in enumerate(score.inputs) if k != slot]
            # operands must repeat over queries, or the fused kernel would read an S x S tensor
            if any(len(g.tensors[i].shape) >= 2 and g.tensors[i].shape[-2] != 1 for i in others):
                continue
            order = {slot: 0, **{k: 1 + others.index(i) for k, i in enumerate(score.inputs) if k != slot}}
            expr, extra, qk = renumber(score.attrs["expr"], order), others, scores_mm[slot]
        else:
            qk, score = score, None
        if qk is None or qk.kind != "matmul" or g.is_const(qk.inputs[1]) or \
                _sole_user(g, qk.output) is not (score or sm):
            continue
        kt = g.producer(qk.inputs[1])
        rank = len(g.tensors[qk.inputs[1]].shape)
        if kt is not None and kt.kind == "permute" and kt.attrs["perm"] == [*range(rank - 2), rank - 1, rank - 2]:
            k = kt.inputs[0]
        else:  # no transpose to absorb: index K^T through a permuted view instead
            ks = g.tensors[qk.inputs[1]].shape
            k = g.new_tensor("k", (*ks[:-2], ks[-1], ks[-2]))
            g.ops.insert(g.ops.index(qk), Op("permute", Mapping.TRANSPOSE, [qk.inputs[1]], k,
                                            {"perm": [*range(rank - 2), rank - 1, rank - 2]}, qk.source))
        fused = Op("attention", Mapping.FUSED, [qk.inputs[0], k, out_mm.inputs[1], *extra], out_mm.output,
                   {"score": expr}, out_mm.source)
        g.ops[g.ops.index(out_mm)] = fused
        for dead in (qk, score, sm):
            if dead is not None:
                g.ops.remove(dead)
    return g.prune()


def fuse_prologues(g: Graph) -> Graph:
    """elementwise -> layernorm: the reduction computes the expression as it reads its row
    (residual add + LayerNorm in one pass; the embedding sum + LayerNorm)."""
    for ln in [op for op in g.ops if op.kind == "layernorm" and "prologue" not in op.attrs]:
        inner = g.producer(ln.inputs[0])
        if inner is None or inner.kind != "ew" or _sole_user(g, inner.output) is not ln \
                or not _same_size(g, inner.output, ln.output):
            continue
        x, gamma, beta = ln.inputs[:3]
        expr, inputs = _absorb(("in", 0), [x], 0, inner)
        ln.inputs = [inputs[0], gamma, beta, *inputs[1:]]
        ln.attrs["prologue"] = expr
        g.ops.remove(inner)
    return g


def fuse_epilogues(g: Graph) -> Graph:
    """matmul (constant weights) -> elementwise: the expression runs on the accumulators."""
    for mm in [op for op in g.ops if op.kind == "matmul" and g.is_const(op.inputs[1])]:
        ew = _sole_user(g, mm.output)
        if ew is None or ew.kind != "ew" or not _same_size(g, mm.output, ew.output):
            continue
        # the accumulator is input 0, the other operands follow
        others = [i for i in ew.inputs if i != mm.output]
        order = {k: (0 if i == mm.output else 1 + others.index(i)) for k, i in enumerate(ew.inputs)}
        mm.attrs["epilogue"] = renumber(ew.attrs["expr"], order)
        mm.inputs = [*mm.inputs[:2], *others]
        g.ops.remove(ew)
        g.replace_uses(ew.output, mm.output)
        g.tensors[mm.output].shape = g.tensors[ew.output].shape
    return g.prune()


def inline_gathers(g: Graph) -> Graph:
    """A gather read only by row kernels (through views) is never materialised."""
    def readers(name):
        out = []
        for user in g.consumers(name):
            out += readers(user.output) if user.mapping in VIEW_KINDS else [user]
        return out

    for op in g.ops:
        if op.kind == "gather":
            users = readers(op.output)
            op.attrs["inline"] = bool(users) and all(u.kind == "layernorm" for u in users) \
                and op.output not in g.outputs
    return g

