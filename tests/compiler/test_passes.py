import copy

import pytest
import torch

from canao.compiler.passes import PIPELINE, optimize
from canao.compiler.reference import run_graph

from compiler_helpers import random_inputs


def _run(g, seq=19, pad=4):
    ids, tt, mask = random_inputs(seq, pad=pad)
    return run_graph(g, dict(input_ids=ids, token_type_ids=tt, attention_mask=mask))


@pytest.mark.parametrize("upto", range(1, len(PIPELINE) + 1))
def test_each_pass_preserves_meaning(graph, upto):
    g = copy.deepcopy(graph)
    want = _run(g)
    for p in PIPELINE[:upto]:
        g = p(g)
    for a, b in zip(_run(g), want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_fused_graph_has_one_kernel_per_stage(graph):
    g, report = optimize(copy.deepcopy(graph), 64)
    kinds = g.summary()
    layers = 2
    assert kinds["attention"] == layers and "softmax" not in kinds
    assert kinds["matmul"] == 4 * layers + 1  # packed QKV, out, FFN1, FFN2 per layer, QA head
    assert kinds["layernorm"] == 2 * layers + 1 and kinds["ew"] == 1  # the mask is the only loose expression
    epilogues = [op.attrs.get("epilogue") for op in g.ops if op.kind == "matmul"]
    assert ("gelu", ("add", ("in", 0), ("in", 1))) in epilogues
    assert all(op.attrs.get("inline") for op in g.ops if op.kind == "gather")
    assert report["kernels_after"] < report["ops_before"] / 2
    assert report["intermediate_bytes_avoided"] > report["intermediate_bytes_after"]


def test_attention_scale_folds_into_query_weights(graph):
    g, _ = optimize(copy.deepcopy(graph), 64)
    exprs = [op.attrs["score"] for op in g.ops if op.kind == "attention"]
    assert all("mul" not in str(e) for e in exprs)  # only the mask add is left on the scores


def test_layernorm_affine_folds_only_where_exact(graph):
    """The last LayerNorm feeds only the QA head: its gamma/beta move into the head's weights
    and bias. Every LayerNorm inside a layer also feeds a residual add and keeps its affine."""
    from canao.compiler.passes import fold_layernorm_affine

    g = copy.deepcopy(graph)
    want = _run(g)
    lns = [op for op in g.ops if op.kind == "layernorm"]
    g = fold_layernorm_affine(g)
    folded = [op for op in g.ops if op.kind == "layernorm" and op.attrs.get("affine") is False]
    assert len(folded) == 1 and folded[0].output == lns[-1].output
    (head,) = g.consumers(folded[0].output)
    assert head.kind == "matmul" and head.inputs[1].startswith("ln_folded_w")
    assert (g.consts[folded[0].inputs[1]] == 1).all() and (g.consts[folded[0].inputs[2]] == 0).all()
    for a, b in zip(_run(g), want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
