"""The node's sweep for stale pods is paced by how long the last one took: on a large fleet a
sweep is a status query per service, and sweeping back to back would keep the control worker
busy with queries."""

from __future__ import annotations

import time
from pathlib import Path

from hms_mgmt.testing import local_settings
from worker.nodes import SWEEP_SHARE, NodeAgent


class SlowListing:
    """A runtime whose listing of the node's pods takes ``took_s`` (and finds none)."""

    def __init__(self, took_s: float) -> None:
        self.took_s = took_s

    def list(self, service: str | None = None) -> list:
        time.sleep(self.took_s)
        return []


async def test_the_next_sweep_waits_a_multiple_of_how_long_the_last_took(tmp_path: Path) -> None:
    settings = local_settings("127.0.0.1:1", tmp_path / "state", "process", orphan_grace_s=1.0)
    agent = NodeAgent(None, settings, settings.this_node("process"), runtime=SlowListing(0.3))  # type: ignore[arg-type]
    assert agent.sweep_every_s == 0.5  # half the orphan grace before any sweep
    assert await agent.sweep() == []
    assert agent.sweep_every_s >= SWEEP_SHARE * 0.3
