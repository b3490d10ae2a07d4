"""Backoff between pod replacements."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hms_mgmt.policy.backoff import backoff_delay

PROPS = settings(max_examples=200, deadline=None)


def test_no_failures_no_wait() -> None:
    assert backoff_delay(0, initial_s=1, max_s=300) == 0.0
    assert backoff_delay(-3, initial_s=1, max_s=300) == 0.0


def test_doubles_up_to_the_cap() -> None:
    delays = [backoff_delay(n, initial_s=1, max_s=300) for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_other_factor() -> None:
    assert backoff_delay(3, initial_s=0.5, max_s=100, factor=3) == 4.5
    assert backoff_delay(5, initial_s=2, max_s=100, factor=1) == 2


def test_huge_failure_count_does_not_overflow() -> None:
    assert backoff_delay(100_000, initial_s=1, max_s=300) == 300


def test_nonsense_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        backoff_delay(1, initial_s=-1, max_s=10)
    with pytest.raises(ValueError):
        backoff_delay(1, initial_s=1, max_s=10, factor=0.5)


@PROPS
@given(
    failures=st.integers(-5, 2000),
    initial=st.floats(0, 100, allow_nan=False),
    extra=st.floats(0, 1000, allow_nan=False),
    factor=st.floats(1, 10, allow_nan=False),
)
def test_delay_grows_and_stays_capped(failures: int, initial: float, extra: float, factor: float) -> None:
    cap = initial + extra
    now = backoff_delay(failures, initial_s=initial, max_s=cap, factor=factor)
    nxt = backoff_delay(failures + 1, initial_s=initial, max_s=cap, factor=factor)
    assert 0 <= now <= nxt <= cap
    if failures >= 1:
        assert now >= initial
