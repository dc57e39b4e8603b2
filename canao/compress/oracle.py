"""The search's only window onto the compiler: the latency oracle, and the final model through it.

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
by the device, not this host. The predictor fitted to its measurements is in predictor.py.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..compiler.build import compiler_fingerprint
from ..errors import CanaoError
from ..fileio import locked, read_json_object, update_json_object
from ..timing import summary
from .space import Arch


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
    """What the search records of a timing: median, p95 (the budget's statistic), min, runs."""
    st = summary(times_ms)
    return {k: st[k] for k in ("median_ms", "p95_ms", "min_ms", "runs")}


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
            from ..device.device_runner import device_target, get_device

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
        from ..device.device_runner import measure

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


def compiler_precisions() -> tuple[str, ...]:
    """Precisions canao's compiler can generate code for."""
    try:
        from ..compiler.codegen.c import PRECISIONS
    except ImportError:
        return ("fp32",)
    return tuple(PRECISIONS)


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
