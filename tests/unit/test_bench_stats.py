"""bench/lib/stats: the one summary of a column the benchmarks write, and the quantiles. Pure; < 1 s."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.lib.stats import median, nearest_rank, pct, pmax, rnd, summary  # noqa: E402


def test_summary_leaves_out_missing_values_and_names_keys_by_unit() -> None:
    assert summary([3.0, None, 1.0, 2.0], "_s") == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "n": 3}
    assert summary(x for x in [1, 2]) == {"median": 1.5, "min": 1, "max": 2, "n": 2}
    assert summary([None], "_s") == {"median_s": None, "min_s": None, "max_s": None, "n": 0}
    assert summary([0.12345], "_s")["median_s"] == 0.123


def test_medians_maxima_and_nearest_rank_quantiles() -> None:
    assert (median([]), pmax([None]), rnd(None)) == (None, None, None)
    assert (median([4, None, 1, 2]), pmax([1, None, 5])) == (2, 5)
    xs = list(range(1, 101))
    assert (nearest_rank(xs, 0.5), nearest_rank(xs, 0.99), nearest_rank(xs, 1.0)) == (50, 99, 100)
    assert (pct([5, None, 1, 3], 0.5), pct([], 0.5)) == (3, None)
