"""llama.cpp baseline (canao.baselines.llamacpp) against canao's own reading of the same GGUF.

Opt-in: set CANAO_TEST_LLAMACPP=1. It needs the managed venv $CANAO_CACHE/venvs/llamacpp,
which the first run builds (llama-cpp-python 0.3.36 compiled from source with cmake and g++:
about half an hour on 2 busy cores), so CI does not run it by default.

On a 2-layer cut of SmolLM2 re-quantized to Q8_0 by canao.models.gguf_convert, so it also
checks that llama.cpp loads the files our converter writes.
"""

import os

import numpy as np
import pytest
import torch

from canao.models.decoders import load_causal_lm
from canao.models.gguf_convert import convert_gguf

pytestmark = pytest.mark.skipif(os.environ.get("CANAO_TEST_LLAMACPP") != "1",
                                reason="opt-in: set CANAO_TEST_LLAMACPP=1 (builds llama-cpp-python once)")

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def test_llamacpp_matches_pytorch_on_converted_file(tmp_path):
    from canao.baselines.llamacpp import Worker

    cut = convert_gguf("smollm2", tmp_path / "cut.gguf", None, layers=2)
    q8 = convert_gguf(cut, tmp_path / "cut.Q8_0.gguf", "Q8_0")
    model, tok, _ = load_causal_lm(q8)
    ids = tok.encode(PROMPT)
    with torch.inference_mode():
        first = int(model(torch.tensor([ids]))[0, -1].argmax())
    with Worker() as w:
        w.load(q8, n_ctx=256)
        for threads in (1, 2):
            w.threads(threads)
            for n in (len(ids), 7):
                got = np.asarray(w.logits(ids[:n]))
                with torch.inference_mode():
                    want = model(torch.tensor([ids[:n]]))[0, -1].numpy()
                assert got.shape == want.shape
                # llama.cpp quantizes activations to 8 bits for its Q8_0 dot products: close, not equal
                assert np.abs(got - want).max() < 0.02 * np.abs(want).max() + 0.05, (threads, n)
                assert int(got.argmax()) == int(want.argmax()), (threads, n)
        times = w.decode_ms(ids, 20, 2)
        assert len(times) == 20 and min(times) > 0
        assert len(w.ttft_ms(ids, 3)) == 3
        greedy = w.greedy(ids, 8)
    assert len(greedy) == 8 and greedy[0] == first


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q6_K"])
def test_llamacpp_reads_our_k_quant_blocks(tmp_path, mix):
    """canao's k-quant quantizer writes ggml's blocks: llama.cpp's logits on the converted file track
    PyTorch's on canao's dequantization of it (to llama.cpp's 8-bit activations)."""
    from canao.baselines.llamacpp import Worker

    cut = convert_gguf("smollm2", tmp_path / "cut.gguf", None, layers=2)
    kq = convert_gguf(cut, tmp_path / f"cut.{mix}.gguf", mix)
    model, tok, _ = load_causal_lm(kq)
    ids = tok.encode(PROMPT)
    with Worker() as w:
        w.load(kq, n_ctx=256)
        got = np.asarray(w.logits(ids))
    with torch.inference_mode():
        want = model(torch.tensor([ids]))[0, -1].numpy()
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max() + 0.05
    assert int(got.argmax()) == int(want.argmax())
