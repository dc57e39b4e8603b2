"""canao's graph IR: tensors with shapes and dtypes, operators tagged by mapping type.

The mapping type says how output elements depend on input elements, and it is
all the fusion passes look at: they never match named subgraphs. A dimension is
an int or the symbol "S" (the dynamic sequence length).

Elementwise operators carry an expression tree over their inputs so chains of
them compose into one operator: ("in", i) is input i, ("const", c) a scalar,
(fn, *args) an application of fn in ELEMENTWISE_FNS.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import numpy as np

SEQ = "S"
ELEMENTWISE_FNS = {"add": 2, "sub": 2, "mul": 2, "div": 2, "gelu": 1, "to_float": 1}


class Mapping(enum.Enum):
    ELEMENTWISE = "elementwise"  # out[i] = f(in[i]), same shapes
    BROADCAST = "broadcast"      # elementwise where some input repeats along dims
    REDUCTION = "reduction"      # out row depends on a whole input row (softmax, layernorm)
    MATMUL = "matmul"            # contraction over one dim
    RESHAPE = "reshape"          # same elements, new index (view, select, slice)
    TRANSPOSE = "transpose"      # same elements, permuted dims
    GATHER = "gather"            # rows picked from a table by an index tensor
    FUSED = "fused"              # a kernel made by the passes from several of the above


VIEW_KINDS = {Mapping.RESHAPE, Mapping.TRANSPOSE}


@dataclass
class Tensor:
    name: str
    shape: tuple
    dtype: str = "float32"  # float32 | int64

    def numel(self, seq: int) -> int:
        return int(np.prod([seq if d == SEQ else d for d in self.shape], dtype=np.int64))

    def nbytes(self, seq: int) -> int:
        return self.numel(seq) * (8 if self.dtype == "int64" else 4)


@dataclass
class Op:
    kind: str              # matmul | ew | layernorm | softmax | gather | view | permute | select | slice | attention ...
    mapping: Mapping
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    source: str = ""       # where it came from in the model, for error messages


@dataclass
class Graph:
    tensors: dict[str, Tensor]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    consts: dict[str, np.ndarray]  # name -> float32 array; also present in `tensors`

    _ids = itertools.count()

    def new_tensor(self, prefix: str, shape: tuple, dtype: str = "float32") -> str:
        name = f"{prefix}_{next(self._ids)}"
        while name in self.tensors:
            name = f"{prefix}_{next(self._ids)}"
        self.tensors[name] = Tensor(name, tuple(shape), dtype)
        return name

    def add_const(self, prefix: str, value: np.ndarray) -> str:
        name = self.new_tensor(prefix, value.shape)
        self.consts[name] = np.ascontiguousarray(value, dtype=np.float32)
        return name

    def producer(self, name: str) -> Op | None:
        return next((op for op in self.ops if op.output == name), None)

    def consumers(self, name: str) -> list[Op]:
        return [op for op in self.ops if name in op.inputs]

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def replace_uses(self, old: str, new: str) -> None:
        for op in self.ops:
            op.inputs = [new if i == old else i for i in op.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def prune(self) -> "Graph":
        """Drop operators and constants nothing reaches from the outputs."""
        live = set(self.outputs)
        kept = []
        for op in reversed(self.ops):
            if op.output in live:
                kept.append(op)
                live.update(op.inputs)
        self.ops = kept[::-1]
        self.consts = {k: v for k, v in self.consts.items() if k in live}
        self.tensors = {k: t for k, t in self.tensors.items() if k in live or k in self.inputs}
        return self

    def compute_ops(self) -> list[Op]:
        return [op for op in self.ops if op.mapping not in VIEW_KINDS]

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        return counts


def broadcast_mapping(inputs: list[Tensor], out: Tensor) -> Mapping:
    return Mapping.ELEMENTWISE if all(t.shape == out.shape for t in inputs) else Mapping.BROADCAST


def expr_inputs(expr) -> set[int]:
    if expr[0] == "in":
        return {expr[1]}
    if expr[0] == "const":
        return set()
    return set().union(*(expr_inputs(e) for e in expr[1:]))


def substitute(expr, index: int, replacement):
    """expr with ("in", index) replaced by `replacement`."""
    if expr[0] == "in":
        return replacement if expr[1] == index else expr
    if expr[0] == "const":
        return expr
    return (expr[0], *(substitute(e, index, replacement) for e in expr[1:]))


def renumber(expr, mapping: dict[int, int]):
    if expr[0] == "in":
        return ("in", mapping[expr[1]])
    if expr[0] == "const":
        return expr
    return (expr[0], *(renumber(e, mapping) for e in expr[1:]))
