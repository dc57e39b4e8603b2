"""GPT-2 in plain PyTorch, with the same key/value-cache interface as `canao.models.llama`.

Learned absolute positions, pre-LayerNorm blocks, GELU (tanh approximation), tied output
embedding. Hugging Face stores GPT-2's projections as `Conv1D` ([in, out] weights); they are
transposed once at load time into ordinary nn.Linear layers ([out, in]).

Parameter names follow HF's `GPT2LMHeadModel` without the `transformer.` prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CanaoError
from .llama import KVCache, adopt_weights, causal_attention

# HF activation names -> our functions. "gelu_new" is GPT-2's tanh approximation.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 3072
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    tie_embeddings: bool = True

    def __post_init__(self):
        from .limits import check_sizes

        check_sizes("gpt2 config", vocab_size=self.vocab_size, max_seq_len=self.n_positions, hidden_size=self.n_embd,
                    num_layers=self.n_layer, num_heads=self.n_head, intermediate_size=self.n_inner)
        if self.n_embd % self.n_head:
            raise CanaoError(f"gpt2 config: hidden size {self.n_embd} does not split into {self.n_head} heads; "
                             "the file is corrupt")

    @property
    def max_seq_len(self) -> int:
        return self.n_positions

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPT2Config":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise CanaoError(f"GPT-2 activation '{act}' is not supported; use one of {sorted(ACTIVATIONS)}")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise CanaoError("GPT-2 configs with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        if cfg.get("scale_attn_weights") is False:
            raise CanaoError("GPT-2 configs with scale_attn_weights=false are not supported")
        n_embd = cfg["n_embd"]
        return cls(
            vocab_size=cfg["vocab_size"],
            n_positions=cfg.get("n_positions", 1024),
            n_embd=n_embd,
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_inner=cfg.get("n_inner") or 4 * n_embd,
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            activation=act,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache | None, start_pos: int) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v)
        y = causal_attention(q, k, v, start_pos)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cache, start_pos):
        x = x + self.attn(self.ln_1(x), cache, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @property
    def max_seq_len(self) -> int:
        return self.config.n_positions

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        c = self.config
        max_len = min(max_len or c.n_positions, c.n_positions)
        return KVCache(c.n_layer, c.n_head, c.n_embd // c.n_head, max_len, batch, self.wte.weight.dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] at positions start_pos..; last_only keeps T=1."""
        t = input_ids.shape[1]
        if start_pos + t > self.config.n_positions:
            raise CanaoError(f"sequence of {start_pos + t} tokens exceeds the context window of {self.config.n_positions}")
        pos = torch.arange(start_pos, start_pos + t)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x, cache, start_pos)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))

    @classmethod
    def from_state_dict(cls, cfg: GPT2Config, state: dict[str, torch.Tensor], conv1d: bool) -> "GPT2":
        """Build the model and load weights.

        conv1d=True for Hugging Face checkpoints, whose projection weights are [in, out];
        GGUF files already hold them as [out, in].
        """
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        # Old HF checkpoints carry the causal mask as buffers; we build masks on the fly.
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if conv1d:
            state = {k: (v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in state.items()}
        return adopt_weights(lambda: cls(cfg), state, cfg.tie_embeddings, "GPT-2")

    def get_input_embeddings_weight(self) -> nn.Parameter:
        return self.wte.weight


__all__ = ["GPT2Config", "GPT2"]
