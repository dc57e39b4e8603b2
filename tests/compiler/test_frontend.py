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
