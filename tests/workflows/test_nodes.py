"""Two real nodes on this machine, against the real dev server: node "a" (the control plane
and a Docker node) and node "b", a Docker node with a worker of its own that reaches the
engine through ``--docker-host``. Both use the one shared engine: an image must resolve to
the same content on every node (admission pins it), and a second engine would need its own
bridge and image store on a machine others share. Pods spread across both; a node whose
worker stops is Lost and its pods move while its containers keep running; a full cluster
waits for a node to join; a CPU step across both nodes is one scaling decision."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import eventually, make_settings, node_pods, require_docker, seed_spec, sweep_pods, terminate_running
from temporalio.testing import WorkflowEnvironment
from test_scale import burn

from hms_mgmt.config import Settings
from hms_mgmt.events import read_events
from hms_mgmt.nodes import list_nodes
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import enrol_node_dir
from worker.main import HmsWorker

LOST_AFTER_S = 5.0
log = logging.getLogger(__name__)


@dataclass
class Cluster:
    env: WorkflowEnvironment
    a: Settings  # control plane + Docker node
    b: Settings  # Docker node, its own worker, state directory and trust store
    hms: Orchestrator
    b_worker: HmsWorker | None = None
    started: list[HmsWorker] = field(default_factory=list)

    async def start_b(self) -> None:
        # As on a second host that joined: its own key and certificate, the control plane's public key.
        enrol_node_dir(self.a.state_dir, self.b.state_dir, self.b.node, self.b.node_address)
        self.b_worker = HmsWorker(self.env.client, self.b, control=False)
        await self.b_worker.__aenter__()

    async def stop_b(self) -> None:
        """The node's worker goes away; its containers stay, as on a host that lost its worker."""
        assert self.b_worker is not None
        await self.b_worker.__aexit__(None, None, None)
        self.b_worker = None

    def events(self, type_: str):
        return [e for e in read_events(self.a.state_dir) if e.type == type_]

    async def pods_by_node(self, service: str = "hms-ach") -> Counter[str]:
        st = await self.hms.status(service, live=False)
        return Counter(p.node for p in st.pods if p.ready)


