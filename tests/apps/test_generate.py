"""Text generation with SmolLM2: greedy parity with transformers' generate, seeded sampling,
stop strings, streaming, and the errors a user can run into."""

import numpy as np
import pytest
import torch

from canao.apps.generate import Generator
from canao.errors import CanaoError
from canao.models.decoders import load_causal_lm
from canao.paths import builtin_model

import transformers

QUESTION = "What is the capital of France?"
INSTRUCTION = "Write a short poem about the ocean."


@pytest.fixture(scope="module")
def gen():
    return Generator.load("smollm2", threads=1)


@pytest.fixture(scope="module")
def reference(gen):
    """transformers' Llama holding our weights: checks the decode loop, not the loading
    (tests/test_llama_parity.py compares loading against transformers' own GGUF reader)."""
    c = gen.model.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=True,
        bos_token_id=gen.tokenizer.bos_id, eos_token_id=gen.tokenizer.eos_id, pad_token_id=gen.tokenizer.eos_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    state = {f"model.{k}": v for k, v in gen.model.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def test_greedy_matches_transformers_generate(gen, reference):
    result = gen.generate(INSTRUCTION, max_new_tokens=16)
    ids = torch.tensor([gen.prompt_ids(INSTRUCTION)])
    with torch.inference_mode():
        out = reference.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert result["generated_tokens"] == 16 and result["stop_reason"] == "length"
    assert result["text"] == gen.tokenizer.decode(out)
    assert result["prompt_tokens"] == ids.shape[1]
    assert gen.generate(INSTRUCTION, max_new_tokens=16)["text"] == result["text"]  # deterministic


def test_chat_answer_and_eos(gen):
    result = gen.generate(QUESTION, max_new_tokens=32)
    assert "Paris" in result["text"]
    assert result["stop_reason"] == "eos" and result["generated_tokens"] < 32
    assert result["ttft_ms"] > 0 and result["tokens_per_s"] > 0 and result["total_ms"] >= result["ttft_ms"]


def test_seeded_sampling_is_reproducible(gen):
    settings = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95)
    first = gen.generate(INSTRUCTION, seed=7, **settings)["text"]
    assert gen.generate(INSTRUCTION, seed=7, **settings)["text"] == first
    others = {gen.generate(INSTRUCTION, seed=s, **settings)["text"] for s in (1, 2)}
    assert others - {first}, "different seeds should give different samples"


def test_stream_yields_the_generated_text(gen):
    stats = {}
    pieces = list(gen.stream(INSTRUCTION, max_new_tokens=10, temperature=0.8, seed=3, stats=stats))
    assert "".join(pieces) == stats["text"]
    assert stats["text"] == gen.generate(INSTRUCTION, max_new_tokens=10, temperature=0.8, seed=3)["text"]


def test_stop_string_ends_generation(gen):
    result = gen.generate(QUESTION, max_new_tokens=32, stop=["Paris"])
    assert result["stop_reason"] == "stop"
    assert "Paris" not in result["text"] and result["text"].startswith("The capital of France")
    streamed = "".join(gen.stream(QUESTION, max_new_tokens=32, stop="Paris"))
    assert streamed == result["text"]


def test_raw_text_continuation(gen):
    result = gen.generate("One, two, three, four,", chat=False, max_new_tokens=4)
    assert result["prompt_tokens"] == len(gen.tokenizer.encode("One, two, three, four,"))
    assert "five" in result["text"].lower()


def test_empty_prompt_is_refused(gen):
    for prompt in ("", "   \n"):
        with pytest.raises(CanaoError, match="empty"):
            gen.generate(prompt)


def test_prompt_longer_than_context_is_refused(gen):
    prompt = "word " * (gen.context_length + 10)
    with pytest.raises(CanaoError, match=r"the prompt is \d+ tokens but the model's context window is 8192"):
        gen.generate(prompt, chat=False)
    with pytest.raises(CanaoError, match="context window"):
        next(gen.stream(prompt))


def test_bad_settings_are_refused(gen):
    with pytest.raises(CanaoError, match="temperature"):
        gen.generate(QUESTION, temperature=-1)
    with pytest.raises(CanaoError, match="top_p"):
        gen.generate(QUESTION, top_p=0)


def test_garbage_gguf_is_refused(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CanaoError, match="garbage.gguf"):
        load_causal_lm(path)


def test_truncated_gguf_is_refused(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(builtin_model("smollm2"), "rb") as f:
        path.write_bytes(f.read(2_000_000))
    with pytest.raises(CanaoError, match="truncated.gguf"):
        load_causal_lm(path)


def _tiny_gguf(path, arch, tensor_type):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": 1, "embedding_length": 32, "feed_forward_length": 64, "context_length": 16,
                       "attention.head_count": 4, "vocab_size": 8}.items():
        w.add_uint32(f"{arch}.{key}", value)
    if tensor_type == "F32":
        w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:  # raw blocks of a type we do not decode: 8 rows of 32 values, 22 bytes per Q5_0 block
        w.add_tensor("token_embd.weight", np.zeros((8, 22), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType[tensor_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_refused(tmp_path):
    _tiny_gguf(tmp_path / "mamba.gguf", "mamba", "F32")
    with pytest.raises(CanaoError, match="architecture 'mamba' is not supported"):
        load_causal_lm(tmp_path / "mamba.gguf")


def test_unsupported_quantization_is_refused(tmp_path):
    _tiny_gguf(tmp_path / "q5.gguf", "llama", "Q5_0")
    with pytest.raises(CanaoError, match="token_embd.weight' has type Q5_0"):
        load_causal_lm(tmp_path / "q5.gguf")


def test_top_k_and_top_p_restrict_the_candidates():
    from canao.apps.generate import _sample

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(0)
    best = int(logits.argmax())
    assert all(_sample(logits, 1.0, 1, 1.0, rng) == best for _ in range(20))  # top_k=1 is greedy
    assert all(_sample(logits, 1.0, 0, 1e-6, rng) == best for _ in range(20))  # so is a tiny top_p
    top5 = set(torch.topk(logits, 5).indices.tolist())
    draws = {_sample(logits, 2.0, 5, 1.0, rng) for _ in range(200)}
    assert draws <= top5 and len(draws) > 1
