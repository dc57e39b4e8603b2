"""The latency predictor the search queries between measurements, fitted to the oracle's timings.

`LatencyPredictor` models the median per precision: per-layer costs (projections,
attention, FFN, per-layer fixed work) plus overhead fitted by relative least squares,
plus a correction per head count and per FFN size (what FLOPs miss: narrow GEMMs run
slower per FLOP), ridge-regularised by leave-one-out error; the p95 is the median times
the measured p95/median ratio. `holdout_error` reports its error on held-out candidates
and `recalibrate` refits it for a new device from a few dozen measurements (or rescales
it from fewer). `calibration_set` picks the candidates to measure for it.
"""

from __future__ import annotations

import random

import numpy as np

from ..errors import CanaoError
from .space import Arch

FEATURES = ("overhead", "layers", "proj", "attn", "ffn")


def features(arch: Arch, teacher) -> np.ndarray:
    """Per-layer work summed over layers, in GFLOP-like units, plus a constant."""
    s, H, d = arch.seq, arch.width(teacher), teacher.head_dim
    heads, ffn = np.asarray(arch.heads, float), np.asarray(arch.ffn, float)
    return np.array([
        1.0,
        arch.depth * s * H / 1e6,  # LayerNorms, residuals, biases
        (heads * d).sum() * s * H * 4 * 2 / 1e9,  # Q, K, V, output projections
        (heads * d).sum() * s * s * 2 * 2 / 1e9,  # scores and context (+ softmax)
        ffn.sum() * s * H * 2 * 2 / 1e9,  # FFN in + out (+ GELU)
    ])


MIN_OWN = 6  # measurements a precision needs for a model of its own (fewer: the base model times one factor)


def _table_key(kind: str, value: int, arch: Arch) -> str:
    width = f"d{arch.hidden}" if arch.hidden else ""
    return f"{kind}{value}{width}@{arch.seq}"


def _table_row(arch: Arch, cols: list[str]) -> np.ndarray:
    """How many of the candidate's layers have each (heads, width, seq) and (FFN size, width, seq) choice."""
    row = np.zeros(len(cols))
    index = {c: i for i, c in enumerate(cols)}
    for h, f in zip(arch.heads, arch.ffn):
        for k in (_table_key("h", h, arch), _table_key("f", f, arch)):
            if k in index:
                row[index[k]] += 1
    return row


class _Model:
    """median_ms ~= features(arch) @ coef + sum of per-choice corrections over the layers.

    The FLOP-like features carry the trend (and extrapolate); the per-choice table absorbs what
    FLOPs miss: a GEMM with N = 192 runs at a lower GFLOP/s than one with N = 1536, an attention
    block has fixed costs per head. The table is ridge-regularised toward zero with the strength
    picked by leave-one-out error, so with few measurements the model stays the FLOP model."""

    def __init__(self, coef, table: dict[str, float] | None = None):
        self.coef = np.asarray(coef, float)
        self.table = dict(table or {})

    def predict(self, arch: Arch, teacher) -> float:
        cols = list(self.table)
        extra = float(_table_row(arch, cols) @ np.array([self.table[c] for c in cols])) if cols else 0.0
        return float(features(arch, teacher) @ self.coef) + extra

    def scaled(self, k: float) -> "_Model":
        return _Model(self.coef * k, {c: v * k for c, v in self.table.items()})

    @classmethod
    def fit(cls, archs: list[Arch], y: np.ndarray, teacher) -> "_Model":
        X = np.stack([features(a, teacher) for a in archs])
        coef = _nnls_relative(X, y)
        cols = sorted({_table_key(kind, v, a) for a in archs for kind, vals in (("h", a.heads), ("f", a.ffn))
                       for v in vals})
        T = np.stack([_table_row(a, cols) for a in archs])
        A, b = T / y[:, None], (y - X @ coef) / y  # relative error, like the FLOP fit
        return cls(coef, dict(zip(cols, _ridge_loo(A, b).tolist())))


