"""One definition of timing statistics: linear percentiles (numpy's, the C runners'), nearest-rank on request."""

import numpy as np
import pytest

from canao.timing import percentile, summary


def test_summary_uses_linear_percentiles():
    times = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0, 6.0, 9.0, 8.0]
    st = summary(times)
    assert st == {"median_ms": 5.5, "mean_ms": 5.5, "min_ms": 1.0, "p90_ms": pytest.approx(9.1),
                  "p95_ms": pytest.approx(9.55), "runs": 10}
    assert st["p90_ms"] == pytest.approx(float(np.percentile(times, 90)))
    with pytest.raises(ValueError, match="no timings"):
        summary([])


def test_nearest_rank_percentile_is_a_value_that_occurred():
    values = [12.0, 3.0, 7.0, 5.0]
    assert percentile(values, 50, nearest_rank=True) == 5.0
    assert percentile(values, 99, nearest_rank=True) == 12.0
    assert percentile(values, 50) == 6.0  # linear: between the two middle values
    assert percentile([], 50) is None
