"""The router's pure policy: scores, power-of-two-choices, ejection, retry budget, weights."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.policy import (
    EjectionPolicy,
    PodState,
    RetryBudget,
    candidates,
    latency,
    pick,
    record_failure,
    record_success,
    score,
    weights,
)


def pods(*latencies: float | None) -> list[PodState]:
    out = []
    for i, ms in enumerate(latencies):
        p = PodState(pod=f"p{i}", address=f"127.0.0.1:{9000 + i}")
        if ms is not None:
            record_success(p, ms, now=0.0)
        out.append(p)
    return out


def test_score_is_outstanding_plus_one_times_latency():
    (p,) = pods(20.0)
    p.outstanding = 3
    assert score(p, 0.0, floor_ms=5.0) == pytest.approx(4 * 20.0)


def test_p2c_sends_little_to_a_slow_pod_and_spreads_over_equal_ones():
    rng = random.Random(1)
    ps = pods(5.0, 5.0, 200.0)
    hits = Counter(pick(ps, 0.0, rng).pod for _ in range(3000))
    assert hits["p2"] == 0  # with three pods the worst always loses its duel
    assert abs(hits["p0"] - hits["p1"]) < 300


def test_outstanding_requests_move_load_away_from_a_busy_pod():
    rng = random.Random(2)
    ps = pods(5.0, 5.0)
    ps[0].outstanding = 10
    assert {pick(ps, 0.0, rng).pod for _ in range(50)} == {"p1"}


def test_idle_slow_pod_decays_toward_the_best_and_is_tried_again():
    ps = pods(5.0, 5.0, 200.0)
    assert latency(ps[2], 0.0, 5.0) == pytest.approx(200.0)
    assert latency(ps[2], 2.0, 5.0) == pytest.approx(5.0 + 195.0 / 2)
    assert latency(ps[2], 30.0, 5.0) < 5.01
    ps[0].outstanding = ps[1].outstanding = 2  # some load on the others
    rng = random.Random(3)
    assert any(pick(ps, 30.0, rng).pod == "p2" for _ in range(100))


def test_new_pod_without_samples_counts_as_good_as_the_best():
    ps = pods(8.0, None)
    assert latency(ps[1], 0.0, 8.0) == 8.0


def test_draining_pods_get_no_new_requests():
    ps = pods(5.0, 5.0)
    ps[0].draining = True
    rng = random.Random(4)
    assert {pick(ps, 0.0, rng).pod for _ in range(50)} == {"p1"}
    ps[1].draining = True
    assert pick(ps, 0.0, rng) is None


def test_ejection_after_consecutive_failures_with_doubling_interval():
    policy = EjectionPolicy(consecutive_failures=3, base_s=1.0, max_s=4.0)
    (p,) = pods(5.0)
    assert not record_failure(p, 0.0, policy)
    assert not record_failure(p, 0.0, policy)
    assert record_failure(p, 0.0, policy)
    assert p.ejected(0.5) and not p.ejected(1.0)
    for _ in range(3):
        record_failure(p, 1.0, policy)  # failed again right after coming back: 2 s
    assert p.ejected(2.9) and not p.ejected(3.0)
    for _ in range(3):
        record_failure(p, 3.0, policy)
    for _ in range(3):
        record_failure(p, 7.0, policy)
    assert p.ejected_until == 7.0 + 4.0  # capped at max_s
    record_success(p, 5.0, 11.0)
    assert p.ejections == 0 and p.consecutive_failures == 0


def test_success_resets_consecutive_failures():
    policy = EjectionPolicy(consecutive_failures=3)
    (p,) = pods(5.0)
    record_failure(p, 0.0, policy)
    record_failure(p, 0.0, policy)
    record_success(p, 5.0, 0.0)
    assert not record_failure(p, 0.0, policy)
    assert not p.ejected(0.0)


def test_ejected_pods_are_skipped_unless_all_are_ejected():
    ps = pods(5.0, 5.0)
    ps[0].ejected_until = 10.0
    assert [p.pod for p in candidates(ps, 0.0)] == ["p1"]
    ps[1].ejected_until = 10.0
    assert [p.pod for p in candidates(ps, 0.0)] == ["p0", "p1"]
    assert [p.pod for p in candidates(ps, 0.0, exclude={"p0"})] == ["p1"]


def test_retry_budget_caps_retries_at_a_ratio_of_requests():
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.1)  # 1 free retry per window
    for _ in range(100):
        b.record_request(0.0)
    spent = sum(b.try_spend(0.0) for _ in range(100))
    assert spent == 21
    assert not b.can_retry(5.0)
    assert b.can_retry(10.5)  # the window slid past them


def test_retry_budget_allows_a_minimum_when_quiet():
    b = RetryBudget(ratio=0.2, window_s=10.0, min_per_s=0.3)
    assert sum(b.try_spend(0.0) for _ in range(10)) == 3


def test_weights_follow_inverse_latency_and_stay_in_haproxy_range():
    ps = pods(5.0, 5.0, 250.0)
    w = weights(ps, 0.0)
    assert w["p0"] == w["p1"] == 256
    assert w["p2"] == 1  # (5/250)^2 x 256 rounds below 1
    ps[2].draining = True
    assert set(weights(ps, 0.0)) == {"p0", "p1"}
    assert weights([], 0.0) == {}


def test_weights_fall_with_the_square_of_the_slowdown():
    w = weights(pods(10.0, 20.0), 0.0)
    assert w == {"p0": 256, "p1": 64}
