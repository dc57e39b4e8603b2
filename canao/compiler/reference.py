"""A plain interpreter of the IR in torch: the meaning of every operator, fused or not.

Each pass is tested by running the graph before and after it here; the
generated C is tested against this and against the PyTorch model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ir import SEQ, Graph, Op

FNS = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "gelu": F.gelu, "to_float": lambda x: x.float(),
}


def eval_expr(expr, args: list):
    if expr[0] == "in":
        return args[expr[1]]
    if expr[0] == "const":
        return expr[1]
    vals = [eval_expr(e, args) for e in expr[1:]]
    if all(not isinstance(v, torch.Tensor) for v in vals):
        vals[0] = torch.tensor(vals[0])
    return FNS[expr[0]](*vals)


def _op(g: Graph, op: Op, env: dict, seq: int) -> torch.Tensor:
    x = [env[i] for i in op.inputs]
    shape = tuple(seq if d == SEQ else d for d in g.tensors[op.output].shape)
    a = op.attrs
    if op.kind == "ew":
        return eval_expr(a["expr"], x).expand(shape)
    if op.kind == "matmul":
        y = x[0] @ x[1]
        return eval_expr(a["epilogue"], [y, *x[2:]]) if "epilogue" in a else y
    if op.kind == "layernorm":
        v = eval_expr(a["prologue"], [x[0], *x[3:]]) if "prologue" in a else x[0]
        return F.layer_norm(v.expand(shape), shape[-1:], x[1], x[2], a["eps"])
    if op.kind == "softmax":
        return x[0].softmax(-1)
    if op.kind == "attention":
        s = x[0] @ x[1].transpose(-1, -2)
        s = eval_expr(a["score"], [s, *x[3:]])
        return s.softmax(-1) @ x[2]
    if op.kind == "gather":
        index = torch.arange(seq) if a["index"] == "iota" else x[1]
        return x[0][index]
    if op.kind == "view":
        return x[0].reshape(shape)
    if op.kind == "permute":
        return x[0].permute(a["perm"])
    if op.kind == "select":
        return x[0].select(a["dim"], a["index"])
    if op.kind == "slice":
        return x[0].narrow(a["dim"], a["start"], a["stop"] - a["start"])
    raise NotImplementedError(op.kind)


def run_graph(g: Graph, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    seq = next(iter(inputs.values())).shape[-1]
    env = {k: torch.from_numpy(v) for k, v in g.consts.items()}
    env.update(inputs)
    for op in g.ops:
        env[op.output] = _op(g, op, env, seq)
    return [env[o] for o in g.outputs]
