"""Statistics of timed runs, one definition for every report (the search's oracle, `canao bench`, the
decode protocol, the server's load test): numpy's linear percentiles, as the C runners' quantile
(canao_stats.h). Imported inside the baseline venvs too: numpy only."""

from __future__ import annotations

import math

import numpy as np


def percentile(values, p: float, nearest_rank: bool = False) -> float | None:
    """The p-th percentile (p in 0..100) of values, None when there are none. nearest_rank: the smallest
    value with at least p % of the values at or below it (a load test's p99 is then a latency a request
    really had)."""
    values = list(values)
    if not values:
        return None
    if nearest_rank:
        ordered = sorted(values)
        return float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def summary(times_ms) -> dict:
    """{"median_ms", "mean_ms", "min_ms", "p90_ms", "p95_ms", "runs"} of a list of milliseconds."""
    a = np.asarray(list(times_ms), dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timings to summarize")
    p90, p95 = np.percentile(a, [90, 95])
    return {"median_ms": float(np.median(a)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "p90_ms": float(p90), "p95_ms": float(p95), "runs": int(a.size)}
