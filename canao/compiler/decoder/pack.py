"""Weights of a Llama model packed for the decoder kernels, in GGUF's own block formats.

A matrix whose GGUF type is already the wanted format is copied block for block (no
round trip through fp32); any other is dequantized and requantized with the `gguf`
package's reference quantizers (Q8_0, Q4_1) or canao's k-quant quantizer (kquants.py).
Each matrix has a format of its own (llama.cpp's k-quant mixes differ per tensor). Rows
are what moves: llama.cpp's Q/K row permutation is undone by reordering whole rows, which
is exact for any block format, and Q/K/V and gate/up are packed by concatenating and
interleaving rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import CanaoError
from ...models import gguf_loader
from ...models.llama import LlamaConfig, RotaryEmbedding
from ...models import kquants

QK = 32
NR = 16  # rows per kernel chunk; gate/up are interleaved in chunks of NR (canao_decoder.c)
FORMATS = {"F32": 0, "Q8_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}  # WT_* in canao_decoder_kernels.h
ALIGN = 64


def row_bytes(fmt: str, k: int) -> int:
    if fmt in kquants.BLOCK_BYTES:
        return k // kquants.QK_K * kquants.BLOCK_BYTES[fmt]
    return {"F32": 4 * k, "Q8_0": k // QK * 34, "Q4_1": k // QK * 20}[fmt]


def quantize_rows(dense: np.ndarray, fmt: str, name: str) -> np.ndarray:
    """A float matrix as rows of fmt's blocks (uint8 [out, row_bytes])."""
    import gguf

    if fmt in kquants.BLOCK_BYTES:
        return kquants.quantize(dense, fmt, name)
    return gguf.quants.quantize(dense, gguf.GGMLQuantizationType[fmt])


@dataclass
class Packed:
    blob: bytearray = field(default_factory=bytearray)
    offsets: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)
    copied_raw: int = 0      # matrices taken block for block from the source file
    requantized: int = 0

    def add(self, name: str, data: np.ndarray, fmt: str = "F32") -> None:
        pad = -len(self.blob) % ALIGN
        self.blob += b"\0" * pad
        self.offsets[name] = len(self.blob)
        self.formats[name] = fmt
        self.blob += np.ascontiguousarray(data).tobytes()


