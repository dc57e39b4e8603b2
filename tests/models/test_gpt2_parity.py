"""GPT-2 from a Hugging Face folder and from GGUF, against transformers' GPT2LMHeadModel.

No real GPT-2 checkpoint is available offline, so a small random one is saved with
transformers (safetensors + config.json), with a byte-level BPE tokenizer trained here.
"""

import json

import numpy as np
import pytest
import torch

from canao.apps.generate import Generator
from canao.models.decoders import load_causal_lm, load_decoder

import transformers
import gguf

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Compilers fuse layers, tune loops and generate code for small CPUs.",
    "Language models predict the next token; 12 + 30 = 42.",
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))

    # n_positions 1024: transformers maps gpt2.context_length to n_ctx only, so its GGUF
    # loader assumes the default 1024 learned positions.
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=1024, n_embd=64, n_layer=3, n_head=4,
                                     eos_token_id=0, bos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    # Random init leaves biases and LayerNorm at 0/1; perturb them so a mis-loaded one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, tok


def write_gguf(path, model, tok):
    """The same weights in llama.cpp's GPT-2 layout: [out, in] matrices, blk.N.* names."""
    cfg = model.config
    sd = {k.removeprefix("transformer."): v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    data = json.loads(tok.to_str())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_eos_token_id(0)
    w.add_bos_token_id(0)
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["wte.weight"])
    w.add_tensor("position_embd.weight", sd["wpe.weight"])
    w.add_tensor("output_norm.weight", sd["ln_f.weight"])
    w.add_tensor("output_norm.bias", sd["ln_f.bias"])
    for i in range(cfg.n_layer):
        for hf, cpp in names.items():
            weight = sd[f"h.{i}.{hf}.weight"]
            w.add_tensor(f"blk.{i}.{cpp}.weight", weight if hf.startswith("ln") else np.ascontiguousarray(weight.T))
            w.add_tensor(f"blk.{i}.{cpp}.bias", sd[f"h.{i}.{hf}.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_hf_folder_logits_match(hf_folder):
    folder, reference, _ = hf_folder
    model, info = load_decoder(folder)
    assert info["architecture"] == "gpt2" and info["format"] == "hf"
    ids = torch.randint(0, reference.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"max abs logit difference {diff}"


def test_kv_cache_matches_full_forward(hf_folder):
    folder, _, _ = hf_folder
    model, _ = load_decoder(folder)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(max_len=20)
        parts = [model(ids[:, :7], cache, 0)] + [model(ids[:, i:i + 1], cache, i) for i in range(7, 20)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


def test_gguf_gpt2_matches_folder_and_transformers(hf_folder, tmp_path):
    folder, reference, tok = hf_folder
    path = tmp_path / "tiny-gpt2.f32.gguf"
    write_gguf(path, reference, tok)
    model, tokenizer, info = load_causal_lm(path)
    assert info["architecture"] == "gpt2" and info["format"] == "gguf"
    ids = torch.randint(0, reference.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = model(ids)
        assert (ours - reference(ids).logits).abs().max().item() <= 1e-4
        # transformers reads the file independently: our GGUF layout assumptions must agree with it.
        from_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                      dtype=torch.float32).eval()
        assert (ours - from_gguf(ids).logits).abs().max().item() <= 1e-4
    text = TEXT[2]
    assert tokenizer.encode(text) == tok.encode(text).ids


def test_generator_greedy_matches_transformers_generate(hf_folder):
    folder, reference, tok = hf_folder
    gen = Generator.load(str(folder))
    prompt = "The quick brown fox"
    result = gen.generate(prompt, max_new_tokens=12, chat=False)
    ids = torch.tensor([tok.encode(prompt).ids])
    out = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0)[0, ids.shape[1]:]
    new = out.tolist()
    if 0 in new:  # we stop at end-of-text; so does transformers (and pads after it)
        new = new[:new.index(0)]
    assert len(new) >= 4, "too short to compare; pick another prompt or seed"
    assert result["generated_tokens"] == len(new)
    assert result["text"] == tok.decode(new)


def test_compiled_gpt2_matches_transformers(hf_folder, tmp_path):
    """canao compile on a GPT-2 (HF folder and GGUF): prefill and decode steps of the native code
    against transformers; q8_0 keeps the greedy choices."""
    from canao.compiler.decoder import CompiledDecoder, compile_decoder

    folder, reference, tok = hf_folder
    write_gguf(tmp_path / "gpt2.gguf", reference, tok)
    ids = torch.randint(0, reference.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = reference(ids).logits[0].numpy()
    for source in (folder, tmp_path / "gpt2.gguf"):
        art = compile_decoder(source, tmp_path / f"art-{source.name}", precision="fp32", max_seq=64)["artifact"]
        dec = CompiledDecoder(art, threads=2)
        assert np.abs(dec.forward_all(ids[0, :10].tolist(), 0) - ref[:10]).max() < 1e-4
        for pos in range(10, 24):
            assert np.abs(dec.forward([int(ids[0, pos])], pos) - ref[pos]).max() < 1e-4
    art = compile_decoder(folder, tmp_path / "art-q8", precision="q8_0", max_seq=64)["artifact"]
    got = CompiledDecoder(art, threads=1).forward_all(ids[0].tolist(), 0)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
