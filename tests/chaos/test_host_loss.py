"""Losing a host, against the real dev server with process pods: node "a" (this process: the
control plane, a node and a router) and node "b", a joined host whose worker is a real
subprocess. With the default timing (a heartbeat every 2 s, Lost after 6 s):

- b loses power under GET load (its worker and its pods SIGKILLed): the service is whole again
  on a, and not one GET through the router fails, with either router engine;
- b's worker alone dies (its pods keep running, as on a host cut off from the network): once it
  is Lost its pods are replaced, and when its worker comes back it stops those stale pods
  before it registers Ready again;
- a pod start refused on b (``access.denied`` written on b) reaches the control host's event log;
- b's worker frozen past the grace (SIGSTOP, as a paused VM) and thawed: it is Ready again only
  after it stopped the pods that were replaced meanwhile.

Times are logged, not asserted (bench/hostloss.py measures them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import eventually, make_settings, node_pods, seed_spec, sweep_pods, terminate_running

from hms_mgmt import constants, names
from hms_mgmt.config import Settings
from hms_mgmt.events import Event, read_events
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import WorkerProcess, enrol_node_dir, free_port
from hms_mgmt.wire import NodesOutput
from worker.main import HmsWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))  # the router tests' fixtures
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "security"))
from outsider import outsider  # noqa: E402
from router_helpers import LoadUnderway, Routed  # noqa: E402

pytestmark = [pytest.mark.timeout(300)]
log = logging.getLogger(__name__)
REPLICAS = 4


class NodeWorkerProcess(WorkerProcess):
    """``python -m worker --no-control``: a joined host's worker, node only."""

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker", "--no-control"], env=self.env(),
                                         cwd=self.source_root, stdout=out, stderr=subprocess.STDOUT)


@dataclass
class TwoHosts:
    env: object
    a: Settings
    b: Settings
    orch: Orchestrator
    router: Routed
    b_worker: NodeWorkerProcess

    async def registry(self) -> dict[str, object]:
        handle = self.env.client.get_workflow_handle(constants.node_registry_id(self.a.task_queue))  # type: ignore[attr-defined]
        out: NodesOutput = await handle.query(names.NR.NODES, result_type=NodesOutput)
        return {r.spec.name: r for r in out.nodes}

    async def b_ready(self) -> bool:
        rec = (await self.registry()).get(self.b.node)
        return rec is not None and rec.state == "Ready"  # type: ignore[attr-defined]

    async def whole_on_a(self, service: str) -> bool:
        """Every replica ready on a, in the service's record and in the router's table."""
        st = await self.orch.status(service, live=False)
        ready = [p for p in st.pods if p.ready]
        if len(ready) != REPLICAS or any(p.node != self.a.node for p in ready):
            return False
        table = await self.router.table(service)
        return table is not None and {e["pod"] for e in table["endpoints"] if e["state"] == "ready"} == \
            {p.id for p in ready} and len(table["endpoints"]) == REPLICAS

    def b_pids(self) -> list[int]:
        return [int(h.extra["pid"]) for h in node_pods(self.b) if h.extra.get("pid")]


@pytest_asyncio.fixture(loop_scope="session")
async def hosts(temporal_env, tmp_path: Path, engine: str) -> AsyncIterator[TwoHosts]:
    port = free_port()
    a = make_settings(temporal_env, tmp_path / "a", "process", routers=[f"http://127.0.0.1:{port}"])
    b = a.model_copy(update={"state_dir": tmp_path / "b", "node": f"{a.node}b", "token": None})
    enrol_node_dir(a.state_dir, b.state_dir, b.node)
    router = Routed(orch=Orchestrator(temporal_env.client, a), settings=a, engine=engine, port=port,
                    client=temporal_env.client)
    b_worker = NodeWorkerProcess(b, tmp_path / "b-worker.log")
    h = TwoHosts(temporal_env, a, b, router.orch, router, b_worker)
    try:
        async with HmsWorker(temporal_env.client, a):
            await router.start()
            b_worker.start()
            try:
                await eventually(h.b_ready, timeout=60, what="node b Ready")
                yield h
            finally:
                b_worker.stop()
                await router.stop()
    finally:
        await terminate_running(temporal_env, a)
        sweep_pods(a)
        sweep_pods(b)
        with contextlib.suppress(OSError):
            print((tmp_path / "b-worker.log").read_text()[-3000:])


