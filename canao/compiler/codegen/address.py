"""C addresses and expressions of the IR's tensors: where a view's rows start (an arena buffer, a
packed weight, an input, an embedding row read through its token index) and the fused
prologue/epilogue expressions as vector or scalar C."""

from __future__ import annotations

import numpy as np
import sympy

from ...errors import CanaoError
from ..ir import SEQ, Graph, Op
from .layout import View
from .memory import Plan
from .weights import WeightBlob, pack_panels

VEC_FN = {"add": "vadd", "sub": "vsub", "mul": "vmul", "div": "vdiv", "gelu": "vgelu"}
SCALAR_OP = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def cexpr(e) -> str:
    return sympy.ccode(sympy.expand(e))


def cfloat(c: float) -> str:
    return repr(float(np.float32(c))) + "f"


class Addressing:
    def __init__(self, g: Graph, views: dict[str, View], blob: WeightBlob):
        self.g, self.views, self.blob = g, views, blob

    def weight(self, name: str, packed_nr: int = 0) -> str:
        """A constant as floats in W (as panels of packed_nr columns when given)."""
        key = f"{name}@{packed_nr}"
        if key in self.blob.offsets:
            return self.blob.floats(key, None)
        arr = self.g.consts[name]
        return self.blob.floats(key, pack_panels(arr, packed_nr) if packed_nr else arr)

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

    @staticmethod
    def row_dim(shape: tuple, where: str) -> int | None:
        big = [i for i, d in enumerate(shape[:-1]) if d != 1]
        if len(big) > 1:
            raise CanaoError(f"codegen: {where}: output {shape} has several row dims")
        return big[0] if big else None

    def rows_expr(self, shape) -> str:
        rd = self.row_dim(shape, "")
        return "1" if rd is None else ("S" if shape[rd] == SEQ else str(shape[rd]))

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
            return f"vset1({cfloat(e[1])})"
        if e[0] not in VEC_FN:
            raise CanaoError(f"codegen: '{e[0]}' inside a vector kernel is not supported")
        return f"{VEC_FN[e[0]]}({', '.join(self.vexpr(x, leaves) for x in e[1:])})"

    def sexpr(self, e, leaves: dict[int, str]) -> str:
        if e[0] == "in":
            return leaves[e[1]]
        if e[0] == "const":
            return cfloat(e[1])
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
