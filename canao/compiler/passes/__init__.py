"""The pass pipeline: named IR -> IR rewrites, run in order, plus the fusion report."""

from __future__ import annotations

import copy

from ..ir import Graph
from .fold import fold_layernorm_affine, fold_scalar_into_weights, pack_parallel_matmuls
from .fusion import compose_elementwise, fuse_attention, fuse_epilogues, fuse_prologues, inline_gathers

# Order matters: scalars fold before elementwise chains absorb them, and
# prologues (residual + LayerNorm) claim their adds before epilogues do.
PIPELINE = [
    fold_scalar_into_weights,
    pack_parallel_matmuls,
    fold_layernorm_affine,
    compose_elementwise,
    fuse_attention,
    fuse_prologues,
    fuse_epilogues,
    inline_gathers,
]


def materialized_bytes(g: Graph, seq: int) -> int:
    """Bytes of every intermediate a kernel writes to memory (views and inlined gathers write none)."""
    return sum(g.tensors[op.output].nbytes(seq) for op in g.compute_ops() if not op.attrs.get("inline"))


def optimize(g: Graph, max_seq: int) -> tuple[Graph, dict]:
    before = copy.deepcopy(g)
    for p in PIPELINE:
        g = p(g)
    report = {
        "ops_before": len(before.compute_ops()),
        "views_before": len(before.ops) - len(before.compute_ops()),
        "kernels_after": len([op for op in g.compute_ops() if not op.attrs.get("inline")]),
        "ops_by_kind_before": before.summary(),
        "ops_by_kind_after": g.summary(),
        "intermediate_bytes_before": materialized_bytes(before, max_seq),
        "intermediate_bytes_after": materialized_bytes(g, max_seq),
        "at_seq": max_seq,
        "passes": [p.__name__ for p in PIPELINE],
    }
    report["intermediate_bytes_avoided"] = report["intermediate_bytes_before"] - report["intermediate_bytes_after"]
    return g, report
