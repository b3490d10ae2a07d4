"""The ServiceWorkflow's phase table, scale-down choice and rollback target (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hms_mgmt.errors import RequestRefused
from hms_mgmt.models import PodStatus, RevisionRecord, ServiceSpec
from hms_mgmt.names import ENDED, SUPERVISED
from hms_mgmt.policy.phases import (
    ENDS,
    PHASES,
    TRANSITIONS,
    RollbackRefused,
    can_move,
    reachable,
    rollback_target,
    scale_down_victims,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- the phase table ------------------------------------------------------------------------

def test_the_table_covers_every_phase_and_names_only_phases() -> None:
    assert set(TRANSITIONS) == set(PHASES)
    for targets in TRANSITIONS.values():
        assert targets <= set(PHASES)
    assert ENDS == set(ENDED)


@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_can_reach_an_end(phase: str) -> None:
    assert reachable(phase) & ENDS, f"{phase} can reach no end"


@pytest.mark.parametrize("end", ["Rejected", "Stopped"])
def test_the_final_ends_lead_nowhere(end: str) -> None:
    assert TRANSITIONS[end] == frozenset() and reachable(end) == {end}


def test_a_failed_deploy_is_only_undeployed() -> None:
    assert TRANSITIONS["Failed"] == {"Undeploying"}


def test_the_design_path_is_allowed() -> None:
    path = ["Validating", "AwaitingApproval", "VerifyingImage", "Deploying", "Running", "Undeploying", "Stopped"]
    assert all(can_move(a, b) for a, b in zip(path, path[1:], strict=False))


@pytest.mark.parametrize("busy", ["Scaling", "Healing", "Updating", "Degraded"])
def test_running_goes_to_each_busy_phase_and_back(busy: str) -> None:
    assert can_move("Running", busy) and can_move(busy, "Running")


@pytest.mark.parametrize("phase", SUPERVISED)
def test_every_supervised_phase_may_be_undeployed(phase: str) -> None:
    assert can_move(phase, "Undeploying")


def test_refusals_come_only_before_any_pod_starts() -> None:
    came_to = {a for a, targets in TRANSITIONS.items() if "Rejected" in targets}
    assert came_to == {"Validating", "AwaitingApproval", "VerifyingImage"}


@pytest.mark.parametrize(("old", "new"), [
    ("Stopped", "Running"), ("Rejected", "Deploying"), ("Validating", "Running"), ("Running", "Validating"),
    ("Undeploying", "Running"), ("AwaitingApproval", "Deploying"), ("Scaling", "Healing"),
])
def test_moves_off_the_table_are_refused(old: str, new: str) -> None:
    assert not can_move(old, new)


@pytest.mark.parametrize("phase", PHASES)
def test_staying_is_no_move(phase: str) -> None:
    assert can_move(phase, phase)


# --- scale-down victims ---------------------------------------------------------------------

def pod(pid: str, *, ready: bool = True, health: str = "healthy", failures: int = 0, age_s: float | None = 100,
        ) -> PodStatus:
    started = None if age_s is None else T0 - timedelta(seconds=age_s)
    return PodStatus(id=pid, node="n1", ready=ready, health=health, consecutive_failures=failures,  # type: ignore[arg-type]
                     started_at=started)


def test_victims_are_unready_then_unhealthy_then_failing_then_newest() -> None:
    pods = [pod("old", age_s=500), pod("new", age_s=10), pod("failing", failures=2),
            pod("unhealthy", health="unhealthy"), pod("unready", ready=False, health="starting")]
    assert [p.id for p in scale_down_victims(pods, 5)] == ["unready", "unhealthy", "failing", "new", "old"]
    assert [p.id for p in scale_down_victims(pods, 2)] == ["unready", "unhealthy"]


def test_a_pod_never_started_counts_as_oldest() -> None:
    assert [p.id for p in scale_down_victims([pod("unknown", age_s=None), pod("young", age_s=1)], 1)] == ["young"]


@pytest.mark.parametrize("count", [0, -3])
def test_no_victims_when_not_scaling_down(count: int) -> None:
    assert scale_down_victims([pod("a"), pod("b")], count) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 1000)), max_size=12), st.integers(0, 15))
def test_victims_are_count_distinct_pods_of_the_service(shape: list[tuple[bool, int, int]], count: int) -> None:
    pods = [pod(f"p{i}", ready=r, failures=f, age_s=a) for i, (r, f, a) in enumerate(shape)]
    victims = scale_down_victims(pods, count)
    assert len(victims) == min(count, len(pods))
    assert len({v.id for v in victims}) == len(victims) and all(v in pods for v in victims)


# --- rollback target ------------------------------------------------------------------------

def rev(n: int, outcome: str = "replaced") -> RevisionRecord:
    spec = ServiceSpec(name="hms-ach", image=f"registry.gov/hms-ach:1.{n}", min_replicas=1, max_replicas=2,
                       cpu_target=60)
    return RevisionRecord(revision=n, spec=spec, outcome=outcome)  # type: ignore[arg-type]


def test_rollback_goes_to_the_newest_earlier_revision_that_ran() -> None:
    revisions = [rev(1), rev(2), rev(3, "failed"), rev(4, "active")]
    assert rollback_target("hms-ach", revisions, 4).revision == 2


def test_rollback_to_a_named_revision() -> None:
    revisions = [rev(1), rev(2), rev(3, "active")]
    assert rollback_target("hms-ach", revisions, 3, to_revision=1).revision == 1


@pytest.mark.parametrize(("revisions", "current", "to", "match"), [
    ([rev(1, "active")], 1, None, "no earlier revision"),
    ([rev(1, "failed"), rev(2, "active")], 2, None, "no earlier revision"),
    ([rev(1), rev(2, "active")], 2, 7, r"no revision 7 \(known: 1, 2\)"),
    ([rev(1), rev(2, "active")], 2, 2, "already runs revision 2"),
])
def test_rollback_refusals_are_typed(revisions: list[RevisionRecord], current: int, to: int | None,
                                     match: str) -> None:
    with pytest.raises(RollbackRefused, match=match) as info:
        rollback_target("hms-ach", revisions, current, to)
    assert isinstance(info.value, RequestRefused) and "hms-ach" in str(info.value)
