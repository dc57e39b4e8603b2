"""Head, FFN-neuron and hidden-dimension importance, and reordering the teacher so the
important ones come first.

Importance is the first-order Taylor estimate of the loss change when a unit is
masked (Michel et al. 2019 for heads, Molchanov et al. for neurons):
|sum over tokens of activation * dLoss/dactivation|, accumulated over a few
batches. A hidden dimension is one channel of the residual stream, so its importance
sums that estimate over the embeddings' output and every layer's output. Reordering
permutes rows/columns only (LayerNorm is equivariant to a permutation of its channels),
so the reordered teacher computes exactly the same function; afterwards "the first k
heads" is the best k heads and "the first d dimensions" the best d.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _qa_loss(start, end, starts, ends):
    return (F.cross_entropy(start, starts) + F.cross_entropy(end, ends)) / 2


def compute_importance(model, feats, batches: int = 8, batch_size: int = 16, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """{"heads": [per layer (heads,)], "ffn": [per layer (ffn,)], "hidden": (hidden,)} from training
    windows with labels."""
    cfg = model.config
    captured: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []

    def grab_out(idx):
        def hook(_mod, _args, out):
            x = out[0] if isinstance(out, tuple) else out
            x.retain_grad()
            captured[("hidden", idx)] = x
        return hook

    hooks.append(model.bert.embeddings.register_forward_hook(grab_out(-1)))
    for i, layer in enumerate(model.bert.encoder.layer):
        def grab(kind, idx):
            def hook(_mod, args):
                x = args[0]
                x.retain_grad()
                captured[(kind, idx)] = x
            return hook
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(grab("heads", i)))
        hooks.append(layer.output.dense.register_forward_pre_hook(grab("ffn", i)))
        hooks.append(layer.register_forward_hook(grab_out(i)))
    hidden_imp = np.zeros(cfg.hidden_size)
    head_imp = [np.zeros(h) for h in cfg.layer_heads]
    ffn_imp = [np.zeros(f) for f in cfg.layer_ffn]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(feats))
    lengths = feats.lengths()
    try:
        for b in range(min(batches, max(1, len(order) // batch_size))):
            idx = order[b * batch_size:(b + 1) * batch_size]
            w = int(lengths[idx].max())
            ids, tt, mask = (torch.as_tensor(a[idx, :w], device=device)
                             for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask))
            model.zero_grad(set_to_none=True)
            start, end = model(ids, tt, mask)
            _qa_loss(start.float(), end.float(), torch.as_tensor(feats.start_positions[idx], device=device),
                     torch.as_tensor(feats.end_positions[idx], device=device)).backward()
            for i in range(cfg.num_layers):
                ctx = captured[("heads", i)]
                contrib = (ctx * ctx.grad).view(*ctx.shape[:2], cfg.layer_heads[i], cfg.head_dim).sum(dim=(1, 3))
                head_imp[i] += contrib.abs().sum(0).detach().float().cpu().numpy()
                act = captured[("ffn", i)]
                ffn_imp[i] += (act * act.grad).sum(1).abs().sum(0).detach().float().cpu().numpy()
            for i in range(-1, cfg.num_layers):
                x = captured[("hidden", i)]
                hidden_imp += (x * x.grad).sum(1).abs().sum(0).detach().float().cpu().numpy()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"heads": head_imp, "ffn": ffn_imp, "hidden": hidden_imp}


@torch.no_grad()
def reorder(model, importance: dict[str, list[np.ndarray]]) -> dict[str, list[list[int]]]:
    """Permute heads and FFN neurons of every layer, and (when importance has "hidden") the channels
    of the residual stream, in place, most important first. Returns the permutations used
    (new position -> old index)."""
    d = model.config.head_dim
    perms = {"heads": [], "ffn": []}
    if importance.get("hidden") is not None:
        perms["hidden"] = _reorder_hidden(model, np.argsort(-np.asarray(importance["hidden"]), kind="stable"))
    for i, layer in enumerate(model.bert.encoder.layer):
        hp = np.argsort(-importance["heads"][i], kind="stable")
        dev = layer.attention.self.query.weight.device
        rows = torch.as_tensor(np.concatenate([np.arange(h * d, (h + 1) * d) for h in hp]), device=dev)
        sa = layer.attention.self
        for lin in (sa.query, sa.key, sa.value):
            lin.weight.copy_(lin.weight[rows])
            lin.bias.copy_(lin.bias[rows])
        out = layer.attention.output.dense
        out.weight.copy_(out.weight[:, rows])
        fp = torch.as_tensor(np.argsort(-importance["ffn"][i], kind="stable").copy(), device=dev)
        inter, fout = layer.intermediate.dense, layer.output.dense
        inter.weight.copy_(inter.weight[fp])
        inter.bias.copy_(inter.bias[fp])
        fout.weight.copy_(fout.weight[:, fp])
        perms["heads"].append(hp.tolist())
        perms["ffn"].append(fp.cpu().tolist())
    return perms


@torch.no_grad()
def _reorder_hidden(model, perm: np.ndarray) -> list[int]:
    """Permute the residual stream's channels everywhere they appear: the embedding tables and
    their LayerNorm, every linear reading the stream (columns) or writing it (rows, bias), every
    LayerNorm over it, and the QA head."""
    p = torch.as_tensor(perm.copy(), device=model.qa_outputs.weight.device)
    emb = model.bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        table.weight.copy_(table.weight[:, p])

    def norm(ln):
        ln.weight.copy_(ln.weight[p])
        ln.bias.copy_(ln.bias[p])

    norm(emb.LayerNorm)
    for layer in model.bert.encoder.layer:
        sa = layer.attention.self
        for lin in (sa.query, sa.key, sa.value, layer.intermediate.dense):  # read the stream
            lin.weight.copy_(lin.weight[:, p])
        for block in (layer.attention.output, layer.output):  # write it, then normalise it
            block.dense.weight.copy_(block.dense.weight[p])
            block.dense.bias.copy_(block.dense.bias[p])
            norm(block.LayerNorm)
    model.qa_outputs.weight.copy_(model.qa_outputs.weight[:, p])
    return perm.tolist()
