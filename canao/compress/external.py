"""External reference points for the search's Pareto plot: the teacher quantized to int8 on
other engines, with its F1 on the search's held-out eval slice and its latency.

    points = int8_teacher_points(teacher, eval_ex, eval_feats, seq, threads)
    # {"teacher-int8-onnxruntime": {...}, "teacher-int8-tflite": {...}}

Engines come from canao.baselines.encoder_engines (what `canao bench` runs): ONNX Runtime (torch.onnx export,
onnxruntime.quantization.quantize_dynamic: per-channel int8 weights, activations quantized
at run time) and TFLite/LiteRT (litert-torch conversion, ai-edge-quantizer dynamic_wi8_afp32,
XNNPACK; a worker process in its own venv, canao.baselines.litert).

Each point: F1 (official SQuAD, the same decoding as the search's other points) and the
median/p95 of `runs` timed invokes at batch 1 with the input padded to `seq` tokens (real eval
windows, mask 0 past their length), after `warmup` untimed ones, on `threads` threads. Also
`per_question`: the latency per eval window as the engine would serve it. ONNX Runtime has
dynamic shapes, so each window runs at its real length (these timings come from the F1 pass);
the TFLite models have a static [1, seq] input, so every window runs padded to seq, which is how
TFLite QA apps run, and per_question is the padded figure.

An engine that is not available here (onnxruntime not installed, the LiteRT venv missing and
not creatable, e.g. offline) gives {"skipped": reason} instead of a point; other errors raise.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import time

import numpy as np

from ..errors import CanaoError
from ..tasks import squad
from .oracle import timing_stats

ENGINES = ("onnxruntime", "tflite")
NEG = -1e9  # logits past a window's length (what squad.predict fills in)


class Unavailable(Exception):
    """The engine cannot run here (a missing package or venv): a skipped point, not an error."""


class _DropPreprocessHint(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Please consider to run pre-processing")


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _padded(eval_feats, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eval windows as (n, seq) arrays: make_features pads to the longest window, which can be shorter."""
    n, width = eval_feats.input_ids.shape
    if width > seq:
        raise CanaoError(f"eval windows are {width} tokens wide, longer than the sequence length {seq}")
    out = []
    for a in (eval_feats.input_ids, eval_feats.token_type_ids, eval_feats.attention_mask):
        x = np.zeros((n, seq), np.int64)
        x[:, :width] = a
        out.append(x)
    return tuple(out)


def _f1(run_fn, eval_ex, eval_feats) -> float:
    """As the search's f1_of."""
    return float(squad.score(run_fn, eval_ex, eval_feats)[0]["f1"])


def _timed_padded(call, padded, runs: int, warmup: int) -> dict:
    """`call(ids, tt, mask) -> ms` on window i % n, batch 1, padded to seq: warmup untimed, then runs timed."""
    ids, tt, mask = padded
    n = len(ids)
    for w in range(warmup):
        call(ids[w % n: w % n + 1], tt[w % n: w % n + 1], mask[w % n: w % n + 1])
    times = [call(ids[i % n: i % n + 1], tt[i % n: i % n + 1], mask[i % n: i % n + 1]) for i in range(runs)]
    return timing_stats(times)


def _stats(times: list[float]) -> dict:
    st = timing_stats(times)
    return {"median_ms": st["median_ms"], "p95_ms": st["p95_ms"], "runs": st["runs"]}


def _onnxruntime(model, eval_ex, eval_feats, seq, threads, runs, warmup, log) -> dict:
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401  (needs the onnx package too)
    except ImportError as exc:
        raise Unavailable(f"onnxruntime is not installed ({exc}); pip install 'canao[bench]'") from None
    from ..baselines.encoder_engines import OnnxRuntimeEngine

    log("teacher int8 on ONNX Runtime: exporting and quantizing (quantize_dynamic, per-channel int8)")
    quiet = _DropPreprocessHint()
    logging.getLogger().addFilter(quiet)  # quantize_dynamic's advice to run its pre-processing first
    try:
        eng = OnnxRuntimeEngine(model, "int8")
    finally:
        logging.getLogger().removeFilter(quiet)
    try:
        eng.prepare(threads)
        timing = _timed_padded(eng.time_ms, _padded(eval_feats, seq), runs, warmup)
        per_window, tokens = [], []

        def run_fn(ids, tt, mask):  # batch 1, each window at its real length (dynamic shapes)
            b, width = ids.shape
            start = np.full((b, width), NEG, np.float32)
            end = np.full((b, width), NEG, np.float32)
            for r in range(b):
                n = int(mask[r].sum())
                t0 = time.perf_counter()
                s, e = eng.run(ids[r: r + 1, :n], tt[r: r + 1, :n], mask[r: r + 1, :n])
                per_window.append((time.perf_counter() - t0) * 1e3)
                tokens.append(n)
                start[r, :n], end[r, :n] = s[0], e[0]
            return start, end

        log(f"teacher int8 on ONNX Runtime: F1 on {len(eval_ex)} eval questions ({len(eval_feats)} windows)")
        f1 = _f1(run_fn, eval_ex, eval_feats)
        version = eng.version.removesuffix(" int8")
    finally:
        eng.close()  # the exported .onnx files (a temporary folder)
    return {"engine": "onnxruntime", "version": version, "precision": "int8",
            "quantization": "onnxruntime.quantization.quantize_dynamic: int8 per-channel weights, activations "
                            "quantized at run time", "f1": f1, "median_ms": timing["median_ms"],
            "p95_ms": timing["p95_ms"], "runs": timing["runs"], "seq": seq, "threads": threads,
            "per_question": {**_stats(per_window), "windows": len(per_window),
                             "mean_tokens": float(np.mean(tokens))},
            "note": f"median_ms/p95_ms: batch 1 padded to {seq} tokens; per_question: each eval window at its real "
                    "length (dynamic shapes), timed during the F1 pass"}


