"""The router in front of real pods and the real dev server, both engines: where requests go,
what a caller sees when there is nowhere to send them, and who may change the table."""

from __future__ import annotations

import os
import signal

import aiohttp
import psutil
import pytest
from conftest import eventually, seed_spec
from multidict import CIMultiDict
from router_helpers import engine, routed, run_load  # noqa: F401 - fixtures

from hms_mgmt import feed as wire
from hms_mgmt.models import Endpoint, EndpointSet


async def get_json(url: str, **kw) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as r:
        return r.status, CIMultiDict(r.headers), await r.json(content_type=None)


async def test_load_spreads_over_pods_with_request_ids(routed):
    await routed.orch.deploy(seed_spec(min_replicas=3, max_replicas=3), wait=True, timeout=120)
    st = await routed.orch.status("hms-ach")
    table = await routed.wait_pods("hms-ach", 3)
    assert {e["address"] for e in table["endpoints"]} == {p.endpoint for p in st.pods}

    status, headers, body = await get_json(f"{routed.url}/hms-ach/", headers={"X-Request-Id": "req-42"})
    assert status == 200 and body["service"] == "hms-ach"
    assert headers["X-Request-Id"] == "req-42"
    assert headers["X-HMS-Pod"] in {p.id for p in st.pods}
    _, headers, _ = await get_json(f"{routed.url}/hms-ach/health")
    assert headers.get("X-Request-Id"), "a request id is created when the caller sends none"

    await run_load(f"{routed.url}/hms-ach/", concurrency=6, seconds=2, max_requests=200)  # warm connections
    # Time, not a count: P2C on a peak latency estimate keeps a pod that answered slowly once away
    # for about a second, and a few hundred requests take less than that through the router.
    load = await run_load(f"{routed.url}/hms-ach/", concurrency=6, seconds=4, max_requests=100_000)
    assert load.statuses[200] == load.total >= 300, load.failures[:5]
    per_pod = [load.pods[p.id] for p in st.pods]

    # The builtin engine counts every request; the haproxy engine's figures are estimated from
    # sampled log lines (under load one line in k, k = 1 + rate/200, each standing for k): at
    # this load k is about 20, so about 750 lines, whose estimate spreads by about 1/sqrt(750),
    # 4 %: 15 % below is about 4 standard deviations.
    need = load.total if routed.engine == "builtin" else int(load.total * 0.85)

    async def caught_up() -> dict | None:  # the figures are refreshed about every half second
        _, _, stats = await get_json(f"{routed.url}/-/stats")
        return stats if stats["services"]["hms-ach"]["requests"] >= need else None

    stats = await eventually(caught_up, timeout=5, what="the router's figures to count the whole load")
    assert min(per_pod) >= load.total * 0.10, f"load not spread over the 3 pods: {per_pod} {stats}"

    svc = stats["services"]["hms-ach"]
    assert svc["requests"] >= need and svc["error_rate"] == 0 and svc["p99_ms"] >= svc["p50_ms"] > 0
    async with aiohttp.ClientSession() as http, http.get(f"{routed.url}/metrics") as r:
        text = await r.text()
    assert 'hms_router_requests_total{' in text and 'service="hms-ach"' in text
    if routed.engine == "builtin":
        await _every_process_serves_and_is_counted(routed)
    if routed.engine == "haproxy":
        # Pods added at run time keep their connections open: not one connection per request.
        def total(metric: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(metric + "{") and 'service="hms-ach"' in line)

        sent, opened = total("hms_haproxy_server_requests_total"), total("hms_haproxy_server_connections_total")
        assert sent >= load.total and opened < sent / 5, f"{opened:.0f} connections for {sent:.0f} requests"


