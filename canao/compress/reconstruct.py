"""Training-free repair of a sliced student: least-squares refits of its output projections.

Slicing heads and FFN neurons out of a layer drops what they wrote into the residual stream;
the units that remain can make up much of it. Layer by layer, on 128 calibration windows, each
block's output projection (the attention output's and the FFN output's dense layer, weights and
bias) is refit by ridge regression on the student's own activations so that the student's
residual stream before the block's LayerNorm matches the teacher's at the layer it was sliced
from. The target is the teacher's pre-LayerNorm sum minus the student's residual input, so each
block also corrects what the blocks before it missed (a purely local refit, block output against
the teacher's block on the same input, recovered F1 34.6 where this one recovers 49.7). This is
the "mask rescaling" of Kwon et al. 2022 (a fast post-training pruning framework for transformers)
generalised from one scale per unit to a full linear refit, as layer-wise reconstruction in
OBC / SparseGPT.

The ridge pulls the weights towards the cut ones, not towards zero, and strongly (0.3 x the mean
diagonal of A'A): a near-exact fit (1e-3) leaves large cancelling weights that int8 quantization
breaks (F1 50.1 in fp32, 47.5 compiled int8; 4.1 F1 lost to int8 after phase 2), and generalises
worse through the layers above. On the reference teacher's importance-ordered slices, 300 dev questions,
F1 cut -> refit (compiled int8): L6-h4-f384 26.1 -> 59.1 (58.5); L6-h2-f384 16.1 -> 44.8 (45.7);
L6-h6-f960 62.5 -> 65.1 (62.9); L3-h12-f1536 8.5 -> 22.8 (23.8). A refit is kept only where it beats
the cut weights on held-out calibration windows (every fourth), so a block that slicing left intact
stays as it was. It costs seconds, no gradient step.

Queries, keys, values and the FFN's input projection are kept as sliced.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..models.bert import mask_bias
from .space import Arch, keep_layers


class Reconstructor:
    """Calibration windows and the teacher's pre-LayerNorm residual stream on them, computed once;
    calling it refits a student sliced from that teacher (same channel order) in place."""

    def __init__(self, teacher, feats, batch_size: int = 16, ridge: float = 0.3):
        self.ridge = ridge
        self.batches = []
        n = len(feats.input_ids)
        for i in range(0, n, batch_size):
            rows = slice(i, i + batch_size)
            mask = torch.as_tensor(feats.attention_mask[rows])
            width = int(mask.sum(1).max())
            self.batches.append((torch.as_tensor(feats.input_ids[rows, :width]),
                                 torch.as_tensor(feats.token_type_ids[rows, :width]), mask[:, :width]))
        self.windows = n
        self.tokens = int(sum(int(m.sum()) for _, _, m in self.batches))
        # per teacher layer, over every calibration token: the stream before each block's LayerNorm
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            xs = [teacher.bert.embeddings(ids, tt) for ids, tt, _ in self.batches]
            for layer in teacher.bert.encoder.layer:
                attn_sums, ffn_sums = [], []
                for k, (_, _, mask) in enumerate(self.batches):
                    ctx = layer.attention.self(xs[k], mask_bias(mask))[0]
                    ao, fo = layer.attention.output, layer.output
                    u = xs[k] + ao.dense(ctx)
                    mid = ao.LayerNorm(u)
                    v = mid + fo.dense(layer.intermediate(mid))
                    xs[k] = fo.LayerNorm(v)
                    keep = mask.bool()
                    attn_sums.append(u[keep].half())
                    ffn_sums.append(v[keep].half())  # half precision: ~1e-3 relative, far below what is refit
                self.targets.append((torch.cat(attn_sums), torch.cat(ffn_sums)))

    @torch.no_grad()
    def __call__(self, student, arch: Arch) -> dict:
        """Refit `student`'s output projections in place; returns timing and, per block, the share of
        the target's variance the refit leaves unexplained before and after (tokens of the calibration set)."""
        t0 = time.perf_counter()
        hidden = student.config.hidden_size
        teacher_layers = keep_layers(arch.depth, len(self.targets))
        xs = [student.bert.embeddings(ids, tt) for ids, tt, _ in self.batches]
        unexplained = []
        for si, li in enumerate(teacher_layers):
            layer = student.bert.encoder.layer[si]
            ao, fo = layer.attention.output, layer.output
            attn_target, ffn_target = (t[:, :hidden] for t in self.targets[li])
            ctxs = [layer.attention.self(xs[k], mask_bias(m))[0] for k, (_, _, m) in enumerate(self.batches)]
            unexplained.append(self._refit(ao.dense, ctxs, xs, attn_target))
            mids = [ao.LayerNorm(x + ao.dense(c)) for x, c in zip(xs, ctxs)]
            inters = [layer.intermediate(m) for m in mids]
            unexplained.append(self._refit(fo.dense, inters, mids, ffn_target))
            xs = [fo.LayerNorm(m + fo.dense(h)) for m, h in zip(mids, inters)]
        return {"seconds": time.perf_counter() - t0, "windows": self.windows, "tokens": self.tokens,
                "unexplained_before": [round(u[0], 4) for u in unexplained],
                "unexplained_after": [round(u[1], 4) for u in unexplained]}

    def _refit(self, dense, inputs, residuals, target) -> tuple[float, float]:
        """Ridge fit of `dense` (weight and bias) so that residual + dense(input) ~ target at the valid tokens,
        kept only where it beats the weights as cut on held-out calibration windows (every fourth: a wide
        block refit from few tokens overfits). Returns the unexplained share of the target's variance
        before and after, over all calibration tokens."""
        n_in = dense.weight.shape[1]
        parts = [_Normal(n_in + 1, target.shape[1]) for _ in range(2)]  # fit, held out
        at = 0
        for (_, _, mask), a, r in zip(self.batches, inputs, residuals):
            keep = mask.bool()
            held = (torch.arange(len(keep)) % 4 == 3)[:, None].expand_as(keep)  # every fourth window
            rows = torch.cat([a[keep], torch.ones(int(keep.sum()), 1)], 1)
            y = target[at:at + len(rows)].float() - r[keep]
            at += len(rows)
            flag = held[keep]
            parts[0].add(rows[~flag], y[~flag])
            parts[1].add(rows[flag], y[flag])
        both = parts[0] + parts[1]
        cut = torch.cat([dense.weight.T, dense.bias[None]]).double()
        chosen = cut
        if parts[1].count and parts[1].sse(parts[0].solve(self.ridge, cut)) < parts[1].sse(cut):
            chosen = both.solve(self.ridge, cut)
        dense.weight.copy_(chosen[:n_in].T.float())
        dense.bias.copy_(chosen[n_in].float())
        total = max(both.centred_energy(), 1e-12)
        return both.sse(cut) / total, both.sse(chosen) / total


