"""The compile pipeline: model -> IR -> passes -> C -> shared library -> artifact folder."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import CanaoError
from . import artifact
from .build import build_artifact, copy_support_files
from .codegen.c import generate
from .frontend import capture
from .passes import optimize
from .targets import TARGETS, X86_64, X86_VARIANTS, get_target, is_cross, missing_features
from .tuner import tune_graph

from .codegen.c import PRECISIONS


def compile_model(model, out: str | Path, precision: str = "fp32", max_seq: int = 384,
                  target: str = "host", threads: int | None = None, tune: bool | None = None,
                  log=None, attention: str | None = None) -> dict:
    """Compile a BertForQuestionAnswering-style model into the artifact folder `out`; returns a summary.

    tune: True measures the GEMM signatures the tuning database lacks (canao.compiler.tuner),
    None (default) uses the schedules the database already has and measures nothing,
    False ignores the database (the target's default schedule everywhere).
    attention: precision of the attention's two products, fp32 or int8 (default: int8 for int8
    models, fp32 otherwise; codegen.c.default_attention)."""
    if precision not in PRECISIONS:
        raise CanaoError(f"precision '{precision}' is not implemented yet; available: {', '.join(PRECISIONS)}")
    if target == X86_64:
        return _compile_x86_64(model, out, precision, max_seq, threads, tune, log, attention)
    limit = model.config.max_position_embeddings
    if not 2 <= max_seq <= limit:
        raise CanaoError(f"--max-seq {max_seq} must be between 2 and the model's {limit} positions")
    tgt = get_target(target)
    times = {}
    t0 = time.perf_counter()
    graph = capture(model, max_seq)
    times["frontend_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    graph, report = optimize(graph, max_seq)
    times["passes_ms"] = (time.perf_counter() - t0) * 1e3
    schedules, tuning = {}, {"enabled": False}
    if is_cross(tgt):
        # schedules measured on this machine say nothing about the device's: the target's defaults
        tuning["note"] = f"cross-compiled for {tgt.arch}: default schedules, nothing measured"
    elif tune is not False:
        t0 = time.perf_counter()
        schedules, tuning = tune_graph(graph, tgt, precision, measure_missing=bool(tune), log=log)
        tuning["enabled"] = bool(tune)
        times["tune_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    program = generate(graph, tgt, max_seq, schedules, precision=precision, attention=attention)
    times["codegen_ms"] = (time.perf_counter() - t0) * 1e3
    final, out = artifact.begin_folder(out)
    (out / "model.c").write_text(program.source)
    copy_support_files(out)
    artifact.write_weights(out / artifact.WEIGHTS, program.weights)
    t0 = time.perf_counter()
    build_artifact(out, tgt, artifact.LIBRARY, artifact.RUNNER)
    times["cc_ms"] = (time.perf_counter() - t0) * 1e3
    cfg = model.config
    info = {
        "target": {"name": tgt.name, "arch": tgt.arch, "features": list(tgt.features), "cflags": list(tgt.cflags)},
        "runner": artifact.RUNNER,
        "precision": precision,
        "attention": program.attention,
        "max_seq": max_seq,
        "threads": threads,
        "model": {"hidden_size": cfg.hidden_size, "layer_heads": list(cfg.layer_heads),
                  "layer_ffn": list(cfg.layer_ffn), "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size},
        "outputs": ["start_logits", "end_logits"],
        "memory": {"arena_peak_bytes": program.plan.peak_bytes, "arena_naive_bytes": program.plan.naive_bytes,
                   "weight_bytes": len(program.weights)},
        "fusion": report,
        "tuning": tuning,
        "schedules": {name: vars(s) for name, s in schedules.items()},
        "kernels": program.kernels,
        "phases": program.phases,
    }
    manifest = artifact.finish_folder(out, final, info)
    return {"artifact": str(final), **{k: manifest[k] for k in ("target", "precision", "attention", "max_seq", "memory")},
            "fusion": report, "tuning": tuning, "times": times}


def _compile_x86_64(model, out, precision, max_seq, threads, tune, log, attention) -> dict:
    """One artifact with a build per x86 target (X86_VARIANTS), each a complete artifact in its own
    sub-folder (its weights are packed for its vector width and int8 range); loading picks the widest
    build the CPU runs (artifact.pick_build), so an artifact compiled on one x86 machine runs at full
    speed on another. Builds this CPU cannot run are compiled with default schedules (nothing to time)."""
    final, partial = artifact.begin_folder(out)
    builds = {}
    for name in X86_VARIANTS:
        here = not missing_features(TARGETS[name])
        builds[name] = compile_model(model, partial / name, precision, max_seq, target=name, threads=threads,
                                     tune=tune if here else False, log=log, attention=attention)
    first = artifact.read_manifest(partial / X86_VARIANTS[0], here=False)
    info = {"target": {"name": X86_64, "arch": "x86_64", "variants": list(X86_VARIANTS)},
            **{k: first[k] for k in ("precision", "attention", "max_seq", "threads", "model", "outputs")}}
    artifact.finish_folder(partial, final, info)
    host = next((b for name, b in builds.items() if not missing_features(TARGETS[name])), builds[X86_VARIANTS[-1]])
    return {"artifact": str(final), "target": info["target"], "precision": precision, "attention": info["attention"],
            "max_seq": max_seq, "memory": host["memory"], "builds": {name: str(final / name) for name in builds},
            "fusion": host["fusion"], "tuning": host["tuning"], "times": host["times"]}