def _ridge_loo(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ridge solution of A t ~= b with the strength of least leave-one-out error (t = 0 included)."""
    n, k = A.shape
    if n < 3 or k == 0:
        return np.zeros(k)
    G = A.T @ A
    base = max(float(np.trace(G)) / k, 1e-12)
    best_err, best_t = float(np.mean(b ** 2)), np.zeros(k)  # no correction at all
    for lam in base * np.logspace(-4, 2, 13):
        M = np.linalg.solve(G + lam * np.eye(k), A.T)
        t = M @ b
        H = np.einsum("ij,ji->i", A, M)  # diagonal of the hat matrix
        loo = (b - A @ t) / np.clip(1 - H, 1e-6, None)
        err = float(np.mean(loo ** 2))
        if err < best_err:
            best_err, best_t = err, t
    return best_t


class LatencyPredictor:
    """Predicted latency of an architecture from measured ones.

    Per precision, a `_Model` of the median (FLOP-like per-layer costs + per-choice corrections);
    a precision with fewer than MIN_OWN measurements is the base precision's model times one
    factor, as a recalibration would. The p95 is the predicted median times the median p95/median
    ratio of that precision's measurements: the median is what the code costs, the ratio is how
    noisy the machine is, and fitting p95 directly would fit the noise. `key` says which one
    `predict` returns (p95 for the budget)."""

    def __init__(self, teacher, coef: np.ndarray | None = None, threads: int = 1, key: str = "p95_ms",
                 trim: float = 1.25):
        self.teacher, self.threads, self.key, self.trim = teacher, threads, key, trim
        self.models: dict[str, _Model] = {}
        self.base = "fp32"
        if coef is not None:
            self.models[self.base] = _Model(coef)
        self.scale: dict[str, float] = {}
        self.p95_ratio: dict[str, float] = {}
        self.n_fit = 0
        self.contended: list[str] = []

    @property
    def coef(self) -> np.ndarray | None:
        m = self.models.get(self.base)
        return None if m is None else m.coef

    def fit(self, samples: list[tuple[Arch, dict]]) -> "LatencyPredictor":
        if len(samples) < 2:
            raise CanaoError("latency predictor: need at least 2 measurements to fit")
        groups: dict[str, list[tuple[Arch, dict]]] = {}
        for a, m in samples:
            groups.setdefault(a.precision, []).append((a, m))
        self.base = "fp32" if len(groups.get("fp32", [])) >= 2 else max(groups, key=lambda p: len(groups[p]))
        self.models, self.scale, self.p95_ratio, self.contended, self.n_fit = {}, {}, {}, [], 0
        for prec in [self.base] + sorted(set(groups) - {self.base}):
            group = groups[prec]
            self.p95_ratio[prec] = float(np.median([_p95_ratio(m) for _, m in group]))
            if prec == self.base or len(group) >= MIN_OWN:
                self.models[prec] = self._fit_group(group)
            else:
                base = self.models[self.base]
                self.scale[prec] = float(np.median([_median(m) / base.predict(a, self.teacher) for a, m in group]))
        return self

    def _fit_group(self, group: list[tuple[Arch, dict]]) -> _Model:
        archs = [a for a, _ in group]
        y = np.array([_median(m) for _, m in group])
        X = np.stack([features(a, self.teacher) for a in archs])
        keep = np.ones(len(y), bool)
        # On a shared machine another process only ever makes a run slower: measurements far above
        # the trend (> trim x the FLOP fit) are treated as contended and left out, then the fit is redone.
        for _ in range(5):
            coef = _nnls_relative(X[keep], y[keep])
            new = y <= self.trim * (X @ coef)
            if new.sum() < max(2, len(y) // 2) or (new == keep).all():
                break
            keep = new
        self.n_fit += int(keep.sum())
        self.contended += [a.key() for a, k in zip(archs, keep) if not k]
        return _Model.fit([a for a, k in zip(archs, keep) if k], y[keep], self.teacher)

    def is_contended(self, arch: Arch, m: dict) -> bool:
        return _median(m) > self.trim * self.predict(arch, "median_ms")

    def recalibrate(self, samples: list[tuple[Arch, dict]]) -> "LatencyPredictor":
        """For a new device: refit when there are enough measurements (>= 3 per feature),
        otherwise keep the cost ratios and fit one scale factor."""
        if not self.models or len(samples) >= 3 * len(FEATURES):
            return self.fit(samples)
        k = float(np.median([_median(m) / self.predict(a, "median_ms") for a, m in samples]))
        self.models = {p: m.scaled(k) for p, m in self.models.items()}
        ratios = [_p95_ratio(m) for _, m in samples]
        self.p95_ratio = {p: float(np.median(ratios)) for p in self.p95_ratio} or {self.base: float(np.median(ratios))}
        return self

    def predict(self, arch: Arch, key: str | None = None) -> float:
        if not self.models:
            raise CanaoError("latency predictor used before fitting")
        model = self.models.get(arch.precision)
        med = (model or self.models[self.base]).predict(arch, self.teacher)
        if model is None:
            med *= self.scale.get(arch.precision, 1.0)
        if (key or self.key) == "median_ms":
            return med
        return med * self.p95_ratio.get(arch.precision, self.p95_ratio.get(self.base, 1.0))

    def errors(self, samples: list[tuple[Arch, dict]], skip_contended: bool = False, key: str | None = None) -> dict:
        """Error against measurement; with skip_contended, measurements > trim x predicted are left out
        (and counted), since on a shared machine they measure the other processes."""
        key = key or self.key
        y = np.array([m[key] for _, m in samples])
        p = np.array([self.predict(a, key) for a, _ in samples])
        keep = y <= self.trim * p if skip_contended else np.ones(len(y), bool)
        if not keep.any():
            keep[:] = True
        y, p = y[keep], p[keep]
        return {"mae_ms": float(np.mean(np.abs(p - y))), "mape_pct": float(100 * np.mean(np.abs(p - y) / y)),
                "max_pct": float(100 * np.max(np.abs(p - y) / y)), "n": int(len(y)), "left_out": int((~keep).sum())}

    def to_dict(self) -> dict:
        return {"version": 2, "features": list(FEATURES), "base": self.base,
                "models": {p: {"coef": m.coef.tolist(), "table": m.table} for p, m in self.models.items()},
                "coef": None if self.coef is None else self.coef.tolist(),
                "threads": self.threads, "key": self.key, "n_fit": self.n_fit, "trim": self.trim,
                "contended": self.contended, "scale": self.scale, "p95_ratio": self.p95_ratio}

    @classmethod
    def from_dict(cls, d: dict, teacher) -> "LatencyPredictor":
        p = cls(teacher, None, d.get("threads", 1), d.get("key", "p95_ms"), d.get("trim", 1.25))
        p.n_fit, p.scale, p.base = d.get("n_fit", 0), dict(d.get("scale", {})), d.get("base", "fp32")
        if "models" in d:
            p.models = {k: _Model(v["coef"], v.get("table")) for k, v in d["models"].items()}
            p.p95_ratio = dict(d.get("p95_ratio", {}))
        elif d.get("coef") is not None:  # version 1: one FLOP model fitted directly on `key`
            p.models = {p.base: _Model(d["coef"])}
            p.p95_ratio = {p.base: 1.0}
        return p


def _median(m: dict) -> float:
    return float(m.get("median_ms", m.get("p95_ms")))


def _p95_ratio(m: dict) -> float:
    return float(m.get("p95_ms", _median(m))) / _median(m)


def _nnls_relative(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||(X c - y) / y|| with c >= 0: active-set by dropping negative coefficients."""
    Xw, yw = X / y[:, None], np.ones_like(y)
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(Xw[:, active], yw, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def holdout_error(predictor: LatencyPredictor, samples: list[tuple[Arch, dict]], frac: float = 0.3,
                  seed: int = 0) -> dict:
    """Fit on (1-frac) of the measurements, report the error on the rest (for the predictor's key and
    for the median); then refit on all. Held-out candidates are drawn from every precision alike, and
    from the inside of the space: the largest and smallest shapes of each precision always stay in
    the fit (they bound the range the search queries; holding one out tests extrapolation instead)."""
    rng = random.Random(seed)
    by_prec: dict[str, list[int]] = {}
    for i, (a, _) in enumerate(samples):
        by_prec.setdefault(a.precision, []).append(i)
    for prec, idx in by_prec.items():
        size = {i: float(features(samples[i][0], predictor.teacher)[2:].sum()) for i in idx}
        ends = {min(idx, key=size.get), max(idx, key=size.get)} if len(idx) > 3 else set()
        by_prec[prec] = [i for i in idx if i not in ends]
    test_idx: set[int] = set()
    for idx in by_prec.values():
        rng.shuffle(idx)
        test_idx |= set(idx[:int(round(len(idx) * frac))])
    if not test_idx:
        test_idx = {rng.randrange(len(samples))}
    test = [samples[i] for i in sorted(test_idx)]
    train = [samples[i] for i in range(len(samples)) if i not in test_idx]
    predictor.fit(train)
    err = predictor.errors(test)
    err["uncontended"] = predictor.errors(test, skip_contended=True)
    err["median"] = predictor.errors(test, key="median_ms")
    err["train"] = predictor.errors(train)
    predictor.fit(samples)
    return err


def calibration_set(space, n: int, seed: int = 0) -> list[Arch]:
    """Candidates that span the space: the largest, the smallest, uniform shapes and random ones, `n`
    of them, each in every precision of the space (the same shapes: each precision gets its own model)."""
    rng = random.Random(seed)
    base = space.precisions[0]
    shapes = [space.largest(None, base), space.smallest(None, base)]  # at the longest and the shortest length
    L, H, F = space.teacher_layers, space.head_choices, space.ffn_choices
    mid = space.uniform(max(1, (L + 1) // 2), H[len(H) // 2], F[len(F) // 2], max(space.seq_choices), base)
    if n > 2 and mid not in shapes:
        shapes.append(mid)
    while len(shapes) < n:
        a = space.sample(rng)
        a = Arch(a.heads, a.ffn, a.seq, base, a.hidden)
        if a not in shapes:
            shapes.append(a)
    shapes = shapes[:max(1, n)]
    return [Arch(a.heads, a.ffn, a.seq, p, a.hidden) for p in space.precisions for a in shapes]
