"""Routers on any host, against the real dev server, process pods and real router processes
(``python -m router``, one per engine): a router joins with a router token (`hms router join`,
the real CLI) or, on the control host, enrols itself; both register and heartbeat, signed. The
endpoint feed, signed by the control plane's key, reaches every live router with no router list
kept anywhere; a rollout's drains are confirmed by both, each answer signed by its router; a
router killed mid-drain stops heartbeating, is dropped, and the drain still ends early; a removed
one is refused at its next heartbeat. A forged push and an unenrolled registration are refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import REPO, V2_IMAGE, eventually, make_settings, seed_spec, sweep_pods, terminate_running
from temporalio.client import WorkflowUpdateFailedError

from dashboard import running_dashboard
from hms_mgmt import constants, feed, names, nodeid
from hms_mgmt.config import Settings
from hms_mgmt.events import read_events
from hms_mgmt.models import Endpoint, EndpointSet
from hms_mgmt.nodes import list_routers
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import activity_results, free_port
from hms_mgmt.wire import DrainResult, JoinAnswer, PublishResult, RouterRegistration
from router.server import RouterProcess
from worker.main import HmsWorker

pytestmark = pytest.mark.timeout(300)

ROUTER_ENV = {"HMS_NODE_HEARTBEAT_S": "0.5", "HMS_NODE_LOST_AFTER_S": "4"}  # a silent router is dropped after 4 s


def hms_cli(*args: str, state_dir: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HMS_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO), **env_vars}
    return subprocess.run([sys.executable, "-m", "hms_mgmt.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


async def join_router(control: Settings, router_dir: Path, name: str) -> Settings:
    """`hms router join-token` on the control host, `hms router join` on the router's (a thread:
    this process's worker answers the enrolment meanwhile)."""
    made = await asyncio.to_thread(hms_cli, "--address", control.temporal_address, "router", "join-token",
                                   "--ttl", "10m", state_dir=control.state_dir, HMS_TASK_QUEUE=control.task_queue)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    # A node token is no router token, and the other way round.
    wrong = await asyncio.to_thread(hms_cli, "node", "join", token, "--name", name, "--state-dir", str(router_dir),
                                    state_dir=router_dir)
    assert wrong.returncode != 0 and "router join" in wrong.stdout + wrong.stderr
    joined = await asyncio.to_thread(hms_cli, "router", "join", token, "--name", name, "--address", "127.0.0.1",
                                     "--state-dir", str(router_dir), state_dir=router_dir)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    keys = sorted(p.name for p in (router_dir / "keys").iterdir())
    assert keys == ["control.pub", f"router-{name}.crt", f"router-{name}.pem"], keys  # no control-plane secret
    return Settings.from_env(env={"HMS_STATE_DIR": str(router_dir), **ROUTER_ENV})


async def start_router(s: Settings, port: int, engine: str, log: Path, monkeypatch, **env: str) -> RouterProcess:
    with monkeypatch.context() as m:
        for k, v in {**ROUTER_ENV, **env}.items():
            m.setenv(k, v)
        rp = RouterProcess(s, port=port, engine=engine, log_path=log)
        rp.start()
    await rp.wait_ready(30)
    return rp


async def push(url: str, body: bytes, signature: str | None) -> int:
    headers = {feed.SIGNATURE_HEADER: signature} if signature else {}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/-/feed", data=body, headers=headers) as r:
        return r.status


async def test_every_live_router_gets_the_feed_and_confirms_drains(temporal_env, tmp_path, monkeypatch):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy")
    # No router list: HMS_ROUTERS left at its default (the local port, where nothing listens here).
    s = make_settings(temporal_env, tmp_path / "state", "process", routers=[], router_port=free_port())
    client = temporal_env.client
    orch = Orchestrator(client, s)
    procs: list[RouterProcess] = []
    try:
        async with HmsWorker(client, s):
            a_settings = await join_router(s, tmp_path / "router-a", "edge-a")  # as on another host
            a = await start_router(a_settings, free_port(), "builtin", tmp_path / "a.log", monkeypatch)
            b_name = "edge-b"  # self-enrolled: on the control host, it needs no token
            b = await start_router(s, free_port(), "haproxy", tmp_path / "b.log", monkeypatch, HMS_ROUTER_NAME=b_name)
            procs += [a, b]
            await check_registered(client, s, {"edge-a": a.url, b_name: b.url})
            await check_feed_and_drains(client, s, orch, a, b, b_name)
            await check_dashboard_reads_both(client, s)
            await check_forged_pushes(a, s, tmp_path, b_name)
            await check_unenrolled_registration(client, s, a.url)
            await check_dead_router_dropped(client, s, orch, a, b)
            await check_removed_router_dropped(client, s)
    finally:
        for rp in procs:
            rp.stop()
        await terminate_running(temporal_env, s)
        sweep_pods(s)


async def check_registered(client, s: Settings, want: dict[str, str]) -> None:
    async def both() -> bool:
        return {r.name: r.url for r in await list_routers(client, s) if r.state == "Ready"} == want

    await eventually(both, timeout=60, what=f"routers {sorted(want)} registered")
    shown = await asyncio.to_thread(hms_cli, "--address", s.temporal_address, "routers", "-o", "json",
                                    state_dir=s.state_dir, HMS_TASK_QUEUE=s.task_queue)
    assert shown.returncode == 0, shown.stderr
    rows = {r["name"]: r for r in json.loads(shown.stdout)}
    assert {n: r["url"] for n, r in rows.items()} == want and all(r["last_heartbeat"] for r in rows.values())


