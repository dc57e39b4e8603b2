"""Hostile model files: GGUF, safetensors and tokenizer readers end every damaged input in a clean
CanaoError, quickly and in bounded memory (random truncations, bit flips, huge counts)."""

import json
import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canao.errors import CanaoError
from canao.models.gguf_loader import dequantize, llama_config, open_gguf

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SECONDS, PEAK_BYTES = 1.0, 64 << 20


def tiny_gguf(path, **meta):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    values = {"embedding_length": 8, "head_count": 2, "head_count_kv": 2, "block_count": 1,
              "feed_forward_length": 16, "context_length": 32, **meta}
    w.add_uint32("llama.embedding_length", values["embedding_length"])
    w.add_uint32("llama.attention.head_count", values["head_count"])
    w.add_uint32("llama.attention.head_count_kv", values["head_count_kv"])
    w.add_uint32("llama.block_count", values["block_count"])
    w.add_uint32("llama.feed_forward_length", values["feed_forward_length"])
    w.add_uint64("llama.context_length", values["context_length"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "ab"])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def damage(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data[:max(0, len(data) - cut)])
    for pos, bit in flips:
        if b:
            b[pos % len(b)] ^= 1 << bit
    return bytes(b)


def bounded(fn) -> CanaoError | None:
    """fn() must return or raise CanaoError (returned), within SECONDS and PEAK_BYTES of Python/numpy
    allocations; any other exception fails the test."""
    tracemalloc.start()
    t0 = time.perf_counter()
    error = None
    try:
        fn()
    except CanaoError as exc:
        assert "\n" not in str(exc)  # one line, no traceback text
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < SECONDS and peak < PEAK_BYTES
    return error


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def read_all_gguf(path):
    gf = open_gguf(path)
    llama_config(gf)
    for name in gf.tensors:
        dequantize(gf, name)


@FUZZ
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), max_size=6))
def test_damaged_gguf_ends_in_a_clean_error(gguf_bytes, tmp_path_factory, cut, flips):
    path = tmp_path_factory.mktemp("fuzz") / "damaged.gguf"
    path.write_bytes(damage(gguf_bytes, cut, flips))
    bounded(lambda: read_all_gguf(path))


def test_crafted_counts_are_refused_at_once(tmp_path):
    header = b"GGUF" + struct.pack("<I", 3)
    crafted = {  # 41 bytes: one key whose array claims 2^40 values (the gguf package iterates them for hours)
        "array": header + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, 1 << 40),
        "entries": header + struct.pack("<QQ", 0, 1 << 62),
        "tensors": header + struct.pack("<QQ", 1 << 62, 0),
        "string": header + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1 << 60) + b"k",
    }
    for name, data in crafted.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        t0 = time.perf_counter()
        with pytest.raises(CanaoError, match=f"{name}.gguf: not a valid GGUF file"):
            open_gguf(path)
        assert time.perf_counter() - t0 < SECONDS


@pytest.mark.parametrize("meta, words", [
    (dict(head_count=0), "num_heads = 0 is outside"),
    (dict(context_length=1 << 40), "max_seq_len = 1099511627776 is outside"),
    (dict(head_count=3), "head_count|split|evenly|does not"),  # 8 is not a multiple of 3
])
def test_impossible_model_sizes_are_one_line_errors(tmp_path, meta, words):
    from canao.models.llama import Llama

    path = tiny_gguf(tmp_path / "bad.gguf", **meta)

    def load():
        Llama(llama_config(open_gguf(path)))

    error = bounded(load)
    assert error is not None and re.search(words, str(error))


@pytest.fixture(scope="module")
def safetensors_bytes():
    from safetensors.torch import save

    return save({"a.weight": torch.randn(4, 8), "b.bias": torch.zeros(8, dtype=torch.float16)})


@FUZZ
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 7)), max_size=6))
def test_damaged_safetensors_ends_in_a_clean_error(safetensors_bytes, tmp_path_factory, cut, flips):
    from canao.models.checkpoint import load_state_dict

    folder = tmp_path_factory.mktemp("st")
    (folder / "model.safetensors").write_bytes(damage(safetensors_bytes, cut, flips))
    bounded(lambda: load_state_dict(folder))


def test_a_safetensors_header_claiming_huge_sizes_is_refused(tmp_path):
    from canao.models.checkpoint import load_state_dict

    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 1 << 62]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    error = bounded(lambda: load_state_dict(tmp_path))
    assert error is not None and "corrupt or unreadable safetensors" in str(error)


@FUZZ
@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), max_size=4))
def test_damaged_tokenizer_files_end_in_a_clean_error(teacher_dir, tmp_path_factory, cut, flips):
    from canao.models.wordpiece import load_wordpiece

    for name in ("tokenizer.json", "vocab.txt"):
        folder = tmp_path_factory.mktemp("tok")
        (folder / name).write_bytes(damage((teacher_dir / name).read_bytes(), cut, flips))
        t0 = time.perf_counter()
        try:
            load_wordpiece(folder)
        except CanaoError as exc:
            assert "\n" not in str(exc)
        assert time.perf_counter() - t0 < SECONDS
