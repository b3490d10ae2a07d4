"""Router test fixtures and helpers (imported by the test modules; a second conftest.py
would shadow tests/conftest.py under pytest's rootdir imports).

 a worker and a router (in this process) against the real dev server.

``routed`` yields a :class:`Routed`: the orchestrator, the router's URL and a way to restart
the router. Pushes from the feed go to this router only (``settings.routers``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
import pytest_asyncio
from conftest import eventually, make_settings, require_docker, sweep_pods, terminate_running

from hms_mgmt import feed
from hms_mgmt.config import Settings
from hms_mgmt.models import Endpoint, EndpointSet
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import cancel_and_wait, free_port
from router import serve
from worker.main import HmsWorker


@pytest.fixture(params=["builtin", "haproxy"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "haproxy" and shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy")
    return request.param


@dataclass
class Routed:
    orch: Orchestrator
    settings: Settings
    engine: str
    port: int
    client: object
    task: asyncio.Task[None] | None = None
    procs: int = 2  # the builtin engine's processes: a primary and a worker

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        ready = asyncio.Event()
        self.task = asyncio.create_task(serve(self.settings, port=self.port, engine=self.engine, ready=ready,
                                              resync_interval_s=1.0, client=self.client, procs=self.procs))
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED, timeout=20)
        if self.task.done():
            self.task.result()
        assert ready.is_set(), "router did not start"
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                async with http.get(f"{self.url}/-/health") as r:
                    if r.status == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError("router never reported healthy (first table load)")

    async def stop(self) -> None:
        if self.task is not None:
            await cancel_and_wait(self.task)
            self.task = None

    async def table(self, service: str) -> dict | None:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/-/table") as r:
            return (await r.json())["services"].get(service)

    async def wait_pods(self, service: str, ready: int, timeout: float = 60.0, without: str | None = None) -> dict:
        """Until the router's table holds ``ready`` ready pods of ``service``, no draining one,
        and not the pod ``without``, and the engine carries that table."""
        deadline = time.monotonic() + timeout
        t = None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                t = await self.table(service)
                if t is not None and sum(e["state"] == "ready" for e in t["endpoints"]) == ready \
                        and len(t["endpoints"]) == ready and without not in {e["pod"] for e in t["endpoints"]} \
                        and t.get("applied_version") == t["version"]:
                    return t
            await asyncio.sleep(0.2)
        raise AssertionError(f"router table for {service} never had {ready} ready pods (without {without}): {t}")


@pytest_asyncio.fixture(loop_scope="session")
async def routed(temporal_env, tmp_path: Path, request: pytest.FixtureRequest, engine: str
                 ) -> AsyncIterator[Routed]:
    async with routed_stack(temporal_env, tmp_path, engine, getattr(request, "param", "process")) as r:
        yield r


@contextlib.asynccontextmanager
async def routed_stack(temporal_env, tmp_path: Path, engine: str, runtime: str = "process",
                       **settings: object) -> AsyncIterator[Routed]:
    """A worker and a started router of ``engine``, with ``settings`` on top of a test's own."""
    if runtime == "docker":
        require_docker()
    port = free_port()
    s = make_settings(temporal_env, tmp_path / "state", runtime, routers=[f"http://127.0.0.1:{port}"], **settings)
    r = Routed(orch=Orchestrator(temporal_env.client, s), settings=s, engine=engine, port=port,
               client=temporal_env.client)
    try:
        async with HmsWorker(temporal_env.client, s):
            await r.start()
            try:
                yield r
            finally:
                await r.stop()
    finally:
        await terminate_running(temporal_env, s)
        sweep_pods(s)




