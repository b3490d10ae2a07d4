"""The rolling update's budget and rounds, and a dry run's plan (pure policy)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hms_mgmt.models import PodStatus, RevisionRecord, ServiceSpec, ServiceStatus
from hms_mgmt.policy import rollout
from hms_mgmt.policy.plan import first_replicas, plan_change, plan_placement, slot_edges
from hms_mgmt.policy.scheduler import NodeUsage


def spec(**kw: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": "svc", "image": "registry.gov/a:1", "min_replicas": 2,
                                       "max_replicas": 6, "cpu_target": 60, **kw})


@pytest.mark.parametrize(("surge", "unavailable", "replicas", "want"), [
    ("25%", 0, 4, (1, 0)),
    (2, 1, 4, (2, 1)),
    (0, 0, 4, (1, 0)),  # no budget at all: one pod of surge, else no progress
    ("50%", "50%", 3, (2, 1)),  # surge rounds up, unavailable down; never below min_replicas
])
def test_budget(surge: object, unavailable: object, replicas: int, want: tuple[int, int]) -> None:
    assert rollout.budget(spec(max_surge=surge, max_unavailable=unavailable), replicas) == want


def test_rounds_replace_every_old_pod_within_the_budget() -> None:
    s = spec(max_surge=1, max_unavailable=1)
    rounds = rollout.rounds(s, 4, old=4)
    assert sum(r.start for r in rounds) == 4 and sum(r.retire for r in rounds) == 4
    new = old = 0
    old = 4
    for r in rounds:  # never more than replicas + surge, never fewer than replicas - unavailable ready
        old -= r.retire
        assert new + old >= 4 - 1
        new += r.start
        assert new + old <= 4 + 1


def test_rounds_of_a_partial_rollout_start_from_the_new_pods_already_up() -> None:
    # One of two already runs the new revision: surge the other, then retire the last old pod.
    assert rollout.rounds(spec(max_surge=1, max_unavailable=0), 2, old=1, new=1) == \
        [rollout.RolloutRound(retire=0, start=1), rollout.RolloutRound(retire=1, start=0)]


def status(s: ServiceSpec, pods: int) -> ServiceStatus:
    return ServiceStatus(name=s.name, phase="Running", revision=1, spec=s, desired_replicas=pods, ready_replicas=pods,
                         workflow_id="svc-svc", pods=[PodStatus(id=f"p{i}", node="n1", revision=1, ready=True)
                                                      for i in range(pods)])


def test_plan_change_tells_no_op_in_place_and_rolling_apart() -> None:
    s = spec()
    assert plan_change(status(s, 2), s).no_op
    bounds = plan_change(status(s, 2), spec(max_replicas=8))
    assert bounds.in_place and [c.field for c in bounds.changes] == ["max_replicas"] and bounds.rollout is None
    image = plan_change(status(s, 2), spec(image="registry.gov/a:2"))
    assert not image.in_place and image.rollout is not None and image.rollout.replicas == 2
    assert [(c.field, c.old, c.new) for c in image.changes] == [("image", "registry.gov/a:1", "registry.gov/a:2")]


def test_plan_change_compares_with_the_revision_rolling_out() -> None:
    s, v2 = spec(), spec(image="registry.gov/a:2")
    st = status(s, 2).model_copy(update={"revisions": [
        RevisionRecord(revision=2, spec=v2, image_id="sha256:2", deployed_by="alice",
                       deployed_at=datetime.now(UTC), outcome="rolling")]})
    assert plan_change(st, v2).no_op and not plan_change(st, s).no_op


def test_plan_placement_spreads_and_says_the_room_left() -> None:
    usage = {n: NodeUsage(name=n, cpu=2.0, memory_mb=1024, max_pods=3) for n in ("a", "b")}
    plans, pods = plan_placement(spec(cpu_limit=0.5, memory_mb=256), usage, 3)
    assert pods == ["a", "b", "a"]  # spread first, then pack
    assert [(p.node, p.pods, p.pods_left, p.cpu_left, p.memory_left_mb) for p in plans] == \
        [("a", 2, 1, 1.0, 512), ("b", 1, 2, 1.5, 768)]
    _, pods = plan_placement(spec(cpu_limit=1.5), usage, 3)
    assert pods == ["a", "b", None]


def test_a_first_deploy_inside_a_slot_starts_with_its_bounds() -> None:
    s = spec(min_replicas=2, time_slots=[{"name": "payday", "start": "0 8 * * *", "end": "0 10 * * *",
                                          "min_replicas": 4},
                                         {"name": "night", "start": "0 22 * * *", "end": "0 6 * * *",
                                          "min_replicas": 0, "max_replicas": 0}])
    assert first_replicas(s, datetime(2026, 1, 5, 9, 0, tzinfo=UTC)) == 4
    assert first_replicas(s, datetime(2026, 1, 5, 12, 0, tzinfo=UTC)) == 2
    assert first_replicas(s, datetime(2026, 1, 5, 23, 0, tzinfo=UTC)) == 0  # landed: no pod


def test_slot_edges() -> None:
    s = spec(time_slots=[{"name": "payday", "start": "0 8 * * *", "end": "0 10 * * *", "min_replicas": 3}])
    [edges] = slot_edges(s, datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    assert edges.on and edges.next_start == datetime(2026, 1, 6, 8, 0, tzinfo=UTC)
    assert edges.next_end == datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
