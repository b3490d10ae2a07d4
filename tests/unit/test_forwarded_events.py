"""A node's events ride on its signed heartbeats to the control host's log. A heartbeat copied
from a history and signalled again within its minutes passes its signature check: its events are
written once all the same, also when the control worker restarted in between."""

from __future__ import annotations

import asyncio
from pathlib import Path

from activities.enrolment import NodeTrustActivities
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
