"""The pure clock of time slots: parsing (a bad slot is refused naming its field), on/off, the
next edges, time zones, overlaps (the highest floor wins) and governance over slot ceilings."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydantic import ValidationError

from hms_mgmt.models import ServiceSpec, TimeSlot
from hms_mgmt.policy import slots as clock
from hms_mgmt.policy.governance import GovernancePolicy, evaluate

BASE = {"name": "hms-ach", "image": "registry.gov/hms-ach:1.4", "min_replicas": 2, "max_replicas": 6,
        "cpu_target": 60}


def slot(**kw) -> TimeSlot:
    return TimeSlot(**{"name": "rush", "start": "0 8 * * 1-5", "end": "0 10 * * 1-5", "min_replicas": 4, **kw})


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(("bad", "loc", "words"), [
    ({"start": "0 8 * *"}, ("time_slots", 0, "start"), "neither a 5-field cron"),
    ({"end": "every day"}, ("time_slots", 0, "end"), "neither a 5-field cron"),
    ({"start": "61 8 * * *"}, ("time_slots", 0, "start"), "neither"),
    ({"timezone": "Mars/Base"}, ("time_slots", 0, "timezone"), "unknown time zone"),
    ({"start": "2026-05-01T10:00:00Z", "end": "2026-05-01T09:00:00Z"}, ("time_slots", 0), "end"),
    ({"start": "0 8 * * *", "end": "2026-05-01T09:00:00Z"}, ("time_slots", 0), "both be cron"),
    ({"min_replicas": 5, "max_replicas": 2}, ("time_slots", 0), "max_replicas (2) must be >= min_replicas"),
    ({"name": "Rush Hour"}, ("time_slots", 0, "name"), "DNS-1123"),
])
def test_a_bad_slot_is_refused_naming_the_field(bad, loc, words):
    with pytest.raises(ValidationError) as e:
        ServiceSpec(**BASE, time_slots=[{"name": "rush", "start": "0 8 * * 1-5", "end": "0 10 * * 1-5",
                                         "min_replicas": 4, **bad}])
    err = e.value.errors()[0]
    assert tuple(err["loc"]) == loc and words in err["msg"]


def test_two_slots_of_one_name_are_refused():
    with pytest.raises(ValidationError, match="each slot needs its own name"):
        ServiceSpec(**BASE, time_slots=[slot().model_dump(), slot().model_dump()])


def test_a_spec_without_slots_keeps_its_digest():
    spec = ServiceSpec(**BASE)
    assert "time_slots" not in spec.digest() and spec.digest() != ServiceSpec(**BASE, time_slots=[slot()]).digest()


def test_cron_slot_on_and_off_with_its_next_edges():
    rush = slot()
    assert not clock.is_on(rush, at("2026-05-04T07:59:59+00:00"))  # a Monday
    assert clock.is_on(rush, at("2026-05-04T08:00:00+00:00"))
    assert clock.is_on(rush, at("2026-05-04T09:59:59+00:00"))
    assert not clock.is_on(rush, at("2026-05-04T10:00:00+00:00"))
    assert not clock.is_on(rush, at("2026-05-09T09:00:00+00:00"))  # Saturday
    assert clock.next_edges(rush, at("2026-05-08T12:00:00+00:00")) == (at("2026-05-11T08:00:00+00:00"),
                                                                       at("2026-05-11T10:00:00+00:00"))


def test_cron_is_read_in_the_slot_time_zone_across_daylight_saving():
    paris = slot(timezone="Europe/Paris")
    assert clock.next_edges(paris, at("2026-03-27T12:00:00+00:00"))[0] == at("2026-03-30T06:00:00+00:00")  # CEST
    assert clock.next_edges(paris, at("2026-03-20T12:00:00+00:00"))[0] == at("2026-03-23T07:00:00+00:00")  # CET
    assert clock.is_on(paris, at("2026-03-30T06:30:00+00:00"))


def test_one_off_slot_and_naive_instants_in_its_zone():
    once = slot(start="2026-12-24T08:00:00", end="2026-12-24T12:00:00", timezone="Europe/Paris")
    assert clock.is_on(once, at("2026-12-24T07:00:00+00:00"))
    assert not clock.is_on(once, at("2026-12-24T11:00:00+00:00"))
    assert clock.next_edges(once, at("2026-12-24T09:00:00+00:00")) == (None, at("2026-12-24T11:00:00+00:00"))
    assert clock.next_edges(once, at("2026-12-24T11:30:00+00:00")) == (None, None)
    assert clock.next_edges(once, at("2026-12-01T00:00:00+00:00")) == (at("2026-12-24T07:00:00+00:00"),
                                                                       at("2026-12-24T11:00:00+00:00"))


def test_overlaps_the_highest_floor_wins_then_the_ceiling_then_the_name():
    low, high, landing = slot(name="b", min_replicas=2), slot(name="a", min_replicas=5), \
        slot(name="c", min_replicas=0, max_replicas=0)
    assert clock.winner([low, high, landing], 6).name == "a"
    assert clock.winner([slot(name="x", min_replicas=5, max_replicas=5), slot(name="y", min_replicas=5)], 6).name == "y"
    assert clock.winner([slot(name="q", min_replicas=3), slot(name="p", min_replicas=3)], 6).name == "p"
    assert clock.winner([], 6) is None
    assert clock.slot_bounds(landing, 6) == (0, 0) and clock.is_landing(clock.slot_bounds(landing, 6))
    assert clock.slot_bounds(slot(min_replicas=8), 6) == (8, 8)  # no max of its own: at least the floor


def test_governance_counts_every_slot_ceiling_and_names_its_field():
    policy = GovernancePolicy(max_replicas_without_approval=10, cpu_budget=8)
    spec = ServiceSpec(**BASE, cpu_limit=0.5, time_slots=[slot(min_replicas=12, max_replicas=20)])
    verdict = evaluate(spec, policy)
    assert verdict.needs_approval
    assert verdict.reasons == [
        "time_slots[0] (rush) max_replicas 20 exceeds the limit of 10 without approval",
        "up to 10 CPUs (time_slots[0] (rush) max_replicas 20 x cpu_limit 0.5) exceeds the CPU budget of 8 "
        "without approval",
    ]
    assert not evaluate(ServiceSpec(**BASE, time_slots=[slot(min_replicas=0, max_replicas=0)]), policy).needs_approval


@pytest.mark.parametrize(("edge", "now", "on_time"), [
    ("start", "2026-12-07T08:00:01+00:00", True),   # fired at its time, checked a second later
    ("start", "2026-12-07T07:59:30+00:00", True),   # a little early: within the tolerance
    ("start", "2026-12-07T07:00:00+00:00", False),  # triggered an hour early
    ("start", "2026-12-07T11:00:00+00:00", False),  # after the slot: a late trigger
    ("start", "2026-12-05T08:00:01+00:00", False),  # a Saturday: the slot does not run
    ("end", "2026-12-07T10:00:01+00:00", True),
    ("end", "2026-12-07T09:59:30+00:00", True),
    ("end", "2026-12-07T09:00:00+00:00", False),    # triggered in the middle of the slot
    ("end", "2026-12-07T12:00:00+00:00", True),     # off anyway: ending it again changes nothing
])
def test_an_edge_counts_only_when_the_clock_agrees(edge, now, on_time):
    assert clock.edge_on_time(slot(), edge, at(now)) is on_time
