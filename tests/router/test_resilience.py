"""The router while pods fail, slow down and go away, both engines, real pods: a slow pod gets
little traffic, a SIGKILLed pod costs no GET and no POST that never reached it, and a
scale-down drains without a single error."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.request

import pytest
from conftest import seed_spec
from router_helpers import engine, routed, run_load  # noqa: F401 - fixtures

from hms_mgmt.runtimes import make_runtime

PAYMENT = json.dumps({"amount": 12.5, "account": "DE-1234-5678", "currency": "EUR"}).encode()


def gets_and_posts(routed, stop: asyncio.Event, *, posters: int) -> tuple[asyncio.Future, asyncio.Future]:
    """GETs (8 at a time) and payment POSTs (``posters`` at a time) through the router until ``stop``."""
    gets = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/", concurrency=8, seconds=30, max_requests=20000,
                                          stop=stop))
    posts = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/payments", method="POST", body=PAYMENT,
                                           concurrency=posters, seconds=30, max_requests=20000, stop=stop))
    return gets, posts


def pod_pid(settings, pod_id: str) -> int:
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        handle = rt.find(pod_id)
        assert handle is not None and handle.running
        if settings.runtime == "process":
            return int(handle.extra["pid"])
        return int(rt.client.containers.get(handle.extra["container_id"]).attrs["State"]["Pid"])
    finally:
        rt.close()


def container_id(settings, pod_id: str) -> str:
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        handle = rt.find(pod_id)
        assert handle is not None
        return handle.extra["container_id"]
    finally:
        rt.close()


@pytest.mark.serial
@pytest.mark.docker
@pytest.mark.parametrize("routed", ["docker"], indirect=True)
async def test_a_slow_pod_gets_clearly_less_traffic(routed):
    spec = seed_spec(min_replicas=3, max_replicas=3, cpu_limit=0.5, health_interval_s=30.0)
    await routed.orch.deploy(spec, wait=True, timeout=120)
    pods = (await routed.orch.status("hms-ach")).pods
    await routed.wait_pods("hms-ach", 3)
    slow = pods[0].id
    # Starved: 0.02 CPU, most of it eaten by its own busy loop (on a busy 2-core machine a pod at
    # 0.02 CPU alone is not much slower than its neighbours, which are starved too).
    burn = urllib.request.Request(f"http://{pods[0].endpoint}/admin/cpu", data=b'{"percent": 100}', method="POST",
                                  headers={"Content-Type": "application/json"})
    await asyncio.to_thread(lambda: urllib.request.urlopen(burn, timeout=5).read())
    subprocess.run(["docker", "update", "--cpus", "0.02", container_id(routed.settings, slow)], check=True,
                   capture_output=True)
    warm = await run_load(f"{routed.url}/hms-ach/", concurrency=16, seconds=3, max_requests=1500)
    load = await run_load(f"{routed.url}/hms-ach/", concurrency=16, seconds=8, max_requests=4000)
    assert load.statuses[200] == load.total >= 200, load.failures[:5]
    share = load.pods[slow] / load.total
    # Round-robin would give it a third; the latency score must push it well below.
    assert share < 0.12, f"slow pod got {share:.0%} of {load.total} requests ({dict(load.pods)}; warm-up {dict(warm.pods)})"


async def test_a_pod_killed_under_load_fails_no_get_and_no_unsent_post(routed):
    await routed.orch.deploy(seed_spec(min_replicas=3, max_replicas=3, health_interval_s=1.0), wait=True,
                             timeout=120)
    pods = (await routed.orch.status("hms-ach")).pods
    await routed.wait_pods("hms-ach", 3)
    stop = asyncio.Event()
    gets, posts = gets_and_posts(routed, stop, posters=4)
    await asyncio.sleep(1.5)
    victim = pods[0]
    os.kill(pod_pid(routed.settings, victim.id), signal.SIGKILL)
    # Load goes on through the heal: until the replacement is in the router's table, then 1 s more.
    await routed.wait_pods("hms-ach", 3, timeout=60, without=victim.id)
    await asyncio.sleep(1.0)
    stop.set()
    g, p = await gets, await posts
    assert g.total > 100 and p.total > 20
    assert g.statuses[200] == g.total, f"failed GETs: {g.failures[:5]}"
    # A POST may fail only once it reached a pod: a 5xx saying so, or a reply cut after the pod's
    # headers. HAProxy hangs up instead of answering 502 when the caller's connection carried
    # earlier requests (its rule for kept-alive connections); it does not send the POST again.
    def reached(f: tuple) -> bool:
        hung_up = routed.engine == "haproxy" and f[0] == 0 and "ServerDisconnected" in str(f[1])
        return hung_up or (isinstance(f[1], dict) and bool(f[1].get("reached_pod")))

    unsent = [f for f in p.failures if not reached(f)]
    assert unsent == [], f"POSTs failed that never reached a pod: {unsent[:5]}"
    assert len(p.failures) <= 4, f"more failed POSTs than were in flight at the kill: {p.failures}"


async def test_scale_down_under_load_drains_without_error(routed):
    await routed.orch.deploy(seed_spec(min_replicas=1, max_replicas=3, drain_s=1.0), wait=True, timeout=120)
    await routed.orch.scale("hms-ach", 3)
    await routed.wait_pods("hms-ach", 3)
    stop = asyncio.Event()
    gets, posts = gets_and_posts(routed, stop, posters=2)
    await asyncio.sleep(1.0)
    st = await routed.orch.scale("hms-ach", 1)
    assert st.desired_replicas == 1
    await routed.wait_pods("hms-ach", 1, timeout=60)
    await asyncio.sleep(1.0)
    stop.set()
    g, p = await gets, await posts
    assert g.total > 50 and p.total > 10
    assert g.statuses[200] == g.total, f"failed GETs during the drain: {g.failures[:5]}"
    assert p.statuses[202] == p.total, f"failed POSTs during the drain: {p.failures[:5]}"
    survivors = {x.id for x in (await routed.orch.status("hms-ach")).pods}
    assert set(g.pods) - survivors, "the stopped pods served nothing during the test"
