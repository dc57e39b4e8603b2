"""Our Llama, loaded from the real SmolLM2 Q4_1 GGUF, against transformers loading the same file.

Catches errors in dequantization, tensor-name mapping, the Q/K un-permutation, RoPE theta,
RMSNorm epsilon, grouped-query attention and the KV cache.
"""

import pytest
import torch

from canao.models.decoders import load_causal_lm
from canao.paths import builtin_model

import accelerate  # noqa: F401  transformers needs it to load GGUF files (test extra)
import transformers

PROMPT = "The Eiffel Tower is located in Paris, the capital of France. It was built in"


@pytest.fixture(scope="module")
def ours():
    torch.set_num_threads(1)
    model, tokenizer, info = load_causal_lm("smollm2")
    return model, tokenizer, info


@pytest.fixture(scope="module")
def reference():
    path = builtin_model("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_config_from_gguf_metadata(ours):
    _, _, info = ours
    cfg = info["config"]
    assert info["architecture"] == "llama" and info["format"] == "gguf"
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"]) == (30, 576, 9, 3)
    assert cfg["rope_theta"] == 100000.0  # SmolLM2 does not use the 10000 default
    assert cfg["tie_embeddings"] and info["context_length"] == 8192


def test_logits_match_transformers(ours, reference):
    model, tokenizer, _ = ours
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        got = model(ids)
        want = reference(ids).logits
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"max abs logit difference {diff}"
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))


def test_kv_cache_decode_equals_full_forward(ours):
    model, tokenizer, _ = ours
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    n, split = ids.shape[1], 9
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(max_len=n)
        steps = [model(ids[:, :split], cache, 0)]
        steps += [model(ids[:, i:i + 1], cache, i) for i in range(split, n - 3)]
        steps.append(model(ids[:, n - 3:], cache, n - 3))  # several tokens after a cached prefix
        incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape
    diff = (incremental - full).abs().max().item()
    assert diff <= 5e-4, f"cached decode drifts from the full forward by {diff}"
    assert torch.equal(incremental[0].argmax(-1), full[0].argmax(-1))


def test_hf_folder_llama_matches_transformers(tmp_path):
    """A small random Llama saved by transformers (safetensors): config.json mapping, untied head."""
    from canao.models.decoders import load_decoder

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; perturb them so a mis-loaded norm shows
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model, info = load_decoder(tmp_path)
    assert info["config"]["rope_theta"] == 5000.0 and not info["config"]["tie_embeddings"]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5, f"max abs logit difference {diff}"