class _Normal:
    """Normal equations of a least-squares fit y ~ A W, accumulated in float64: A'A, A'y, y'y, sum y."""

    def __init__(self, n: int, m: int):
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.cross = torch.zeros(n, m, dtype=torch.float64)
        self.sum_y = torch.zeros(m, dtype=torch.float64)
        self.yy, self.count = 0.0, 0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        self.gram += (a.T @ a).double()  # float32 products per batch, float64 sums
        self.cross += (a.T @ y).double()
        self.sum_y += y.sum(0).double()
        self.yy += float((y.double() ** 2).sum())
        self.count += len(a)

    def __add__(self, other: "_Normal") -> "_Normal":
        out = _Normal(*self.cross.shape)
        out.gram, out.cross, out.sum_y = self.gram + other.gram, self.cross + other.cross, self.sum_y + other.sum_y
        out.yy, out.count = self.yy + other.yy, self.count + other.count
        return out

    def solve(self, ridge: float, prior: torch.Tensor) -> torch.Tensor:
        """W minimising |y - A W|^2 + ridge * mean(diag A'A) * |(W - prior) without the last (bias) row|^2."""
        g, c = self.gram.clone(), self.cross.clone()
        n = len(g) - 1
        lam = ridge * float(g.diagonal()[:n].mean())
        g[range(n), range(n)] += lam
        c[:n] += lam * prior[:n]
        return torch.linalg.solve(g, c)

    def sse(self, w: torch.Tensor) -> float:
        """Sum of squared residuals of y - A w, from the accumulated products."""
        return self.yy - 2 * float((w * self.cross).sum()) + float((w * (self.gram @ w)).sum())

    def centred_energy(self) -> float:
        """What a constant (a bias alone) cannot explain: sum of squares of the centred targets."""
        return self.yy - float((self.sum_y ** 2).sum()) / max(self.count, 1)


def calibration_windows(windows, count: int, seed: int = 0):
    """`count` windows of original (not augmented) training questions, a fixed random choice."""
    orig = np.flatnonzero(windows.original)
    pick = np.random.default_rng(seed).choice(orig, min(count, len(orig)), replace=False)
    return windows.features(np.sort(pick))


class RepairedSlices:
    """Sub-networks as slices of the importance-ordered teacher, each refit by a Reconstructor when
    extracted: what the quick preset ranks and what every teacher-slice start is. It answers `extract`,
    `runner`, `eval` and `model` as a SuperNet does."""

    def __init__(self, slices, reconstructor: Reconstructor):
        self.slices, self.reconstructor = slices, reconstructor
        self.model = slices.model
        self.records: dict[str, dict] = {}  # per shape key: the last refit's record

    def eval(self):
        return self

    def extract(self, arch: Arch):
        sub = self.slices.extract(arch)
        self.records[arch.shape_key()] = self.reconstructor(sub, arch)
        return sub

    def runner(self, arch: Arch):
        """A `run(ids, types, mask) -> (start, end)` callable for squad.predict, as SuperNet.runner."""
        from .pipeline import torch_runner

        return torch_runner(self.extract(arch))
