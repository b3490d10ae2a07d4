"""A service whose pods no node has room for says so while it waits: ``status().waiting_for`` is
``capacity``, with what it needs (in ``hms status -o json`` and on the dashboard's feed, which
show the same model), and the wait clears once room appears — for a first deployment and for a
scale-up. Real dev server, a real worker process whose one node takes two pods, process pods."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import yaml
from conftest import eventually, make_settings, worker_process
from temporalio.testing import WorkflowEnvironment
from test_cli import hms, ok
from test_cli_scripting import spec_file

from dashboard.server import service_view
from hms_mgmt.config import Settings
from hms_mgmt.models import ServiceStatus
from hms_mgmt.orchestrator import Orchestrator


@pytest_asyncio.fixture(loop_scope="session")
async def two_slots(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[tuple[Settings, dict[str, str]]]:
    s = make_settings(temporal_env, tmp_path / "state", "process", node_max_pods=2, capacity_retry_max_s=1.0)
    async with worker_process(temporal_env, s, tmp_path / "worker.log") as worker:
        yield s, {**worker.env(), "COLUMNS": "200"}


async def wait_for_room(env: dict[str, str], name: str) -> ServiceStatus:
    async def waiting() -> ServiceStatus | None:
        st = ServiceStatus.model_validate_json(ok(await hms("status", name, "-o", "json", env=env)))
        return st if st.waiting_for is not None and st.waiting_for.kind == "capacity" else None

    return await eventually(waiting, timeout=60, what=f"{name} waiting for capacity")


async def running(orch: Orchestrator, name: str, ready: int) -> ServiceStatus:
    async def placed() -> ServiceStatus | None:
        st = await orch.status(name)
        return st if st.phase == "Running" and st.ready_replicas == ready else None

    return await eventually(placed, timeout=60, what=f"{name} placed once room appeared")


async def test_a_service_waiting_for_room_says_so_until_room_appears(temporal_env: WorkflowEnvironment, two_slots,
                                                                     tmp_path: Path):
    s, env = two_slots
    orch = Orchestrator(temporal_env.client, s)
    a, b, c = (f"cap-{x}-{uuid.uuid4().hex[:5]}" for x in "abc")
    ok(await hms("deploy", str(spec_file(tmp_path, a)), env=env))
    ok(await hms("deploy", str(spec_file(tmp_path, b)), env=env))  # the node is full now

    # A scale-up with no room: it waits in Scaling, and says for what.
    scaling = asyncio.ensure_future(hms("scale", b, "2", env=env))
    st = await wait_for_room(env, b)
    assert st.phase == "Scaling" and st.waiting_for is not None and st.waiting_for.since is not None
    assert f"no node has room for 1 more pod(s) of {b}" in st.waiting_for.reason
    assert f"{s.node}: 2/2 pods" in st.waiting_for.reason
    ok(await hms("undeploy", a, env=env))  # room appears
    ok(await scaling)
    assert (await running(orch, b, 2)).waiting_for is None

    # A first deployment with no room: it waits in Deploying, on the dashboard too.
    ok(await hms("deploy", str(spec_file(tmp_path, c)), "--no-wait", env=env))
    st = await wait_for_room(env, c)
    assert st.phase == "Deploying" and st.ready_replicas == 0
    assert service_view(await orch.read_status(c))["waiting_for"]["kind"] == "capacity"  # "waiting for capacity: ..."
    ok(await hms("undeploy", b, env=env))
    assert (await running(orch, c, 1)).waiting_for is None
    ok(await hms("undeploy", c, env=env))


async def test_deploys_at_the_same_moment_never_overbook_a_node(temporal_env: WorkflowEnvironment, two_slots,
                                                                 tmp_path: Path):
    """The Scheduler reads the fleet once for many placements; the pods it placed meanwhile
    still count, so three one-pod services deployed at once on a node with two slots give two
    running services and one that waits, never three pods."""
    s, env = two_slots
    orch = Orchestrator(temporal_env.client, s)
    names = [f"burst-{x}-{uuid.uuid4().hex[:5]}" for x in "abc"]
    specs = [yaml.safe_load(spec_file(tmp_path, n).read_text()) for n in names]
    await asyncio.gather(*(orch.deploy(spec) for spec in specs))

    seen: list[object] = []

    async def settled() -> list[ServiceStatus] | None:
        sts = [await orch.status(n) for n in names]
        seen[:] = [(st.phase, st.ready_replicas, st.waiting_for) for st in sts]
        placed = [st for st in sts if st.phase == "Running"]
        waiting = [st for st in sts if st.waiting_for is not None and st.waiting_for.kind == "capacity"]
        return sts if len(placed) == 2 and len(waiting) == 1 else None

    try:
        await eventually(settled, timeout=60, what="two services placed, one waiting for room")
    except AssertionError as e:
        raise AssertionError(f"{e}; phases, ready pods, waits: {seen}") from None
    for _ in range(10):  # and it stays so: the waiting one is not squeezed in by an old read
        sts = [await orch.status(n) for n in names]
        assert sum(len([p for p in st.pods if p.health != "exited"]) for st in sts) <= 2, sts
        await asyncio.sleep(0.3)
    for n in names:
        await orch.undeploy(n)
