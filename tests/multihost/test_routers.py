"""Routers on any host, on separate hosts: A runs the control plane and its router (`hms up
--listen A --no-node`), B joins as a node and runs the pods, C joins as a router with a router
token (`hms router join`) and runs `hms router --host C`. Both routers register themselves (no
router list anywhere), C's router reaches B's pods at B's address, a rollout's drains are
confirmed by both, each answer signed by its router, and C holds no key of the control plane."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from dashboard.server import Dashboard
from hms_mgmt import feed
from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import activity_results
from hms_mgmt.wire import DrainResult

from .conftest import Host, Network, hms_argv, join_host, pod_answering, sign_image, start_control, tails, wait_until
from .test_join import IMAGE, ROUTER_PORT

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(300)]

SERVICE = "hms-edge"


def join_router(a: Host, c: Host, name: str) -> str:
    """``hms router join-token`` on A, ``hms router join`` on C; returns what the join printed."""
    made = a.run(hms_argv("router", "join-token", "--ttl", "10m"), env=a.env())
    assert made.returncode == 0, made.stdout + made.stderr
    token = made.stdout.strip().splitlines()[-1]
    joined = c.run(hms_argv("router", "join", token, "--name", name, "--address", c.address), env=c.env())
    assert joined.returncode == 0, joined.stdout + joined.stderr
    return joined.stdout


def routers_on(a: Host) -> dict[str, tuple[str, str]]:
    shown = a.run(hms_argv("routers", "-o", "json"), env=a.env())
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return {r["name"]: (r["url"], r["state"]) for r in json.loads(shown.stdout)}


async def test_a_router_on_c_joins_gets_the_feed_and_confirms_drains(network: Network, tmp_path: Path) -> None:
    a, b, c = network.add_host("a"), network.add_host("b"), network.add_host("c")
    logs = [tmp_path / "a-up.log", tmp_path / "b-worker.log", tmp_path / "c-router.log"]
    up = start_control(a, logs[0], logs=logs)
    sign_image(a, IMAGE)
    join_host(a, b, "b")
    worker_b = b.start(hms_argv("worker"), env=b.env(), log=logs[1])
    assert "now run" in join_router(a, c, "edge-c")
    held = sorted(str(p.relative_to(c.state_dir)) for p in c.state_dir.rglob("*") if p.is_file())
    assert [h for h in held if h.startswith("keys/")] == ["keys/control.pub", "keys/router-edge-c.crt",
                                                          "keys/router-edge-c.pem"], held
    router_c = c.start(hms_argv("router", "--host", c.address, "--port", str(ROUTER_PORT)), env=c.env(), log=logs[2])
    want = {f"http://{a.address}:{ROUTER_PORT}", f"http://{c.address}:{ROUTER_PORT}"}
    wait_until(lambda: {u for u, st in routers_on(a).values() if st == "Ready"} == want, timeout=60,
               what="the routers on A and C registered", procs=[up, worker_b, router_c], logs=logs)

    orch = await Orchestrator.connect(Settings.from_env(env={"HMS_STATE_DIR": str(a.state_dir)}))
    spec = {"name": SERVICE, "image": IMAGE, "min_replicas": 2, "max_replicas": 2, "cpu_target": 60, "drain_s": 60}
    try:
        await orch.deploy(spec, wait=True, timeout=120)
        pods = {p.id for p in (await orch.status(SERVICE)).pods}
        for host in (a, c):  # each router reaches B's pods at B's address
            url = f"http://{host.address}:{ROUTER_PORT}/{SERVICE}/health"
            await asyncio.to_thread(wait_until, lambda url=url: pod_answering(url) in pods, timeout=30,
                                    what=f"{host.name}'s router to reach B's pods", logs=logs)
        await _inspection_is_for_the_control_plane(orch, c, b)
        # A rolling update: drain_s 60 each, so it ends within its timeout only on the routers' word.
        await orch.deploy({**spec, "env": {"LOG_LEVEL": "INFO"}}, wait=True, timeout=100)
        drains = [d for d in await activity_results(orch.client, orch.settings.task_queue, "await_drained",
                                                    DrainResult) if d.routers]
        assert len(drains) == 2, drains
        for d in drains:
            assert d.confirmed and set(d.routers) == want, d
            assert d.routers[f"http://{c.address}:{ROUTER_PORT}"] == "idle (router edge-c)", d
    except BaseException:
        print(tails(logs))
        raise
    finally:
        await orch.undeploy(SERVICE, wait=True, timeout=60)


async def _inspection_is_for_the_control_plane(orch: Orchestrator, c: Host, b: Host) -> None:
    """C's router shows its pods' addresses to no one on the network (this test's process is not on
    C's loopback) but to reads signed by the control plane: the dashboard on A shows C's figures."""
    base = f"http://{c.address}:{ROUTER_PORT}"
    async with aiohttp.ClientSession() as http:
        for path in feed.INSPECT_PATHS:
            async with http.get(base + path, headers={"X-Forwarded-For": "127.0.0.1"}) as r:
                body = await r.text()
                assert r.status == 401 and b.address not in body, (path, r.status, body)
        async with http.get(base + "/-/health") as r:
            assert r.status == 200
        async with http.get(base + "/-/table", headers=feed.inspect_headers(orch.settings.state_dir, "/-/table")) as r:
            assert r.status == 200 and b.address in await r.text()
    dash = Dashboard(orch.client, orch.settings, refresh_s=0.5, router_url=f"{base}/-/stats")
    await dash.start(port=0)
    try:
        for _ in range(40):
            seen = dash.router or {}
            if seen.get("live") == 1 and SERVICE in seen.get("services", {}):
                break
            await asyncio.sleep(0.25)
        assert seen.get("live") == 1 and SERVICE in seen["services"], seen
    finally:
        await dash.stop()
