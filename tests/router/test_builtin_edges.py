"""The builtin engine's data path at its edges, as a caller and a pod see it: the engine's own
classes (:class:`router.builtin.BuiltinEngine` behind :func:`router.builtin.caller_server`, as
``python -m router`` runs them, in this process, no control plane) in front of a raw pod that
says exactly what the test wants said on the wire.

- a request head that never ends (one endless header line) is refused 431 and the connection
  closed; a head that stops arriving is answered 408 and closed;
- a pod's answer delimited by closing its connection reaches an HTTP/1.1 caller whole (chunked,
  its last chunk included) and counts as a success;
- a request asking for an upgrade (``curl --http2``'s ``Upgrade: h2c``) reaches the pod with its
  body, as a plain request;
- a pod that answers a HEAD with a body does not corrupt the caller's next answer;
- an upload slower than the read timeout is not cut by it; a pod that does not answer still is;
- a request body that stops arriving does not hold the connection for ever;
- a caller that sends requests and never reads the answers holds a bounded buffer.

The timeouts are shortened for the test (module constants and ``ProxyOptions``)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from router_helpers import ParsingPod, closed, in_process_router, read_answer

from router import http1

pytestmark = pytest.mark.timeout(60)

READ_TIMEOUT_S = 2.0


class RawPod(ParsingPod):
    """``/echo``: the request as the pod got it, in JSON; ``/close``: an answer without length,
    ended by closing; ``/headbody``: ``Content-Length: 5`` and ``hello``, to a HEAD too;
    ``/silent``: no answer at all."""

    def on_message_complete(self) -> None:
        path = self.url.decode("latin-1")
        if path == "/close":
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, read to close")
            self.t.close()
        elif path == "/headbody":
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        elif path != "/silent":
            self.echo()
        self.url, self.headers, self.body = b"", [], bytearray()


@pytest.fixture
async def router(tmp_path, monkeypatch):
    async with in_process_router(tmp_path, monkeypatch, RawPod, read_timeout_s=READ_TIMEOUT_S) as r:
        yield r


async def test_an_endless_header_line_is_refused_431(router):
    reader, writer = await router.connect()
    answer = asyncio.ensure_future(read_answer(reader))
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\nX-A: ")
    sent = 0
    try:
        while not answer.done() and sent < 4 << 20:  # a head without end: 64 KiB at a time
            writer.write(b"a" * (64 << 10))
            sent += 64 << 10
            await writer.drain()
            await asyncio.sleep(0.01)
    except ConnectionError:
        pass
    got = await answer
    assert got.status == 431 and "larger than" in got.json()["error"], got.body
    assert sent <= 4 * http1.MAX_HEAD_BYTES, f"refused only after {sent} bytes"
    assert got.headers["connection"] == "close" and await closed(reader, 5)
    writer.close()


async def test_a_head_that_stops_arriving_is_answered_408(router):
    reader, writer = await router.connect()
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\nX-A: b")
    got = await asyncio.wait_for(read_answer(reader), 8)
    assert got.status == 408 and got.json()["error"], got.body
    assert await closed(reader, 5)
    writer.close()
    # Heads sent whole, or slowly but within the deadline, are served.
    reader, writer = await router.connect()
    for piece in (b"GET /svc/echo HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n"):
        writer.write(piece)
        await asyncio.sleep(0.3)
    assert (await read_answer(reader)).status == 200
    writer.close()


async def test_an_answer_ended_by_the_pods_close_reaches_a_1_1_caller_whole(router):
    reader, writer = await router.connect()
    writer.write(b"GET /svc/close HTTP/1.1\r\nHost: a\r\n\r\n")
    got = await read_answer(reader)
    assert got.status == 200 and got.headers["transfer-encoding"] == "chunked"
    assert got.body == b"hello, read to close"
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\n\r\n")  # the caller's connection is still good
    assert (await read_answer(reader)).status == 200
    writer.close()
    pod = router.engine.pools["svc"].pods["raw"]
    assert pod.consecutive_failures == 0 and pod.total_ejections == 0
    # An HTTP/1.0 caller gets it as before: delimited by our close.
    reader, writer = await router.connect()
    writer.write(b"GET /svc/close HTTP/1.0\r\nHost: a\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 10)
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\nhello, read to close")
    writer.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_request_asking_for_an_upgrade_reaches_the_pod_with_its_body(router, chunked):
    reader, writer = await router.connect()
    head = (b"POST /svc/echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Type: text/plain\r\n")
    if chunked:
        writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n")
        await asyncio.sleep(0.1)
        writer.write(b"5\r\nworld\r\n0\r\n\r\n")
    else:
        writer.write(head + b"Content-Length: 11\r\n\r\nhello")
        await asyncio.sleep(0.1)
        writer.write(b" world")
    got = await read_answer(reader)
    assert got.status == 200, got.body
    seen = got.json()
    assert seen["method"] == "POST" and seen["body"] == "hello world", seen
    names = {name for name, _ in seen["headers"]}
    assert not names & {"upgrade", "connection", "http2-settings"}, seen["headers"]
    writer.close()


async def test_a_body_to_a_head_does_not_reach_the_caller(router):
    reader, writer = await router.connect()
    for _ in range(3):
        writer.write(b"HEAD /svc/headbody HTTP/1.1\r\nHost: a\r\n\r\n")
        got = await read_answer(reader, "HEAD")
        assert got.status == 200 and got.headers["content-length"] == "5"
        writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\n\r\n")
        got = await read_answer(reader)
        assert got.status == 200 and got.json()["path"] == "/echo"
    writer.close()


async def test_an_upload_slower_than_the_read_timeout_is_not_cut(router):
    reader, writer = await router.connect()
    writer.write(b"POST /svc/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    pieces = int(READ_TIMEOUT_S * 2 / 0.4) + 1  # twice the read timeout, a piece every 0.4 s
    for i in range(pieces):
        writer.write(b"2\r\n%02d\r\n" % i)
        await writer.drain()
        await asyncio.sleep(0.4)
    writer.write(b"0\r\n\r\n")
    got = await read_answer(reader)
    assert got.status == 200, got.body
    assert got.json()["body"] == "".join(f"{i:02d}" for i in range(pieces))
    # A pod that does not answer a request it has whole still runs into the read timeout.
    writer.write(b"POST /svc/silent HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    got = await read_answer(reader)
    assert got.status == 504, got.body
    writer.close()


@pytest.mark.parametrize("framing", [b"Content-Length: 100", b"Transfer-Encoding: chunked"])
async def test_a_body_that_stops_arriving_does_not_hold_the_connection(router, framing):
    reader, writer = await router.connect()
    first = b"2\r\nab\r\n" if b"chunked" in framing else b"ab"
    writer.write(b"POST /svc/echo HTTP/1.1\r\nHost: a\r\n%s\r\n\r\n%s" % (framing, first))
    assert await closed(reader, 10), "a silent request body held the connection"
    writer.close()


async def test_a_caller_that_never_reads_holds_a_bounded_buffer(router):
    """Requests the router answers itself (an unknown service: 404), sent for 3 s by a caller
    that reads nothing: the router stops reading it once its answers back up, so what it keeps
    for that caller stays near the transport's high-water mark (it grew by tens of MB)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", router.port))
    request = b"GET /nosuch/x HTTP/1.1\r\nHost: a\r\n\r\n" * 64
    sent, began = 0, time.monotonic()
    try:
        while time.monotonic() - began < 3.0:
            try:
                sent += sock.send(request)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        (caller,) = [c for c in router.server.connections if c.transport is not None]
        buffered = caller.transport.get_write_buffer_size()
        assert buffered < 2 << 20, f"{buffered} bytes of answers kept for a caller that reads nothing ({sent} sent)"
        assert "writing" in caller._pauses
    finally:
        sock.close()


async def test_an_absolute_form_request_reaches_its_service(router):
    """``GET http://host/svc/echo`` (what a client speaking to a proxy sends) is served as
    ``/svc/echo``: RFC 9112 says a server must accept it (it was 404 ``unknown service "http:"``)."""
    reader, writer = await router.connect()
    try:
        writer.write(b"GET http://127.0.0.1:%d/svc/echo?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % router.port)
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.json()["path"] == "/echo?x=1", answer.body
    finally:
        writer.close()
