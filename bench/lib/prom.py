"""A worker's Prometheus ``/metrics``: scrape it, read a histogram, and its quantiles over a
window (two scrapes) the way Prometheus' ``histogram_quantile`` reads them."""

from __future__ import annotations

import math
from typing import Any

import aiohttp

from bench.lib.stats import rnd


async def scrape(session: aiohttp.ClientSession, port: int) -> str:
    async with session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        r.raise_for_status()
        return await r.text()


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts ``{le: count}`` of an unlabelled histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != name:
            continue
        for s in fam.samples:
            if s.name == f"{name}_bucket":
                out[float(s.labels["le"])] = s.value
    return out


def hist_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in sorted(after)}


def hist_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket the rank falls in."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    total = buckets[les[-1]]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bucket: its bound is all we know
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return None


def share_within(buckets: dict[float, float], le: float) -> float | None:
    total = buckets.get(math.inf)
    return None if not total else buckets.get(le, 0.0) / total


def hist_summary(buckets: dict[float, float]) -> dict[str, Any]:
    return {
        "count": int(buckets.get(math.inf, 0)),
        "p50_s": rnd(hist_quantile(buckets, 0.5), 4),
        "p99_s": rnd(hist_quantile(buckets, 0.99), 4),
        "p999_s": rnd(hist_quantile(buckets, 0.999), 4),
        "share_within_1s": rnd(share_within(buckets, 1.0), 5),
        "share_within_0_1s": rnd(share_within(buckets, 0.1), 5),
        "buckets": {("+Inf" if math.isinf(k) else f"{k:g}"): int(v) for k, v in buckets.items()},
    }


def window_summary(before: str, after: str, metric: str) -> dict[str, Any]:
    """``hist_summary`` of ``metric`` between two scrapes."""
    return hist_summary(hist_delta(histogram(before, metric), histogram(after, metric)))
