"""The builtin engine's data path as a caller and a pod see it, through the real router process
(``python -m router``, two processes sharing the port) in front of real process pods, against the
real dev server: a caller's connection carries many requests (pipelined ones too, HEAD, and
``Connection: close`` honoured); connections to pods are kept and reused, not opened per
request; bodies stream chunked both ways; a pod that refuses connections costs no request (GET
or POST), the refused tries are counted as retries, and a service whose only pod refuses answers
502 saying so. Every proxied answer carries ``X-HMS-Pod`` and ``X-Request-Id``.

Tables for services no workflow owns (a chunked-streaming server in this test, a refusing
address) are pushed as the control plane pushes them: signed with its key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web
from conftest import eventually, make_settings, seed_spec, sweep_pods, terminate_running
from router_helpers import push_table, read_answer

from hms_mgmt import feed
from hms_mgmt.events import read_events
from hms_mgmt.models import Endpoint
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import free_port
from router.server import RouterProcess
from worker.main import HmsWorker

pytestmark = pytest.mark.timeout(300)

PAYMENT = json.dumps({"amount": 12.5, "account": "DE-1234-5678", "currency": "EUR"}).encode()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: router.test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.timeout(300)
async def test_the_lean_data_path_end_to_end(temporal_env, tmp_path, monkeypatch):
    port = free_port()
    s = make_settings(temporal_env, tmp_path / "state", "process", routers=[f"http://127.0.0.1:{port}"])
    monkeypatch.setenv("HMS_ROUTER_PROCS", "2")
    router = RouterProcess(s, port=port, engine="builtin", log_path=tmp_path / "router.log")
    try:
        async with HmsWorker(temporal_env.client, s):
            router.start()
            await router.wait_ready(30)
            orch = Orchestrator(temporal_env.client, s)
            await orch.deploy(seed_spec(min_replicas=2, max_replicas=2), wait=True, timeout=120)
            pods = {p.id: p.endpoint for p in (await orch.status("hms-ach")).pods}
            await eventually(lambda: _routes(router, "hms-ach", set(pods)), timeout=60, what="both pods routed")
            await check_caller_connection(router, set(pods))
            await check_pod_connections_reused(router, set(pods.values()))
            await check_chunked_both_ways(router, s.state_dir)
            await check_refusing_pod(router, s.state_dir, next(iter(pods.values())))
            await check_refusal_names_the_caller(router, s.state_dir)
    finally:
        router.stop()
        await terminate_running(temporal_env, s)
        sweep_pods(s)


async def _routes(router: RouterProcess, service: str, pods: set[str]) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{router.url}/-/table") as r:
        t = (await r.json())["services"].get(service)
    return t is not None and t.get("applied_version") == t["version"] and \
        {e["pod"] for e in t["endpoints"] if e["state"] == "ready"} == pods


async def check_caller_connection(router: RouterProcess, pods: set[str]) -> None:
    """Two pipelined GETs, a HEAD, a POST and a ``Connection: close`` GET on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        writer.write(request("GET", "/hms-ach/", "X-Request-Id: first") + request("GET", "/hms-ach/health"))
        first, second = await read_answer(reader), await read_answer(reader)
        assert (first.status, second.status) == (200, 200)
        assert first.headers["x-request-id"] == "first" and len(second.headers["x-request-id"]) == 32
        assert {first.headers["x-hms-pod"], second.headers["x-hms-pod"]} <= pods
        assert json.loads(first.body)["service"] == "hms-ach"

        writer.write(request("HEAD", "/hms-ach/"))
        head = await read_answer(reader, "HEAD")
        assert head.status == 200 and int(head.headers["content-length"]) > 0 and head.headers["x-hms-pod"] in pods
        writer.write(request("POST", "/hms-ach/payments", "Content-Type: application/json", body=PAYMENT))
        posted = await read_answer(reader)
        assert posted.status == 202 and json.loads(posted.body)["status"] == "accepted", posted.body

        writer.write(request("GET", "/hms-ach/", "Connection: close"))
        last = await read_answer(reader)
        assert last.status == 200 and last.headers["connection"].lower() == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b"", "the router kept a closed connection open"
    finally:
        writer.close()


def _to_pods(addresses: set[str]) -> int:
    """TCP connections on this host (any state: a closed one lingers in TIME_WAIT) to these pods."""
    ports = {int(a.rsplit(":", 1)[1]) for a in addresses}
    return sum(1 for c in psutil.net_connections("tcp") if c.raddr and c.raddr.port in ports)