def node_settings(env: WorkflowEnvironment, tmp_path: Path, **a_extra: object) -> tuple[Settings, Settings]:
    timing = {"node_lost_after_s": LOST_AFTER_S, "node_heartbeat_s": 1.0}
    a = make_settings(env, tmp_path / "a", "docker", **timing, **a_extra)
    b = make_settings(env, tmp_path / "b", "docker", **timing,
                      docker_host=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    return a, b.model_copy(update={"task_queue": a.task_queue, "node": f"{a.node}-b"})


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(temporal_env: WorkflowEnvironment, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Cluster]:
    require_docker()
    marker = request.node.get_closest_marker("node_a")
    a, b = node_settings(temporal_env, tmp_path, **(marker.kwargs if marker else {}))
    c = Cluster(temporal_env, a, b, Orchestrator(temporal_env.client, a))
    try:
        async with HmsWorker(temporal_env.client, a):
            yield c
            if c.b_worker is not None:
                await c.stop_b()
    finally:
        await terminate_running(temporal_env, a)
        sweep_pods(a)
        sweep_pods(b)


def spec(**kw: object) -> dict[str, object]:
    return seed_spec(health_interval_s=1.0, scale_interval_s=1.0, **kw)


async def test_pods_spread_and_move_off_a_lost_node_which_cleans_up_when_back(cluster: Cluster):
    c = cluster
    await c.start_b()
    await c.hms.deploy(spec(min_replicas=4, max_replicas=4), wait=True, timeout=120)
    assert await c.pods_by_node() == {c.a.node: 2, c.b.node: 2}, "spread 2 + 2 across the two nodes"
    assert len(node_pods(c.b, "hms-ach")) == 2
    views = {v.spec.name: v for v in await list_nodes(c.env.client, c.a)}
    assert views[c.b.node].state == "Ready" and views[c.b.node].pods == 2

    await c.stop_b()  # the containers keep running: the node, not the pods, is gone
    stopped = asyncio.get_running_loop().time()
    assert len(node_pods(c.b, "hms-ach")) == 2

    async def moved():
        st = await c.hms.status("hms-ach", live=False)
        on_a = [p for p in st.pods if p.node == c.a.node and p.ready]
        return st if len(on_a) == 4 and len(st.pods) == 4 else None

    st = await eventually(moved, timeout=45, interval=0.5, what="all 4 pods ready on node a")
    took = asyncio.get_running_loop().time() - stopped
    assert st.phase == "Running"
    views = {v.spec.name: v for v in await list_nodes(c.env.client, c.a)}
    assert views[c.b.node].state == "Lost" and views[c.b.node].pods == 0
    lost = c.events("node.lost")
    assert lost and lost[0].data["node"] == c.b.node and lost[0].data["services"] == 1
    replaced = [e for e in c.events("pod.replaced") if f"node {c.b.node} lost" in e.reason]
    assert len(replaced) == 2, [e.reason for e in c.events("pod.replaced")]
    log.info("pods of the lost node ready elsewhere %.1fs after its worker stopped", took)

    # The node comes back: the two containers it still runs are on no service's record.
    await c.start_b()
    await eventually(lambda: node_pods(c.b, "hms-ach") == [], timeout=20, what="stale containers removed")
    views = {v.spec.name: v for v in await list_nodes(c.env.client, c.a)}
    assert views[c.b.node].state == "Ready"
    assert len(node_pods(c.a, "hms-ach")) == 4
    await c.hms.undeploy("hms-ach")


@pytest.mark.node_a(node_max_pods=1)
async def test_full_cluster_alerts_then_deploys_when_a_node_joins(cluster: Cluster):
    c = cluster
    await c.hms.deploy(spec(min_replicas=2, max_replicas=4))
    alert = await eventually(lambda: c.events("capacity.alert"), timeout=30, what="capacity.alert")
    assert "no node has room" in alert[0].reason
    st = await c.hms.status("hms-ach", live=False)
    assert st.phase == "Deploying" and len(node_pods(c.a, "hms-ach")) == 1

    await c.start_b()  # a node joins
    st = await c.hms.wait_for("hms-ach", timeout=60)
    assert st.ready_replicas == 2
    assert await c.pods_by_node() == {c.a.node: 1, c.b.node: 1}
    await c.hms.undeploy("hms-ach")


async def test_node_selector_places_only_on_labelled_nodes(cluster: Cluster):
    c = cluster
    c.b = c.b.model_copy(update={"node_labels": {"disk": "ssd"}})
    await c.start_b()
    await c.hms.deploy(spec(min_replicas=2, max_replicas=2, node_selector={"disk": "ssd"}), wait=True, timeout=120)
    assert await c.pods_by_node() == {c.b.node: 2}
    await c.hms.undeploy("hms-ach")


@pytest.mark.serial
async def test_cpu_step_across_both_nodes_is_one_decision(cluster: Cluster):
    c = cluster
    await c.start_b()
    # A low target: whatever CPU a loaded machine leaves the burn, the step asks for max_replicas.
    await c.hms.deploy(spec(min_replicas=2, max_replicas=4, cpu_target=5), wait=True, timeout=120)
    st = await c.hms.status("hms-ach")
    assert Counter(p.node for p in st.pods) == {c.a.node: 1, c.b.node: 1}
    first = {p.id for p in st.pods}
    await asyncio.gather(*(asyncio.to_thread(burn, p.endpoint, 90) for p in st.pods))

    scaled = await eventually(lambda: c.events("service.scaled"), timeout=60, what="a scale-up")
    assert (scaled[0].data["from_replicas"], scaled[0].data["to_replicas"]) == (2, 4)
    assert {s["pod_id"] for s in scaled[0].data["samples"]} == first, "one decision on both nodes' samples"
    await eventually(lambda: _ready(c, 4), timeout=60, what="4 ready pods")
    await asyncio.sleep(4)  # several more sampling rounds under the same load
    assert len(c.events("service.scaled")) == 1
    st = await c.hms.status("hms-ach")
    assert st.scale_count == 1 and st.desired_replicas == 4
    await asyncio.gather(*(asyncio.to_thread(burn, p.endpoint, 0) for p in st.pods if p.id in first))
    await c.hms.undeploy("hms-ach")


async def _ready(c: Cluster, n: int):
    st = await c.hms.status("hms-ach")
    return st if st.ready_replicas == n and len(st.pods) == n else None
