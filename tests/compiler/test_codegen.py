import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canao.compiler import compile_model, load_artifact
from canao.errors import CanaoError
from compiler_helpers import random_inputs, small_model

FP32_TOL = 1e-4


def _max_err(got, want):
    return max((torch.as_tensor(a) - b).abs().max().item() for a, b in zip(got, want))


@pytest.mark.parametrize("seq,pad", [(1, 0), (2, 0), (7, 0), (33, 5), (64, 10)])
def test_compiled_matches_pytorch_at_every_length(model, compiled, seq, pad):
    ids, tt, mask = random_inputs(seq, pad=pad, seed=seq)
    with torch.no_grad():
        want = model(ids, tt, mask)
    assert _max_err(compiled.run(ids, tt, mask), want) <= FP32_TOL


def test_batch_threads_and_numpy_inputs(model, compiled):
    ids, tt, mask = random_inputs(20, pad=3)
    ids = torch.cat([ids, ids.flip(1)])
    tt, mask = torch.cat([tt, tt]), torch.cat([mask, mask.flip(1)])
    with torch.no_grad():
        want = model(ids, tt, mask)
    for threads in (1, 2, 3):
        compiled.set_threads(threads)
        start, end = compiled.run(ids.numpy(), tt.numpy(), mask.numpy())
        assert isinstance(start, np.ndarray) and start.dtype == np.float32 and start.shape == (2, 20)
        assert _max_err((start, end), want) <= FP32_TOL
    compiled.set_threads(2)


def test_longer_than_max_seq_is_refused(compiled):
    ids, tt, mask = random_inputs(65)
    with pytest.raises(CanaoError, match="max-seq"):
        compiled.run(ids, tt, mask)


def test_manifest_records_target_memory_and_fusion(compiled):
    m = compiled.manifest
    assert m["precision"] == "fp32" and m["max_seq"] == 64 and m["target"]["name"] in ("avx2", "avx512")
    assert 0 < m["memory"]["arena_peak_bytes"] < m["memory"]["arena_naive_bytes"]
    assert m["fusion"]["kernels_after"] == len(m["kernels"])
    assert {"model.c", "libcanao_model.so", "weights.bin"} <= set(m["checksums"])


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=st.integers(1, 3), data=st.data())
def test_random_architectures_of_the_search_space(tmp_path_factory, layers, data):
    head_dim = data.draw(st.sampled_from([8, 16]))
    hidden = data.draw(st.sampled_from([24, 32, 40]))
    heads = data.draw(st.lists(st.integers(1, 4), min_size=layers, max_size=layers))
    ffn = data.draw(st.lists(st.integers(1, 70), min_size=layers, max_size=layers))
    model = small_model(hidden=hidden, heads=heads, ffn=ffn, head_dim=head_dim, seed=layers)
    out = tmp_path_factory.mktemp("prop") / "a"
    compile_model(model, out, max_seq=40)
    cm = load_artifact(out, threads=2)
    for seq in (3, data.draw(st.integers(1, 40))):
        ids, tt, mask = random_inputs(seq, pad=seq // 3)
        with torch.no_grad():
            want = model(ids, tt, mask)
        assert _max_err(cm.run(ids, tt, mask), want) <= FP32_TOL
