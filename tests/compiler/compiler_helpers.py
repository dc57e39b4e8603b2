"""Small models and inputs shared by the compiler tests."""

import torch

from canao.models.bert import BertConfig, BertForQuestionAnswering


def small_model(hidden=64, heads=(2, 3), ffn=(96, 50), head_dim=16, vocab=100, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, layer_heads=list(heads), layer_ffn=list(ffn),
                     head_dim=head_dim, max_position_embeddings=64)
    model = BertForQuestionAnswering(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so folding mistakes show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_inputs(seq, vocab=100, pad=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (1, seq), generator=gen)
    tt = torch.randint(0, 2, (1, seq), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, seq - pad:] = 0
    return ids, tt, mask
