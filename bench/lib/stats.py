"""Medians, quantiles and one summary of a column of figures (None values are left out)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any


def _present(xs: Iterable[float | None]) -> list[float]:
    return [x for x in xs if x is not None]


def median(xs: Iterable[float | None]) -> float | None:
    xs = _present(xs)
    return statistics.median(xs) if xs else None


def pmax(xs: Iterable[float | None]) -> float | None:
    xs = _present(xs)
    return max(xs) if xs else None


def rnd(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The q-quantile of sorted values, nearest rank: the smallest value with at least q of them at or below."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def pct(xs: Iterable[float | None], q: float) -> float | None:
    """The q-quantile (0..1) of xs, nearest rank."""
    xs = sorted(_present(xs))
    return nearest_rank(xs, q) if xs else None


def summary(xs: Iterable[float | None], unit: str = "") -> dict[str, Any]:
    """``{median, min, max, n}`` of a column, each key but ``n`` suffixed with ``unit``
    (``"_s"`` for seconds: ``median_s``...), rounded to 3 places."""
    xs = _present(xs)
    return {f"median{unit}": rnd(median(xs)), f"min{unit}": rnd(min(xs)) if xs else None,
            f"max{unit}": rnd(pmax(xs)), "n": len(xs)}
