"""ONNX Runtime decode baseline (canao.baselines.onnx_decoder): the exported graph with an
explicit KV cache gives our PyTorch Llama's logits, for prefill and for decode steps."""

import numpy as np
import pytest
import torch

from canao.baselines import protocol
from canao.baselines.onnx_decoder import OrtDecoder, export_decoder
from canao.errors import CanaoError
from canao.models.llama import Llama, LlamaConfig

TOL = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=128, rope_theta=10000.0)
    model = Llama(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = export_decoder(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, path


def test_prefill_and_decode_match_pytorch(tiny):
    model, path = tiny
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)[0].numpy()  # every position, no cache
    for threads in (1, 2):
        eng = OrtDecoder(path, threads)
        got = [eng.feed(ids[0, :17].tolist())]  # prefill from an empty cache
        got.append(eng.feed(ids[0, 17:25].tolist()))  # several tokens after a cached prefix
        got += [eng.feed([int(ids[0, i])]) for i in range(25, 40)]  # single-token decode
        want = [full[16], full[24], *full[25:40]]
        err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        assert err <= TOL, f"threads={threads}: max abs diff {err}"
        assert eng.past[0].shape == (1, 2, 40, 16)


def test_greedy_matches_pytorch_cache_loop(tiny):
    model, path = tiny
    prompt = [5, 17, 99, 3, 250, 42]
    eng = OrtDecoder(path, 1)
    ids = protocol.greedy(eng, prompt, 12)
    cache = model.new_cache(64)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, 0, last_only=True)
        want = [int(logits[0, -1].argmax())]
        for i in range(11):
            logits = model(torch.tensor([[want[-1]]]), cache, len(prompt) + i, last_only=True)
            want.append(int(logits[0, -1].argmax()))
    assert ids == want
    eng.reset()
    assert eng.past[0].shape[2] == 0


def test_protocol_timings_shape(tiny):
    _, path = tiny
    eng = OrtDecoder(path, 1)
    times = protocol.decode_ms(eng, list(range(1, 33)), steps=20, warmup=2)
    assert len(times) == 20 and all(t > 0 for t in times)
    assert eng.past[0].shape[2] == 32 + 20
    assert len(protocol.ttft_ms(eng, list(range(1, 17)), runs=3)) == 3


def test_rejects_non_llama(tmp_path):
    with pytest.raises(CanaoError, match="Llama"):
        export_decoder(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
