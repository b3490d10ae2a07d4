"""The node's log port against whoever reaches it, no grant needed: connections that send nothing
or trickle a head are closed after a deadline (a request being answered is not); connections over
the caps are closed at the accept while another address's snapshot still answers; a key of
undecodable bytes is "no key" (401, recorded); a bogus grant or a huge ``tail`` is a refusal,
never a 500 or Python's own words; an EMFILE storm is one log line per interval.

A real ``LogServer`` (the worker's, through ``webserve.serve_app``) over a stand-in runtime."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from hms_mgmt import logstream, tickets, webserve
from hms_mgmt.events import EventSink, read_events

SERVICE = "hms-ach"
POD = str(uuid.uuid4())


class Runtime:
    node = "n1"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def find(self, pod: str):
        return SimpleNamespace(service=SERVICE, state="running") if pod == POD else None

    def logs(self, pod: str, tail: int) -> list[str]:
        time.sleep(self.delay)
        return [f"line {i}" for i in range(min(tail, 3))]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    tickets.ensure_control_key(tmp_path)
    return tmp_path


def grant(state: Path, kh: str, pods: list[str] | None = None) -> str:
    now = int(time.time())
    return tickets.sign_claims(state, {"typ": "grant", "act": "logs", "svc": SERVICE, "sub": "vic", "role": "viewer",
                                       "bind": logstream.grant_bind(pods or [POD], kh), "iat": now, "exp": now + 300})


async def serve(state: Path, runtime: Runtime | None = None):
    server = logstream.LogServer(runtime or Runtime(), state, sink=EventSink(state))  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    return server


async def raw(port: int, data: bytes, *, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request as bytes on a connection of its own: the status and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds."""
    try:
        await asyncio.wait_for(reader.read(), within)  # whatever is left of an answer, then the end
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def snapshot(port: int, state: Path) -> int:
    key, kh = logstream.new_key()
    headers = {"Authorization": f"Bearer {grant(state, kh)}", logstream.KEY_HEADER: key}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v1/pods/{POD}/logs"
        async with session.get(url, params={"service": SERVICE, "tail": "3"}, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.text()
            assert "end of snapshot" in body or resp.status != 200
            return resp.status


async def test_silent_and_trickling_connections_are_closed(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webserve, "HEAD_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr(webserve, "IDLE_TIMEOUT_S", 1.0, raising=False)
    server = await serve(state, Runtime(delay=2.5))
    try:
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", server.port)
        trickle_r, trickle_w = await asyncio.open_connection("127.0.0.1", server.port)
        trickle_w.write(f"GET /v1/pods/{POD}/logs HTTP/1.1\r\nHost: x\r\n".encode())

        async def trickle() -> None:
            for i in range(100):
                if trickle_r.at_eof():
                    return
                trickle_w.write(f"X-Slow-{i}: a\r\n".encode())
                await asyncio.sleep(0.1)

        feeding = asyncio.create_task(trickle())
        assert await closed(silent_r, 5), "a connection that sent nothing is still open"
        assert await closed(trickle_r, 5), "a connection trickling its head is still open"
        feeding.cancel()
        for w in (silent_w, trickle_w):
            w.close()

        # A request that takes longer than both deadlines to answer is answered whole; then, with
        # nothing more sent, its connection is closed once idle.
        key, kh = logstream.new_key()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write((f"GET /v1/pods/{POD}/logs?service={SERVICE}&tail=3 HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {grant(state, kh)}\r\n{logstream.KEY_HEADER}: {key}\r\n\r\n").encode())
        answer = await asyncio.wait_for(reader.readuntil(b"end of snapshot"), 10)
        assert answer.startswith(b"HTTP/1.1 200") and b"line 2" in answer
        assert await closed(reader, 5), "an idle kept-alive connection is still open"
        writer.close()
    finally:
        await server.stop()


async def test_connections_over_the_caps_are_closed_and_others_still_read(state: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webserve, "MAX_CONNECTIONS", 10, raising=False)
    monkeypatch.setattr(webserve, "MAX_PER_PEER", 4, raising=False)
    server = await serve(state)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def knock(source: str) -> bool:
        """Connect from ``source`` and send nothing: whether the connection is kept."""
        r, w = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))
        held.append((r, w))
        return not await closed(r, 0.5)

    try:
        # One address's idle connections: 4 kept, the rest closed at once.
        assert [await knock("127.0.0.2") for _ in range(6)] == [True] * 4 + [False] * 2
        assert await snapshot(server.port, state) == 200  # another address still reads
        # Every address's: at most 10 in all; past that, the connection idle longest makes room,
        # so that idle connections held open cannot lock a reader out.
        kept = [await knock(f"127.0.0.{3 + i // 4}") for i in range(8)]
        assert kept == [True] * 8
        assert [await closed(r, 0.5) for r, _w in held[:4]] == [True, True, False, False]  # 127.0.0.2's oldest
        assert await snapshot(server.port, state) == 200
    finally:
        for _r, w in held:
            w.close()
        await server.stop()


