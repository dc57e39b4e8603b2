import copy

import pytest
import torch

from canao.compiler.frontend import capture
from canao.compiler.ir import SEQ, Mapping
from canao.compiler.reference import run_graph
from canao.errors import CanaoError

from compiler_helpers import random_inputs


def test_capture_classifies_ops_and_keeps_sequence_dynamic(graph):
    kinds = {op.kind: op.mapping for op in graph.ops}
    assert kinds["matmul"] is Mapping.MATMUL and kinds["permute"] is Mapping.TRANSPOSE
    assert kinds["layernorm"] is Mapping.REDUCTION and kinds["gather"] is Mapping.GATHER
    assert {op.mapping for op in graph.ops if op.kind == "ew"} == {Mapping.ELEMENTWISE, Mapping.BROADCAST}
    assert graph.tensors[graph.outputs[0]].shape == (1, SEQ)
    assert [graph.tensors[i].dtype for i in graph.inputs] == ["int64"] * 3


@pytest.mark.parametrize("seq,pad", [(7, 0), (33, 5)])
def test_ir_interpreter_matches_pytorch_at_any_length(model, graph, seq, pad):
    ids, tt, mask = random_inputs(seq, pad=pad)
    want = model(ids, tt, mask)
    got = run_graph(graph, dict(input_ids=ids, token_type_ids=tt, attention_mask=mask))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _Unsupported(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, token_type_ids, attention_mask):
        start, end = self.inner(input_ids, token_type_ids, attention_mask)
        return torch.cumsum(start, -1), end


def test_unsupported_operator_names_op_and_source(model):
    with pytest.raises(CanaoError) as err:
        capture(_Unsupported(copy.deepcopy(model)), 32)
    assert "cumsum" in str(err.value) and "test_frontend.py" in str(err.value)


def test_capture_cache_reuses_the_architecture_with_its_own_weights(tmp_path, monkeypatch):
    """The traced IR is cached per architecture: another model of the same shapes gets it without
    torch.export, filled with its own weights (equal to PyTorch); other shapes or lengths trace again."""
    import canao.compiler.frontend as frontend
    from compiler_helpers import small_model

    monkeypatch.setenv("CANAO_CACHE", str(tmp_path))
    capture(small_model(seed=0), 32)
    assert len(list((tmp_path / "frontend").glob("*.json"))) == 1

    def no_export(*args):
        raise AssertionError("torch.export ran although the architecture was cached")

    monkeypatch.setattr(frontend, "export_model", no_export)
    other = small_model(seed=5)
    g = capture(other, 32)
    ids, tt, mask = random_inputs(19, pad=3)
    for a, b in zip(run_graph(g, dict(input_ids=ids, token_type_ids=tt, attention_mask=mask)), other(ids, tt, mask)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for different in (lambda: capture(other, 48), lambda: capture(small_model(ffn=(96, 52)), 32)):
        with pytest.raises(AssertionError, match="torch.export ran"):
            different()
    # a damaged entry is traced again, not trusted
    for f in (tmp_path / "frontend").glob("*.json"):
        f.write_text("{")
    with pytest.raises(AssertionError, match="torch.export ran"):
        capture(other, 32)
