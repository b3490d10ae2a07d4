"""A node's events ride on its signed heartbeats to the control host's log. A heartbeat copied
from a history and signalled again within its minutes passes its signature check: its events are
written once all the same, also when the control worker restarted in between."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from activities.enrolment import FORWARDED_FILE, FORWARDED_KEPT_S, NodeTrustActivities, _take_fresh
from hms_mgmt.config import Settings
from hms_mgmt.events import Event, EventSink, read_events
from hms_mgmt.models import NodeSpec
from hms_mgmt.wire import NodeRegistration


def test_a_heartbeats_events_are_written_once_across_restarts(tmp_path: Path):
    settings = Settings(temporal_address="unused", task_queue="hms-control", node="a", state_dir=tmp_path)
    beat = NodeRegistration(spec=NodeSpec(name="b", task_queue="hms-node-b"),
                            events=[Event(type="access.denied", service="hms-ach", reason="pod start refused")])

    def worker() -> NodeTrustActivities:  # a control worker, as it starts
        return NodeTrustActivities(lambda: settings, EventSink(tmp_path))

    first = worker()
    asyncio.run(first._record_node_events(beat))
    asyncio.run(first._record_node_events(beat))  # the same heartbeat checked again
    asyncio.run(worker()._record_node_events(beat))  # ... and replayed after a restart
    written = [e for e in read_events(tmp_path) if e.data.get("forwarded_by") == "b"]
    assert len(written) == 1 and written[0].reason == "pod start refused"


def test_ids_are_kept_while_a_heartbeat_could_be_replayed_then_dropped(tmp_path: Path):
    """Bounded by time, not by count: a flood of new ids from one node pushes out no other
    node's ids while that node's heartbeat could still pass its check."""
    first = _take_fresh(tmp_path, "b", ["e1", "e2"])
    assert first == ["e1", "e2"]
    assert _take_fresh(tmp_path, "evil", [f"x{i}" for i in range(20_000)])[:1] == ["x0"]
    assert _take_fresh(tmp_path, "b", ["e1", "e3"]) == ["e3"]  # e1 still remembered
    written = json.loads((tmp_path / FORWARDED_FILE).read_text())
    assert all(until - time.time() <= FORWARDED_KEPT_S for _, until in written.values())


def test_a_damaged_record_writes_no_event_rather_than_every_event_again(tmp_path: Path):
    settings = Settings(temporal_address="unused", task_queue="hms-control", node="a", state_dir=tmp_path)
    beat = NodeRegistration(spec=NodeSpec(name="b", task_queue="hms-node-b"),
                            events=[Event(type="access.denied", service="hms-ach", reason="pod start refused")])
    (tmp_path / FORWARDED_FILE).write_text("[1, 2")
    asyncio.run(NodeTrustActivities(lambda: settings, EventSink(tmp_path))._record_node_events(beat))
    assert [e for e in read_events(tmp_path) if e.data.get("forwarded_by") == "b"] == []


def test_the_record_and_its_lock_are_private(tmp_path: Path):
    import stat

    _take_fresh(tmp_path, "b", ["e1"])
    for name in (FORWARDED_FILE, FORWARDED_FILE + ".lock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