def _tflite(model, eval_ex, eval_feats, seq, threads, runs, warmup, log) -> dict:
    from ..baselines import litert

    try:
        litert.ensure_venv(log)  # creating it needs the network (pip): without it the engine is skipped
    except (CanaoError, subprocess.CalledProcessError, OSError) as exc:
        raise Unavailable(f"TFLite: its venv {litert.venv_dir()} is missing and could not be created: "
                          f"{exc}") from None
    from ..baselines.encoder_engines import TFLiteEngine

    eng = TFLiteEngine(model, "int8", log=log)
    try:
        log("teacher int8 on TFLite: converting (litert-torch, ai-edge-quantizer dynamic_wi8_afp32; cached)")
        eng.setup(seq)  # the model's static input is [1, seq]
        eng.prepare(threads)
        padded = _padded(eval_feats, seq)
        timing = _timed_padded(eng.time_ms, padded, runs, warmup)

        def run_fn(ids, tt, mask):  # batch 1, every window padded to seq by the worker (static shape)
            b, width = ids.shape
            start = np.full((b, width), NEG, np.float32)
            end = np.full((b, width), NEG, np.float32)
            for r in range(b):
                s, e = eng.run(ids[r: r + 1], tt[r: r + 1], mask[r: r + 1])
                start[r], end[r] = s[0], e[0]
            return start, end

        log(f"teacher int8 on TFLite: F1 on {len(eval_ex)} eval questions ({len(eval_feats)} windows, "
            f"each padded to {seq})")
        f1 = _f1(run_fn, eval_ex, eval_feats)
        version = eng.version.removesuffix(" int8")
    finally:
        eng.close()
    return {"engine": "tflite", "version": version, "precision": "int8",
            "quantization": "ai-edge-quantizer dynamic_wi8_afp32: int8 weights, float activations",
            "f1": f1, "median_ms": timing["median_ms"], "p95_ms": timing["p95_ms"], "runs": timing["runs"],
            "seq": seq, "threads": threads,
            "per_question": {"median_ms": timing["median_ms"], "p95_ms": timing["p95_ms"], "runs": timing["runs"],
                             "padded_to": seq},
            "note": f"the TFLite model has a static [1, {seq}] input: every question runs padded to {seq} tokens, "
                    "as TFLite QA apps run it, so per_question is the padded figure"}


_RUNNERS = {"onnxruntime": _onnxruntime, "tflite": _tflite}


def int8_teacher_points(teacher, eval_ex, eval_feats, seq: int, threads: int,
                        engines=ENGINES, runs: int = 20, warmup: int = 5, log=None) -> dict[str, dict]:
    """{"teacher-int8-<engine>": point or {"skipped": reason}} for each engine (see the module docstring).

    teacher: the PyTorch QA teacher (left untouched: a CPU copy is exported); eval_ex / eval_feats: the
    search's held-out slice and its windows (squad.make_features at `seq`)."""
    unknown = [e for e in engines if e not in _RUNNERS]
    if unknown:
        raise CanaoError(f"unknown engine(s) {unknown} for the int8 teacher points; available: {', '.join(_RUNNERS)}")
    if runs < 1 or warmup < 0:
        raise CanaoError(f"runs must be at least 1 and warmup at least 0 (got runs {runs}, warmup {warmup})")
    if len(eval_feats) == 0 or not eval_ex:
        raise CanaoError("no eval questions for the int8 teacher points")
    log = log or (lambda line: None)
    model = copy.deepcopy(teacher).float().cpu().eval()  # the search's teacher may live on a GPU
    out = {}
    for engine in engines:
        name = f"teacher-int8-{engine}"
        try:
            out[name] = _RUNNERS[engine](model, eval_ex, eval_feats, seq, threads, runs, warmup, log)
        except Unavailable as exc:
            out[name] = {"skipped": _one_line(exc)}
            log(f"{name}: skipped ({out[name]['skipped']})")
            continue
        p = out[name]
        log(f"{name}: F1 {p['f1']:.2f}, p50 {p['median_ms']:.2f} ms, p95 {p['p95_ms']:.2f} ms "
            f"(batch 1, {seq} tokens, {threads} thread(s))")
    return out
