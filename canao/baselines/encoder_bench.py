"""Latency of the same weights on canao and other engines, interleaved in one run.

Each engine gets the same tokens and thread count; after warm-up the engines take
turns run by run, so load from other processes hits them alike. Reported: median
and p90 milliseconds of at least 20 runs per engine and setting.

Engines run in one or more precisions: canao fp32/bf16/int8 (one artifact each),
ONNX Runtime fp32 and int8 (onnxruntime.quantization dynamic: int8 weights, per-row
activation quantization at run time), PyTorch fp32, TFLite fp32/int8 and ExecuTorch
(XNNPACK) fp32/int8 in their own venvs, OpenVINO (CPU plugin) fp32. A sequence setting is a length
(random tokens, no padding), or "squad": real SQuAD dev questions with their
contexts at their real lengths, one question per run, in the same order for every
engine (static-shape engines run them padded to 384, as their QA apps do), or
"squad-unpadded": the same questions, with TFLite given a model converted at each
question's exact length (one conversion per distinct length, cached), so every engine
does the same work.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from ..compiler.targets import cpu_model
from ..errors import CanaoError
from ..timing import summary
from .encoder_engines import ENGINES, open_engine

SQUAD_SETTINGS = ("squad", "squad-unpadded")


def squad_inputs(tokenizer, squad_file: Path, count: int, max_seq: int = 384) -> list[tuple]:
    """The first `count` dev questions with their contexts, tokenized, cut at max_seq (no padding)."""
    from ..compiler.verify import squad_cases

    cases = squad_cases(tokenizer, squad_file, max_seq, count=count)
    return [(ids.numpy(), tt.numpy(), mask.numpy()) for _, ids, tt, mask in cases]


def run_bench(model, artifact, engines: list[str], seqs: list, threads: list[int],
              runs: int = 20, warmup: int = 3, progress=None, precisions: list[str] = ("fp32",),
              squad: list[tuple] | None = None) -> dict:
    """artifact: a path (fp32) or {precision: path}. seqs: ints, or "squad" (needs `squad` inputs)."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise CanaoError(f"unknown engine(s) {unknown}; available: {', '.join(ENGINES)}")
    if runs < 20:
        raise CanaoError("use at least 20 runs so medians mean something")
    artifacts = artifact if isinstance(artifact, dict) else {"fp32": artifact}
    runners, skipped = {}, []
    for e in engines:
        for prec in precisions:
            if prec not in ENGINES[e].precisions:
                skipped.append(f"{e} {prec}")
                continue
            runners[(e, prec)] = open_engine(e, model, prec, artifacts.get(prec) if e == "canao" else None)
    try:
        gen = np.random.default_rng(0)
        results = []
        for th in threads:
            for seq in seqs:
                if seq in SQUAD_SETTINGS:
                    if not squad:
                        raise CanaoError(f"--seq {seq} needs SQuAD dev questions (--data) and a checkpoint with a tokenizer")
                    inputs = [squad[i % len(squad)] for i in range(runs)]
                else:
                    ids = gen.integers(1000, model.config.vocab_size, (1, seq)).astype(np.int64)
                    inputs = [(ids, np.zeros_like(ids), np.ones_like(ids))] * runs
                times = {k: [] for k in runners}
                for k, r in runners.items():
                    r.setup(seq, inputs)
                    r.prepare(th)
                    for w in range(warmup):
                        r.time_ms(*inputs[w % len(inputs)])
                for args in inputs:
                    for k, r in runners.items():  # interleaved: background load hits every engine alike
                        times[k].append(r.time_ms(*args))
                tokens = float(np.mean([a[0].shape[1] for a in inputs]))
                for (e, prec), ts in times.items():
                    st = summary(ts)
                    results.append({"engine": e, "version": runners[(e, prec)].version, "precision": prec, "seq": seq,
                                    "mean_tokens": tokens, "threads": th, "median_ms": st["median_ms"],
                                    "mean_ms": st["mean_ms"], "p90_ms": st["p90_ms"], "runs": runs,
                                    "padded_to": runners[(e, prec)].padded_to})
                if progress:
                    progress(f"threads {th} seq {seq}: " + ", ".join(
                        f"{r['engine']} {r['precision']} {r['median_ms']:.1f} ms" for r in results[-len(runners):]))
    finally:
        for r in runners.values():
            r.close()
    return {"cpu": cpu_model(), "machine": platform.machine(), "results": results, "skipped": skipped,
            "note": "engines interleaved run by run; median/p90 over runs; squad rows: one real dev question per run"}


def markdown(report: dict) -> str:
    engines = list(dict.fromkeys(f"{r['engine']} {r['precision']}" for r in report["results"]))
    lines = [f"CPU: {report['cpu']}", "",
             "| seq | threads | " + " | ".join(f"{e} ms" for e in engines) + " | canao / others |",
             "| --- | --- | " + " | ".join("---" for _ in engines) + " | --- |"]
    keys = list(dict.fromkeys((r["seq"], r["threads"]) for r in report["results"]))
    for seq, th in keys:
        rows = [r for r in report["results"] if r["seq"] == seq and r["threads"] == th]
        row = {f"{r['engine']} {r['precision']}": r["median_ms"] for r in rows}
        ratios = []
        for c in (e for e in engines if e.startswith("canao ") and e in row):
            ratios += [f"{c} {row[c] / row[e]:.2f}x {e}" for e in engines if not e.startswith("canao ") and e in row]
        label = f"{seq} ({rows[0]['mean_tokens']:.0f} tok)" if seq in SQUAD_SETTINGS else seq
        lines.append(f"| {label} | {th} | " + " | ".join(f"{row[e]:.1f}" if e in row else "-" for e in engines)
                     + f" | {'; '.join(ratios)} |")
    return "\n".join(lines) + "\n"

