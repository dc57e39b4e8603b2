"""Qwen2 (Llama with q/k/v biases) and Phi-3 (Llama with fused Q/K/V and gate/up matrices), neither
with llama's Q/K row permutation in GGUF, end to end against transformers.

A small random Qwen2ForCausalLM / Phi3ForCausalLM (and a Llama for the writer's Q/K permutation)
is saved as a HF folder, loaded by canao, written to GGUF by canao's writer, read back by
transformers' own GGUF loader (so the file follows llama.cpp's layout, not only ours), then
loaded and compiled by canao from that GGUF; every path's logits are checked against transformers.
"""

import numpy as np
import pytest
import torch

import accelerate  # noqa: F401  transformers needs it to load GGUF files (test extra)
import transformers

from canao.compiler.decoder import CompiledDecoder, compile_decoder
from canao.errors import CanaoError
from canao.models.decoders import load_causal_lm, load_decoder
from canao.models.gguf_export import write_gguf

VOCAB = 49152  # SmolLM2's tokenizer is copied into the files
IDS = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161, 253, 2306, 436, 253]


def _hf_model(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(**common, rope_theta=1e4, tie_word_embeddings=False, sliding_window=95,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.Phi3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, rope_theta=1e4, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's, biases nonzero: logits far from uniform
            p.normal_(0, 0.15)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2", "phi3", "llama"])
def models(request, tmp_path_factory):
    arch = request.param
    hf = _hf_model(arch)
    folder = tmp_path_factory.mktemp(arch) / "hf"
    hf.save_pretrained(folder)
    ours, _ = load_decoder(folder)
    gguf_path = write_gguf(ours, folder.parent / f"tiny-{arch}.gguf", arch=arch)
    with torch.inference_mode():
        ref = hf(torch.tensor([IDS])).logits[0].float().numpy()
    return arch, hf, folder, ours, gguf_path, ref


def _ours(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]), model.new_cache(64), 0)[0].numpy()


def test_hf_folder_matches_transformers(models):
    arch, _, _, ours, _, ref = models
    assert ours.config.qkv_bias == (arch == "qwen2") and not ours.config.attention_bias
    np.testing.assert_allclose(_ours(ours, IDS), ref, atol=2e-4)


def test_transformers_reads_our_gguf_as_the_original(models):
    _, _, _, _, gguf_path, ref = models
    back = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                             dtype=torch.float32).eval()
    with torch.inference_mode():
        got = back(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_gguf_loads_with_config_and_tokenizer(models):
    arch, _, _, _, gguf_path, ref = models
    model, tok, info = load_causal_lm(gguf_path)
    assert info["architecture"] == arch and info["config"]["qkv_bias"] == (arch == "qwen2")
    assert info["config"]["rope_theta"] == (1e6 if arch == "qwen2" else 1e4)
    # Phi-3's sliding window (95) bounds the context: full attention equals it up to 96 tokens
    assert info["context_length"] == (96 if arch == "phi3" else 128)
    assert tok.encode("Once upon a time")[:2] == IDS[:2]
    np.testing.assert_allclose(_ours(model, IDS), ref, atol=2e-4)


def test_compiled_from_gguf_matches_transformers(models, tmp_path):
    arch, _, _, _, gguf_path, ref = models
    summary = compile_decoder(str(gguf_path), tmp_path / "fp32", precision="fp32", max_seq=64)
    decoder = CompiledDecoder(summary["artifact"], threads=2)
    assert np.abs(decoder.forward(IDS, 0) - ref[-1]).max() < 2e-4
    decoder.forward(IDS[:7], 0)  # prefill in pieces, then decode steps over the cache
    assert np.abs(decoder.forward(IDS[7:12], 7) - ref[11]).max() < 2e-4
    for pos in range(12, len(IDS)):
        assert np.abs(decoder.forward([IDS[pos]], pos) - ref[pos]).max() < 2e-4
    q8 = CompiledDecoder(compile_decoder(str(gguf_path), tmp_path / "q8", precision="q8_0", max_seq=64)["artifact"],
                         threads=1)
    got = np.stack([q8.forward([t], i).copy() for i, t in enumerate(IDS)])  # a view until the next call
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.995
    # a Q8_0 file's blocks are copied as they are (llama: whole rows moved back to HF's order),
    # and they are the blocks the compiler's own quantizer made from the fp32 file
    q8_file = write_gguf(load_decoder(gguf_path)[0], tmp_path / "q8.gguf", arch=arch, qtype="Q8_0")
    summary = compile_decoder(str(q8_file), tmp_path / "q8-raw", precision="q8_0", max_seq=64)
    assert summary["weights"]["copied_from_source"] == 2 * 7 + 1 + (arch != "qwen2")  # + untied output
    raw = CompiledDecoder(summary["artifact"], threads=1)
    np.testing.assert_array_equal(np.stack([raw.forward([t], i).copy() for i, t in enumerate(IDS)]), got)


def test_writer_refuses_what_the_format_cannot_hold(models, tmp_path):
    arch, _, _, ours, _, _ = models
    if arch == "qwen2":
        with pytest.raises(CanaoError, match="write this model as qwen2"):
            write_gguf(ours, tmp_path / "x.gguf", arch="llama")
        with pytest.raises(CanaoError, match="a phi3 GGUF has no attention biases"):
            write_gguf(ours, tmp_path / "x.gguf", arch="phi3")
    with pytest.raises(CanaoError, match="cannot write GGUF architecture 'gemma'"):
        write_gguf(ours, tmp_path / "x.gguf", arch="gemma")
    assert not list(tmp_path.iterdir())
