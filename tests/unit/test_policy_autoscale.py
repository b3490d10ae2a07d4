"""The autoscale policy: HPA-like proportional scaling with a scale-down stabilisation window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hms_mgmt.policy.autoscale import (
    AutoscaleDecision,
    AutoscaleInput,
    CpuSample,
    Recommendation,
    autoscale,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
PROPS = settings(max_examples=200, deadline=None)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def pods(*cpus: float | None, ready: bool = True, prefix: str = "p") -> list[CpuSample]:
    return [CpuSample(pod_id=f"{prefix}{i}", cpu_percent=c, ready=ready) for i, c in enumerate(cpus)]


def decide(current: int, samples: list[CpuSample], **kw: object) -> AutoscaleDecision:
    args: dict[str, object] = {
        "min_replicas": 1,
        "max_replicas": 10,
        "cpu_target": 60,
        "now": T0,
        "current": current,
        "samples": samples,
    }
    args.update(kw)
    return autoscale(AutoscaleInput.model_validate(args))


# --- examples --------------------------------------------------------------------------


def test_seed_case_two_pods_at_95_percent_go_to_four_in_one_decision() -> None:
    d = decide(2, pods(95, 95))
    assert (d.desired, d.recommended, d.mean_cpu, d.at_max) == (4, 4, 95.0, False)
    assert d.reason == "mean CPU 95% of target 60% across 2 ready pods -> 4 pods"
    assert d.history == [Recommendation(at=T0, replicas=4)]


def test_step_needing_ten_pods_goes_from_two_to_ten_at_once() -> None:
    d = decide(2, pods(100, 100), cpu_target=20)
    assert d.desired == 10
    assert not d.at_max


def test_load_beyond_max_clamps_and_says_so() -> None:
    d = decide(2, pods(100, 100), cpu_target=10)
    assert d.desired == 10
    assert d.recommended == 10
    assert d.at_max
    assert "capped at max_replicas 10" in d.reason


def test_low_load_stops_at_min() -> None:
    d = decide(5, pods(1, 1, 1, 1, 1), min_replicas=3)
    assert d.desired == 3
    assert not d.at_max


def test_within_tolerance_nothing_changes() -> None:
    d = decide(3, pods(64, 64, 64))
    assert d.desired == 3
    assert "within tolerance 10%" in d.reason


def test_scale_down_proportionally() -> None:
    d = decide(6, pods(20, 20, 20, 20, 20, 20))
    assert d.desired == 2  # 120 % of load / 60 % target


def test_not_ready_pods_are_left_out_of_the_average() -> None:
    # A starting pod's burst of CPU is not load: the ready pods say 30 %, so scale down.
    d = decide(3, pods(30, 30) + pods(100, ready=False, prefix="new"))
    assert d.mean_cpu == 30.0
    assert d.desired == 1


def test_pods_already_starting_are_not_asked_for_twice() -> None:
    # 2 pods at 95 % asked for 4; the 2 new ones are still starting: no further scale-up.
    d = decide(4, pods(95, 95) + pods(None, None, ready=False, prefix="new"))
    assert d.desired == 4
    assert "not enough to scale up" in d.reason


def test_scale_up_with_starting_pods_counts_them_as_idle() -> None:
    # 300 % of load needs 5 pods of 60 %, whether or not one of the 3 is still starting.
    d = decide(3, pods(150, 150) + pods(None, ready=False, prefix="new"))
    assert d.desired == 5


def test_missing_sample_counts_as_idle_on_scale_up() -> None:
    # 95, 95 and an unknown: at 0 % the mean is 63 %, within tolerance.
    d = decide(3, pods(95, 95, None))
    assert d.desired == 3


def test_missing_sample_counts_as_busy_on_scale_down() -> None:
    # 10, 10 and an unknown at 100 %: 120 % of load -> 2 pods, not 1.
    d = decide(3, pods(10, 10, None))
    assert d.desired == 2
    assert d.mean_cpu == pytest.approx(40.0)


def test_missing_samples_that_flip_the_direction_mean_no_change() -> None:
    d = decide(3, pods(10, None, None))
    assert d.desired == 3
    assert "not enough to scale down" in d.reason


def test_pods_without_any_sample_count_as_missing() -> None:
    assert decide(3, pods(10)).desired == decide(3, pods(10, None, None)).desired == 3


def test_no_samples_no_change() -> None:
    d = decide(4, pods(None, None, None, None))
    assert (d.desired, d.mean_cpu, d.at_max) == (4, None, False)
    assert d.reason == "no CPU samples from ready pods: keeping 4 pods"


def test_no_samples_still_clamps() -> None:
    assert decide(0, [], min_replicas=2).desired == 2
    high = decide(12, [], max_replicas=10)
    assert high.desired == 10
    assert not high.at_max


def test_zero_pods_zero_min_stays_at_zero() -> None:
    d = decide(0, [], min_replicas=0)
    assert d.desired == 0


def test_scale_down_waits_for_the_window() -> None:
    earlier = [Recommendation(at=at(-100), replicas=10)]
    d = decide(10, pods(*[10] * 10), history=earlier, max_replicas=20)
    assert d.recommended == 2
    assert d.desired == 10
    assert "held at 10 by the 300s scale-down window" in d.reason

    later = decide(10, pods(*[10] * 10), history=d.history, max_replicas=20, now=at(301))
    assert later.desired == 2


def test_scale_up_ignores_the_window() -> None:
    earlier = [Recommendation(at=at(-10), replicas=2)]
    assert decide(2, pods(95, 95), history=earlier).desired == 4


def test_window_max_never_scales_up() -> None:
    # A high recommendation in the window holds a scale-down, it does not add pods.
    earlier = [Recommendation(at=at(-10), replicas=9)]
    assert decide(4, pods(10, 10, 10, 10), history=earlier).desired == 4


def test_history_is_pruned_to_the_window() -> None:
    earlier = [
        Recommendation(at=at(-400), replicas=9),  # expired
        Recommendation(at=at(-250), replicas=4),  # outlived by the later, higher 8
        Recommendation(at=at(-200), replicas=8),
        Recommendation(at=at(-100), replicas=5),
        Recommendation(at=at(+50), replicas=9),  # not yet: outside (now - w, now]
    ]
    d = decide(8, pods(*[22.5] * 8), history=earlier)
    assert d.recommended == 3
    assert d.desired == 8
    assert d.history == [
        Recommendation(at=at(-200), replicas=8),
        Recommendation(at=at(-100), replicas=5),
        Recommendation(at=T0, replicas=3),
    ]


def test_zero_window_scales_down_at_once() -> None:
    earlier = [Recommendation(at=at(-1), replicas=10)]
    d = decide(10, pods(*[10] * 10), history=earlier, scale_down_window_s=0, max_replicas=20)
    assert d.desired == 2


def test_inputs_are_validated() -> None:
    with pytest.raises(ValidationError):
        decide(1, [], min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError):
        decide(1, [], surprise=True)
    with pytest.raises(ValidationError):
        CpuSample(pod_id="a", cpu_percent=float("nan"))


def test_same_input_same_decision() -> None:
    inp = AutoscaleInput(
        current=3,
        samples=pods(80, None, 70),
        min_replicas=1,
        max_replicas=9,
        cpu_target=50,
        now=T0,
        history=[Recommendation(at=at(-5), replicas=6)],
    )
    assert autoscale(inp) == autoscale(inp.model_copy(deep=True))


# --- properties ------------------------------------------------------------------------

sample_shape = st.tuples(st.booleans(), st.booleans())  # (ready, has a sample)


@st.composite
def bounds(draw: st.DrawFn) -> tuple[int, int]:
    low = draw(st.integers(0, 20))
    return low, draw(st.integers(low, 40))


histories = st.lists(
    st.builds(
        Recommendation,
        at=st.floats(-1000, 10, allow_nan=False).map(at),
        replicas=st.integers(0, 60),
    ),
    max_size=8,
)


def shaped(shape: list[tuple[bool, bool]], cpu: float) -> list[CpuSample]:
    return [
        CpuSample(pod_id=f"p{i}", cpu_percent=cpu if has else None, ready=ready) for i, (ready, has) in enumerate(shape)
    ]


@PROPS
@given(
    current=st.integers(0, 50),
    samples=st.lists(
        st.builds(
            CpuSample,
            pod_id=st.text("abc", min_size=1, max_size=3),
            cpu_percent=st.none() | st.floats(0, 400, allow_nan=False),
            ready=st.booleans(),
        ),
        max_size=50,
    ),
    bound=bounds(),
    target=st.integers(1, 100),
    tolerance=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
    window=st.sampled_from([0.0, 30.0, 300.0]),
    history=histories,
)
def test_never_outside_bounds(
    current: int,
    samples: list[CpuSample],
    bound: tuple[int, int],
    target: int,
    tolerance: float,
    window: float,
    history: list[Recommendation],
) -> None:
    low, high = bound
    d = decide(
        current,
        samples,
        min_replicas=low,
        max_replicas=high,
        cpu_target=target,
        tolerance=tolerance,
        scale_down_window_s=window,
        history=history,
    )
    assert low <= d.desired <= high
    assert low <= d.recommended <= high
    assert d.history[-1] == Recommendation(at=T0, replicas=d.recommended)
    assert all(r.at == T0 or at(-window) < r.at < T0 for r in d.history)
    if d.desired > current:
        assert d.desired == d.recommended  # scale-ups apply at once
    if low <= current <= high and d.desired < current:
        assert d.desired >= d.recommended  # scale-downs only as far as the window allows


@PROPS
@given(
    shape=st.lists(sample_shape, max_size=20),
    extra=st.integers(0, 3),
    cpus=st.tuples(st.floats(0, 300, allow_nan=False), st.floats(0, 300, allow_nan=False)),
    bound=bounds(),
    target=st.integers(1, 100),
    history=histories,
)
def test_more_cpu_never_means_fewer_pods(
    shape: list[tuple[bool, bool]],
    extra: int,
    cpus: tuple[float, float],
    bound: tuple[int, int],
    target: int,
    history: list[Recommendation],
) -> None:
    lo_cpu, hi_cpu = sorted(cpus)
    low, high = bound
    kw = {"min_replicas": low, "max_replicas": high, "cpu_target": target, "history": history}
    current = len(shape) + extra
    lo = decide(current, shaped(shape, lo_cpu), **kw)
    hi = decide(current, shaped(shape, hi_cpu), **kw)
    assert lo.recommended <= hi.recommended
    assert lo.desired <= hi.desired


@PROPS
@given(
    bound=bounds(),
    data=st.data(),
    target=st.integers(1, 100),
    tolerance=st.sampled_from([0.05, 0.1, 0.2]),
    history=histories,
)
def test_inside_tolerance_nothing_changes(
    bound: tuple[int, int],
    data: st.DataObject,
    target: int,
    tolerance: float,
    history: list[Recommendation],
) -> None:
    low, high = bound
    current = data.draw(st.integers(low, high))
    factor = data.draw(st.floats(1 - tolerance + 1e-6, 1 + tolerance - 1e-6))
    d = decide(
        current,
        pods(*[target * factor] * current),
        min_replicas=low,
        max_replicas=high,
        cpu_target=target,
        tolerance=tolerance,
        history=history,
    )
    assert d.desired == current


def _never_down_then_up(series: list[int]) -> bool:
    went_down = False
    for before, after in zip(series, series[1:], strict=False):
        went_down = went_down or after < before
        if went_down and after > before:
            return False
    return True


@PROPS
@given(
    start=st.integers(0, 30),
    bound=bounds(),
    target=st.integers(1, 100),
    steps=st.lists(st.floats(1, 30), min_size=1, max_size=9),
    history=histories,
    per_pod=st.booleans(),
    level=st.floats(0, 400, allow_nan=False),
)
def test_constant_cpu_never_scales_down_then_up(
    start: int,
    bound: tuple[int, int],
    target: int,
    steps: list[float],
    history: list[Recommendation],
    per_pod: bool,
    level: float,
) -> None:
    # Constant load, replayed as the workflow would: every decision's desired count and
    # history feed the next round. ``per_pod`` keeps each pod's CPU constant; otherwise the
    # service's total load is constant and spreads over however many pods there are.
    low, high = bound
    current, now, series = start, 0.0, [start]
    for step in steps:  # at most 270 s in all: inside the 300 s window
        now += step
        cpu = level if per_pod else (level * 4 / current if current else 0.0)
        d = decide(
            current,
            pods(*[cpu] * current),
            min_replicas=low,
            max_replicas=high,
            cpu_target=target,
            history=history,
            now=at(now),
        )
        current, history = d.desired, d.history
        series.append(current)
    assert _never_down_then_up(series), series