async def _requests_total(url: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hms_router_requests_total{") and 'service="hms-ach"' in line)


def _listening(port: int) -> set[int]:
    return {c.pid for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}


async def _fresh_gets(url: str, n: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(n):
            async with http.get(url) as r:
                assert r.status == 200 and r.headers["X-HMS-Pod"] and r.headers["X-Request-Id"]


async def _every_process_serves_and_is_counted(routed) -> None:
    """The builtin engine's processes (2 here) all listen on the port, and each new connection
    goes to any of them: requests on 60 fresh connections are counted once each in the
    primary's figures, whichever process answered them. A worker killed is started again."""
    listening = _listening(routed.port)
    assert len(listening) == routed.procs >= 2 and os.getpid() in listening, listening
    before = await _requests_total(routed.url)
    await _fresh_gets(f"{routed.url}/hms-ach/", 60)
    assert await _requests_total(routed.url) == before + 60

    (worker,) = listening - {os.getpid()}
    os.kill(worker, signal.SIGKILL)
    await eventually(lambda: worker not in _listening(routed.port), timeout=10)
    await _fresh_gets(f"{routed.url}/hms-ach/", 20)  # the primary serves meanwhile
    await eventually(lambda: len(_listening(routed.port)) == routed.procs, timeout=60)
    await _fresh_gets(f"{routed.url}/hms-ach/", 20)


async def test_unknown_service_is_404_and_no_ready_pod_is_503(routed):
    status, _, body = await get_json(f"{routed.url}/no-such-svc/x")
    assert status == 404 and body["service"] == "no-such-svc" and body["error"]

    await routed.orch.deploy(seed_spec(name="hms-idle", min_replicas=0, max_replicas=2), wait=True, timeout=60)
    await routed.wait_pods("hms-idle", 0)
    status, headers, body = await get_json(f"{routed.url}/hms-idle/payments")
    assert status == 503 and body["service"] == "hms-idle" and "no ready pod" in body["reason"]
    assert headers["Retry-After"] == "1"


async def test_unsigned_or_forged_feed_push_is_refused(routed, tmp_path):
    await routed.orch.deploy(seed_spec(min_replicas=1, max_replicas=1), wait=True, timeout=120)
    table = await routed.wait_pods("hms-ach", 1)
    evil = EndpointSet(service="hms-ach", version=table["version"] + 10**6,
                       endpoints=[Endpoint(pod="evil", address="127.0.0.1:1")]).model_dump_json().encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{routed.url}/-/feed", data=evil) as r:
            assert r.status == 401
        other = tmp_path / "another-control-plane"  # a well-formed signature by another Ed25519 key
        forged = wire.sign(other, evil)
        async with http.post(f"{routed.url}/-/feed", data=evil, headers={wire.SIGNATURE_HEADER: forged}) as r:
            assert r.status == 401
        # The control plane's own signature over another body, or as a drain question, is no table either.
        for sig in (wire.sign(routed.settings.state_dir, b"{}"), wire.sign(routed.settings.state_dir, evil,
                                                                           kind="drained")):
            async with http.post(f"{routed.url}/-/feed", data=evil, headers={wire.SIGNATURE_HEADER: sig}) as r:
                assert r.status == 401
        stale = wire.sign(routed.settings.state_dir, evil, now=0)  # a replay from long ago
        async with http.post(f"{routed.url}/-/feed", data=evil, headers={wire.SIGNATURE_HEADER: stale}) as r:
            assert r.status == 401
    assert [e["pod"] for e in (await routed.table("hms-ach"))["endpoints"]] == [table["endpoints"][0]["pod"]]
    status, _, _ = await get_json(f"{routed.url}/hms-ach/")
    assert status == 200


@pytest.mark.parametrize("routed", ["process"], indirect=True)
async def test_router_restarted_under_load_recovers_its_table(routed):
    """No push arrives after the restart (the pods do not change): the router must load the
    table from the workflows on its own."""
    import asyncio

    await routed.orch.deploy(seed_spec(min_replicas=2, max_replicas=2), wait=True, timeout=120)
    before = await routed.wait_pods("hms-ach", 2)
    stop = asyncio.Event()
    load = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/", concurrency=4, seconds=30, max_requests=5000,
                                          stop=stop))
    await asyncio.sleep(1.0)
    await routed.stop()
    await asyncio.sleep(0.5)
    await routed.start()
    after = await routed.wait_pods("hms-ach", 2, timeout=10)
    assert after["endpoints"] == before["endpoints"]
    tail = await run_load(f"{routed.url}/hms-ach/", concurrency=4, seconds=3, max_requests=200)
    stop.set()
    during = await load
    assert during.statuses[200] > 0
    assert tail.statuses[200] == tail.total > 0, tail.failures[:5]
