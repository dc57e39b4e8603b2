"""Load a causal language model (Llama or GPT-2) with its tokenizer, from GGUF or a HF folder.

    model, tokenizer, info = load_causal_lm("smollm2")          # built-in name
    model, tokenizer, info = load_causal_lm("model.gguf")
    model, tokenizer, info = load_causal_lm("checkpoints/gpt2") # config.json + model.safetensors + tokenizer.json

Every model returned has the same interface: `model(input_ids, cache, start_pos, last_only=False)`
-> logits, `model.new_cache(max_len)`, and `model.max_seq_len`.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import CanaoError
from ..paths import resolve_model_path
from . import gguf_loader
from .bpe_tokenizer import BPETokenizer
from .checkpoint import load_state_dict, read_config
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig

HF_ARCHITECTURES = ("llama", "qwen2", "phi3", "gpt2")


def load_decoder(spec: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model alone (no tokenizer needed), and an info dict."""
    model, _, info = _load(spec, with_tokenizer=False)
    return model, info


def load_causal_lm(spec: str | Path) -> tuple[torch.nn.Module, BPETokenizer, dict]:
    """(model, tokenizer, info) from a .gguf file, a HF folder, or a built-in name ('smollm2'), in PyTorch.
    A compiled artifact is loaded by canao.apps.decoders.load_causal_lm, which takes all of these too.

    info: path, format ('gguf' | 'hf'), architecture, params, context_length, config (dict),
    weight_types (GGUF tensor type counts; the model itself always runs in float32), load_ms.
    """
    return _load(spec, with_tokenizer=True)


def is_compiled_artifact(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").exists()


def _load(spec, with_tokenizer: bool):
    start = time.perf_counter()
    path = resolve_model_path(spec)
    if is_compiled_artifact(path):
        raise CanaoError(f"{path} is a compiled canao artifact, not a PyTorch model: load it with "
                         f"canao.apps.decoders.load_causal_lm (what `canao generate` and `canao eval` use)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CanaoError(f"{path}: expected a .gguf file or a checkpoint folder (config.json + model.safetensors)")
        model, tokenizer, info = _from_gguf(path, with_tokenizer)
    else:
        model, tokenizer, info = _from_folder(path, with_tokenizer)
    info.update(
        path=str(path),
        params=sum(p.numel() for p in model.parameters()),
        context_length=model.max_seq_len,
        config=model.config.to_dict(),
        load_ms=(time.perf_counter() - start) * 1000.0,
    )
    return model, tokenizer, info


def _from_gguf(path: Path, with_tokenizer: bool):
    gf = gguf_loader.open_gguf(path)
    arch = gguf_loader.check_architecture(gf)
    if arch in gguf_loader.LLAMA_FAMILY:
        config = gguf_loader.llama_config(gf)
        model = Llama.from_state_dict(config, gguf_loader.llama_state_dict(gf, config))
    else:
        config = gguf_loader.gpt2_config(gf)
        model = GPT2.from_state_dict(config, gguf_loader.gpt2_state_dict(gf, config), conv1d=False)
    tokenizer = BPETokenizer.from_gguf(gf) if with_tokenizer else None
    types = Counter(t.tensor_type.name for t in gf.tensors.values())
    info = {"format": "gguf", "architecture": arch, "name": gf.get("general.name"), "weight_types": dict(types)}
    return model, tokenizer, info


def _from_folder(folder: Path, with_tokenizer: bool):
    config = read_config(folder)
    arch = config.get("model_type")
    if arch not in HF_ARCHITECTURES:
        raise CanaoError(
            f"{folder}: model_type '{arch}' is not a supported decoder; canao generates with {', '.join(HF_ARCHITECTURES)}"
        )
    try:
        if arch in gguf_loader.LLAMA_FAMILY:
            cfg = LlamaConfig.from_hf(config)
            model = Llama.from_state_dict(cfg, unfuse_phi3(load_state_dict(folder), cfg) if arch == "phi3"
                                          else load_state_dict(folder))
        else:
            model = GPT2.from_state_dict(GPT2Config.from_hf(config), load_state_dict(folder), conv1d=True)
    except KeyError as exc:
        raise CanaoError(f"{folder / 'config.json'}: missing key {exc} for a {arch} model") from None
    tokenizer = BPETokenizer.from_folder(folder) if with_tokenizer else None
    return model, tokenizer, {"format": "hf", "architecture": arch, "name": folder.name, "weight_types": {}}


def unfuse_phi3(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Phi-3's qkv_proj and gate_up_proj (gate rows first) as Llama's separate projections."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, t in state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            pre = name.removesuffix("qkv_proj.weight")
            out.update({pre + "q_proj.weight": t[:q], pre + "k_proj.weight": t[q:q + kv], pre + "v_proj.weight": t[q + kv:]})
        elif name.endswith("mlp.gate_up_proj.weight"):
            pre = name.removesuffix("gate_up_proj.weight")
            out.update({pre + "gate_proj.weight": t[:cfg.intermediate_size], pre + "up_proj.weight": t[cfg.intermediate_size:]})
        else:
            out[name] = t
    return out


__all__ = ["load_causal_lm", "load_decoder"]
