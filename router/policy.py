"""The router's policy: which pod gets the next request, and when to stop sending to one.

Pure and deterministic: time (``now``, seconds) and randomness (``rng``) come in as arguments,
so every rule is unit-tested without a clock or a network. Both engines use it: the builtin
engine per request, the haproxy engine to turn scores into server weights every second.

- **Score** of a pod = (outstanding requests + 1) x latency EWMA. Lower is better. The EWMA is
  time-decayed toward the service's best while a pod gets no traffic, so a pod that was slow
  once is tried again later instead of being starved forever (Finagle's "peak EWMA" idea).
- **Pick**: power of two choices — two distinct random candidates, the lower score wins.
- **Passive ejection**: ``consecutive_failures`` connect errors or 5xx in a row eject a pod for
  ``base_s`` doubling per ejection up to ``max_s``; a success resets the count, and an ejection
  that is over and followed by a success resets the doubling.
- **Retry budget**: retries may add at most ``ratio`` of the requests in a sliding window,
  plus ``min_per_s`` per second so a quiet service can still retry.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

DEFAULT_LATENCY_MS = 10.0  # a pod with no sample yet, in a service with none either
EWMA_ALPHA = 0.3
IDLE_HALF_LIFE_S = 2.0  # an idle pod's excess latency halves every this many seconds


@dataclass
class PodState:
    """What the router knows of one pod of one service."""

    pod: str
    address: str
    draining: bool = False
    outstanding: int = 0
    ewma_ms: float | None = None
    last_sample_at: float = 0.0
    consecutive_failures: int = 0
    ejections: int = 0  # consecutive ejections, for the doubling
    ejected_until: float = 0.0
    total_ejections: int = 0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


@dataclass(frozen=True)
class EjectionPolicy:
    consecutive_failures: int = 3
    base_s: float = 1.0
    max_s: float = 30.0

    def interval(self, ejections: int) -> float:
        """Seconds out for the ``ejections``-th ejection in a row (1-based)."""
        return min(self.max_s, self.base_s * 2 ** max(0, ejections - 1))


def latency(pod: PodState, now: float, floor_ms: float | None) -> float:
    """The pod's latency estimate in ms: its EWMA, decaying toward ``floor_ms`` (the service's
    best) while it receives no samples; a pod with no sample yet is assumed as good as the floor."""
    base = floor_ms if floor_ms is not None else DEFAULT_LATENCY_MS
    if pod.ewma_ms is None:
        return base
    if pod.ewma_ms <= base:
        return pod.ewma_ms
    idle = max(0.0, now - pod.last_sample_at)
    return base + (pod.ewma_ms - base) * 0.5 ** (idle / IDLE_HALF_LIFE_S)


def best_latency(pods: list[PodState]) -> float | None:
    samples = [p.ewma_ms for p in pods if p.ewma_ms is not None]
    return min(samples) if samples else None


def score(pod: PodState, now: float, floor_ms: float | None) -> float:
    return (pod.outstanding + 1) * latency(pod, now, floor_ms)


def candidates(pods: list[PodState], now: float, exclude: set[str] = frozenset()) -> list[PodState]:  # type: ignore[assignment]
    """Pods a new request may go to: not draining, not tried already, and not ejected — unless
    every remaining pod is ejected, when they are all tried anyway (a guess beats a 503)."""
    live = [p for p in pods if not p.draining and p.pod not in exclude]
    healthy = [p for p in live if not p.ejected(now)]
    return healthy or live


def pick(pods: list[PodState], now: float, rng: random.Random, exclude: set[str] = frozenset()  # type: ignore[assignment]
         ) -> PodState | None:
    """Power of two choices on :func:`score` among :func:`candidates`; None if there is none."""
    cands = candidates(pods, now, exclude)
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    a, b = rng.sample(cands, 2)
    floor = best_latency(pods)
    return a if score(a, now, floor) <= score(b, now, floor) else b


def record_latency(pod: PodState, ms: float, now: float) -> None:
    pod.ewma_ms = ms if pod.ewma_ms is None else EWMA_ALPHA * ms + (1 - EWMA_ALPHA) * pod.ewma_ms
    pod.last_sample_at = now


def record_success(pod: PodState, ms: float, now: float) -> None:
    record_latency(pod, ms, now)
    pod.consecutive_failures = 0
    if not pod.ejected(now):
        pod.ejections = 0


def record_failure(pod: PodState, now: float, policy: EjectionPolicy, ms: float | None = None) -> bool:
    """A connect error or a 5xx. Returns True if this failure ejected the pod."""
    if ms is not None:
        record_latency(pod, ms, now)
    pod.consecutive_failures += 1
    if pod.consecutive_failures < policy.consecutive_failures or pod.ejected(now):
        return False
    pod.ejections += 1
    pod.total_ejections += 1
    pod.ejected_until = now + policy.interval(pod.ejections)
    pod.consecutive_failures = 0
    return True


@dataclass
class RetryBudget:
    """Retries allowed: ``ratio`` x requests in the last ``window_s``, plus ``min_per_s`` per second."""

    ratio: float = 0.2
    window_s: float = 10.0
    min_per_s: float = 1.0
    _requests: deque[float] = field(default_factory=deque)
    _retries: deque[float] = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        edge = now - self.window_s
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def record_request(self, now: float) -> None:
        self._requests.append(now)

    def can_retry(self, now: float) -> bool:
        self._trim(now)
        return len(self._retries) < self.ratio * len(self._requests) + self.min_per_s * self.window_s

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is one."""
        if not self.can_retry(now):
            return False
        self._retries.append(now)
        return True


MAX_WEIGHT = 256  # HAProxy's server weight range is 0..256


def weights(pods: list[PodState], now: float, *, max_weight: int = MAX_WEIGHT) -> dict[str, int]:
    """HAProxy server weights from our score: proportional to 1/score squared (a pod twice as
    slow gets a quarter of the draws: the tail latency is made by the few requests a slow pod
    still gets), the best pod at ``max_weight``, none below 1 (weight 0 would stop a pod for
    good, as it would get no request to measure; ejection is HAProxy's own, on errors)."""
    live = [p for p in pods if not p.draining]
    if not live:
        return {}
    floor = best_latency(live)
    inv = {p.pod: 1.0 / score(p, now, floor) ** 2 for p in live}
    top = max(inv.values())
    return {pod: max(1, min(max_weight, math.floor(max_weight * v / top + 0.5))) for pod, v in inv.items()}
