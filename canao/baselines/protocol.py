"""The measurement every decode engine goes through, so their numbers compare.

An engine is anything with `reset()` (forget the KV cache) and `feed(ids) -> logits`
(append `ids` at the next positions and return the last position's logits, a 1-D float
array over the vocabulary). Timings cover `feed` only; the greedy argmax is taken outside
the timed region, so no engine pays for sampling or detokenizing.

Imports only the standard library and numpy: llama.cpp's worker runs this same code in its
own venv.
"""

from __future__ import annotations

import time

import numpy as np

from .. import timing

DECODE_STEPS = 32
DECODE_WARMUP = 4
TTFT_RUNS = 5


def _argmax(logits) -> int:
    return int(np.argmax(np.asarray(logits)))


def decode_ms(engine, prompt: list[int], steps: int = DECODE_STEPS, warmup: int = DECODE_WARMUP) -> list[float]:
    """Milliseconds of each of `steps` greedy single-token decode steps after a prefill of `prompt`.

    A warm-up round (prefill + `warmup` steps) first; then the cache is cleared, the prompt is
    prefilled again and the timed step i attends to len(prompt) + i positions.
    """
    if steps < 20:
        raise ValueError("decode_ms needs at least 20 steps: medians of fewer are noise")
    engine.reset()
    nxt = _argmax(engine.feed(prompt))
    for _ in range(warmup):
        nxt = _argmax(engine.feed([nxt]))
    engine.reset()
    nxt = _argmax(engine.feed(prompt))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = engine.feed([nxt])
        times.append((time.perf_counter() - t0) * 1e3)
        nxt = _argmax(logits)
    return times


def ttft_ms(engine, prompt: list[int], runs: int = TTFT_RUNS) -> list[float]:
    """Prefill of `prompt` up to the first logits, from an empty cache: one warm-up, then `runs` timed."""
    times = []
    for i in range(runs + 1):
        engine.reset()
        t0 = time.perf_counter()
        engine.feed(prompt)
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def greedy(engine, prompt: list[int], n: int) -> list[int]:
    """The `n` token ids greedy decoding generates after `prompt`."""
    engine.reset()
    out = [_argmax(engine.feed(prompt))]
    while len(out) < n:
        out.append(_argmax(engine.feed([out[-1]])))
    return out


def summary(times: list[float]) -> dict:
    """Median and p90 milliseconds of a list of timings."""
    st = timing.summary(times)
    return {"median_ms": st["median_ms"], "p90_ms": st["p90_ms"], "runs": st["runs"]}
