"""The search's only window onto the compiler: a latency oracle and a fitted predictor.

`LatencyOracle.measure(arch)` builds a random-weight model of the architecture
(latency does not depend on the weights), compiles it with canao's compiler
(`canao.compiler.compile_model`, `load_artifact(...).run`) and times it at batch 1,
padded to `arch.seq` tokens, on a fixed number of threads: warm-up, then the
median and p95 of `runs` timings. Results go in a JSON database keyed by the
host's CPU, the backend, the architecture and the threads, so nothing is
measured twice (the compiler's own build cache makes a re-compile cheap too).
Entries older than `max_age_h` (default 24 h) are measured again: the same VM ran
1.7x slower on one day than the day before, and old timings would mislead the predictor.
`backend="torch"` times PyTorch eager instead, behind the same interface, for
precisions the compiler does not have yet or when no C compiler is available.
`device="ssh://user@host"` (or "adb", "local"; canao.device) compiles for that device's
target and times on the device with the artifact's canao-run; its measurements are keyed
by the device, not this host.

`LatencyPredictor` models the median per precision: per-layer costs (projections,
attention, FFN, per-layer fixed work) plus overhead fitted by relative least squares,
plus a correction per head count and per FFN size (what FLOPs miss: narrow GEMMs run
slower per FLOP), ridge-regularised by leave-one-out error; the p95 is the median times
the measured p95/median ratio. `holdout_error` reports its error on held-out candidates
and `recalibrate` refits it for a new device from a few dozen measurements (or rescales
it from fewer).
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..compiler.build import compiler_fingerprint
from ..errors import CanaoError
from ..fileio import locked, read_json_object, update_json_object
from .space import Arch

FEATURES = ("overhead", "layers", "proj", "attn", "ffn")


def host_id() -> str:
    """CPU model + core count: measurements from another machine are never reused."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{os.cpu_count()}"


def timing_stats(times_ms: list[float]) -> dict:
    a = np.asarray(times_ms)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
            "min_ms": float(a.min()), "runs": int(a.size)}