class Source:
    """Tensors of a decoder checkpoint by our parameter names, as rows of a wanted format.

    Llama GGUF files are read tensor by tensor, so matrices already in the wanted block format
    are copied as they are. Other sources (HF folders; GPT-2) go through the PyTorch model."""

    def __init__(self, spec):
        from ...paths import resolve_model_path

        path = resolve_model_path(spec)
        self.path = path
        self.gguf = None
        if path.is_file():
            gf = gguf_loader.open_gguf(path)
            if gf.architecture in gguf_loader.LLAMA_FAMILY:
                self.gguf = gf
                self.arch, self.model_arch = "llama", gf.architecture
                self.config = gguf_loader.llama_config(gf)
                self.state = None
                return
        from ...models.decoders import load_decoder

        model, info = load_decoder(path)
        self.model_arch = info.get("architecture")
        # the kernels' family: Llama's blocks (Qwen2, Phi-3 are Llama as far as they go), or GPT-2's
        self.arch = "llama" if self.model_arch in gguf_loader.LLAMA_FAMILY else self.model_arch
        if self.arch not in ("llama", "gpt2"):
            raise CanaoError(f"{path}: canao compiles llama, qwen2, phi3 and gpt2 decoders; this is '{self.model_arch}'")
        self.config = model.config
        self.state = {k: v.detach().float() for k, v in model.state_dict().items()}

    def vector(self, name: str, gguf_name: str) -> np.ndarray:
        if self.gguf is None:
            return self.state[name].numpy().astype(np.float32)
        v = gguf_loader.dequantize(self.gguf, gguf_name)
        heads = gguf_loader.permuted_heads(self.gguf, self.config, gguf_name)  # a Q or K bias
        return (gguf_loader.reverse_permute(v, heads) if heads else v).numpy()

    def matrix(self, name: str, gguf_name: str, fmt: str) -> tuple[np.ndarray, bool]:
        """(rows as a [out, row_bytes] uint8 array or [out, in] float32, taken raw?). Rows llama.cpp
        permuted (llama's Q and K) are put back in HF's order."""
        raw, permute_heads = None, 0
        if self.gguf is not None:
            permute_heads = gguf_loader.permuted_heads(self.gguf, self.config, gguf_name)
            gguf_name, start, end = gguf_loader.file_rows(self.gguf, self.config, gguf_name)  # Phi-3: rows of a fused one
            t = self.gguf.tensors.get(gguf_name)
            if t is None:
                raise CanaoError(f"{self.path}: tensor '{gguf_name}' is missing; the file is not a complete "
                                 f"{self.model_arch} model")
            if t.tensor_type.name == fmt and fmt != "F32":
                raw = np.asarray(t.data, dtype=np.uint8).reshape(int(t.shape[1]), -1)[start:end]
        if raw is not None:
            rows = raw
        else:
            dense = self.state[name].numpy() if self.gguf is None else \
                gguf_loader.dequantize(self.gguf, gguf_name).numpy()[start:end]
            if permute_heads:
                dense = gguf_loader.reverse_permute(torch.from_numpy(dense), permute_heads).numpy()
                permute_heads = 0  # done
            dense = np.ascontiguousarray(dense, dtype=np.float32)
            if fmt == "F32":
                return dense, False
            if dense.shape[1] % QK:
                raise CanaoError(f"{name}: input size {dense.shape[1]} is not a multiple of {QK}; use --precision fp32")
            rows = quantize_rows(dense, fmt, gguf_name if self.gguf is not None else name)
        if permute_heads:
            order = gguf_loader.reverse_permute(torch.arange(rows.shape[0])[:, None], permute_heads)[:, 0].numpy()
            rows = rows[order]
        return rows, raw is not None


PRECISION_FORMATS = {"fp32": "F32", "q8_0": "Q8_0", "q4_1": "Q4_1", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}


def matrix_format(src: Source, precision: str, name: str, gguf_name: str, n_layers: int) -> str:
    """The block format of one matrix. The k-quant mixes keep a tensor the file already holds in one of
    the mix's formats (a llama.cpp Q4_K_M file compiled at q4_k_m is copied block for block); others
    get llama.cpp's choice (kquants.mix_format)."""
    fmt = PRECISION_FORMATS[precision]
    if precision not in kquants.MIXES:
        return fmt
    if src.gguf is not None:
        t = src.gguf.tensors.get(gguf_loader.file_rows(src.gguf, src.config, gguf_name)[0])
        if t is None:
            return fmt  # Source.matrix says it is missing
        if t.tensor_type.name in kquants.MIXES[precision]:
            return t.tensor_type.name
        k = int(t.shape[0])  # GGUF lists the innermost dimension first
    else:
        k = src.state[name].shape[1]
    return kquants.mix_format(precision, gguf_name, k, n_layers)


def embedding_format(src: Source, precision: str) -> str:
    """fp32 keeps fp32; quantized builds keep a quantized embedding as the file has it (llama.cpp
    writes token_embd as Q8_0 in its Q4 files and Q6_K in its k-quant ones: the tied output matrix
    is sensitive)."""
    if precision == "fp32":
        return "F32"
    if src.gguf is not None:
        kind = src.gguf.tensors["token_embd.weight"].tensor_type.name
        if kind in FORMATS and kind != "F32":
            return kind
    return "Q8_0"


