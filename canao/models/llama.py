"""A Llama decoder in plain PyTorch (nanoGPT style), with a key/value cache.

Blocks: RMSNorm, rotary position embeddings (half-rotation layout, as in Hugging Face),
grouped-query attention, SwiGLU feed-forward, optionally tied input/output embeddings.
Parameter names follow Hugging Face's `LlamaForCausalLM` without the `model.` prefix, so a
HF state dict loads after stripping it and the GGUF loader maps onto the same names.

    model = Llama(config)
    cache = model.new_cache(max_len=256)
    logits = model(prompt_ids, cache, start_pos=0)           # prefill
    logits = model(next_id[:, None], cache, start_pos=len)   # one decode step
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CanaoError


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    attention_bias: bool = False  # biases on q, k, v and o (HF Llama's attention_bias)
    qkv_bias: bool = False        # biases on q, k and v only (Qwen2)

    def __post_init__(self):
        from .limits import check_sizes

        check_sizes("llama config", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, max_seq_len=self.max_seq_len)
        if self.num_heads % self.num_kv_heads:
            raise CanaoError(f"llama config: {self.num_heads} attention heads cannot share {self.num_kv_heads} "
                             "key/value heads evenly; the file is corrupt")

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a Hugging Face config.json (transformers 4.x or 5.x spelling)."""
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise CanaoError(f"RoPE scaling '{rope_type}' in config.json is not supported; canao runs default RoPE only")
        if cfg.get("mlp_bias"):
            raise CanaoError("config.json sets mlp_bias=true, which canao's Llama does not support")
        if cfg.get("use_sliding_window"):
            raise CanaoError("config.json sets use_sliding_window=true; canao runs full attention only")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise CanaoError(f"partial rotary embedding (partial_rotary_factor {cfg['partial_rotary_factor']}) is not supported")
        context = cfg.get("max_position_embeddings", 2048)
        if cfg.get("model_type") == "phi3" and cfg.get("sliding_window"):
            # Phi-3 attends within a window: full attention is the same while the sequence fits it
            context = min(context, int(cfg["sliding_window"]) + 1)
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_seq_len=context,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            attention_bias=cfg.get("attention_bias", False),
            qkv_bias=cfg.get("model_type") == "qwen2",
        )

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys and values for every layer: [batch, kv_heads, max_len, head_dim].

    Shared by the Llama and GPT-2 models. `update` writes the new positions and returns views
    of everything cached so far, so attention never copies the history.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise CanaoError(f"KV cache holds {self.max_len} positions but {end} were requested; allocate a larger cache")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Scaled dot-product attention of T new queries (at start_pos..) over all S cached keys.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with S = start_pos + T. Grouped-query heads are
    expanded by SDPA itself (enable_gqa), without materializing repeated keys.
    """
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == 1:  # a single new query may look at every cached key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if start_pos == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Several new queries after a cached prefix: query i sees keys up to start_pos + i.
    mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=start_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even when the model runs in bfloat16 (as HF does).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once (rope_theta comes from the checkpoint)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.arange(max_seq_len, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # half-rotation layout: [f0..f(d/2-1), f0..f(d/2-1)]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Rotate x: [B, heads, T, head_dim] for positions start_pos .. start_pos+T-1."""
        t = x.shape[2]
        cos = self.cos[start_pos:start_pos + t].to(x.dtype)
        sin = self.sin[start_pos:start_pos + t].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | None, start_pos: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, start_pos), rope(k, start_pos)
        if cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v)
        y = causal_attention(q, k, v, start_pos)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, cache, start_pos):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, max_len, batch, self.embed_tokens.weight.dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] at positions start_pos..; last_only keeps T=1."""
        t = input_ids.shape[1]
        if start_pos + t > self.config.max_seq_len:
            raise CanaoError(f"sequence of {start_pos + t} tokens exceeds the context window of {self.config.max_seq_len}")
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, self.rope, cache, start_pos)
        if last_only:  # generation needs only the next-token distribution; skip the rest of the vocab matmul
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    @classmethod
    def from_state_dict(cls, cfg: LlamaConfig, state: dict[str, torch.Tensor]) -> "Llama":
        """Build the model around checkpoint tensors; HF `model.` prefixes are accepted."""
        state = {k.removeprefix("model."): v for k, v in state.items()}
        model = adopt_weights(lambda: cls(cfg), state, cfg.tie_embeddings, "Llama")
        model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # was built on meta
        return model

    def get_input_embeddings_weight(self) -> nn.Parameter:
        return self.embed_tokens.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def adopt_weights(make, state: dict[str, torch.Tensor], tied: bool, arch: str) -> nn.Module:
    """Construct a model on the meta device and adopt the checkpoint's tensors as its parameters.

    Skips the random initialization (seconds for 135M parameters) and a second copy of the
    weights. `tied`: lm_head shares the token embedding (the checkpoint's copy, if any, is ignored).
    Buffers computed in __init__ stay on meta; the caller rebuilds them.
    """
    with torch.device("meta"):
        model = make()
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CanaoError(
            f"checkpoint does not match the {arch} config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise CanaoError(f"checkpoint tensors do not fit the {arch} config: {first}") from None
    if tied:
        model.lm_head.weight = model.get_input_embeddings_weight()
    return model.eval().requires_grad_(False)


def flops_per_token(cfg: LlamaConfig) -> float:
    """Matmul FLOPs of one decode step, ignoring attention over the cache."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return 2.0 * (cfg.num_layers * (attn + mlp) + cfg.hidden_size * cfg.vocab_size)


__all__ = ["LlamaConfig", "KVCache", "Llama", "adopt_weights", "causal_attention", "flops_per_token"]
