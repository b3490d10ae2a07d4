"""Bytes an outsider (or a bad pod) sends the builtin engine to make it misroute, hang or hoard:
the engine's own classes in this process (router_helpers.in_process_router) in front of a raw pod
that records what it got.

- a trailer field is no header: it cannot mark the request as an upgrade (which glued the next
  request, another caller's through a shared front proxy, onto this one), nor reach the pod;
- a body that breaks after its head went to the pod cuts the connection and the pod's with it;
- a pod whose answer head never ends, or that switches protocols, gets a 502 in bounded time;
- more than 100 header fields: 431; an X-Request-Id that is no id is replaced by ours;
- a connection that sends nothing is closed after the head timeout, not the keep-alive one;
  past the connection cap the longest idle one makes room, and with none idle a new one is refused;
- the bodies one process holds (to send again) are bounded: past the budget they stream.

Both engines meet the trailer attack and the id rule alike (test_hostile_bytes_engines.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from router_helpers import ParsingPod, closed, in_process_router, read_answer

from router import http1

pytestmark = pytest.mark.timeout(60)


class RecordingPod(ParsingPod):
    """Records each connection's bytes; answers ``/echo`` (and anything else) with what it got
    as JSON once the request is whole, ``/endless`` with a head that never ends, ``/switch``
    with ``101``, and ``/hold`` never."""

    conns: list[RecordingPod] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.raw = bytearray()
        self.lost = False
        RecordingPod.conns.append(self)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def on_headers_complete(self) -> None:
        if self.url == b"/endless":
            self.t.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
            asyncio.get_running_loop().call_soon(self._more)
        elif self.url == b"/switch":
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")

    def _more(self) -> None:
        if not self.lost:
            self.t.write(b"a" * (64 << 10))
            asyncio.get_running_loop().call_later(0.01, self._more)

    def on_message_complete(self) -> None:
        if self.url not in (b"/endless", b"/switch", b"/hold"):
            self.echo()
        self.url, self.headers, self.body = b"", [], bytearray()


@pytest.fixture
async def router(tmp_path, monkeypatch):
    RecordingPod.conns = []
    async with in_process_router(tmp_path, monkeypatch, RecordingPod, read_timeout_s=2.0) as r:
        yield r


def pod_heads() -> bytes:
    return b"".join(bytes(c.raw) for c in RecordingPod.conns)


async def test_a_trailer_neither_glues_the_next_request_on_nor_reaches_the_pod(router):
    reader, writer = await router.connect()
    writer.write(b"POST /svc/echo?text= HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"7\r\nstolen=\r\n0\r\nUpgrade: h2c\r\nAuthorization: Bearer from-trailer\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # the next request, as another caller's would come through a shared front proxy
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\nCookie: session=victim\r\n\r\n")
    first, second = await read_answer(reader), await read_answer(reader)
    assert first.status == 200 and first.json()["path"] == "/echo?text=" and first.json()["body"] == "stolen="
    assert second.status == 200 and second.json()["path"] == "/echo", second.body
    assert ["cookie", "session=victim"] in second.json()["headers"]
    assert not any(name in ("authorization", "upgrade") for name, _ in first.json()["headers"]), first.body
    assert b"from-trailer" not in pod_heads() and b"?text=/svc" not in pod_heads()
    writer.close()


@pytest.mark.parametrize("sent", [
    b"POST /svc/hold HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",  # then a bad chunk
    b"POST /svc/hold HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",  # a coding llhttp refuses
])
async def test_a_body_that_breaks_after_its_head_holds_nothing(router, sent):
    reader, writer = await router.connect()
    writer.write(sent)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(b"zz\r\n")
    await writer.drain()
    # Cut at once (not after the 2 s body silence nor the read timeout): the stream cannot be
    # trusted, and whatever went to the pod goes with it.
    assert await closed(reader, 1.5), "the connection was held after its body broke"
    await asyncio.sleep(0.2)
    assert all(c.lost for c in RecordingPod.conns), "the pod's connection was held for a broken body"
    writer.close()


async def test_a_pod_whose_head_never_ends_gets_a_502_in_bounded_time(router):
    reader, writer = await router.connect()
    writer.write(b"GET /svc/endless HTTP/1.1\r\nHost: a\r\n\r\n")
    got = await asyncio.wait_for(read_answer(reader), 10)
    assert got.status == 502 and "larger than" in json.dumps(got.json()), got.body
    await asyncio.sleep(0.2)
    assert RecordingPod.conns and all(c.lost for c in RecordingPod.conns)
    writer.close()


async def test_a_pod_that_switches_protocols_gets_a_502_and_the_router_goes_on(router):
    reader, writer = await router.connect()
    writer.write(b"GET /svc/switch HTTP/1.1\r\nHost: a\r\n\r\n")
    got = await asyncio.wait_for(read_answer(reader), 10)
    assert got.status == 502 and "switched protocols" in got.body.decode(), got.body
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_answer(reader)).status == 200
    writer.close()


async def test_too_many_header_fields_are_refused_and_an_id_that_is_none_is_replaced(router):
    reader, writer = await router.connect()
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\n" + b"a: b\r\n" * 150 + b"\r\n")
    got = await read_answer(reader)
    assert got.status == 431 and "header fields" in got.json()["error"], got.body
    writer.close()
    for sent, kept in (("x" * 200, False), ("bad id with spaces", False), ("i" * 128, True), ("req-42", True)):
        reader, writer = await router.connect()
        writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\nX-Request-Id: %s\r\n\r\n" % sent.encode())
        got = await read_answer(reader)
        seen = dict(got.json()["headers"])["x-request-id"]
        assert (seen == sent) == kept and got.headers["x-request-id"] == seen, (sent, seen)
        writer.close()


async def test_a_connection_that_says_nothing_is_closed_after_the_head_timeout(router):
    silent, w1 = await router.connect()
    served, w2 = await router.connect()
    w2.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_answer(served)).status == 200
    assert await closed(silent, 3.0), "a connection that never sent a byte was kept"
    assert not await closed(served, 1.5), "a kept-alive connection was closed as if it had said nothing"
    w1.close()
    w2.close()


async def test_past_the_connection_cap_the_longest_idle_makes_room_and_none_is_refused_if_all_work(router):
    router.server.max_connections = 3
    conns = [await router.connect() for _ in range(3)]
    await asyncio.sleep(0.1)
    reader, writer = await router.connect()  # the 4th: the longest idle (the first) is closed for it
    writer.write(b"GET /svc/echo HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_answer(reader)).status == 200
    assert await closed(conns[0][0], 2.0)
    for _, w in conns[1:]:  # the others now each begin a request (a head under way: not idle)
        w.write(b"GET /svc/echo HTTP/1.1\r\n")
    writer.write(b"GET /svc/echo HTTP/1.1\r\n")
    await asyncio.sleep(0.1)
    late, late_w = await router.connect()
    assert await closed(late, 2.0), "a connection past the cap was taken while none was idle"
    for r, w in conns[1:]:
        w.write(b"Host: a\r\n\r\n")
        assert (await read_answer(r)).status == 200  # the working ones were kept
    for _, w in [*conns, (reader, writer), (late, late_w)]:
        w.close()


async def test_bodies_held_to_send_again_are_bounded_then_stream(router, monkeypatch):
    monkeypatch.setattr(http1, "BUFFER_BUDGET", 1000)
    reader, writer = await router.connect()
    writer.write(b"POST /svc/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n" + b"x" * 500)
    await writer.drain()
    await asyncio.sleep(0.5)
    # Over the budget: sent on as it comes (before: held whole, the pod reached only at its end).
    assert b"POST /echo" in pod_heads(), "a body over the budget was held"
    writer.write(b"x" * 1500)
    got = await read_answer(reader)
    assert got.status == 200 and len(got.json()["body"]) == 2000
    # Within it: held whole first (so that it can be sent again), then the budget is given back.
    RecordingPod.conns = []
    writer.write(b"POST /svc/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 800\r\n\r\n" + b"y" * 300)
    await writer.drain()
    await asyncio.sleep(0.5)
    assert b"POST /echo" not in pod_heads()
    writer.write(b"y" * 500)
    assert (await read_answer(reader)).status == 200
    assert router.server.reserved == 0
    writer.close()