@dataclass
class Load:
    """Results of a bounded load: status per request, and which pod answered."""

    statuses: Counter = field(default_factory=Counter)
    pods: Counter = field(default_factory=Counter)
    failures: list[tuple[int, dict | str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def assert_all_ok(self) -> None:
        """Some requests were sent, and every one of them answered 200."""
        assert self.total > 0
        assert self.statuses[200] == self.total, \
            f"{self.total - self.statuses[200]} of {self.total} GETs failed: {self.failures[:5]}"


async def run_load(url: str, *, concurrency: int, seconds: float, max_requests: int, method: str = "GET",
                   body: bytes | None = None, stop: asyncio.Event | None = None) -> Load:
    """``concurrency`` clients sending back to back until ``seconds``, ``max_requests`` or ``stop``."""
    out = Load()
    deadline = time.monotonic() + seconds
    sent = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < max_requests and not (stop and stop.is_set()):
            sent += 1
            try:
                async with http.request(method, url, data=body, headers={"Content-Type": "application/json"}) as r:
                    try:
                        payload = await r.read()
                    except aiohttp.ClientPayloadError as e:
                        # The pod answered (these headers are its) and died before its body.
                        out.statuses[0] += 1
                        out.failures.append((0, {"reached_pod": True, "status": r.status, "error": str(e)}))
                        continue
                    out.statuses[r.status] += 1
                    out.pods[r.headers.get("X-HMS-Pod", "-")] += 1
                    if r.status >= 400:
                        try:
                            out.failures.append((r.status, json.loads(payload)))
                        except ValueError:
                            out.failures.append((r.status, payload[:200].decode(errors="replace")))
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                out.statuses[0] += 1
                out.failures.append((0, f"{type(e).__name__}: {e}"))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return out


class LoadUnderway:
    """``run_load`` in the background, with a stop of its own: the steady traffic a test keeps on a
    service while it breaks something. ``stop()`` ends it and gives its :class:`Load`."""

    def __init__(self, url: str, *, seconds: float = 120, concurrency: int = 8,
                 max_requests: int = 10_000_000) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(run_load(url, concurrency=concurrency, seconds=seconds,
                                                    max_requests=max_requests, stop=self._stop))

    def running(self, until: str) -> None:
        assert not self._task.done(), f"the load ended before {until}"

    async def linger(self, seconds: float, until: str) -> None:
        """Keep the load on ``seconds`` more; it must not have ended before ``until``."""
        await asyncio.sleep(seconds)
        self.running(until)

    async def stop(self) -> Load:
        self._stop.set()
        return await self._task


async def push_table(router: Any, state_dir: Path, service: str, endpoints: list[Endpoint]) -> None:
    """Push a table signed with the control plane's key, as the feed does, and wait until the router
    (every process of it) carries it: a service no workflow owns, with pods of a test's own."""
    table = EndpointSet(service=service, version=int(time.time() * 1000), endpoints=endpoints)
    body = table.model_dump_json().encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}{feed.FEED_PATH}", data=body,
                             headers={feed.SIGNATURE_HEADER: feed.sign(state_dir, body)}) as r:
            assert r.status == 200, await r.text()

        async def carried() -> bool:
            async with http.get(f"{router.url}/-/table", headers=feed.inspect_headers(state_dir, "/-/table")) as r:
                t = (await r.json())["services"].get(service)
            return t is not None and t.get("applied_version") == table.version

        await eventually(carried, timeout=20, what=f"{service}'s table in every router process")


# --- raw HTTP on both sides: a test's own pods and a caller reading answers off the wire ---------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, method: str = "GET") -> Answer:
    """One HTTP/1.1 answer off a raw connection, which must begin right where the last one ended:
    Content-Length, chunked, or none for HEAD, 204 and 304."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert raw.startswith(b"HTTP/1.1 "), f"not an answer's start: {raw[:60]!r}"
    head = raw.decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    if method == "HEAD" or status in (204, 304):
        return Answer(status, headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).split(b";")[0], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), 10)
            if size == 0:
                return Answer(status, headers, body)
            body += chunk[:-2]
    return Answer(status, headers, await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), 10))


def json_answer(body: object) -> bytes:
    """A pod's 200 answer with ``body`` as JSON."""
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


class RawPodServer:
    """A test's own pod on 127.0.0.1: ``serve`` gets each connection (reader, writer) and the
    connection is closed after it, whatever happens to the caller's side."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


# --- the builtin engine in this process, in front of a raw pod of a test's own ---------------------


class ParsingPod(asyncio.Protocol):
    """A raw pod's protocol that parses requests (llhttp): ``url``, ``headers`` (lowercase names)
    and ``body`` of the one being read; subclasses answer in ``on_message_complete``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.p = httptools.HttpRequestParser(self)
        self.url, self.headers, self.body = b"", [], bytearray()

    def data_received(self, data: bytes) -> None:
        self.p.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def echo(self) -> None:
        """Answer with the request as the pod got it (method, path, headers, body), as JSON."""
        body = json.dumps({"method": self.p.get_method().decode(), "path": self.url.decode("latin-1"),
                           "headers": self.headers, "body": self.body.decode("latin-1")}).encode()
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))


@dataclass
class InProcessRouter:
    port: int
    engine: Any  # router.builtin.BuiltinEngine
    server: Any = None
    pod_port: int = 0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)


@contextlib.asynccontextmanager
async def in_process_router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pod: Any, *,
                            read_timeout_s: float) -> AsyncIterator[InProcessRouter]:
    """The builtin engine's classes as ``python -m router`` runs them (no control plane), its
    timeouts shortened, service ``svc`` served by one pod speaking the protocol ``pod``."""
    from router import http1
    from router.builtin import BuiltinEngine, ControlRelay, ProxyOptions, caller_server
    from router.feed import EndpointTable
    from router.workers import StatsBatch

    monkeypatch.setattr(http1, "HEAD_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(http1, "BODY_SILENCE_S", 2.0, raising=False)
    monkeypatch.setattr(http1, "CALLER_SWEEP_S", 0.2, raising=False)
    loop = asyncio.get_running_loop()
    pods = await loop.create_server(pod, "127.0.0.1", 0)
    pod_port = pods.sockets[0].getsockname()[1]
    table = EndpointTable()
    engine = BuiltinEngine(table, StatsBatch(), ProxyOptions(read_timeout_s=read_timeout_s))
    table.put(EndpointSet(service="svc", version=1, endpoints=[Endpoint(pod="raw", address=f"127.0.0.1:{pod_port}")]))
    server = caller_server(engine, ControlRelay(tmp_path / "no-primary.sock"))
    port = free_port()
    await server.listen("127.0.0.1", port)
    try:
        yield InProcessRouter(port, engine, server, pod_port)
    finally:
        await server.close()
        await engine.close()
        pods.close()


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the router closed (or cut) the connection within ``within`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
