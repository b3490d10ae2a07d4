"""A service whose pods no node has room for says so while it waits: ``status().waiting_for`` is
``capacity``, with what it needs (in ``hms status -o json`` and on the dashboard's feed, which
show the same model), and the wait clears once room appears. Real dev server, a real worker
process whose one node takes one pod, process pods."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from conftest import eventually, make_settings, worker_process
from temporalio.testing import WorkflowEnvironment
from test_cli import hms, ok
from test_cli_scripting import spec_file

from dashboard.server import service_view
from hms_mgmt.config import Settings
from hms_mgmt.models import ServiceStatus
from hms_mgmt.orchestrator import Orchestrator


@pytest_asyncio.fixture(loop_scope="session")
async def one_slot(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[tuple[Settings, dict[str, str]]]:
    s = make_settings(temporal_env, tmp_path / "state", "process", node_max_pods=1, capacity_retry_max_s=1.0)
    async with worker_process(temporal_env, s, tmp_path / "worker.log") as worker:
        yield s, {**worker.env(), "COLUMNS": "200"}


async def test_a_service_waiting_for_room_says_so_until_room_appears(temporal_env: WorkflowEnvironment, one_slot,
                                                                     tmp_path: Path):
    s, env = one_slot
    first, second = f"cap-a-{uuid.uuid4().hex[:5]}", f"cap-b-{uuid.uuid4().hex[:5]}"
    ok(await hms("deploy", str(spec_file(tmp_path, first)), env=env))  # takes the node's one pod slot
    ok(await hms("deploy", str(spec_file(tmp_path, second)), "--no-wait", env=env))

    async def waiting() -> ServiceStatus | None:
        st = ServiceStatus.model_validate_json(ok(await hms("status", second, "-o", "json", env=env)))
        return st if st.waiting_for is not None and st.waiting_for.kind == "capacity" else None

    st = await eventually(waiting, timeout=60, what=f"{second} waiting for capacity")
    assert st.phase == "Deploying" and st.ready_replicas == 0
    wait = st.waiting_for
    assert wait is not None and wait.since is not None
    assert f"no node has room for 1 more pod(s) of {second}" in wait.reason and f"{s.node}: 1/1 pods" in wait.reason
    live = await Orchestrator(temporal_env.client, s).read_status(second)  # what the dashboard reads
    assert service_view(live)["waiting_for"]["kind"] == "capacity"  # its page shows "waiting for capacity: ..."

    ok(await hms("undeploy", first, env=env))  # room appears

    async def placed() -> ServiceStatus | None:
        st = await Orchestrator(temporal_env.client, s).status(second)
        return st if st.phase == "Running" and st.ready_replicas == 1 else None

    st = await eventually(placed, timeout=60, what=f"{second} placed once room appeared")
    assert st.waiting_for is None
    ok(await hms("undeploy", second, env=env))
