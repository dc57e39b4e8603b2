"""Write a Llama-family model (canao.models.llama.Llama as llama, qwen2 or phi3) to a GGUF file in
llama.cpp's own layout, so llama.cpp, transformers' GGUF loader and canao all read it:

- tensor names as llama.cpp's converter writes them (blk.N.attn_q.weight, ...);
- for the llama architecture, the rows of Q and K permuted per head from HF's half-rotation
  order to llama.cpp's interleaved pairs (qwen2 files keep HF's order: llama.cpp rotates them
  "NEOX" style); phi3 files hold Q/K/V as one attn_qkv matrix and gate/up as one ffn_up (gate
  rows first);
- the hyper-parameters under <arch>.*, and the tokenizer's tokenizer.ggml.* fields copied
  from another GGUF file of the same vocabulary (e.g. SmolLM2's).

Used to write small random models for the architecture parity tests, and to hand canao's own
(distilled, fine-tuned) decoders to GGUF tools.

    write_gguf(model, "tiny-qwen2.gguf", arch="qwen2", tokenizer_from="smollm2", qtype="Q8_0")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CanaoError
from .llama import Llama

ARCHS = ("llama", "qwen2", "phi3")
QTYPES = ("F32", "F16", "Q8_0", "Q4_1")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's per-head [x0..x(d/2-1), y0..] rows -> llama.cpp's [x0, y0, x1, y1, ...] (the inverse of
    gguf_loader.reverse_permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: Llama, arch: str) -> dict[str, np.ndarray]:
    cfg = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.o_proj.bias": "attn_output.bias"}
    for n in "qkv":
        names[f"self_attn.{n}_proj.weight"] = f"attn_{n}.weight"
        names[f"self_attn.{n}_proj.bias"] = f"attn_{n}.bias"
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            t = state.get(f"layers.{i}.{ours}")
            if t is None:
                continue
            if arch == "llama" and theirs.startswith(("attn_q.", "attn_k.")):
                t = permute(t, cfg.num_heads if theirs.startswith("attn_q.") else cfg.num_kv_heads)
            out[f"blk.{i}.{theirs}"] = t
        if arch == "phi3":
            b = f"blk.{i}."
            out[b + "attn_qkv.weight"] = np.concatenate([out.pop(b + f"attn_{n}.weight") for n in "qkv"])
            out[b + "ffn_up.weight"] = np.concatenate([out.pop(b + "ffn_gate.weight"), out.pop(b + "ffn_up.weight")])
    return out


def write_gguf(model: Llama, path: str | os.PathLike, arch: str = "llama", tokenizer_from: str | os.PathLike = "smollm2",
               qtype: str = "F32", name: str = "canao") -> Path:
    """Write `model` to `path`. qtype: the 2-D weight matrices' type (norms and biases stay F32)."""
    import gguf
    from gguf import quants

    from ..paths import resolve_model_path

    if arch not in ARCHS:
        raise CanaoError(f"cannot write GGUF architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    if qtype not in QTYPES:
        raise CanaoError(f"cannot write GGUF weights as '{qtype}'; choose one of {', '.join(QTYPES)}")
    cfg = model.config
    if arch == "llama" and cfg.qkv_bias:
        raise CanaoError("a llama GGUF has no q/k/v-only biases; write this model as qwen2")
    if arch == "qwen2" and cfg.attention_bias:
        raise CanaoError("a qwen2 GGUF has no output-projection bias; write this model as llama")
    if arch == "phi3" and (cfg.attention_bias or cfg.qkv_bias):
        raise CanaoError("a phi3 GGUF has no attention biases; write this model as llama or qwen2")
    source = gguf.GGUFReader(str(resolve_model_path(tokenizer_from)))
    tokens = source.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != cfg.vocab_size:
        raise CanaoError(f"{tokenizer_from}: its tokenizer has {len(tokens.data) if tokens else 'no'} tokens; the model's "
                         f"vocabulary has {cfg.vocab_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype])
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    for field in source.fields.values():  # the tokenizer, chat template included, as the source has it
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            w.add_key_value(field.name, field.contents(), vtype,
                            sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for tname, t in _tensors(model, arch).items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 2 and qtype != "F32":
            target = gguf.GGMLQuantizationType[qtype]
            if qtype == "F16":
                w.add_tensor(tname, t.astype(np.float16))
            else:
                if t.shape[1] % gguf.GGML_QUANT_SIZES[target][0]:
                    raise CanaoError(f"{tname}: rows of {t.shape[1]} values do not split into {qtype} blocks")
                w.add_tensor(tname, quants.quantize(t, target), raw_dtype=target)
        else:
            w.add_tensor(tname, t)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)  # atomic: never a half-written file under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["write_gguf", "permute"]
