"""GGUF re-quantization (canao.models.gguf_convert): Q4_1 -> Q8_0 keeps the model.

Runs on a 2-layer cut of SmolLM2 (same tokenizer, embedding and layer shapes) so that
loading both versions stays fast; the full 30-layer conversion is what
benchmarks/decode_baselines.py feeds to llama.cpp. (Most of the time here is the gguf
package parsing the 49k-entry tokenizer arrays, once per file opened.)
"""

import numpy as np
import pytest
import torch

from canao.errors import CanaoError
from canao.models import gguf_loader
from canao.models.decoders import load_causal_lm
from canao.models.gguf_convert import convert_gguf

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    q41 = convert_gguf("smollm2", d / "cut.Q4_1.gguf", None, layers=2)  # tensors copied as they are
    q8 = convert_gguf(q41, d / "cut.Q8_0.gguf", "Q8_0")
    return q41, q8


@pytest.fixture(scope="module")
def opened(files):
    return tuple(gguf_loader.open_gguf(p) for p in files)


def test_types_and_metadata(opened):
    q41, q8 = opened
    assert q41.get("llama.block_count") == 2 and len(q41.tensors) == 2 + 2 * 9  # embd, norm, 2 blocks
    assert q41.tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    types = {n: t.tensor_type.name for n, t in q8.tensors.items()}
    assert set(types) == set(q41.tensors)
    for name, t in q41.tensors.items():
        expect = "F32" if t.tensor_type.name == "F32" else "Q8_0"
        assert types[name] == expect, name
        if t.tensor_type.name == expect:  # F32 norms and the Q8_0 embedding: copied byte for byte
            assert np.array_equal(np.asarray(q8.tensors[name].data), np.asarray(t.data)), name
    assert set(q8.metadata) == set(q41.metadata)
    for key, value in q41.metadata.items():  # tokenizer, chat template, hyper-parameters
        if key != "general.file_type":
            assert q8.metadata[key] == value, key
    assert q41.get("general.file_type") == 3  # MOSTLY_Q4_1, as in SmolLM2's file
    assert q8.get("general.file_type") == 7  # MOSTLY_Q8_0


def test_requantization_error_is_q8_rounding(opened):
    """Each Q8_0 weight is its Q4_1 value rounded to its block's 8-bit grid: half a step, plus the
    float16 rounding of the block scale (2^-11 relative) times the largest code, 127."""
    q41, q8 = opened
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.attn_v.weight"):
        w4 = gguf_loader.dequantize(q41, name).reshape(-1, 32)
        w8 = gguf_loader.dequantize(q8, name).reshape(-1, 32)
        step = w4.abs().amax(dim=1, keepdim=True) / 127
        assert ((w8 - w4).abs() <= (0.5 + 127 * 2.0**-11) * step + 1e-7).all(), name
        assert (w8 - w4).abs().max() > 0, name  # really requantized, not copied


def test_converted_model_matches(files):
    m4, tok, info4 = load_causal_lm(files[0])
    m8, _, info8 = load_causal_lm(files[1])
    assert info4["weight_types"] == {"Q8_0": 1, "Q4_1": 14, "F32": 5}
    assert info8["weight_types"] == {"Q8_0": 15, "F32": 5}
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.inference_mode():
        a, b = m4(ids)[0], m8(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert not torch.equal(a, b)


def test_bad_target_type(tmp_path):
    with pytest.raises(CanaoError, match="choose one of"):
        convert_gguf("smollm2", tmp_path / "x.gguf", "Q2_K")