async def test_undecodable_key_is_no_key_and_recorded(state: Path) -> None:
    server = await serve(state)
    try:
        _key, kh = logstream.new_key()
        request = (f"GET /v1/pods/{POD}/logs?service={SERVICE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   f"Authorization: Bearer {grant(state, kh)}\r\n").encode()
        status, body = await raw(server.port, request + logstream.KEY_HEADER.encode() + b": \xff\xfe\r\n\r\n")
        assert status == 401, body
        assert b"Traceback" not in body and b"UnicodeEncodeError" not in body
        status, _ = await raw(server.port, request + f"{logstream.KEY_HEADER}: {'k' * 200}\r\n\r\n".encode())
        assert status == 401
    finally:
        await server.stop()
    denied = [e for e in read_events(state) if e.type == "access.denied" and "log stream" in e.reason]
    assert len(denied) == 2 and all("no key" in e.reason for e in denied), denied


async def test_bogus_grant_and_huge_tail_are_refusals_without_pythons_words(state: Path) -> None:
    server = await serve(state)
    key, kh = logstream.new_key()
    url = f"http://127.0.0.1:{server.port}/v1/pods"
    huge = "9" * 5000
    try:
        async with aiohttp.ClientSession() as session:
            async def get(pod: str, grant_: str, tail: str, service: str = SERVICE) -> tuple[int, str]:
                headers = {"Authorization": f"Bearer {grant_}", logstream.KEY_HEADER: key}
                async with session.get(f"{url}/{pod}/logs", params={"service": service, "tail": tail},
                                       headers=headers) as resp:
                    return resp.status, await resp.text()

            # No valid grant: refused whatever else is wrong, and recorded.
            for pod, grant_, tail in [(POD, "bogus", huge), ("not-a-pod", "bogus", "5"), (POD, "a.b.c", "5"),
                                      (POD, "\u00e9\u00e9.\u00e9", "5")]:
                status, body = await get(pod, grant_, tail)
                assert status in (401, 403), (pod, grant_, status, body)
                assert "4300" not in body and "Traceback" not in body
            # A valid grant with a huge or bad tail: 400, in the node's words.
            for tail in (huge, "-1", "1e3", "10001", "\u0661\u0662"):
                status, body = await get(POD, grant(state, kh), tail)
                assert status == 400, (tail, status, body)
                assert "4300" not in body and "Exceeds" not in body and tail not in body
            status, body = await get(POD, grant(state, kh), "2")
            assert status == 200 and "line 1" in body
            # A good grant asked for another "service" that is a terminal escape: refused, recorded clean.
            status, _ = await get(POD, grant(state, kh), "2", service="\x1b[2J\x1b]0;owned\x07")
            assert status == 403
    finally:
        await server.stop()
    denied = [e for e in read_events(state) if e.type == "access.denied" and "log stream" in e.reason]
    assert len(denied) == 5, [e.reason for e in denied]
    assert not [e for e in denied if "\x1b" in e.service or "\x1b" in e.reason]


async def test_accept_errors_are_one_line_per_interval(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    # What asyncio writes each time an accept fails with EMFILE, 500 times over: one line.
    servers = [await serve(state), await serve(state)]  # the filter is installed once
    for server in servers:
        await server.stop()
    flt = next((f for f in logging.getLogger("asyncio").filters if type(f).__name__ == "AcceptErrorFilter"), None)
    assert flt is not None, "nothing limits asyncio's accept errors"
    flt.last = 0.0  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(500):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logging.getLogger("asyncio").error("socket.accept() out of system resource", exc_info=True)
        logging.getLogger("asyncio").error("something else")
    lines = [r for r in caplog.records if r.name == "asyncio"]
    assert len(lines) == 2 and "Too many open files" in lines[0].getMessage() and lines[0].exc_info is None
    assert sum(f is flt for f in logging.getLogger("asyncio").filters) == 1



@pytest.mark.parametrize("hard", [200_000, -1])
def test_worker_raises_its_open_files_limit_to_a_cap(hard: int, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # A worker started with a soft 200 and a hard 200,000 (or none): the soft limit goes to 65,536, logged.
    import resource

    from worker.main import raise_open_files_limit

    hard = resource.RLIM_INFINITY if hard < 0 else hard
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _what: (200, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _what, limits: set_to.append(limits))
    with caplog.at_level(logging.INFO, logger="hms.worker"):
        assert raise_open_files_limit(100) == 65536
    assert set_to == [(65536, hard)]
    assert [r.getMessage() for r in caplog.records if "raised" in r.getMessage()] == [
        f"open files limit raised from 200 to 65536 (hard {hard})"]
