"""Drains that end when the routers are done, both engines, real pods and a real Temporal server.

A pod stopped on purpose (scale-down, rolling update, undeploy) first drains: routers send it
nothing new. It stops as soon as every router says it has no request in flight to it
(``GET /-/drained``, asked by ``await_drained``), and never later than ``drain_s``; when a router
cannot confirm, the full ``drain_s`` is waited."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from conftest import seed_spec
from router_helpers import engine, free_port, routed, run_load  # noqa: F401 - fixtures
from temporalio.testing import ActivityEnvironment

from activities.feed import FeedActivities
from hms_mgmt import feed, nodeid, tickets
from hms_mgmt.config import Settings
from hms_mgmt.wire import DrainInput, DrainResult


async def pods_of(orch, service: str) -> set[str]:
    return {p.id for p in (await orch.status(service)).pods}


async def test_a_scale_down_stops_the_pod_once_its_long_requests_end_not_after_drain_s(routed):
    # drain_s 40: waited out, the scale-down would take 40 s.
    await routed.orch.deploy(seed_spec(min_replicas=1, max_replicas=2, drain_s=40.0), wait=True, timeout=120)
    await routed.orch.scale("hms-ach", 2)
    await routed.wait_pods("hms-ach", 2)
    before = await pods_of(routed.orch, "hms-ach")

    async def slow_call(http: aiohttp.ClientSession) -> tuple[int, str]:
        async with http.get(f"{routed.url}/hms-ach/delay/4") as r:
            await r.read()
            return r.status, r.headers.get("X-HMS-Pod", "-")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        calls = [asyncio.ensure_future(slow_call(http)) for _ in range(8)]
        await asyncio.sleep(1.0)  # all eight are in flight, on both pods
        t0 = time.monotonic()
        await routed.orch.scale("hms-ach", 1)
        deadline = t0 + 35
        while len(await pods_of(routed.orch, "hms-ach")) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stopped_after = time.monotonic() - t0
        results = await asyncio.gather(*calls)

    after = await pods_of(routed.orch, "hms-ach")
    assert len(after) == 1, f"the scale-down did not finish within 35 s: {after}"
    (victim,) = before - after
    assert [s for s, _ in results] == [200] * 8, f"a long request was cut by the drain: {results}"
    assert victim in {p for _, p in results}, f"no long request was answered by the stopped pod {victim} (cut and retried elsewhere?): {results}"
    # The victim's requests had ~3 s left when the scale-down began: the drain waited for them...
    assert stopped_after >= 2.0, f"the pod was stopped {stopped_after:.1f} s in, with requests still in flight"
    # ...and not for the rest of drain_s.
    assert stopped_after < 30.0, f"the drain waited {stopped_after:.1f} s: the router's word was not taken"


async def test_the_router_says_which_pods_it_is_not_done_with_only_to_the_control_plane_and_signs_it(
        routed, tmp_path):
    await routed.orch.deploy(seed_spec(min_replicas=2, max_replicas=2), wait=True, timeout=120)
    await routed.wait_pods("hms-ach", 2)
    pods = sorted(await pods_of(routed.orch, "hms-ach"))
    control = routed.settings.state_dir
    other = tmp_path / "another-control-plane"
    tickets.ensure_control_key(other)  # a well-formed signature, by a key that is not this control plane's

    async def ask(http: aiohttp.ClientSession, params: dict[str, str], *, signed: bool = True,
                  signer=control) -> tuple[int, dict]:
        headers = {}
        if signed:
            q = feed.drained_query(params.get("service", ""), params.get("pods", ""), params.get("wait", ""))
            headers[feed.SIGNATURE_HEADER] = feed.sign(signer, q, kind="drained")
        async with http.get(f"{routed.url}/-/drained", params=params, headers=headers) as r:
            raw = await r.read()
            if r.status == 200:  # the answer is the router's own signed word about this very question
                name = r.headers[feed.ROUTER_HEADER]
                nodeid.check_statement(nodeid.node_public_key(control, name, role="router"),
                                       r.headers[feed.ROUTER_SIGNATURE_HEADER], node=name, kind="drained",
                                       message=feed.drained_answer(headers[feed.SIGNATURE_HEADER], raw))
            return r.status, json.loads(raw)

    both = {"service": "hms-ach", "pods": ",".join(pods)}
    async with aiohttp.ClientSession() as http:
        status, body = await ask(http, both)
        assert status == 200 and body["idle"] is False
        assert set(body["busy"]) == set(pods) and set(body["busy"].values()) == {"still routed to"}
        # A pod it never routed to is no reason to wait.
        status, body = await ask(http, {"service": "hms-ach", "pods": "0b7c1e0e-0000-4000-8000-000000000000"})
        assert status == 200 and body["idle"] is True
        # Its answer ends a drain early: only the control plane may ask.
        for unsigned in ((await ask(http, both, signed=False)), (await ask(http, both, signer=other))):
            assert unsigned[0] == 401 and "refused" in unsigned[1]["error"], unsigned
        for bad in ({"service": "hms-ach"}, {"pods": pods[0]}, {"service": "hms-ach", "pods": pods[0], "wait": "x"}):
            status, body = await ask(http, bad)
            assert status == 400 and "error" in body, bad


async def drain_through(tmp_path, router: str, max_s: float) -> tuple[DrainResult, float]:
    """``await_drained`` for pod p1 with ``router`` as the only router: its result and how long it took."""
    acts = FeedActivities(lambda: Settings(state_dir=tmp_path, routers=[router]))
    try:
        t0 = time.monotonic()
        result = await ActivityEnvironment().run(
            acts.await_drained, DrainInput(service="hms-ach", pods=["p1"], max_s=max_s))
        return result, time.monotonic() - t0
    finally:
        await acts.close()


async def test_a_router_that_does_not_answer_means_the_whole_drain_is_waited(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result, waited = await drain_through(tmp_path, dead, 0.8)
    assert result.confirmed is False
    assert waited >= 0.75, f"gave up after {waited:.2f} s of a 0.8 s drain"
    assert result.routers[dead].startswith("no answer")

    # A router that takes the connection and never answers holds the drain no longer than max_s.
    done = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await done.wait()
        writer.close()

    hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        result, waited = await drain_through(tmp_path, f"http://127.0.0.1:{hung.sockets[0].getsockname()[1]}", 1.5)
    finally:
        done.set()
        hung.close()
        await hung.wait_closed()
    assert result.confirmed is False
    assert 1.4 <= waited < 1.9, f"a hung router held a 1.5 s drain {waited:.2f} s"

    none = FeedActivities(lambda: Settings(state_dir=tmp_path, routers=[]))
    result = await ActivityEnvironment().run(none.await_drained, DrainInput(service="hms-ach", pods=["p1"], max_s=5))
    await none.close()
    assert result.confirmed is False, "with no router to ask, nothing may be confirmed"



async def test_a_failing_pod_is_stopped_once_the_router_is_done_with_it_not_drain_s_after(routed):
    """A heal's bad pod: routers have had it as draining since it failed; it stops when they say
    they are done with it, long before ``drain_s`` (30 s here), and no request fails meanwhile."""
    await routed.orch.deploy(seed_spec(min_replicas=2, max_replicas=2, health_interval_s=1.0, health_failures=2,
                                       drain_s=30.0), wait=True, timeout=120)
    await routed.wait_pods("hms-ach", 2)
    victim = (await routed.orch.status("hms-ach")).pods[0]
    stop = asyncio.Event()
    gets = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/", concurrency=4, seconds=40, max_requests=20000,
                                          stop=stop))
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{victim.endpoint}/admin/health", json={"failing": True}) as r:
            assert r.status == 200
    t0 = time.monotonic()
    while victim.id in await pods_of(routed.orch, "hms-ach") and time.monotonic() - t0 < 40:
        await asyncio.sleep(0.1)
    gone_after = time.monotonic() - t0
    await routed.wait_pods("hms-ach", 2, without=victim.id)
    stop.set()
    g = await gets
    assert victim.id not in await pods_of(routed.orch, "hms-ach"), "the failing pod was never replaced"
    # Detection takes ~2 s (2 failures x 1 s), the replacement ~1 s: waited out, drain_s would add 30 s.
    assert gone_after < 15, f"the failing pod was stopped {gone_after:.1f} s after it failed"
    assert g.total > 20 and g.statuses[200] == g.total, f"requests failed during the heal: {g.failures[:5]}"
