"""Reshapes, transposes, slices and selects become index arithmetic, never copies.

Every tensor gets a strided view (base tensor, offset, strides), with offsets and
strides as expressions in the sequence length S. Materialised tensors are dense;
one whose only reader is a transpose is written already transposed, so the
transposed view is dense (attention writes its heads straight into [S, H*D]).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ...errors import CanaoError
from ..ir import SEQ, VIEW_KINDS, Graph

S = sympy.Symbol("S", positive=True, integer=True)
PROBE = 1009  # a concrete length for comparing sizes that depend on S


def size(d):
    return S if d == SEQ else sympy.Integer(d)


@dataclass
class View:
    base: str
    offset: object   # sympy expression, elements
    strides: tuple   # sympy expressions, elements


def dense_strides(shape) -> tuple:
    strides, acc = [], sympy.Integer(1)
    for d in reversed(shape):
        strides.append(sympy.Integer(0) if d == 1 else acc)
        acc = acc * size(d)
    return tuple(reversed(strides))


def _reshape_strides(old_shape, old_strides, new_shape, where: str) -> tuple:
    """Strides of a reshape of a strided tensor without copying (torch's computeStride)."""
    old = [(size(d), s) for d, s in zip(old_shape, old_strides) if d != 1]
    new = [size(d) for d in new_shape]
    out = [sympy.Integer(0)] * len(new)
    v = len(new) - 1
    while v >= 0 and new[v] == 1:
        v -= 1
    i = len(old) - 1
    while i >= 0:
        chunk_stride, numel = old[i][1], old[i][0]
        while i > 0 and sympy.expand(old[i - 1][1] - old[i][1] * old[i][0]) == 0:
            i -= 1
            numel = numel * old[i][0]
        view_numel = sympy.Integer(1)
        while v >= 0 and (view_numel.subs(S, PROBE) < numel.subs(S, PROBE) or new[v] == 1):
            out[v] = view_numel * chunk_stride if new[v] != 1 else sympy.Integer(0)
            view_numel = view_numel * new[v]
            v -= 1
        if sympy.expand(view_numel - numel) != 0:
            raise CanaoError(f"layout: reshape to {new_shape} needs a copy ({where})")
        i -= 1
    return tuple(out)


def assign_layouts(g: Graph) -> dict[str, View]:
    views: dict[str, View] = {}
    for name in [*g.inputs, *g.consts]:
        views[name] = View(name, sympy.Integer(0), dense_strides(g.tensors[name].shape))
    for op in g.ops:
        out = g.tensors[op.output]
        if op.mapping not in VIEW_KINDS:
            users = g.consumers(op.output)
            strides = dense_strides(out.shape)
            if len(users) == 1 and users[0].kind == "permute" and op.output not in g.outputs:
                perm = users[0].attrs["perm"]
                dense = dense_strides(g.tensors[users[0].output].shape)
                strides = [None] * len(perm)
                for i, p in enumerate(perm):
                    strides[p] = dense[i]
                strides = tuple(strides)
            views[op.output] = View(op.output, sympy.Integer(0), strides)
            continue
        src = views[op.inputs[0]]
        a = op.attrs
        if op.kind == "permute":
            strides = tuple(src.strides[p] for p in a["perm"])
            views[op.output] = View(src.base, src.offset, strides)
        elif op.kind == "select":
            strides = src.strides[:a["dim"]] + src.strides[a["dim"] + 1:]
            views[op.output] = View(src.base, src.offset + a["index"] * src.strides[a["dim"]], strides)
        elif op.kind == "slice":
            views[op.output] = View(src.base, src.offset + a["start"] * src.strides[a["dim"]], src.strides)
        else:
            strides = _reshape_strides(g.tensors[op.inputs[0]].shape, src.strides, out.shape, op.source)
            views[op.output] = View(src.base, src.offset, strides)
    return views