class LatencyOracle:
    """measure(arch, seq=None, threads=None) -> {"median_ms", "p95_ms", ...}."""

    def __init__(self, teacher_config, threads: int = 1, backend: str = "canao", db_path: str | Path | None = None,
                 runs: int = 30, warmup: int = 5, progress=None, rounds: int = 3, device: str | None = None,
                 max_age_h: float | None = 24.0):
        if backend not in ("canao", "torch"):
            raise CanaoError(f"latency backend '{backend}' unknown; use canao or torch")
        if device and backend != "canao":
            raise CanaoError("timing on a device needs the canao latency backend (the device has no PyTorch)")
        self.teacher = teacher_config
        self.threads, self.backend, self.runs, self.warmup = threads, backend, runs, warmup
        self.rounds = max(1, rounds)
        self.max_age_s = None if max_age_h is None else max_age_h * 3600
        self.db_path = Path(db_path) if db_path else None
        # shared by every search on this machine: read and written under its lock, merged, never lost
        # (a corrupt file is kept aside and named, not overwritten)
        self.db: dict[str, dict] = {}
        if self.db_path:
            with locked(self.db_path):
                self.db = read_json_object(self.db_path, "latency database")
        self.host = host_id()
        self.device, self.target = device, "host"
        if device:
            from ..device.runner import device_target, get_device

            info = get_device(device).probe()
            self.host = f"device:{info['spec']}|{info['cpu_model']}|{info['arch']}|{info['cores']}"
            self.target = device_target(info)
        self.progress = progress
        self.measured_now = 0  # measurements taken by this process (not from the database)

    def _key(self, arch: Arch, threads: int) -> str:
        t = self.teacher
        return f"{self.backend}|{self.host}|H{t.hidden_size}d{t.head_dim}v{t.vocab_size}|{arch.key()}|t{threads}{self._code()}"

    def _code(self) -> str:
        # canao timings are of the code this compiler generates: another compiler's are not reused
        return f"|c{compiler_fingerprint()}" if self.backend == "canao" else ""

    def _fresh(self, entry: dict | None) -> bool:
        return entry is not None and (self.max_age_s is None or time.time() - entry.get("when", 0) <= self.max_age_s)

    def cached(self, arch: Arch, threads: int | None = None) -> dict | None:
        entry = self.db.get(self._key(arch, threads or self.threads))
        return entry if self._fresh(entry) else None

    def all_cached(self, threads: int | None = None) -> list[tuple[Arch, dict]]:
        prefix = f"{self.backend}|{self.host}|"
        t = threads or self.threads
        return [(Arch.from_dict(v["arch"]), v) for k, v in self.db.items()
                if k.startswith(prefix) and k.endswith(self._code()) and v.get("threads") == t and self._fresh(v)]

    def _save(self, key: str, entry: dict) -> None:
        if not self.db_path:
            return
        # only this measurement goes in: what other processes wrote meanwhile stays, and is read back
        self.db = update_json_object(self.db_path, "latency database", lambda data: data.update({key: entry}))

    def measure(self, arch: Arch, seq: int | None = None, threads: int | None = None, fresh: bool = False,
                model=None) -> dict:
        """Median/p95 ms of one batch-1 inference at `seq` tokens. `model` (optional): time these
        weights instead of random ones (same architecture; used to verify the final model)."""
        if seq is not None and seq != arch.seq:
            arch = Arch(arch.heads, arch.ffn, seq, arch.precision, arch.hidden)
        threads = threads or self.threads
        key = self._key(arch, threads)
        if not fresh and model is None and self._fresh(self.db.get(key)):
            return self.db[key]
        import torch

        from ..models.bert import BertForQuestionAnswering

        if model is None:
            torch.manual_seed(0)
            model = BertForQuestionAnswering(arch.bert_config(self.teacher)).eval()
        rng = np.random.default_rng(0)
        ids = rng.integers(1, self.teacher.vocab_size, (1, arch.seq))
        tt = np.zeros_like(ids)
        tt[:, arch.seq // 4:] = 1
        mask = np.ones_like(ids)
        t0 = time.perf_counter()
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if self.device:
                stats, compile_s = self._time_device(model, arch, threads)
            elif self.backend == "canao":
                times, compile_s = self._time_canao(model, arch, threads, ids, tt, mask)
            else:
                if arch.precision != "fp32":
                    raise CanaoError(f"the torch latency backend times fp32 only, not {arch.precision}")
                times, compile_s = self._time_torch(model, ids, tt, mask), 0.0
        finally:
            torch.set_num_threads(old_threads)
        if not self.device:
            stats = timing_stats(times)
        result = {**stats, "rounds": self.rounds, "arch": arch.to_dict(), "threads": threads, "backend": self.backend,
                  "compile_s": compile_s, "measure_s": time.perf_counter() - t0, "when": time.time()}
        self.measured_now += 1
        if self.progress:
            self.progress(arch, result)
        self.db[key] = result
        self._save(key, result)
        return result

    def _loop(self, fn) -> list[float]:
        """Warm-up, then `rounds` rounds of `runs` timings; the round with the lowest median is kept.
        On a shared machine another process's burst inflates one round, not the code's latency."""
        for _ in range(self.warmup):
            fn()
        best = None
        for _ in range(self.rounds):
            times = []
            for _ in range(self.runs):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            if best is None or np.median(times) < np.median(best):
                best = times
        return best

    def _time_canao(self, model, arch, threads, ids, tt, mask):
        from ..compiler import compile_model, load_artifact

        tmp = Path(tempfile.mkdtemp(prefix="canao-lat-"))
        try:
            t0 = time.perf_counter()
            compile_model(model, tmp / "artifact", precision=arch.precision, max_seq=arch.seq, threads=threads)
            compile_s = time.perf_counter() - t0
            art = load_artifact(tmp / "artifact", threads=threads)
            try:
                times = self._loop(lambda: art.run(ids, tt, mask))
            finally:
                art.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return times, compile_s

    def _device_rounds(self, path, seq: int, threads: int) -> dict:
        """canao-run on the device: `rounds` rounds (warm-up before the first), the lowest median kept."""
        from ..device.runner import measure

        rounds = [measure(path, self.device, seq=seq, threads=threads, runs=self.runs,
                          warmup=self.warmup if i == 0 else 0) for i in range(self.rounds)]
        best = min(rounds, key=lambda r: r["median_ms"])
        return {k: best[k] for k in ("median_ms", "p95_ms", "min_ms", "runs")}

    def _time_device(self, model, arch, threads):
        from ..compiler import compile_model

        tmp = Path(tempfile.mkdtemp(prefix="canao-lat-"))
        try:
            t0 = time.perf_counter()
            compile_model(model, tmp / "artifact", precision=arch.precision, max_seq=arch.seq, target=self.target,
                          threads=threads)
            compile_s = time.perf_counter() - t0
            return self._device_rounds(tmp / "artifact", arch.seq, threads), compile_s
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def time_artifact(self, path, seq: int, threads: int | None = None) -> dict:
        """Median/p95 of an already compiled artifact (the final model), batch 1, `seq` tokens."""
        from ..compiler import load_artifact

        threads = threads or self.threads
        if self.device:
            return {**self._device_rounds(path, seq, threads), "threads": threads, "seq": seq}
        rng = np.random.default_rng(0)
        ids = rng.integers(1, self.teacher.vocab_size, (1, seq))
        tt, mask = np.zeros_like(ids), np.ones_like(ids)
        art = load_artifact(path, threads=threads)
        try:
            return {**timing_stats(self._loop(lambda: art.run(ids, tt, mask))), "threads": threads, "seq": seq}
        finally:
            art.close()

    def _time_torch(self, model, ids, tt, mask):
        import torch

        args = [torch.as_tensor(a) for a in (ids, tt, mask)]
        with torch.inference_mode():
            return self._loop(lambda: model(*args))


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


def compiler_precisions() -> tuple[str, ...]:
    """Precisions canao's compiler can generate code for."""
    try:
        from ..compiler.codegen.c import PRECISIONS
    except ImportError:
        return ("fp32",)
    return tuple(PRECISIONS)


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


def arch_hash(arch: Arch) -> str:
    return hashlib.sha256(arch.key().encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the final model through the compiler
def compile_final(model, out: str | Path, arch: Arch, threads: int, target: str = "host") -> dict:
    """Compile the trained model to an artifact folder (the same compiler call the oracle times)."""
    from ..compiler import compile_model

    return compile_model(model, out, precision=arch.precision, max_seq=arch.seq, threads=threads, target=target)


def artifact_runner(path, threads: int):
    """(run(ids, types, mask) -> (start, end) numpy, close) for squad.predict."""
    from ..compiler import load_artifact

    art = load_artifact(path, threads=threads)
    return (lambda ids, tt, mask: art.run(ids, tt, mask, as_torch=False)), art.close


def verify_artifact(path, model, feats, threads: int, n: int = 8) -> dict:
    """Max |logit difference| between the artifact and PyTorch on `n` real windows at their lengths."""
    import torch

    run, close = artifact_runner(path, threads)
    worst = 0.0
    try:
        for i in range(min(n, len(feats))):
            L = int(feats.lengths()[i])
            args = [a[i:i + 1, :L] for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask)]
            s, e = run(*args)
            with torch.no_grad():
                rs, re_ = model(*[torch.as_tensor(a) for a in args])
            worst = max(worst, float(np.abs(s - rs.numpy()).max()), float(np.abs(e - re_.numpy()).max()))
    finally:
        close()
    return {"max_abs_diff": worst, "windows": min(n, len(feats)), "ok": worst < 1e-3}


def per_question_latency(path, feats, threads: int, n: int = 100, warmup: int = 5) -> dict:
    """p50/p95 of single-window runs at each window's real (unpadded) length."""
    run, close = artifact_runner(path, threads)
    times = []
    try:
        idx = list(range(min(n, len(feats))))
        for i in idx[:warmup] + idx:
            L = int(feats.lengths()[i])
            args = [a[i:i + 1, :L] for a in (feats.input_ids, feats.token_type_ids, feats.attention_mask)]
            t = time.perf_counter()
            run(*args)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        close()
    st = timing_stats(times[warmup:])
    return {**st, "mean_len": float(feats.lengths()[:len(times) - warmup].mean())}