def pack_llama(src: Source, precision: str, max_ctx: int) -> tuple[Packed, dict]:
    cfg: LlamaConfig = src.config
    efmt = embedding_format(src, precision)
    if cfg.intermediate_size % NR or cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise CanaoError(f"unsupported shapes for the decoder kernels: intermediate_size {cfg.intermediate_size} "
                         f"(multiple of {NR} needed), {cfg.num_heads} heads over {cfg.num_kv_heads} KV heads")
    if precision != "fp32" and (cfg.hidden_size % QK or cfg.intermediate_size % QK):
        raise CanaoError(f"{precision} needs hidden and intermediate sizes that are multiples of {QK}; use --precision fp32")
    p = Packed()

    def take(name, gname, fmt=None):
        fmt = fmt or matrix_format(src, precision, name, gname, cfg.num_layers)
        rows, raw = src.matrix(name, gname, fmt)
        p.copied_raw += raw
        p.requantized += (not raw) and fmt != "F32"
        return rows, fmt

    p.add("tok_embd", *take("embed_tokens.weight", "token_embd.weight", efmt))
    if cfg.tie_embeddings:
        p.offsets["lm_head"], p.formats["lm_head"] = p.offsets["tok_embd"], efmt
    else:
        p.add("lm_head", *take("lm_head.weight", "output.weight", None if precision in kquants.MIXES else efmt))
    p.add("out_norm", src.vector("norm.weight", "output_norm.weight"))

    rope = RotaryEmbedding(cfg.head_dim, max_ctx, cfg.rope_theta)  # the same tables PyTorch uses
    half = cfg.head_dim // 2
    p.add("rope_cos", rope.cos[:, :half].numpy())
    p.add("rope_sin", rope.sin[:, :half].numpy())
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        g = f"blk.{i}."
        p.add(f"{i}.attn_norm", src.vector(pre + "input_layernorm.weight", g + "attn_norm.weight"))
        # one GEMV for Q and K: K in Q's format
        q, qfmt = take(pre + "self_attn.q_proj.weight", g + "attn_q.weight")
        k, _ = take(pre + "self_attn.k_proj.weight", g + "attn_k.weight", qfmt)
        v, vfmt = take(pre + "self_attn.v_proj.weight", g + "attn_v.weight")
        # V rows follow Q and K; in another format (the mixes' Q6_K) they are a second GEMV
        p.add(f"{i}.wqkv", np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)]) if vfmt != qfmt
              else np.concatenate([q, k, v]), qfmt)
        p.formats[f"{i}.wv"] = vfmt
        if cfg.attention_bias or cfg.qkv_bias:  # added by the GEMV's epilogue, before RoPE
            p.add(f"{i}.bqkv", np.concatenate([src.vector(pre + f"self_attn.{n}_proj.bias", g + f"attn_{n}.bias")
                                               for n in "qkv"]))
        p.add(f"{i}.wo", *take(pre + "self_attn.o_proj.weight", g + "attn_output.weight"))
        if cfg.attention_bias:
            p.add(f"{i}.bo", src.vector(pre + "self_attn.o_proj.bias", g + "attn_output.bias"))
        p.add(f"{i}.ffn_norm", src.vector(pre + "post_attention_layernorm.weight", g + "ffn_norm.weight"))
        # interleaved into one matrix: up in gate's format
        gate, gfmt = take(pre + "mlp.gate_proj.weight", g + "ffn_gate.weight")
        up, _ = take(pre + "mlp.up_proj.weight", g + "ffn_up.weight", gfmt)
        chunks = cfg.intermediate_size // NR
        w13 = np.stack([gate.reshape(chunks, NR, -1), up.reshape(chunks, NR, -1)], axis=1).reshape(2 * cfg.intermediate_size, -1)
        p.add(f"{i}.w13", w13, gfmt)
        p.add(f"{i}.w2", *take(pre + "mlp.down_proj.weight", g + "ffn_down.weight"))
    return p, format_summary(p, precision, cfg.num_layers)


LLAMA_MATRICES = (("wqkv", 2), ("wv", 1), ("wo", 1), ("w13", 2), ("w2", 1))  # Q and K, V, O, gate and up, down
GPT2_MATRICES = (("wqkv", 1), ("wo", 1), ("w13", 1), ("w2", 1))


