"""One weight set, every candidate: elastic slicing of the (reordered) teacher.

`SuperNet.forward(..., arch)` runs the sub-network `arch` directly on slices of
the shared weights (so gradients train the shared weights), and
`extract(arch)` copies those slices into a standalone BertForQuestionAnswering
that computes the same function (tested).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.bert import BertForQuestionAnswering
from .space import Arch, SearchSpace, keep_layers


class SuperNet(nn.Module):
    def __init__(self, model: BertForQuestionAnswering, space: SearchSpace):
        super().__init__()
        self.model = model
        self.space = space

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, token_type_ids, attention_mask, arch: Arch, output_attentions: bool = False):
        """(start, end, hidden_states, attentions): hidden_states = [embeddings, each kept layer],
        attentions = per kept layer (b, heads, s, s) probabilities, or None."""
        m, cfg = self.model, self.model.config
        d = cfg.head_dim
        mask_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        x = m.bert.embeddings(input_ids, token_type_ids)
        hidden, attns = [x], ([] if output_attentions else None)
        b, s = input_ids.shape
        for li, heads, ffn in zip(keep_layers(arch.depth, cfg.num_layers), arch.heads, arch.ffn):
            layer = m.bert.encoder.layer[li]
            sa = layer.attention.self
            w = heads * d

            def proj(lin):
                return F.linear(x, lin.weight[:w], lin.bias[:w]).view(b, s, heads, d).transpose(1, 2)

            q, k, v = proj(sa.query), proj(sa.key), proj(sa.value)
            drop = sa.dropout if self.training else 0.0
            if output_attentions:
                probs = (q @ k.transpose(-1, -2) / math.sqrt(d) + mask_bias).softmax(-1)
                ctx = F.dropout(probs, drop, self.training) @ v
                attns.append(probs)
            else:
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, dropout_p=drop)
            ctx = ctx.transpose(1, 2).reshape(b, s, w)
            ao = layer.attention.output
            x = ao.LayerNorm(ao.dropout(F.linear(ctx, ao.dense.weight[:, :w], ao.dense.bias)) + x)
            inter = F.gelu(F.linear(x, layer.intermediate.dense.weight[:ffn], layer.intermediate.dense.bias[:ffn]))
            fo = layer.output
            x = fo.LayerNorm(fo.dropout(F.linear(inter, fo.dense.weight[:, :ffn], fo.dense.bias)) + x)
            hidden.append(x)
        start, end = m.qa_outputs(x).unbind(-1)
        return start, end, hidden, attns

    @torch.no_grad()
    def extract(self, arch: Arch) -> BertForQuestionAnswering:
        """A standalone model holding copies of `arch`'s slices of the shared weights."""
        cfg = arch.bert_config(self.model.config)
        sub = BertForQuestionAnswering(cfg)
        src = self.model
        sub.bert.embeddings.load_state_dict(src.bert.embeddings.state_dict())
        sub.qa_outputs.load_state_dict(src.qa_outputs.state_dict())
        d = cfg.head_dim
        for si, li in enumerate(keep_layers(arch.depth, src.config.num_layers)):
            t, u = src.bert.encoder.layer[li], sub.bert.encoder.layer[si]
            w, f = arch.heads[si] * d, arch.ffn[si]
            for name in ("query", "key", "value"):
                getattr(u.attention.self, name).weight.copy_(getattr(t.attention.self, name).weight[:w])
                getattr(u.attention.self, name).bias.copy_(getattr(t.attention.self, name).bias[:w])
            u.attention.output.dense.weight.copy_(t.attention.output.dense.weight[:, :w])
            u.attention.output.dense.bias.copy_(t.attention.output.dense.bias)
            u.attention.output.LayerNorm.load_state_dict(t.attention.output.LayerNorm.state_dict())
            u.intermediate.dense.weight.copy_(t.intermediate.dense.weight[:f])
            u.intermediate.dense.bias.copy_(t.intermediate.dense.bias[:f])
            u.output.dense.weight.copy_(t.output.dense.weight[:, :f])
            u.output.dense.bias.copy_(t.output.dense.bias)
            u.output.LayerNorm.load_state_dict(t.output.LayerNorm.state_dict())
        return sub.eval()

    def runner(self, arch: Arch):
        """A `run(ids, types, mask) -> (start, end)` callable for squad.predict."""
        device = next(self.model.parameters()).device

        @torch.no_grad()
        def run(ids, tt, mask):
            args = [torch.as_tensor(a, device=device) for a in (ids, tt, mask)]
            s, e, _, _ = self(*args, arch=arch)
            return s.float().cpu().numpy(), e.float().cpu().numpy()

        return run


def copy_teacher(model: BertForQuestionAnswering) -> BertForQuestionAnswering:
    t = copy.deepcopy(model)
    for p in t.parameters():
        p.requires_grad_(False)
    return t.eval()
