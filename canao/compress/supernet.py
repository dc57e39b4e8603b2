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

from ..models.bert import BertForQuestionAnswering, mask_bias
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
        """(start, end, hidden_states, attentions): hidden_states = [embeddings, each kept layer]
        (`arch`'s hidden width), attentions = per kept layer (b, heads, s, s) probabilities, or None."""
        m, cfg = self.model, self.model.config
        d, H = cfg.head_dim, arch.width(cfg)
        eps = cfg.layer_norm_eps
        bias = mask_bias(attention_mask)

        def norm(x, ln):  # a LayerNorm over the kept channels only
            return F.layer_norm(x, (H,), ln.weight[:H], ln.bias[:H], eps)

        emb = m.bert.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (emb.word_embeddings.weight[input_ids, :H] + emb.position_embeddings.weight[positions, :H][None]
             + emb.token_type_embeddings.weight[token_type_ids, :H])
        x = emb.dropout(norm(x, emb.LayerNorm))
        hidden, attns = [x], ([] if output_attentions else None)
        b, s = input_ids.shape
        for li, heads, ffn in zip(keep_layers(arch.depth, cfg.num_layers), arch.heads, arch.ffn):
            layer = m.bert.encoder.layer[li]
            sa = layer.attention.self
            w = heads * d

            def proj(lin):
                return F.linear(x, lin.weight[:w, :H], lin.bias[:w]).view(b, s, heads, d).transpose(1, 2)

            q, k, v = proj(sa.query), proj(sa.key), proj(sa.value)
            drop = sa.dropout if self.training else 0.0
            if output_attentions:
                probs = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias).softmax(-1)
                ctx = F.dropout(probs, drop, self.training) @ v
                attns.append(probs)
            else:
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
            ctx = ctx.transpose(1, 2).reshape(b, s, w)
            ao = layer.attention.output
            x = norm(ao.dropout(F.linear(ctx, ao.dense.weight[:H, :w], ao.dense.bias[:H])) + x, ao.LayerNorm)
            inter = F.gelu(F.linear(x, layer.intermediate.dense.weight[:ffn, :H], layer.intermediate.dense.bias[:ffn]))
            fo = layer.output
            x = norm(fo.dropout(F.linear(inter, fo.dense.weight[:H, :ffn], fo.dense.bias[:H])) + x, fo.LayerNorm)
            hidden.append(x)
        start, end = F.linear(x, m.qa_outputs.weight[:, :H], m.qa_outputs.bias).unbind(-1)
        return start, end, hidden, attns

    @torch.no_grad()
    def extract(self, arch: Arch) -> BertForQuestionAnswering:
        """A standalone model holding copies of `arch`'s slices of the shared weights."""
        cfg = arch.bert_config(self.model.config)
        sub = BertForQuestionAnswering(cfg)
        src = self.model
        H, d = cfg.hidden_size, cfg.head_dim

        def norm(dst, ln):
            dst.weight.copy_(ln.weight[:H])
            dst.bias.copy_(ln.bias[:H])

        se, te = sub.bert.embeddings, src.bert.embeddings
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            getattr(se, name).weight.copy_(getattr(te, name).weight[:, :H])
        norm(se.LayerNorm, te.LayerNorm)
        sub.qa_outputs.weight.copy_(src.qa_outputs.weight[:, :H])
        sub.qa_outputs.bias.copy_(src.qa_outputs.bias)
        for si, li in enumerate(keep_layers(arch.depth, src.config.num_layers)):
            t, u = src.bert.encoder.layer[li], sub.bert.encoder.layer[si]
            w, f = arch.heads[si] * d, arch.ffn[si]
            for name in ("query", "key", "value"):
                getattr(u.attention.self, name).weight.copy_(getattr(t.attention.self, name).weight[:w, :H])
                getattr(u.attention.self, name).bias.copy_(getattr(t.attention.self, name).bias[:w])
            u.attention.output.dense.weight.copy_(t.attention.output.dense.weight[:H, :w])
            u.attention.output.dense.bias.copy_(t.attention.output.dense.bias[:H])
            norm(u.attention.output.LayerNorm, t.attention.output.LayerNorm)
            u.intermediate.dense.weight.copy_(t.intermediate.dense.weight[:f, :H])
            u.intermediate.dense.bias.copy_(t.intermediate.dense.bias[:f])
            u.output.dense.weight.copy_(t.output.dense.weight[:H, :f])
            u.output.dense.bias.copy_(t.output.dense.bias[:H])
            norm(u.output.LayerNorm, t.output.LayerNorm)
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