async def deploy_spread(h: TwoHosts, service: str) -> None:
    await h.orch.deploy(seed_spec(name=service, min_replicas=REPLICAS, max_replicas=REPLICAS, health_interval_s=1.0),
                        wait=True, timeout=120)
    st = await h.orch.status(service, live=False)
    assert sorted(p.node for p in st.pods) == sorted([h.a.node] * 2 + [h.b.node] * 2), "spread 2 + 2"
    await h.router.wait_pods(service, REPLICAS)


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
async def test_power_loss_of_a_host_under_load_fails_no_get(hosts: TwoHosts):
    h = hosts
    service = f"hl-{h.a.node[1:7]}"
    await deploy_spread(h, service)
    load = LoadUnderway(f"{h.router.url}/{service}/")
    try:
        await asyncio.sleep(2.0)
        pids = h.b_pids()
        assert len(pids) == 2
        h.b_worker.kill()  # power loss: the worker and its pods at once
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lost_at = time.monotonic()
        await eventually(lambda: h.whole_on_a(service), timeout=90, interval=0.2,
                         what=f"{service} whole again on node a")
        took = time.monotonic() - lost_at
        await load.linger(1.0, "the service was whole")
    finally:
        result = await load.stop()
    result.assert_all_ok()
    assert (await h.registry())[h.b.node].state == "Lost"  # type: ignore[attr-defined]

    def replaced() -> bool:  # written once each heal has also tried to stop the old pod on b
        return len([e for e in read_events(h.a.state_dir)
                    if e.type == "pod.replaced" and f"node {h.b.node} lost" in e.reason]) == 2

    await eventually(replaced, timeout=30, what="both of b's pods replaced")
    log.info("%s router: host power loss -> whole again in %.1fs; %d GETs, 0 failed", h.router.engine, took,
             result.total)


@pytest.mark.parametrize("engine", ["builtin"])
async def test_a_returning_host_stops_its_stale_pods_before_it_is_ready_and_forwards_its_events(hosts: TwoHosts):
    h = hosts
    service = f"hs-{h.a.node[1:7]}"
    await deploy_spread(h, service)
    stale = sorted(p.pod_id for p in node_pods(h.b, service))
    assert len(stale) == 2
    h.b_worker.kill()  # the worker only: its pods keep running, unreachable to the control plane
    await eventually(lambda: h.whole_on_a(service), timeout=90, what=f"{service} whole again on node a")
    assert sorted(p.pod_id for p in node_pods(h.b, service)) == stale, "b's pods still run, on no record"

    h.b_worker.start()  # the host is back
    await eventually(h.b_ready, timeout=60, what="node b Ready again")
    assert node_pods(h.b, service) == [], "b was Ready again while it still ran its stale pods"
    rec = (await h.registry())[h.b.node]
    assert rec.rejoins == 1  # type: ignore[attr-defined]
    # The removal was written on b (pod.orphaned), and reached the control host's log on a heartbeat.
    # One event per pod, each forwarded when it is written: wait for both, not the first.
    def orphaned_on_a() -> list[Event]:
        found = [e for e in read_events(h.a.state_dir) if e.type == "pod.orphaned" and e.data.get("pod") in stale]
        return found if {e.data["pod"] for e in found} == set(stale) else []

    orphaned = await eventually(orphaned_on_a, timeout=20, what="b's pod.orphaned events in the control host's log")
    assert {e.data["pod"] for e in orphaned} == set(stale) and {e.data["forwarded_by"] for e in orphaned} == {h.b.node}
    assert max(e.time for e in orphaned) < rec.registered_at  # type: ignore[attr-defined]

    # A start refused on b (no admission ticket) is b's access.denied, and the control host's too.
    async with outsider(h.env.client) as them:  # type: ignore[attr-defined]
        with pytest.raises(Exception):  # noqa: B017 - whichever check refuses it first
            await them.run("start_pod", {"pod_id": "forged-pod", "service": service, "revision": 1,
                                         "node": h.b.node, "spec": seed_spec(name=service), "image_id": "sha256:" + "0" * 64,
                                         "ticket": ""}, h.b.node_task_queue())

    def denied_on_a() -> list[object]:
        return [e for e in read_events(h.a.state_dir) if e.type == "access.denied"
                and e.data.get("forwarded_by") == h.b.node and "forged-pod" in e.reason]

    await eventually(denied_on_a, timeout=20, what="b's access.denied in the control host's log")
    await h.orch.undeploy(service, timeout=60)


@pytest.mark.parametrize("engine", ["builtin"])
async def test_a_frozen_host_that_thaws_rejoins_only_after_stopping_its_replaced_pods(hosts: TwoHosts):
    h = hosts
    service = f"hf-{h.a.node[1:7]}"
    await deploy_spread(h, service)
    assert h.b_worker.proc is not None
    os.kill(h.b_worker.proc.pid, signal.SIGSTOP)
    try:
        await eventually(lambda: h.whole_on_a(service), timeout=90, what=f"{service} whole again on node a")
        assert (await h.registry())[h.b.node].state == "Lost"  # type: ignore[attr-defined]
        assert len(node_pods(h.b, service)) == 2, "b's pods still run while it is frozen"
    finally:
        os.kill(h.b_worker.proc.pid, signal.SIGCONT)
    await eventually(h.b_ready, timeout=60, what="node b Ready again")
    assert node_pods(h.b, service) == [], "b was Ready again while it still ran its replaced pods"
    assert (await h.registry())[h.b.node].rejoins == 1  # type: ignore[attr-defined]
