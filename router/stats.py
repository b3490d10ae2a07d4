"""Traffic figures both engines report: ``/-/stats`` (JSON for the dashboard) and ``/metrics``
(Prometheus). The builtin engine records each request as it answers it; the haproxy engine
records each line of HAProxy's request log, which is sampled above a request rate (each line
then stands for ``count`` requests)."""

from __future__ import annotations

import bisect
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

WINDOW_S = 60
SAMPLES_PER_SECOND = 400  # latency samples kept per second per service (reservoir), for p50/p99
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class _Second:
    t: int
    requests: int = 0
    errors: int = 0
    retries: int = 0
    seen: int = 0  # latencies offered to the reservoir this second
    latencies: list[float] = field(default_factory=list)


class ServiceWindow:
    """The last minute of one service, one bucket per second."""

    def __init__(self, rng: random.Random) -> None:
        self.buckets: dict[int, _Second] = {}
        self.rng = rng

    def _bucket(self, now: float) -> _Second:
        t = int(now)
        b = self.buckets.get(t)
        if b is None:
            b = self.buckets[t] = _Second(t)
            if len(self.buckets) > WINDOW_S + 2:
                for old in [k for k in self.buckets if k <= t - WINDOW_S]:
                    del self.buckets[old]
        return b

    def record(self, now: float, ms: float, error: bool, count: int = 1) -> None:
        """One answered request, or one sampled line standing for ``count`` requests."""
        b = self._bucket(now)
        b.requests += count
        b.errors += count if error else 0
        b.seen += 1
        if len(b.latencies) < SAMPLES_PER_SECOND:
            b.latencies.append(ms)
        else:
            j = int(self.rng.random() * b.seen)  # as randrange(seen), at about half its cost
            if j < SAMPLES_PER_SECOND:
                b.latencies[j] = ms

    def retry(self, now: float, count: int = 1) -> None:
        self._bucket(now).retries += count

    def summary(self, now: float, uptime_s: float) -> dict[str, Any]:
        edge = int(now) - WINDOW_S
        live = [b for t, b in self.buckets.items() if t > edge]
        n = sum(b.requests for b in live)
        errors = sum(b.errors for b in live)
        # Each second's reservoir stands for its requests: weight samples accordingly.
        weighted = sorted((ms, b.requests / len(b.latencies)) for b in live for ms in b.latencies if b.latencies)
        span = max(1.0, min(float(WINDOW_S), uptime_s))
        return {
            "requests": n,
            "requests_per_s": round(n / span, 2),
            "errors": errors,
            "error_rate": round(errors / n, 4) if n else 0.0,
            "retries": sum(b.retries for b in live),
            "p50_ms": _quantile(weighted, 0.50),
            "p99_ms": _quantile(weighted, 0.99),
        }


def _quantile(weighted: list[tuple[float, float]], q: float) -> float | None:
    if not weighted:
        return None
    total = sum(w for _, w in weighted)
    acc = 0.0
    for ms, w in weighted:
        acc += w
        if acc >= q * total:
            return round(ms, 2)
    return round(weighted[-1][0], 2)


def observe(histogram: Any, seconds: float, count: int) -> None:
    """``count`` observations of ``seconds`` in a histogram child, in one step: a sampled log line
    stands for up to thousands of requests a second, and observing each would cost our process
    about as much per request as HAProxy spends. prometheus_client has no weighted observation,
    so its own sum and bucket counters are advanced (one for one, when a version lacks them)."""
    buckets, bounds = getattr(histogram, "_buckets", None), getattr(histogram, "_upper_bounds", None)
    if count == 1 or buckets is None or bounds is None or not hasattr(histogram, "_sum"):
        for _ in range(count):
            histogram.observe(seconds)
        return
    histogram._sum.inc(seconds * count)
    buckets[bisect.bisect_left(bounds, seconds)].inc(count)


def observe_many(histogram: Any, values: list[float]) -> None:
    """Each of ``values`` observed in a histogram child, its sum and bucket counters advanced once
    (a batch of a second's requests); one by one when a version lacks them."""
    buckets, bounds = getattr(histogram, "_buckets", None), getattr(histogram, "_upper_bounds", None)
    if buckets is None or bounds is None or not hasattr(histogram, "_sum"):
        for v in values:
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)
        counts[i] = counts.get(i, 0) + 1
    histogram._sum.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


class TrafficStats:
    """Per-service windows plus the Prometheus metrics, in one registry per router."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.started = time.monotonic()
        self.rng = random.Random()
        self.windows: dict[str, ServiceWindow] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter("hms_router_requests", "Requests answered, by service, pod and status code",
                                ["service", "pod", "code"], registry=self.registry)
        self.latency = Histogram("hms_router_request_duration_seconds", "Time to answer a request",
                                 ["service", "pod"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("hms_router_retries", "Requests sent again to another pod",
                               ["service", "reason"], registry=self.registry)
        self.ejections = Counter("hms_router_ejections", "Pods taken out of rotation after consecutive failures",
                                 ["service", "pod"], registry=self.registry)
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def window(self, service: str) -> ServiceWindow:
        w = self.windows.get(service)
        if w is None:
            w = self.windows[service] = ServiceWindow(self.rng)
        return w

    def record(self, service: str, pod: str, status: int, seconds: float, *, now: float | None = None,
               count: int = 1) -> None:
        """One request; ``count`` > 1: a sampled request standing for that many (haproxy engine)."""
        now = time.monotonic() if now is None else now
        self.window(service).record(now, seconds * 1000.0, status >= 500, count)
        children = self._series(service, pod, status)
        children[0].inc(count)
        observe(children[1], seconds, count)

    def _series(self, service: str, pod: str, status: int) -> tuple[Any, Any]:
        key = (service, pod, str(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(service, pod, str(status)),
                                              self.latency.labels(service, pod))
        return children

    def record_series(self, service: str, pod: str, status: int, seconds: Sequence[float], when: Sequence[float]
                      ) -> None:
        """Many requests of one (service, pod, status), the i-th taking ``seconds[i]`` and answered
        at ``when[i]``: the figures :meth:`record` would give one by one, the Prometheus series
        advanced once."""
        window, error = self.window(service), status >= 500
        for s, now in zip(seconds, when, strict=True):
            window.record(now, s * 1000.0, error)
        counter, histogram = self._series(service, pod, status)
        counter.inc(len(seconds))
        observe_many(histogram, seconds)

    def record_retry(self, service: str, reason: str, count: int = 1, *, now: float | None = None) -> None:
        self.window(service).retry(time.monotonic() if now is None else now, count)
        self.retries.labels(service, reason).inc(count)

    def record_ejection(self, service: str, pod: str) -> None:
        self.ejections.labels(service, pod).inc()

    def summary(self, services: list[str] | None = None) -> dict[str, Any]:
        now = time.monotonic()
        uptime = now - self.started
        names = sorted(set(self.windows) | set(services or []))
        return {
            "engine": self.engine,
            "window_s": WINDOW_S,
            "uptime_s": round(uptime, 1),
            "services": {n: self.window(n).summary(now, uptime) for n in names},
        }