def format_summary(p: Packed, precision: str, n_layers: int, matrices=LLAMA_MATRICES) -> dict:
    """The manifest's weights entry: the precision's layer format, the embedding's and the output's, and
    how many of the checkpoint's layer matrices each format holds (the mixes and their fallbacks differ
    per matrix). matrices: (packed name, checkpoint matrices in it)."""
    counts: dict = {}
    for i in range(n_layers):
        for m, n in matrices:
            counts[p.formats[f"{i}.{m}"]] = counts.get(p.formats[f"{i}.{m}"], 0) + n
    return {"weights_format": PRECISION_FORMATS[precision], "embedding_format": p.formats["tok_embd"],
            "output_format": p.formats["lm_head"], "matrix_formats": counts}


def arch_shapes(src: Source) -> dict:
    """The shapes and constants the generated C needs, for either architecture."""
    c = src.config
    if src.arch == "llama":
        return {"architecture": "llama", "model_architecture": src.model_arch, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim, "vocab_size": c.vocab_size, "eps": c.rms_norm_eps,
                "max_positions": c.max_seq_len}
    return {"architecture": "gpt2", "hidden_size": c.n_embd, "intermediate_size": c.n_inner, "num_layers": c.n_layer,
            "num_heads": c.n_head, "num_kv_heads": c.n_head, "head_dim": c.n_embd // c.n_head,
            "vocab_size": c.vocab_size, "eps": c.layer_norm_epsilon, "max_positions": c.n_positions,
            "gelu_tanh": c.activation != "gelu"}


def pack_gpt2(src: Source, precision: str, max_ctx: int) -> tuple[Packed, dict]:
    """GPT-2: LayerNorms with bias, learned positions, fused QKV with bias, GELU MLP, biases everywhere."""
    c = src.config
    efmt = "F32" if precision == "fp32" else "Q8_0"
    if precision != "fp32" and (c.n_embd % QK or c.n_inner % QK):
        raise CanaoError(f"{precision} needs n_embd and n_inner that are multiples of {QK}; use --precision fp32")
    state = src.state
    p = Packed()

    def mat(name, fmt):
        dense = np.ascontiguousarray(state[name].numpy(), dtype=np.float32)
        if fmt == "F32":
            return dense
        p.requantized += 1
        return quantize_rows(dense, fmt, name)

    def vec(name):
        return state[name].numpy().astype(np.float32)

    p.add("tok_embd", mat("wte.weight", efmt), efmt)
    if c.tie_embeddings:
        p.offsets["lm_head"], p.formats["lm_head"] = p.offsets["tok_embd"], efmt
    else:
        p.add("lm_head", mat("lm_head.weight", efmt), efmt)
    p.add("wpe", vec("wpe.weight")[:max_ctx])
    p.add("out_norm", vec("ln_f.weight"))
    p.add("out_norm_b", vec("ln_f.bias"))
    for i in range(c.n_layer):
        pre = f"h.{i}."
        for field, name in (("attn_norm", "ln_1.weight"), ("attn_norm_b", "ln_1.bias"), ("bqkv", "attn.c_attn.bias"),
                            ("bo", "attn.c_proj.bias"), ("ffn_norm", "ln_2.weight"), ("ffn_norm_b", "ln_2.bias"),
                            ("b13", "mlp.c_fc.bias"), ("b2", "mlp.c_proj.bias")):
            p.add(f"{i}.{field}", vec(pre + name))
        # the same roles as llama.cpp's names for GPT-2's matrices (its mixes treat them as for Llama)
        for field, name, role in (("wqkv", "attn.c_attn.weight", "attn_qkv"),
                                  ("wo", "attn.c_proj.weight", "attn_output"),
                                  ("w13", "mlp.c_fc.weight", "ffn_up"), ("w2", "mlp.c_proj.weight", "ffn_down")):
            fmt = matrix_format(src, precision, pre + name, f"blk.{i}.{role}.weight", c.n_layer)
            p.add(f"{i}.{field}", mat(pre + name, fmt), fmt)
        p.formats[f"{i}.wv"] = p.formats[f"{i}.wqkv"]
    return p, format_summary(p, precision, c.n_layer, GPT2_MATRICES)