async def router_pods(url: str, service: str) -> set[str]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/-/table") as r:
        t = (await r.json())["services"].get(service)
    return {e["pod"] for e in t["endpoints"] if e["state"] == "ready"} if t else set()


async def check_feed_and_drains(client, s: Settings, orch: Orchestrator, a, b, b_name: str) -> None:
    await orch.deploy(seed_spec(min_replicas=2, max_replicas=2, drain_s=60.0), wait=True, timeout=120)
    async def pushed_to_both() -> bool:
        pushed = await activity_results(client, s.task_queue, "publish_endpoints", PublishResult)
        return any(set(p.pushed) == {a.url, b.url} and not p.failed for p in pushed)

    await eventually(pushed_to_both, timeout=30, what="a feed push that reached both routers")
    for rp in (a, b):
        await eventually(lambda rp=rp: _has_pods(rp.url, 2), timeout=30, what=f"{rp.url} routes to both pods")

    # drain_s 60: a drain the routers did not confirm would hold the rollout past its timeout.
    await orch.deploy(seed_spec(image=V2_IMAGE, min_replicas=2, max_replicas=2, drain_s=60.0), wait=True, timeout=100)
    drains = [d for d in await activity_results(client, s.task_queue, "await_drained", DrainResult) if d.routers]
    assert len(drains) >= 2, drains  # one per old pod
    for d in drains:
        assert d.confirmed, d
        assert d.routers == {a.url: "idle (router edge-a)", b.url: f"idle (router {b_name})"}, d.routers


async def check_dashboard_reads_both(client, s: Settings) -> None:
    """The dashboard keeps no router list either: it reads traffic from every registered router."""
    async with running_dashboard(client, s, port=0, refresh_s=0.2) as dash:
        async def both_live() -> bool:
            r = dash.router or {}
            return r.get("routers") == 2 and r.get("live") == 2 and "hms-ach" in r.get("services", {})

        await eventually(both_live, timeout=20, what="the dashboard reading both registered routers")


async def _has_pods(url: str, n: int) -> bool:
    return len(await router_pods(url, "hms-ach")) == n


async def check_forged_pushes(a, s: Settings, tmp_path: Path, b_name: str) -> None:
    evil = EndpointSet(service="hms-ach", version=int(time.time() * 1000) + 1000,
                       endpoints=[Endpoint(pod="evil", address="127.0.0.1:1")]).model_dump_json().encode()
    other = tmp_path / "elsewhere"  # a control plane of the attacker's own
    router_key = nodeid.load_node_key(s.state_dir, b_name, role="router")  # a router's key signs no table
    for sig in (None, feed.sign(other, evil), nodeid.statement(router_key, b_name, "feed", evil.decode())):
        assert await push(a.url, evil, sig) == 401
    assert "evil" not in await router_pods(a.url, "hms-ach")


async def check_unenrolled_registration(client, s: Settings, url: str) -> None:
    handle = client.get_workflow_handle(constants.router_registry_id(s.task_queue))
    bogus = RouterRegistration(name="intruder", address="127.0.0.1", url=url)
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update(names.RR.REGISTER, bogus)
    await handle.signal(names.RR.JOIN, bogus.model_copy(update={"request_id": "intruder-join"}))
    answer = await eventually(lambda: handle.query(names.RR.JOINED, "intruder-join", result_type=JoinAnswer | None),
                              timeout=30, what="the answer to the intruder's join")
    assert answer.refused and answer.router is None
    assert "intruder" not in {r.name for r in await list_routers(client, s)}
    assert any("router intruder" in e.reason for e in read_events(s.state_dir) if e.type == "access.denied")


async def check_dead_router_dropped(client, s: Settings, orch: Orchestrator, a, b) -> None:
    assert b.proc is not None
    b.proc.send_signal(signal.SIGKILL)  # power off: no goodbye, its heartbeats just stop
    b.proc.wait(10)
    # drain_s 60: a drain that waited for the dead router would hold the rollout past its timeout.
    await orch.deploy(seed_spec(min_replicas=2, max_replicas=2, drain_s=60.0), wait=True, timeout=100)
    drains = [d for d in await activity_results(client, s.task_queue, "await_drained", DrainResult)
              if not d.routers.get(b.url, "").startswith("idle")]  # since b died
    assert len(drains) == 2, drains  # one per old pod
    for d in drains:
        assert d.confirmed and d.routers[a.url].startswith("idle"), d
        assert d.routers.get(b.url, "dropped").startswith("dropped"), d
    lost = {r.name: r.state for r in await list_routers(client, s)}
    assert list(lost.values()).count("Lost") == 1 and lost["edge-a"] == "Ready", lost


async def check_removed_router_dropped(client, s: Settings) -> None:
    """`hms router remove` revokes the router: its next heartbeat is refused and it is Lost."""
    removed = await asyncio.to_thread(hms_cli, "--address", s.temporal_address, "router", "remove", "edge-a",
                                      state_dir=s.state_dir, HMS_TASK_QUEUE=s.task_queue)
    assert removed.returncode == 0, removed.stdout + removed.stderr

    async def lost() -> bool:
        return {r.name: r.state for r in await list_routers(client, s)}.get("edge-a") == "Lost"

    await eventually(lost, timeout=30, what="the removed router Lost")
    assert any("router edge-a: heartbeat refused" in e.reason and "removed" in e.reason
               for e in read_events(s.state_dir) if e.type == "access.denied")
