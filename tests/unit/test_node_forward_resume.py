"""A joined node's events (refusals, orphans) reach the control host's log on its heartbeats. A
worker that stops before a heartbeat carried them must not drop them: the next worker sends what
its log holds after the last event a heartbeat carried."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hms_mgmt.config import Settings
from hms_mgmt.events import Event, EventSink
from hms_mgmt.models import NodeSpec
from worker.nodes import NodeAgent


class Registry:
    def __init__(self) -> None:
        self.beats: list[Any] = []

    def get_workflow_handle(self, _id: str) -> Registry:
        return self

    async def signal(self, _signal: Any, reg: Any) -> None:
        self.beats.append(reg)


def agent(state: Path, registry: Registry) -> NodeAgent:
    settings = Settings(temporal_address="unused", task_queue="hms-control", node="b", state_dir=state)
    return NodeAgent(registry, settings, NodeSpec(name="b", task_queue="hms-node-b"), runtime=None)  # type: ignore[arg-type]


def refusal(sink: EventSink, what: str) -> None:
    asyncio.run(sink.publish(Event(type="access.denied", service="hms-ach", reason=what)))


def test_events_no_heartbeat_carried_are_sent_by_the_next_worker(tmp_path: Path):
    sink = EventSink(tmp_path)
    refusal(sink, "before this node joined")
    registry = Registry()
    first = agent(tmp_path, registry)
    assert first.resume_forwarding() == 0  # the first start: the log so far is taken as carried
    sink.listeners.append(first.forward)
    refusal(sink, "one")
    asyncio.run(first._heartbeat())
    refusal(sink, "two")
    refusal(sink, "three")  # ... and the worker stops before its next heartbeat

    second = agent(tmp_path, registry)
    assert second.resume_forwarding() == 2
    asyncio.run(second._heartbeat())
    carried = [[e.reason for e in beat.events] for beat in registry.beats]
    assert carried == [["one"], ["two", "three"]]
    assert agent(tmp_path, registry).resume_forwarding() == 0  # nothing is sent twice
