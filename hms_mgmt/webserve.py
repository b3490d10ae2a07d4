"""Serve an aiohttp application on one address: what the dashboard and a node's log stream share.

Anyone who reaches the address may connect, so each connection is held to limits aiohttp has no
setting for (each costs a file descriptor, and a worker out of them cannot start a pod):

- at most :data:`MAX_CONNECTIONS` open at once and, where asked (the node's log port; not the
  dashboard, whose browsers' tabs and streams all come from one address), :data:`MAX_PER_PEER` from
  one address; a connection over either is closed as soon as it is accepted;
- a request head complete within :data:`HEAD_TIMEOUT_S` of the accept, and between requests at
  most :data:`IDLE_TIMEOUT_S` with none (a request being answered, a stream, is never cut);
- ``socket.accept() out of system resource`` (EMFILE) written at most once per
  :data:`ACCEPT_ERROR_LOG_S` (asyncio already stops accepting for a second after one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_runner import BaseSite

from hms_mgmt.addresses import host_port
from hms_mgmt.errors import HmsError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # open at once on one server
MAX_PER_PEER = 32  # open at once from one peer address
HEAD_TIMEOUT_S = 15.0  # from the accept to a whole first request head
IDLE_TIMEOUT_S = 60.0  # between requests (from one seen to the next head)
ACCEPT_ERROR_LOG_S = 10.0
REFUSAL_LOG_S = 10.0


class ConnectionGuard:
    """The connections of one server: counted by peer, refused over the caps, closed when silent."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], what: str, *, per_peer: bool) -> None:
        self.factory = factory
        self.what = what
        self.per_peer_cap = per_peer
        self.open: set[_Guarded] = set()
        self.per_peer: Counter[str] = Counter()
        self.refused = 0
        self._refusal_logged = 0.0

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)

    def admit(self, peer: str) -> bool:
        if self.per_peer_cap and self.per_peer[peer] >= MAX_PER_PEER:
            return self._refuse(peer)
        if len(self.open) < MAX_CONNECTIONS:
            return True
        # Full: the connection idle longest (no request being answered) makes room, so that
        # connections held open by someone who sends a request a minute cannot lock everyone out.
        idle = [c for c in self.open if c.idle()]
        if idle:
            min(idle, key=lambda c: c.last).close()
            return True
        return self._refuse(peer)

    def _refuse(self, peer: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_S:
            self._refusal_logged = now
            log.warning("%s: %d connections open (%d from %s): a new one closed (%d refused so far; at most %d%s)",
                        self.what, len(self.open), self.per_peer[peer], peer, self.refused, MAX_CONNECTIONS,
                        f", {MAX_PER_PEER} per address" if self.per_peer_cap else "")
        return False


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, made only once the connection is admitted, and
    closed when it has not sent a whole request head in time. Whether a request is being
    answered and how many heads were read are aiohttp's ``RequestHandler._request_in_progress``
    and ``_request_count``; a handler without them is never closed for silence."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.seen = 0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.last = time.monotonic()  # its last byte from the caller

    def idle(self) -> bool:
        """No request being answered (aiohttp's own word; unknown counts as busy)."""
        return self.transport is not None and getattr(self.inner, "_request_in_progress", True) is False

    def close(self) -> None:
        transport, self.transport = self.transport, None
        self._forget()  # its room is the new connection's now, not once the abort lands
        if transport is not None:
            self.inner.force_close()
            transport.abort()

    def _forget(self) -> None:
        if self in self.guard.open:
            self.guard.open.discard(self)
            self.guard.per_peer[self.peer] -= 1
            if self.guard.per_peer[self.peer] <= 0:
                del self.guard.per_peer[self.peer]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        if not self.guard.admit(self.peer):
            transport.abort()
            return
        self.transport = transport
        self.guard.open.add(self)
        self.guard.per_peer[self.peer] += 1
        self.inner = self.guard.factory()
        self.inner.connection_made(transport)
        self._watch(HEAD_TIMEOUT_S)

    def _watch(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + delay
        self.timer = loop.call_at(self.deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        busy = getattr(self.inner, "_request_in_progress", None)
        count = getattr(self.inner, "_request_count", None)
        if busy is None or count is None:
            return  # not the aiohttp this was written for: the caps still hold
        if busy or count != self.seen:
            self.seen = count
            self._watch(IDLE_TIMEOUT_S)
            return
        log.info("%s: closed a connection from %s that sent no whole request in time", self.guard.what, self.peer)
        transport, self.transport = self.transport, None
        self.inner.force_close()
        transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.inner is None:
            return  # refused at the accept
        self.transport = None
        self._forget()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class AcceptErrorFilter(logging.Filter):
    """asyncio's "socket.accept() out of system resource", once per :data:`ACCEPT_ERROR_LOG_S`
    (with how many were not written), without its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.last = 0.0
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "socket.accept() out of system resource" not in str(record.msg):
            return True
        now = time.monotonic()
        if self.last and now - self.last < ACCEPT_ERROR_LOG_S:
            self.dropped += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = (f"socket.accept() out of system resource: {exc or 'no descriptor'} (new connections wait; "
                      f"{self.dropped} more not logged in the last {ACCEPT_ERROR_LOG_S:g}s)")
        record.args, record.exc_info, record.exc_text = None, None, None
        self.last, self.dropped = now, 0
        return True


_ACCEPT_ERRORS = AcceptErrorFilter()


def quiet_accept_errors() -> None:
    """Install :class:`AcceptErrorFilter` on asyncio's logger (once)."""
    asyncio_log = logging.getLogger("asyncio")
    if _ACCEPT_ERRORS not in asyncio_log.filters:
        asyncio_log.addFilter(_ACCEPT_ERRORS)


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, what: str, *, per_peer: bool) -> None:
        super().__init__(runner, host, port)
        self.what = what
        self.per_peer = per_peer
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        await BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.what, per_peer=self.per_peer)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self._host, self._port, backlog=self._backlog)


async def serve_app(app: web.Application, host: str, port: int, what: str, *,
                    per_peer: bool = False) -> tuple[web.AppRunner, int]:
    """Listen on ``host``:``port`` (0: any free port), with the limits above (``per_peer``: and
    :data:`MAX_PER_PEER` from one address); the runner to clean up and the port it got. Raises HmsError naming ``what`` when the address cannot be had
    (nothing is left running)."""
    quiet_accept_errors()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = GuardedSite(runner, host, port, what, per_peer=per_peer)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise HmsError(f"{what} cannot listen on {host_port(host, port)}: {e}") from e
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
