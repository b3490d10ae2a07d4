"""The router's policy: which pod gets the next request, and when to stop sending to one.

Pure and deterministic: time (``now``, seconds) and randomness (``rng``) come in as arguments,
so every rule is unit-tested without a clock or a network. Both engines use it: the builtin
engine per request, the haproxy engine to turn scores into server weights every second.

- **Latency estimate**: a *peak* EWMA (Finagle's): a sample above the estimate replaces it at
  once; one below pulls it down by ``1 - exp(-dt / PEAK_DECAY_S)`` (at most ``MAX_STEP``), dt
  the time since the previous sample, so the decay is in time, not in samples: a pod that was
  slow is believed slow until it has answered fast for a while. While a pod gets no traffic its estimate decays
  toward the service's best, so a pod that was slow once is tried again later instead of being
  starved forever.
- **Score** of a pod = (outstanding requests + 1) x latency. Lower is better.
- **Pick**: power of two choices — two distinct random candidates, the lower ``pick_score``
  wins: the score, times latency / (best + ``SLOW_SLACK_MS``) for a pod slower than that.
  Linear in latency alone, a pod with a tiny fraction of the others' capacity still gets a
  share of a heavy load (at 30 requests in flight on each fast pod, (n + 1) x latency lets a
  pod 10x slower hold several): those requests are the tail. Squared, it holds about one.
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
PEAK_DECAY_S = 1.0  # a pod's estimate falls toward lower samples with this time constant
MAX_STEP = 0.3  # ... but one sample closes at most this fraction of the gap
SLOW_SLACK_MS = 10.0  # latencies within this of the best are noise, not a slower pod
IDLE_HALF_LIFE_S = 2.0  # an idle pod's excess latency halves every this many seconds
STALL_FACTOR = 3.0  # an in-flight request this many times older than the estimate means trouble


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
    inflight: dict[int, float] = field(default_factory=dict)  # request token -> when it was sent
    next_token: int = 0

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
    """(outstanding + 1) x latency. While a pod has requests in flight the idle decay no longer
    applies (one that looks good again after a quiet spell gets a single probe, not a pile of
    requests), and once its oldest request is older than ``STALL_FACTOR`` x its estimate, that
    age is its latency: a pod that just turned slow or hung is seen at once, without waiting for
    a slow answer to finish."""
    est = latency(pod, now, floor_ms)
    if pod.outstanding:
        if pod.ewma_ms is not None:
            est = max(est, pod.ewma_ms)
        if pod.inflight:
            age_ms = (now - min(pod.inflight.values())) * 1000.0
            if age_ms > STALL_FACTOR * est:  # not the usual tail: it has turned slow or hung
                est = age_ms
    return (pod.outstanding + 1) * est


def start_request(pod: PodState, now: float) -> int:
    """Count a request sent to ``pod``; returns the token for :func:`finish_request`."""
    pod.next_token += 1
    pod.inflight[pod.next_token] = now
    pod.outstanding += 1
    return pod.next_token


def finish_request(pod: PodState, token: int) -> None:
    if pod.inflight.pop(token, None) is not None:
        pod.outstanding -= 1


def candidates(pods: list[PodState], now: float, exclude: set[str] = frozenset()) -> list[PodState]:  # type: ignore[assignment]
    """Pods a new request may go to: not draining, not tried already, and not ejected — unless
    every remaining pod is ejected, when they are all tried anyway (a guess beats a 503)."""
    live = [p for p in pods if not p.draining and p.pod not in exclude]
    healthy = [p for p in live if now >= p.ejected_until]
    return healthy or live


def pick(pods: list[PodState], now: float, rng: random.Random, exclude: set[str] = frozenset()  # type: ignore[assignment]
         ) -> PodState | None:
    """Power of two choices on :func:`score` among :func:`candidates`; None if there is none."""
    cands = candidates(pods, now, exclude)
    n = len(cands)
    if not n:
        return None
    if n == 1:
        return cands[0]
    # Two distinct candidates, uniformly (as rng.sample(cands, 2), at a fraction of its cost per request).
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    a, b = cands[i], cands[j + 1 if j >= i else j]
    floor = None
    for p in pods:  # best_latency(pods), without the list: this runs on every request
        e = p.ewma_ms
        if e is not None and (floor is None or e < floor):
            floor = e
    return a if _pick_score(a, now, floor) <= _pick_score(b, now, floor) else b


def _pick_score(pod: PodState, now: float, floor_ms: float | None) -> float:
    """:func:`pick_score` (:func:`score`, :func:`latency`) in one call, for the per-request path:
    the same figure (a unit test compares them). The oldest request in flight is the first in
    ``inflight``: tokens are handed out in the order requests are sent."""
    base = floor_ms if floor_ms is not None else DEFAULT_LATENCY_MS
    ewma = pod.ewma_ms
    if ewma is None:
        est = base
    elif ewma <= base:
        est = ewma
    else:
        idle = now - pod.last_sample_at
        est = base + (ewma - base) * 0.5 ** ((idle if idle > 0.0 else 0.0) / IDLE_HALF_LIFE_S)
    n = pod.outstanding
    if n:
        if ewma is not None and ewma > est:
            est = ewma
        if pod.inflight:
            age_ms = (now - next(iter(pod.inflight.values()))) * 1000.0
            if age_ms > STALL_FACTOR * est:
                est = age_ms
    sc = (n + 1) * est
    slow = est / (base + SLOW_SLACK_MS)
    return sc * slow if slow > 1.0 else sc


def pick_score(pod: PodState, now: float, floor_ms: float | None) -> float:
    """:func:`score` x latency / (best + ``SLOW_SLACK_MS``) when that is above 1: latency counts
    squared for a pod clearly slower than the best, as-is for pods about as fast."""
    sc = score(pod, now, floor_ms)
    base = (floor_ms if floor_ms is not None else DEFAULT_LATENCY_MS) + SLOW_SLACK_MS
    est = sc / (pod.outstanding + 1)
    return sc * max(1.0, est / base)


def record_latency(pod: PodState, ms: float, now: float) -> None:
    """Peak EWMA: a sample above the estimate replaces it; one below pulls it down by
    ``1 - exp(-dt / PEAK_DECAY_S)``, dt the seconds since the previous sample, at most ``MAX_STEP``."""
    if pod.ewma_ms is None or ms >= pod.ewma_ms:
        pod.ewma_ms = ms
    else:
        # One sample moves it down by at most MAX_STEP of the gap: a slow pod's answers are
        # bimodal (a lucky one inside its CPU quota comes back fast), and after a long gap one
        # lucky answer must not make it look fast again at once (the idle decay in `latency`
        # already lets it be probed).
        keep = max(math.exp(-max(0.0, now - pod.last_sample_at) / PEAK_DECAY_S), 1.0 - MAX_STEP)
        pod.ewma_ms = keep * pod.ewma_ms + (1 - keep) * ms
    pod.last_sample_at = now


def record_success(pod: PodState, ms: float, now: float) -> None:
    record_latency(pod, ms, now)
    pod.consecutive_failures = 0
    if now >= pod.ejected_until:  # not ejected
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
        if self._requests[0] < now - self.window_s:  # kept to the window (a busy service: many a second)
            self._trim(now)

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


def weights(pods: list[PodState], now: float, *, max_weight: int = MAX_WEIGHT, tolerance: float = 3.0,
            slack_ms: float = 10.0) -> dict[str, int]:
    """HAProxy server weights from our score. Scores are compared with ``slack_ms`` added to
    both (2 ms against 8 ms is noise on a busy machine, not a slow pod), and pods within
    ``tolerance`` x the best all get ``max_weight`` so that an even spread stays even (pods at a
    fraction of a CPU see their latency jump with CFS throttling); beyond it
    the weight falls with the square of the ratio (a pod 3x past the band gets a ninth: the
    tail latency is made by the few requests a slow pod still gets). None below 1: weight 0
    would stop a pod for good, as it would get no request to measure (ejection on errors is
    HAProxy's own)."""
    live = [p for p in pods if not p.draining]
    if not live:
        return {}
    floor = best_latency(live)
    scores = {p.pod: score(p, now, floor) + slack_ms for p in live}
    best = min(scores.values())
    out = {}
    for pod, sc in scores.items():
        ratio = sc / best / tolerance
        w = max_weight if ratio <= 1.0 else max_weight / ratio**2
        out[pod] = max(1, min(max_weight, math.floor(w + 0.5)))
    return out
