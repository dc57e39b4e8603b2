"""A BERT-family encoder whose width can differ per layer.

The architecture search slices heads and FFN neurons per layer, so every layer
carries its own head count and FFN size; the head dimension and the hidden size
are shared. Parameter names follow Hugging Face's BERT so its checkpoints load
as they are, and a uniform model saves back to a folder transformers can read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CanaoError


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    layer_heads: list[int] = field(default_factory=lambda: [12] * 6)
    layer_ffn: list[int] = field(default_factory=lambda: [1536] * 6)
    head_dim: int = 32
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2  # sequence classification only
    dropout: float = 0.1  # hidden and attention dropout; active only in train()

    def __post_init__(self) -> None:
        if len(self.layer_heads) != len(self.layer_ffn):
            raise CanaoError(
                f"config: {len(self.layer_heads)} per-layer head counts but {len(self.layer_ffn)} FFN sizes; give one of each per layer"
            )
        if not self.layer_heads:
            raise CanaoError("config: the encoder needs at least one layer")
        if min(self.layer_heads) < 1 or min(self.layer_ffn) < 1:
            raise CanaoError("config: every layer needs at least one attention head and one FFN neuron")

    @property
    def num_layers(self) -> int:
        return len(self.layer_heads)

    @classmethod
    def uniform(cls, num_layers: int, hidden_size: int, heads: int, ffn: int, **kw) -> "BertConfig":
        if hidden_size % heads:
            raise CanaoError(f"config: hidden size {hidden_size} is not divisible by {heads} heads")
        return cls(hidden_size=hidden_size, layer_heads=[heads] * num_layers, layer_ffn=[ffn] * num_layers,
                   head_dim=hidden_size // heads, **kw)

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        if cfg.get("model_type") not in ("bert", None):
            raise CanaoError(f"config: model_type '{cfg.get('model_type')}' is not a BERT-family encoder")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise CanaoError(f"config: hidden_act '{act}' is not supported (only exact 'gelu')")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise CanaoError("config: only absolute position embeddings are supported")
        try:
            layers = int(cfg["num_hidden_layers"])
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            ffn = int(cfg["intermediate_size"])
        except KeyError as exc:
            raise CanaoError(f"config: missing field {exc}") from None
        return cls(
            vocab_size=int(cfg.get("vocab_size", 30522)),
            hidden_size=hidden,
            layer_heads=list(cfg.get("canao_layer_heads", [heads] * layers)),
            layer_ffn=list(cfg.get("canao_layer_ffn", [ffn] * layers)),
            head_dim=int(cfg.get("canao_head_dim", hidden // heads)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
            num_labels=int(cfg.get("num_labels", len(cfg.get("id2label", {})) or 2)),
            dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        )

    def to_hf(self, architecture: str) -> dict:
        """A config.json; per-layer sizes go in canao_* keys, the uniform keys describe layer 0."""
        return {
            "architectures": [architecture],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.layer_heads[0],
            "intermediate_size": self.layer_ffn[0],
            "canao_layer_heads": list(self.layer_heads),
            "canao_layer_ffn": list(self.layer_ffn),
            "canao_head_dim": self.head_dim,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "num_labels": self.num_labels,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.dropout,
        }

    def is_uniform(self) -> bool:
        return (len(set(self.layer_heads)) == 1 and len(set(self.layer_ffn)) == 1
                and self.layer_heads[0] * self.head_dim == self.hidden_size)

    def num_parameters(self) -> int:
        h = self.hidden_size
        n = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        for heads, ffn in zip(self.layer_heads, self.layer_ffn):
            a = heads * self.head_dim
            n += 3 * (h * a + a) + a * h + h + 2 * h + h * ffn + ffn + ffn * h + h + 2 * h
        return n


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.query = nn.Linear(hidden, heads * head_dim)
        self.key = nn.Linear(hidden, heads * head_dim)
        self.value = nn.Linear(hidden, heads * head_dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, want_probs: bool = False):
        b, s, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (b, s, h*d) -> (b, h, s, d)
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if want_probs:  # distillation needs the attention maps themselves
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
            probs = scores.softmax(-1)
            ctx = F.dropout(probs, self.dropout, self.training) @ v
        else:
            probs = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, dropout_p=self.dropout if self.training else 0.0)
        return ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim), probs


class DenseResidualNorm(nn.Module):
    """dense -> + residual -> LayerNorm (BERT's 'output' blocks)."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig, heads: int):
        super().__init__()
        self.self = SelfAttention(cfg.hidden_size, heads, cfg.head_dim, cfg.dropout)
        self.output = DenseResidualNorm(heads * cfg.head_dim, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig, heads: int, ffn: int):
        super().__init__()
        self.attention = Attention(cfg, heads)
        self.intermediate = Intermediate(cfg.hidden_size, ffn)
        self.output = DenseResidualNorm(ffn, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, want_probs: bool = False):
        ctx, probs = self.attention.self(x, mask_bias, want_probs)
        x = self.attention.output(ctx, x)
        return self.output(self.intermediate(x), x), probs


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, h, f) for h, f in zip(cfg.layer_heads, cfg.layer_ffn))


@dataclass
class EncoderOutput:
    last_hidden: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None  # embeddings output, then each layer's
    attentions: list[torch.Tensor] | None = None


def mask_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """The additive attention mask: 0 for real tokens, float32's minimum for padding, broadcast over heads
    and query positions (b, 1, 1, s)."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, output_hidden=False, output_attentions=False) -> EncoderOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bias = mask_bias(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        hidden = [x] if output_hidden else None
        attns = [] if output_attentions else None
        for layer in self.encoder.layer:
            x, probs = layer(x, bias, output_attentions)
            if output_hidden:
                hidden.append(x)
            if output_attentions:
                attns.append(probs)
        return EncoderOutput(x, hidden, attns)


class BertForQuestionAnswering(nn.Module):
    """Encoder + a linear span head: start and end logits per token."""

    architecture = "BertForQuestionAnswering"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        hidden = self.bert(input_ids, token_type_ids, attention_mask).last_hidden
        start, end = self.qa_outputs(hidden).unbind(-1)
        return start, end

    def forward_with_features(self, input_ids, token_type_ids=None, attention_mask=None, output_attentions=False):
        """Logits plus every hidden state (and attention maps): what distillation matches."""
        out = self.bert(input_ids, token_type_ids, attention_mask, output_hidden=True, output_attentions=output_attentions)
        start, end = self.qa_outputs(out.last_hidden).unbind(-1)
        return start, end, out


class BertForSequenceClassification(nn.Module):
    """Encoder + pooler (dense + tanh on [CLS]) + linear classifier."""

    architecture = "BertForSequenceClassification"

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.bert.pooler = Pooler(cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        hidden = self.bert(input_ids, token_type_ids, attention_mask).last_hidden
        return self.classifier(self.bert.pooler(hidden))


class Pooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))