async def check_pod_connections_reused(router: RouterProcess, addresses: set[str]) -> None:
    """400 GETs, 4 at a time, from callers that open a connection per request: the pods see a
    handful of connections (kept and reused), not one per request."""
    before = _to_pods(addresses)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async def caller() -> None:
            for _ in range(100):
                async with http.get(f"{router.url}/hms-ach/") as r:
                    assert r.status == 200 and r.headers["X-HMS-Pod"] and r.headers["X-Request-Id"]
                    await r.read()

        await asyncio.gather(*(caller() for _ in range(4)))
    opened = _to_pods(addresses) - before
    assert opened < 40, f"{opened} new connections to the pods for 400 requests"


async def stream_server() -> tuple[web.AppRunner, int]:
    """A pod of our own that answers in chunks (no Content-Length) and echoes a streamed upload."""
    async def chunks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"X-Echo-Length": str(len(await request.read()))})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part-{i};".encode() * 1000)
            await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", chunks)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def check_chunked_both_ways(router: RouterProcess, state_dir: Path) -> None:
    """A chunked upload, sent in pieces with pauses, reaches the pod whole; a chunked answer
    reaches the caller whole, still chunked. And the same for a real pod: hms-ach takes a
    chunked payment."""
    runner, port = await stream_server()
    try:
        await push_table(router, state_dir, "lean-stream", [Endpoint(pod="streamer", address=f"127.0.0.1:{port}")])
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        try:
            for path, body in (("/lean-stream/upload", b"x" * 300_000), ("/hms-ach/payments", PAYMENT)):
                writer.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                             "Content-Type: application/json\r\n\r\n".encode())
                for i in range(0, len(body), 100_000 if len(body) > 1000 else 20):
                    piece = body[i:i + (100_000 if len(body) > 1000 else 20)]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")
                answer = await read_answer(reader)
                if path.startswith("/lean-stream"):
                    assert answer.status == 200 and answer.headers["transfer-encoding"] == "chunked"
                    assert answer.headers["x-echo-length"] == str(len(body))
                    assert answer.body == b"".join(f"part-{i};".encode() * 1000 for i in range(5))
                    assert answer.headers["x-hms-pod"] == "streamer" and answer.headers["x-request-id"]
                else:
                    assert answer.status == 202 and json.loads(answer.body)["status"] == "accepted", answer.body
        finally:
            writer.close()
    finally:
        await runner.cleanup()


async def check_refusing_pod(router: RouterProcess, state_dir: Path, live: str) -> None:
    """A service of two pods, one refusing connections: every GET and POST answers from the
    other, and the refused tries are retries. With only the refusing pod: 502, saying so."""
    dead = f"127.0.0.1:{free_port()}"
    await push_table(router, state_dir, "lean-retry", [Endpoint(pod="refuses", address=dead),
                                                        Endpoint(pod="answers", address=live)])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(60):
            method, path, body = ("POST", "/lean-retry/payments", PAYMENT) if i % 3 == 0 else ("GET", "/lean-retry/", None)
            async with http.request(method, f"{router.url}{path}", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                assert r.status in (200, 202), (method, r.status, await r.text())
                assert r.headers["X-HMS-Pod"] == "answers" and r.headers["X-Request-Id"]
        async with http.get(f"{router.url}/-/stats") as r:
            stats = (await r.json())["services"]["lean-retry"]
        assert stats["retries"] >= 1 and stats["errors"] == 0, stats

        await push_table(router, state_dir, "lean-retry", [Endpoint(pod="refuses", address=dead)])
        async with http.get(f"{router.url}/lean-retry/x", headers={"X-Request-Id": "doomed"}) as r:
            body = await r.json()
            assert r.status == 502 and r.headers["X-HMS-Pod"] == "refuses" and r.headers["X-Request-Id"] == "doomed"
        assert body["reached_pod"] is False and body["pod"] == "refuses" and body["service"] == "lean-retry"
        assert body["error"].startswith("could not connect to pod") and body["attempts"] >= 1, body


async def check_refusal_names_the_caller(router: RouterProcess, state_dir: Path) -> None:
    """An unsigned feed push, relayed by whichever process took it to the primary's control
    socket: refused, and the refusal names the caller's address, not the relay's (nor what the
    caller claims in ``X-Forwarded-For``)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(4):  # new connections: both processes relay some
            async with http.post(f"{router.url}{feed.FEED_PATH}", data=b"{}",
                                 headers={"X-Forwarded-For": "203.0.113.9"}) as r:
                assert r.status == 401
    refused = [e for e in read_events(state_dir) if e.type == "access.denied"
               and e.data.get("action") == "router_feed"]
    assert len(refused) == 4 and {e.data["remote"] for e in refused} == {"127.0.0.1"}, refused
