"""A node configured for many pods gets the activity slots to watch them all and still heal:
each service with pods there holds one watch_pods on the node's queue the whole time."""

from __future__ import annotations

from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from tests.conftest import make_settings
from worker.main import HmsWorker


async def test_node_worker_has_a_slot_per_watch_and_spare(temporal_env: WorkflowEnvironment, tmp_path: Path) -> None:
    s = make_settings(temporal_env, tmp_path / "state", "process", trusted=False, node_max_pods=1500)
    hms = HmsWorker(temporal_env.client, s)
    try:
        control, node = hms.workers
        assert node.config()["task_queue"] == s.node_task_queue()
        # 1,500 single-pod services: 1,500 watches, and a heal's start_pod must not wait for one to end.
        assert node.config()["max_concurrent_activities"] >= 1500 + 100
        assert control.config()["max_concurrent_activities"] >= 1500 + 100
    finally:
        assert hms.pods is not None
        await hms.pods.close()
