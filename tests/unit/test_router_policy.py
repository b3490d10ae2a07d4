"""The router's pure policy: scores, power-of-two-choices, ejection, retry budget, weights."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy import (
    EjectionPolicy,
    PodState,
    RetryBudget,
    _pick_score,
    candidates,
    finish_request,
    latency,
    pick,
    pick_score,
    record_failure,
    record_latency,
    record_success,
    score,
    start_request,
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
    assert 1 <= w["p2"] <= 8  # 250 ms against 5 ms: about 3 % of the best pod's weight
    ps[2].draining = True
    assert set(weights(ps, 0.0)) == {"p0", "p1"}
    assert weights([], 0.0) == {}


def test_weights_ignore_noise_and_fall_with_the_square_of_a_real_slowdown():
    assert weights(pods(10.0, 14.0), 0.0) == {"p0": 256, "p1": 256}
    assert weights(pods(2.0, 8.0), 0.0) == {"p0": 256, "p1": 256}  # milliseconds apart: noise
    assert weights(pods(10.0, 25.0), 0.0) == {"p0": 256, "p1": 256}  # within the 3x band
    assert weights(pods(10.0, 110.0), 0.0) == {"p0": 256, "p1": 64}  # (110+10)/(10+10) = 2x past the 3x band


def test_an_idle_slow_pod_gets_one_probe_at_a_time():
    ps = pods(5.0, 5.0, 500.0)
    for p in ps[:2]:
        p.outstanding = 10
    rng = random.Random(5)
    later = 30.0  # long idle: the slow pod's estimate has decayed to about the best
    assert any(pick(ps, later, rng).pod == "p2" for _ in range(50))
    token = start_request(ps[2], later)  # its probe is in flight: judged on what it measured
    assert all(pick(ps, later, rng).pod != "p2" for _ in range(200))
    finish_request(ps[2], token)
    assert ps[2].outstanding == 0 and not ps[2].inflight


def test_a_pod_that_stops_answering_is_seen_before_any_answer_returns():
    ps = pods(5.0, 5.0, 5.0)
    rng = random.Random(6)
    for p in ps[:2]:
        for _ in range(3):
            start_request(p, 10.0)
    start_request(ps[2], 9.0)  # sent a second ago and still not answered
    assert score(ps[2], 10.0, 5.0) == pytest.approx(2 * 1000.0)
    assert all(pick(ps, 10.0, rng).pod != "p2" for _ in range(100))


def test_a_slow_answer_raises_the_estimate_at_once_and_only_time_brings_it_down():
    (p,) = pods(5.0)
    record_latency(p, 500.0, 1.0)
    assert p.ewma_ms == 500.0  # a peak is believed at once
    for i in range(100):  # a hundred fast answers within 0.1 s barely move it
        record_latency(p, 5.0, 1.0 + 0.001 * (i + 1))
    assert p.ewma_ms > 400.0
    t = 1.1
    while t < 6.0:  # five seconds of fast answers: back to about 5 ms
        t += 0.01
        record_latency(p, 5.0, t)
    assert p.ewma_ms < 10.0


def test_under_heavy_load_a_much_slower_pod_holds_about_one_request():
    rng = random.Random(7)
    ps = pods(50.0, 50.0, 500.0)
    for _ in range(91):  # 91 requests in flight, none answered yet
        start_request(pick(ps, 0.0, rng), 0.0)
    # (n + 1) x latency alone would let the slow pod hold 3 or 4 of them (4 x 500 ~ 45 x 50)
    assert ps[2].outstanding <= 1
    assert abs(ps[0].outstanding - ps[1].outstanding) <= 2


def test_pods_about_as_fast_as_the_best_are_picked_on_the_plain_score():
    ps = pods(5.0, 12.0, 40.0)
    assert pick_score(ps[1], 0.0, 5.0) == score(ps[1], 0.0, 5.0)  # within the slack: noise
    assert pick_score(ps[2], 0.0, 5.0) == pytest.approx(40.0 * 40.0 / 15.0)


def test_after_a_long_gap_one_fast_answer_does_not_make_a_slow_pod_look_fast():
    (p,) = pods(1500.0)
    record_latency(p, 5.0, 10.0)  # a lucky answer inside its CPU quota, ten seconds later
    assert p.ewma_ms == pytest.approx(0.7 * 1500.0 + 0.3 * 5.0)


@settings(max_examples=300, deadline=None)
@given(ewma=st.none() | st.floats(0.01, 5000), floor=st.none() | st.floats(0.01, 5000),
       idle=st.floats(0, 30), ages=st.lists(st.floats(0, 20), max_size=6))
def test_the_per_request_score_is_the_documented_one(ewma, floor, idle, ages):
    """``pick`` uses a one-call copy of ``pick_score``: the same figure for any pod, in flight or not."""
    now = 1000.0
    pod = PodState("p", "a:1", ewma_ms=ewma, last_sample_at=now - idle)
    for age in sorted(ages, reverse=True):  # sent oldest first, as requests are
        start_request(pod, now - age)
    assert _pick_score(pod, now, floor) == pytest.approx(pick_score(pod, now, floor), rel=1e-9)
