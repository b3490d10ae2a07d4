"""The builtin engine's HTTP/1.1 data path: asyncio protocols with httptools (llhttp) parsers.

A proxy spends most of its time on per-request objects; a general web framework makes a dozen
(request, multidicts, URL, payload streams, response, writer) where a proxy needs a parser and a
byte string each way. So:

- :class:`CallerConnection` — one caller's keep-alive connection: parses requests as they come
  (pipelined ones queue), serves them one after another in one task per connection, and writes
  each response as few ``write`` calls as the pod's answer allows (head and a small body in one);
- :class:`PodPool` — per pod address, idle keep-alive connections (most recently used first);
  a connection leaves the pool when its pod closes it, when it idled ``POD_IDLE_S``, or when
  :meth:`PodPool.cut` aborts every connection to pods that left the table;
- :class:`Exchange` — one request on one pod connection: sends it (a body buffered, or streamed
  as it arrives, with the caller's framing), and relays the answer as it arrives, with back
  pressure both ways (a caller that reads slowly pauses the pod's socket, a pod that reads slowly
  pauses the caller's). Its :class:`Outcome` says whether anything reached the caller, so the
  engine knows what may still be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import re
import resource
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

log = logging.getLogger("hms.router.http1")

MAX_HEAD_BYTES = 64 << 10  # a request line and headers past this are refused (431); a pod's answer head too (502)
MAX_HEADERS = 100  # header fields per request, as HAProxy's default (tune.http.maxhdr 101): more are refused (431)
MAX_REQUEST_ID = 128  # a caller's X-Request-Id longer than this (or not visible ASCII) is replaced by ours
HEAD_TIMEOUT_S = 15.0  # a request head not whole this long after it began is answered 408
BODY_SILENCE_S = 60.0  # a request body that got no byte for this long: the caller's connection is cut
CALLER_SWEEP_S = 1.0  # how often callers' connections are checked (idle, a slow head, a silent body)
MAX_PIPELINED = 32  # requests parsed ahead of the one being served; reading pauses beyond
CALLER_IDLE_S = 75.0  # an idle caller's connection is closed after this (aiohttp's default)
POD_IDLE_S = 30.0  # an idle pooled connection to a pod is not used again after this
MAX_IDLE_PER_POD = 256  # idle connections kept per pod; more are closed
BODY_HIGH_WATER = 256 << 10  # a streamed request body buffered past this pauses the caller
BUFFER_BYTES = 1 << 20  # request bodies of known length up to this are held, so that they can be sent again
# What one process holds of such bodies at once. Past it a body streams (and is not sent again):
# callers that trickle bodies in cannot make the router hold more than this.
BUFFER_BUDGET = 64 << 20
MAX_CONNECTIONS = 4000  # callers' connections per process at most (the haproxy engine's maxconn)

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"http2-settings", b"host"})
NO_BODY_STATUSES = frozenset({204, 304})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# Outcome kinds
RELAYED = "relayed"  # the pod's answer reached the caller whole
REFUSED_STATUS = "status"  # a retryable status (502/503), read and dropped: nothing reached the caller
TIMEOUT = "timeout"  # no byte from the pod for the read timeout, before its answer began
LOST = "lost"  # the connection failed before the pod's answer began
TRUNCATED = "truncated"  # the connection failed after the answer began: the caller's connection is cut
CALLER_LEFT = "caller-left"  # the caller closed its connection while the pod was answering or being sent to

_REASONS: dict[int, bytes] = {}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        reason = _REASONS.get(status)
        if reason is None:
            try:
                reason = _REASONS[status] = http.HTTPStatus(status).phrase.encode()
            except ValueError:
                reason = _REASONS[status] = b"Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Request:
    """One parsed request: method, target, headers as received, and its body as it arrives."""

    __slots__ = ("method", "target", "headers", "version", "keep_alive", "length", "chunked", "complete",
                 "chunks", "buffered", "sink", "discard", "streamed", "expect_continue", "request_id",
                 "forwarded_for", "host", "caller", "upgrade", "reserved", "stream_only", "_waiter")

    def __init__(self, caller: CallerConnection) -> None:
        self.caller = caller
        self.method = ""
        self.target = ""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lowercase name, name, value)
        self.version = "1.1"
        self.keep_alive = True
        self.length: int | None = None
        self.chunked = False
        self.complete = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.sink: Exchange | None = None  # the exchange the body streams to, once it is sent
        self.discard = False  # nobody wants the rest of the body (answered without it)
        self.streamed = False  # part of the body went to a pod and is no longer held
        self.expect_continue = False
        self.request_id: str | None = None
        self.forwarded_for: str | None = None
        self.host: str | None = None
        # It asked for an upgrade (never proxied) and has a body: llhttp would end it at its head,
        # so its body is read by an :class:`_UpgradeBody` parser and it is served as a plain request.
        self.upgrade = False
        self.reserved = 0  # bytes of the server's BUFFER_BUDGET this request's body holds
        self.stream_only = False  # the budget was spent: its body streams, whatever its length
        self._waiter: asyncio.Future[None] | None = None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    @property
    def buffers_body(self) -> bool:
        """A body of known length up to :data:`BUFFER_BYTES` is read whole before any pod is tried (so that
        it can be sent again); a longer or chunked one streams."""
        return self.length is not None and self.length <= BUFFER_BYTES and not self.chunked and not self.stream_only

    def header_block(self, exclude: frozenset[bytes]) -> bytes:
        return b"".join([b"%s: %s\r\n" % (name, value) for lname, name, value in self.headers if lname not in exclude])

    def _feed(self, chunk: bytes) -> None:
        if self.sink is not None:
            self.sink.send_body(chunk)
        elif not self.discard:
            self.chunks.append(chunk)
            self.buffered += len(chunk)
            if self.buffered > BODY_HIGH_WATER and not self.buffers_body:
                self.caller.pause("body")

    def _finish(self) -> None:
        self.complete = True
        if self.sink is not None:
            self.sink.end_body()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _lost(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the caller closed the connection"))

    def _continue(self) -> None:
        if self.expect_continue:
            self.expect_continue = False
            self.caller.write(CONTINUE)
            self.caller.flush()

    async def read(self) -> bytes:
        """The whole body (buffered bodies only); raises ConnectionResetError if the caller left."""
        self._continue()
        if not self.complete:
            if self.caller.closed:
                raise ConnectionResetError("the caller closed the connection")
            self._waiter = self.caller.loop.create_future()
            await self._waiter
        return b"".join(self.chunks)

    def take_chunks(self, sink: Exchange) -> list[bytes]:
        """Start streaming to ``sink``: what arrived so far; the rest goes straight to it."""
        self._continue()
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        self.sink = sink
        self.streamed = self.streamed or bool(chunks)
        self.caller.resume("body")
        return chunks

    def detach(self, sink: Exchange) -> None:
        if self.sink is sink:
            self.sink = None
            self.discard = True


Handler = Callable[["CallerConnection", Request], Awaitable[None]]
# Starts a request without a body at once, its end a callback: None if it declines (the request
# then goes to the Handler), True if under way (it calls CallerConnection.done), False if answered.
Starter = Callable[["CallerConnection", Request], "bool | None"]


class CallerConnection(asyncio.Protocol):
    """One caller's connection (see the module's docstring)."""

    def __init__(self, server: CallerServer) -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.queue: deque[Request] = deque()
        self.parsing: Request | None = None
        self.head_bytes = 0  # the head being parsed: its target and the headers whole so far
        self.head_raw = 0  # ... and the bytes that came while it was not whole (a header line not ended yet)
        self.received = 0  # bytes from the caller, ever (a body that stopped arriving is one that stopped growing it)
        self.fresh = True  # no request begun yet: its first must come within HEAD_TIMEOUT_S of the accept
        self._watched: tuple[Request, int] | None = None  # what watch() saw last, and since when
        self._watched_at = 0.0
        self.busy = False  # a request is being served (its answer not yet whole)
        self.out: list[bytes] = []
        self.closed = False
        self.must_close = False
        self.idle_since: float | None = time.monotonic()
        self.relaying: Exchange | None = None  # the exchange whose answer we are writing
        self.asking: Exchange | None = None  # the exchange under way for the request being served
        self.write_paused = False  # the caller's write buffer is over its high-water mark
        # The X-Forwarded-* lines sent for this caller, by (its X-Forwarded-For, its Host).
        self.forwarded: dict[tuple[str | None, str | None], bytes] = {}
        self._pauses: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        if not self.server.admit():
            transport.abort()  # type: ignore[attr-defined]
            return
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        req = self.parsing
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.must_close = True  # no upgrade is proxied: the request is served plain, then we close
            req = self.parsing
            if req is not None and req.upgrade:  # with a body, which llhttp would not read: ours does
                self._read_upgrade_body(req, data[e.args[0]:])
            else:
                self.pause("upgrade")
            return
        except httptools.HttpParserError as e:
            cause = e.__context__  # raised in a callback, it comes wrapped
            if isinstance(cause, _HeadTooLarge):
                self._refuse(431, str(cause) or f"request head larger than {MAX_HEAD_BYTES} bytes")
            elif isinstance(cause, _Desync):
                self._refuse(400, f"bad request: {cause}")
            else:
                self._refuse(400, f"bad request: {e}")
            return
        if req is not None and not req.method and self.parsing is req:
            # A head not whole before this data nor after it: all of it was head. httptools holds a
            # header line until it ends (on_header only then), so it is counted here as it comes.
            self.head_raw += len(data)
            if self.head_raw > MAX_HEAD_BYTES:
                self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.parser = None  # type: ignore[assignment] - it holds our callbacks: no cycle left behind
        for req in (*self.queue, self.parsing):
            if req is not None:
                req._lost()
                self.server.unreserve(req)
        streaming = self.parsing.sink if self.parsing is not None else None
        # Nobody will read the answer: the pod's connection goes too (a pod waiting for a body
        # that will not come, or answering no one, holds nothing of ours).
        for ex in {self.relaying, streaming, self.asking} - {None}:
            ex.caller_lost()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        """The caller does not read what we write fast enough: read neither its next requests nor
        the answer being relayed (nor one relayed later) until it has taken most of it, so a
        caller that never reads holds at most its write buffer and MAX_PIPELINED requests."""
        self.write_paused = True
        self.pause("writing")
        if self.relaying is not None:
            self.relaying.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume("writing")
        if self.relaying is not None:
            self.relaying.conn.resume_reading()

    # --- httptools callbacks -------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        # A request's first callback (no on_message_begin: one call fewer per request); a long
        # target may come in pieces.
        if self.parsing is None:
            self.parsing = Request(self)
            self.head_bytes = self.head_raw = 0
            self.fresh = False
        elif self.parsing.method:
            # A new request line while the last request is not over (its head taken, its end not
            # seen): never glue the two into one.
            raise _Desync("a request began before the last one ended")
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        self.parsing.target += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        req = self.parsing
        assert req is not None
        if req.method:
            # A trailer field (after a chunked body): neither a header of the request nor believed
            # as one (framing, upgrade, host, ids), nor sent on: the pod gets the body's last chunk.
            return
        if len(req.headers) >= MAX_HEADERS:
            raise _HeadTooLarge(f"more than {MAX_HEADERS} header fields")
        lname = name.lower()
        req.headers.append((lname, name, value))
        special = _SPECIAL.get(lname)
        if special is not None:
            special(req, value)

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        req.method = self.parser.get_method().decode("latin-1")
        if req.target[:1] != "/":  # absolute-form (RFC 9112 3.2.2, which a server must accept)
            req.target = origin_form(req.target)
        req.version = self.parser.get_http_version()
        req.keep_alive = self.parser.should_keep_alive()
        if req.upgrade:  # an Upgrade header: llhttp ends the request here if it takes it as an upgrade
            req.upgrade = req.has_body and self.parser.should_upgrade()
        if req.buffers_body:
            self.server.reserve(req)
        self.queue.append(req)
        if len(self.queue) > MAX_PIPELINED:
            self.pause("pipeline")
        if not self.busy:
            self._dispatch()

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None
        self.parsing._feed(body)

    def on_message_complete(self) -> None:
        assert self.parsing is not None
        if self.parsing.upgrade:  # not yet: its body follows (data_received, HttpParserUpgrade)
            return
        self.parsing._finish()
        self.parsing = None

    def _read_upgrade_body(self, req: Request, rest: bytes) -> None:
        """A request that asked for an upgrade, with a body: llhttp took the upgrade and ended it at
        its head. Its body is read by a parser of its own, primed with a head of the same framing;
        nothing after it is read (the connection closes after the answer)."""
        self.parser = httptools.HttpRequestParser(_UpgradeBody(self, req))
        framing = b"Transfer-Encoding: chunked" if req.chunked else b"Content-Length: %d" % (req.length or 0)
        self.parser.feed_data(b"PUT / HTTP/1.1\r\n%s\r\n\r\n" % framing)
        if rest:
            self.data_received(rest)

    def watch(self, now: float) -> None:
        """About every :data:`CALLER_SWEEP_S` (the server's sweeper), while a request is being read:
        a head not whole :data:`HEAD_TIMEOUT_S` after it was first seen is answered 408; a body that
        got no byte for :data:`BODY_SILENCE_S`, the connection is cut. Not while we hold reading
        back, nor while the caller waits for our ``100 Continue``."""
        req = self.parsing
        if req is None or self._pauses or self.closed or req.expect_continue:
            self._watched = None
            return
        mark = (req, self.received if req.method else -1)
        if mark != self._watched:
            self._watched, self._watched_at = mark, now
            return
        waited = now - self._watched_at
        if not req.method:
            if waited >= HEAD_TIMEOUT_S:
                self._watched = None
                self._refuse(408, f"request head not received within {HEAD_TIMEOUT_S:g}s")
        elif waited >= BODY_SILENCE_S:
            log.info("router: a request body from %s got no byte for %.0fs: connection cut", self.peer, waited)
            self.abort()

    # --- serving -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Serve the next queued request, if nothing is being served. A request without a body
        goes first to the handler's synchronous start (``server.start``: no task, its end a
        callback, :meth:`done`); a request it declines, and any with a body, to a task."""
        start = self.server.start
        while self.queue and not self.busy and not self.closed:
            self.busy, self.idle_since = True, None
            req = self.queue.popleft()
            self.resume("pipeline")
            taken = start(self, req) if start is not None and not req.has_body else None
            if taken is None:
                self._task = self.loop.create_task(self._serve(req))
                return
            if taken:  # under way: done() follows
                return
            if not self._finished(req):  # answered at once
                return
            self.busy = False
        if not self.busy:
            self.idle_since = time.monotonic()

    def done(self, req: Request) -> None:
        """A request started by ``server.start`` is answered."""
        if self._finished(req):
            self.busy = False
            if self.queue:  # pipelined: not from inside the pod's callback that ended this one
                self.loop.call_soon(self._dispatch)
            else:
                self.idle_since = time.monotonic()

    async def _serve(self, req: Request | None) -> None:
        """Requests in a task, one after another while any are queued."""
        try:
            while req is not None:
                await self.server.handler(self, req)
                if not self._finished(req):
                    return
                req = None
                if self.queue and not self.closed:
                    req = self.queue.popleft()
                    self.resume("pipeline")
            self.busy = False
            self.idle_since = time.monotonic()
        except Exception:  # noqa: BLE001 - one caller's failure must not reach the loop's handler
            log.exception("router: serving a caller failed")
            self.abort()

    def _finished(self, req: Request) -> bool:
        """After an answer: False if the connection closes now (as the caller or we asked)."""
        self.server.unreserve(req)
        if not req.complete:  # answered without its body: the rest is read and dropped
            req.discard = True
            req.chunks = []
            self.resume("body")
        if self.must_close or not req.keep_alive or self.closed:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    def _count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def _refuse(self, status: int, error: str) -> None:
        """A request we cannot parse: say so and close (the stream cannot be trusted any more).
        If its head was taken and its body broke, it may be at a pod already, waiting for the
        rest: nothing more can be said on this connection, so it is cut (and that exchange with it)."""
        self.must_close = True
        self.pause("refused")
        req = self.parsing
        if req is not None and req.method and not req.complete:
            log.info("router: a request body from %s broke off (%s): connection cut", self.peer, error)
            self.abort()
            return
        if not self.queue and not self.busy and not self.closed:
            self.send_json(status, {"error": error}, (), close=True)
            self.flush()
            if self.transport is not None:
                self.transport.close()

    def pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._pauses.add(why)

    def resume(self, why: str) -> None:
        if why in self._pauses:
            self._pauses.discard(why)
            if not self._pauses and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def flush(self) -> None:
        if self.out:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out = []
            if not self.closed and self.transport is not None:
                self.transport.write(data)

    def abort(self) -> None:
        self.out = []
        if self.transport is not None:
            self.transport.abort()

    def connection_header(self, req: Request, close: bool = False) -> bytes:
        """What the answer says about the connection; marks it to be closed when it must be."""
        if close or self.must_close or not req.keep_alive:
            self.must_close = True
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if req.version == "1.0" else b""

    def send_json(self, status: int, body: dict[str, Any], headers: Any, *, req: Request | None = None,
                  close: bool = False) -> None:
        """An answer of our own (an error): a JSON body, as ``aiohttp.web.json_response`` writes it."""
        data = json.dumps(body).encode()
        extra = b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
        conn = self.connection_header(req, close) if req is not None else b"Connection: close\r\n"
        self.write(status_line(status) + b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
                   % len(data) + extra + conn + b"\r\n")
        if req is None or req.method != "HEAD":
            self.write(data)
        self.flush()


class _HeadTooLarge(Exception):
    pass


class _Desync(Exception):
    pass


class _UpgradeBody:
    """The callbacks of the parser that reads the body of a request that asked for an upgrade
    (:meth:`CallerConnection._read_upgrade_body`): the body to the request, nothing after it."""

    __slots__ = ("caller", "req")

    def __init__(self, caller: CallerConnection, req: Request) -> None:
        self.caller, self.req = caller, req

    def on_body(self, body: bytes) -> None:
        if self.caller.parsing is self.req:
            self.req._feed(body)

    def on_message_complete(self) -> None:
        if self.caller.parsing is self.req:
            self.caller.parsing = None
            self.req._finish()
            self.caller.pause("upgrade")  # what follows is not read: the connection closes after the answer


def _set_length(req: Request, value: bytes) -> None:
    with contextlib.suppress(ValueError):
        req.length = int(value)


def _set_chunked(req: Request, value: bytes) -> None:
    # As llhttp reads it: chunked when the last coding is exactly "chunked".
    req.chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"


def _set_expect(req: Request, value: bytes) -> None:
    req.expect_continue = value.lower() == b"100-continue"


def _set_request_id(req: Request, value: bytes) -> None:
    # Kept when it is an id (a short run of visible ASCII); anything else is replaced by one of ours.
    text = value.decode("latin-1")
    ok = 0 < len(text) <= MAX_REQUEST_ID and text.isascii() and text.isprintable() and " " not in text
    req.request_id = text if ok else None


def _set_forwarded_for(req: Request, value: bytes) -> None:
    req.forwarded_for = value.decode("latin-1")


def _set_host(req: Request, value: bytes) -> None:
    req.host = value.decode("latin-1")


def _set_upgrade(req: Request, value: bytes) -> None:
    req.upgrade = True


_SPECIAL: dict[bytes, Callable[[Request, bytes], None]] = {
    b"content-length": _set_length, b"transfer-encoding": _set_chunked, b"expect": _set_expect,
    b"x-request-id": _set_request_id, b"x-forwarded-for": _set_forwarded_for, b"host": _set_host,
    b"upgrade": _set_upgrade,
}


class CallerServer:
    """The listening side: a :class:`CallerConnection` per accepted connection, each request to
    ``handler``; idle callers are closed after ``CALLER_IDLE_S``."""

    def __init__(self, handler: Handler, start: Starter | None = None) -> None:
        self.handler = handler
        self.start = start
        self.loop = asyncio.get_running_loop()
        self.connections: set[CallerConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.max_connections = max_connections()
        self.reserved = 0  # request body bytes held (of BUFFER_BUDGET)

    def admit(self) -> bool:
        """Room for one more caller's connection? At the cap, the longest idle one is closed to
        make it; with none idle the new one is refused (closed at once)."""
        if len(self.connections) < self.max_connections:
            return True
        idle = [c for c in self.connections if c.idle_since is not None and c.parsing is None]
        if not idle:
            log.warning("router: %d connections open, none idle: a new one refused", len(self.connections))
            return False
        oldest = min(idle, key=lambda c: c.idle_since or 0.0)
        oldest.closed = True
        self.connections.discard(oldest)
        if oldest.transport is not None:
            oldest.transport.abort()
        return True

    def reserve(self, req: Request) -> None:
        """Hold ``req``'s body (to send it again if a pod fails) if the budget allows, else stream it."""
        length = req.length or 0
        if self.reserved + length > BUFFER_BUDGET:
            req.stream_only = True
            return
        self.reserved += length
        req.reserved = length

    def unreserve(self, req: Request) -> None:
        self.reserved -= req.reserved
        req.reserved = 0

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_server(lambda: CallerConnection(self), host, port, backlog=1024,
                                                     reuse_port=reuse_port or None))
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Idle callers' connections closed; requests being read watched (:meth:`CallerConnection.watch`)."""
        while True:
            await asyncio.sleep(CALLER_SWEEP_S)
            now = time.monotonic()
            edge, first = now - CALLER_IDLE_S, now - HEAD_TIMEOUT_S
            for c in list(self.connections):
                if c.idle_since is not None and c.idle_since < (first if c.fresh else edge):
                    if c.transport is not None and c.transport.get_write_buffer_size():
                        c.transport.abort()  # close() would wait for a caller that never reads
                    elif c.transport is not None:
                        c.transport.close()
                elif c.parsing is not None or c._watched is not None:
                    c.watch(now)

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for c in list(self.connections):
            c.abort()
        for s in self.servers:
            await s.wait_closed()


def max_connections() -> int:
    """Callers' connections one process keeps: each may need a pod connection too, so half the
    file descriptors it may open (less a reserve), at most HAProxy's ``maxconn`` of ours."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, min(MAX_CONNECTIONS, (soft - 64) // 2))


# --- pods ------------------------------------------------------------------------------------


class PodConnection(asyncio.Protocol):
    """One connection to a pod (or to the primary's control socket); carries one exchange at a time."""

    def __init__(self, pool: PodPool | None, address: str) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_at = 0.0
        self.closed = False
        self.single_use = False  # a fresh connection for one request: closed after it
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # nothing asked: a pod that talks out of turn is not used again
            self.abort()
            return
        ex.feed(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.pool is not None:
            self.pool.discard(self)
        if self.exchange is not None:
            self.exchange.conn_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.req.caller.pause("upload")

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.req.caller.resume("upload")

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def spoil(self) -> None:
        """The pod said more than it was asked: the connection is cut, and not taken from the pool again."""
        self.closed = True
        self.abort()

    def release(self, keep: bool) -> None:
        self.exchange = None
        if self._reading_paused:
            self.resume_reading()
        if keep and not self.single_use and self.pool is not None and not self.closed:
            self.pool.put_back(self)
        elif self.transport is not None:
            self.transport.close()


class PodPool:
    """Keep-alive connections per pod address (see the module's docstring)."""

    def __init__(self, connect_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle: dict[str, list[PodConnection]] = {}
        self.conns: dict[str, set[PodConnection]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def _sweep(self) -> None:
        """Every second: exchanges past their read timeout fail; idle connections past
        ``POD_IDLE_S`` close (one timer for all, not one per request)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for held in list(self.conns.values()):
                for conn in list(held):
                    if conn.exchange is not None:
                        conn.exchange.tick(now)
                    elif now - conn.idle_at > POD_IDLE_S and conn.idle_at:
                        conn.abort()

    async def acquire(self, address: str, *, fresh: bool = False) -> PodConnection:
        """An idle connection to ``address`` (unless ``fresh``), else a new one; raises OSError
        or TimeoutError when none can be made within the connect timeout."""
        if not fresh:
            conn = self.take_idle(address)
            if conn is not None:
                return conn
        host, port = host_port(address)
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        async with asyncio.timeout(self.connect_timeout_s):
            _, conn = await loop.create_connection(lambda: PodConnection(self, address), host, port)
        conn.single_use = fresh
        self.conns.setdefault(address, set()).add(conn)
        return conn

    def take_idle(self, address: str) -> PodConnection | None:
        """The most recently used idle connection to ``address`` that is still good, if any."""
        idle = self.idle.get(address)
        edge = time.monotonic() - POD_IDLE_S
        while idle:
            conn = idle.pop()
            if conn.closed or conn.idle_at < edge:
                conn.release(False)
                continue
            return conn
        return None

    def put_back(self, conn: PodConnection) -> None:
        idle = self.idle.setdefault(conn.address, [])
        if len(idle) >= MAX_IDLE_PER_POD:
            conn.release(False)
            return
        conn.idle_at = time.monotonic()
        idle.append(conn)

    def discard(self, conn: PodConnection) -> None:
        for table in (self.conns, self.idle):
            held = table.get(conn.address)
            if held is not None and conn in held:
                if isinstance(held, list):
                    held.remove(conn)
                else:
                    held.discard(conn)
                if not held:
                    del table[conn.address]

    def cut(self, addresses: set[str]) -> None:
        """Abort every connection, idle or busy, to these addresses (pods that left the table)."""
        for address in addresses:
            for conn in list(self.conns.get(address, ())):
                conn.abort()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.cut(set(self.conns))


class Outcome:
    __slots__ = ("kind", "status", "head_at", "error")

    def __init__(self, kind: str, status: int = 0, head_at: float = 0.0, error: BaseException | str | None = None
                 ) -> None:
        self.kind, self.status, self.head_at, self.error = kind, status, head_at, error


class Exchange:
    """One request on one :class:`PodConnection`, and its answer relayed to the caller.

    ``extra``: header lines added to the answer (``X-HMS-Pod``...); ``retryable``: a 502/503
    answer is read and dropped (:data:`REFUSED_STATUS`) so another pod can be tried."""

    __slots__ = ("req", "caller", "conn", "parser", "extra", "retryable", "future", "status", "raw",
                 "head_at", "relaying", "discarding", "chunked_out", "close_delimited", "ended",
                 "informational", "keep", "body_sent", "idle_since", "active", "read_timeout_s", "on_done", "unframed")

    def __init__(self, req: Request, conn: PodConnection, *, extra: bytes, retryable: bool,
                 read_timeout_s: float) -> None:
        self.req, self.caller, self.conn = req, req.caller, conn
        self.parser = httptools.HttpResponseParser(self)
        self.extra = extra
        self.retryable = retryable
        self.future: asyncio.Future[Outcome] | None = None
        self.on_done: Callable[[Outcome], None] | None = None
        self.status = 0
        self.raw: bytes | None = b""  # the answer as received, until its head is whole
        self.head_at = 0.0
        self.relaying = self.discarding = self.chunked_out = self.close_delimited = False
        self.ended = self.informational = self.keep = False
        self.body_sent = False
        self.unframed: bytes | None = None  # the head lines of an answer without Content-Length
        self.active = False
        self.read_timeout_s = read_timeout_s
        self.idle_since = 0.0

    async def run(self, head: bytes, body: bytes | None) -> Outcome:
        """Send the request (``head``: request line and headers, framing not included) and
        relay the answer; the outcome once the exchange is over."""
        self.future = self.caller.loop.create_future()
        if not self.start(head, body):
            return Outcome(LOST, error=ConnectionResetError("the pod closed the connection"))
        return await self.future

    def start(self, head: bytes, body: bytes | None) -> bool:
        """Send the request; its outcome goes to ``on_done`` (else the future of :meth:`run`).
        False if the connection turned out closed (nothing sent)."""
        conn, req = self.conn, self.req
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            return False
        conn.exchange = self
        self.caller.asking = self
        if body is not None or not req.has_body:
            if body:
                transport.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            else:
                transport.write(head + (b"Content-Length: 0\r\n\r\n" if req.method in ("POST", "PUT", "PATCH")
                                        else b"\r\n"))
            self.body_sent = True
        else:
            framing = b"Transfer-Encoding: chunked\r\n\r\n" if req.chunked else b"Content-Length: %d\r\n\r\n" % (
                req.length or 0)
            transport.write(head + framing + b"".join(self._frame(c) for c in req.take_chunks(self)))
            if req.complete:
                self.end_body()
        return True

    # --- the request body, streamed ------------------------------------------------------------

    def _frame(self, chunk: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.req.chunked and chunk else chunk

    def send_body(self, chunk: bytes) -> None:
        self.req.streamed = True
        if not self.conn.closed and self.conn.transport is not None and chunk:
            self.conn.transport.write(self._frame(chunk))

    def end_body(self) -> None:
        if self.req.chunked and not self.conn.closed and self.conn.transport is not None:
            self.conn.transport.write(LAST_CHUNK)
        self.body_sent = True
        self.req.sink = None

    # --- the answer ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.active = True
        if self.raw is not None:  # the answer's head is not whole yet: on_headers_complete reads it raw
            self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.conn.abort()
            self._lost(f"bad answer from pod: {e}")
        except httptools.HttpParserUpgrade:
            self.conn.abort()
            self._lost("bad answer from pod: it switched protocols (101), which the router does not relay")
        if self.raw is not None and len(self.raw) > MAX_HEAD_BYTES:  # a head still not whole: one pod holds no more
            self.conn.abort()
            self._lost(f"bad answer from pod: its head is larger than {MAX_HEAD_BYTES} bytes")
        self.caller.flush()

    def on_headers_complete(self) -> None:
        # The head is taken raw (one regex pass over it, not a callback per header): llhttp has
        # checked it, and it is in what was fed so far.
        if self.ended:  # another answer after ours, unasked: the connection is not used again
            self.conn.spoil()
            return
        raw = self.raw or b""
        end = raw.find(b"\r\n\r\n") + 2
        if end < 2:
            end = raw.find(b"\n\n") + 1
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and friends: not ours to relay (we sent no Expect)
            self.informational = True
            self.raw = raw[end + (2 if raw[end:end + 2] == b"\r\n" else 1):]
            return
        self.raw = None
        line_end = raw.find(b"\n")
        self.status, self.head_at = status, time.monotonic()
        self.keep = self.parser.should_keep_alive()
        if self.retryable and status in (502, 503):
            self.discarding = True
        else:
            self._write_head(raw[9:line_end].rstrip(b"\r"), raw[line_end + 1:end])
        if self.req.method == "HEAD":  # no body follows, whatever the headers say
            self.on_message_complete()

    def _write_head(self, status: bytes, headers: bytes) -> None:
        """``status``: the pod's code and reason; ``headers``: its header lines, as received."""
        req, caller = self.req, self.caller
        kept, length = relayed_headers(headers)
        if req.method == "HEAD":
            framing = b"Content-Length: %s\r\n" % length if length is not None else b""
        elif self.status in NO_BODY_STATUSES:
            framing = b""
        elif length is not None:
            framing = b"Content-Length: %s\r\n" % length
        elif req.version == "1.1":
            framing, self.chunked_out, self.unframed = b"Transfer-Encoding: chunked\r\n", True, headers
        else:
            framing, self.close_delimited, self.unframed = b"", True, headers
        conn = caller.connection_header(req, close=self.close_delimited)
        caller.out.append(b"HTTP/1.1 %s\r\n%s%s%s%s\r\n" % (status, kept, self.extra, framing, conn))
        self.relaying = True
        caller.relaying = self
        if caller.write_paused:  # the caller has not taken what it was sent yet
            self.conn.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self.discarding or self.informational or self.ended or not body:
            if self.ended:  # a body after the answer ended (to a HEAD): dropped, the connection not used again
                self.conn.spoil()
            return
        if self.chunked_out:
            self.caller.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.caller.write(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.ended:
            return
        if self.chunked_out:
            self.caller.write(LAST_CHUNK)
        keep = self.keep and self.body_sent
        kind = REFUSED_STATUS if self.discarding else RELAYED
        self._end(Outcome(kind, self.status, self.head_at), keep)

    def _end(self, outcome: Outcome, keep: bool) -> None:
        self.ended = True
        self.req.detach(self)
        self.req.caller.resume("upload")
        if self.caller.relaying is self:
            self.caller.relaying = None
        if self.caller.asking is self:
            self.caller.asking = None
        self.conn.release(keep)
        # The parser holds our callbacks: without this cycle, the exchange and all it holds die
        # by reference counting, not in a garbage collection (which, a request at a time, costs
        # more than the proxying).
        self.parser = None  # type: ignore[assignment]
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(outcome)
        elif self.future is not None and not self.future.done():
            self.future.set_result(outcome)

    def _lost(self, error: BaseException | str | None) -> None:
        if self.ended:
            return
        if self.relaying and self.unframed is not None and not _chunked(self.unframed):
            # An answer without length, not chunked: its end is the pod's close (RFC 9112 6.3).
            if self.chunked_out:
                self.caller.write(LAST_CHUNK)
                self.caller.flush()
            self._end(Outcome(RELAYED, self.status, self.head_at), False)
            return
        self._end(Outcome(TRUNCATED if self.relaying else LOST, self.status, self.head_at, error), False)

    def conn_lost(self, exc: Exception | None) -> None:
        self._lost(exc or ConnectionResetError("the pod closed the connection"))

    def caller_lost(self) -> None:
        """The caller left mid-answer or mid-body: nobody reads the rest, and the pod would wait
        for the rest of the body; the connection is not reusable."""
        if self.ended:
            return
        self.conn.abort()
        self._end(Outcome(CALLER_LEFT, self.status, self.head_at), False)

    def tick(self, now: float) -> None:
        """Called about every second: past the read timeout without a byte from the pod, give up."""
        if self.ended:
            return
        if self.active or not self.idle_since or not (self.body_sent or "upload" in self.caller._pauses):
            # The read timeout runs once the request is sent whole, or while the pod does not take
            # its body (a body the caller sends slowly is the caller's: BODY_SILENCE_S).
            self.active, self.idle_since = False, now
            return
        if now - self.idle_since < self.read_timeout_s:
            return
        self.conn.abort()
        if not self.relaying:
            self._end(Outcome(TIMEOUT, error=f"no answer within {self.read_timeout_s:g}s"), False)


# An answer's headers not passed on (lowercase names): hop-by-hop ones, its framing (ours may
# differ), and those the router sets on every proxied answer.
_NOT_RELAYED = HOP_BY_HOP | {b"content-length", b"x-hms-pod", b"x-request-id"}


_RELAYED_CACHE: dict[bytes, tuple[bytes, bytes | None]] = {}
_RELAYED_CACHE_MAX = 1024  # blocks kept (then it starts again empty), each up to _RELAYED_CACHE_BLOCK bytes
_RELAYED_CACHE_BLOCK = 1024


def relayed_headers(headers: bytes) -> tuple[bytes, bytes | None]:
    """A pod's header lines as received (llhttp has checked them) -> the lines passed on (CRLF
    ends), and the value of its first ``Content-Length``. A pod sends the same block again and
    again (its ``Date`` changes once a second), so the answer for a block is kept: one hash of
    the block instead of a split and a set lookup per line."""
    if len(headers) > _RELAYED_CACHE_BLOCK:
        return _relayed_headers(headers)
    got = _RELAYED_CACHE.get(headers)
    if got is None:
        if len(_RELAYED_CACHE) >= _RELAYED_CACHE_MAX:
            _RELAYED_CACHE.clear()
        got = _RELAYED_CACHE[headers] = _relayed_headers(headers)
    return got


_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def origin_form(target: str) -> str:
    """``http://host:port/svc/x?q`` -> ``/svc/x?q`` (``/`` for none); any other form as it is
    (``*`` of ``OPTIONS *``, an authority of ``CONNECT``)."""
    m = _ABSOLUTE_FORM.match(target)
    if m is None:
        return target
    rest = target[m.end():]
    return rest if rest.startswith("/") else "/" + rest


def _chunked(headers: bytes) -> bool:
    """Whether an answer's header lines (as received) frame its body chunked: ``chunked`` is the
    last transfer coding. Else an answer without Content-Length ends when the pod closes."""
    codings = [value for name, _, value in (line.partition(b":") for line in headers.split(b"\n"))
               if name.strip().lower() == b"transfer-encoding"]
    return bool(codings) and codings[-1].split(b",")[-1].strip().lower() == b"chunked"


def _relayed_headers(headers: bytes) -> tuple[bytes, bytes | None]:
    lines, length = [], None
    for line in headers.split(b"\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.rstrip(b" \t").lower()
        if name not in _NOT_RELAYED:
            lines.append(line)
        elif name == b"content-length" and length is None:
            length = value.strip()
    lines.append(b"")
    kept = b"\n".join(lines)
    if b"\r\n" not in kept and b"\n" in kept:  # bare LF line ends (llhttp is lenient): ours are CRLF
        kept = kept.replace(b"\n", b"\r\n")
    return kept, length


async def open_unix(path: str) -> PodConnection:
    """A connection to a unix socket (the primary's control endpoints), for one exchange."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_unix_connection(lambda: PodConnection(None, path), path)
    return conn
