"""The builtin engine: an aiohttp reverse proxy, ``/<service>/<path>`` -> a ready pod.

Per request: power-of-two-choices on (outstanding + 1) x latency EWMA (:mod:`router.policy`);
draining and ejected pods get nothing new. A request that failed before reaching a pod
(connection refused, connect timeout) is retried on another pod whatever its method; a 502/503
or a reset is retried only for idempotent methods; every retry is paid from the service's
retry budget. Non-idempotent requests go on a fresh connection, so "did it reach the pod?" has
a sure answer: a reused keep-alive connection that turns out dead cannot tell.

Bodies stream both ways; request bodies up to :data:`BUFFER_BYTES` are buffered so that they
can be sent again. Responses carry ``X-HMS-Pod`` and ``X-Request-Id`` (kept or created);
requests get ``X-Forwarded-For`` / ``-Proto`` / ``-Host``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from hms_mgmt.models import EndpointSet
from router import policy
from router.control import Control
from router.feed import EndpointTable, FeedSync
from router.stats import TrafficStats
from router.workers import Workers

log = logging.getLogger("hms.router.builtin")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "host"})
BUFFER_BYTES = 1 << 20
MAX_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503})
_SERVICE_PATH = re.compile(r"/?([^/?]*)(.*)", re.DOTALL)  # /<service><tail>: the tail from the first / or ?


@dataclass
class ProxyOptions:
    connect_timeout_s: float = 1.0
    read_timeout_s: float = 30.0
    max_attempts: int = MAX_ATTEMPTS
    ejection: policy.EjectionPolicy = field(default_factory=policy.EjectionPolicy)


class ServicePool:
    """One service's pods as the policy sees them, plus its retry budget."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pods: dict[str, policy.PodState] = {}
        self.budget = policy.RetryBudget()
        self.known = True
        self.landed_until: datetime | None = None  # landed by a time slot, until then
        self.listed: list[policy.PodState] = []  # the pods, as a list (per request, for the pick)
        self._counts = (0, 0)

    def update(self, table: EndpointSet) -> set[str]:
        """Take the new table; returns the addresses of the pods that left it."""
        self.landed_until = table.landed_until
        seen = set()
        for ep in table.endpoints:
            seen.add(ep.pod)
            pod = self.pods.get(ep.pod)
            if pod is None or pod.address != ep.address:
                pod = self.pods[ep.pod] = policy.PodState(pod=ep.pod, address=ep.address)
            pod.draining = ep.state == "draining"
        gone = set()
        for pod_id in [p for p in self.pods if p not in seen]:
            # Gone from the table: no new requests; in-flight ones keep their PodState object.
            gone.add(self.pods.pop(pod_id).address)
        self.listed = list(self.pods.values())
        ready = sum(1 for p in self.listed if not p.draining)
        self._counts = (ready, len(self.listed) - ready)
        return gone

    def counts(self) -> tuple[int, int]:
        """(ready, draining) pods: they change only with the table."""
        return self._counts


def retry_after(until: datetime) -> str:
    """``Retry-After`` as an HTTP-date (RFC 9110): the landing slot's end."""
    return format_datetime(until.astimezone(UTC), usegmt=True)


def landed_body(service: str, until: datetime) -> dict[str, Any]:
    return {"error": "landed", "service": service, "until": until.isoformat(),
            "reason": f"landed by a time slot until {until.isoformat()}: no pod runs"}


class _Truncated(Exception):
    """The pod failed after the response had started: the caller's connection is closed."""


@dataclass
class _Failed:
    """A failed attempt: what to answer if it is the last, and the retry reason if it may be retried."""

    status: int
    info: dict[str, Any]
    retry: str | None


class BuiltinEngine:
    def __init__(self, table: EndpointTable, stats: TrafficStats, options: ProxyOptions | None = None) -> None:
        self.table = table
        self.stats = stats
        self.options = options or ProxyOptions()
        self.pools: dict[str, ServicePool] = {}
        self.rng = random.Random()
        self.session: aiohttp.ClientSession | None = None
        self.fresh_session: aiohttp.ClientSession | None = None
        self.applied: dict[str, int] = {}
        table.subscribe(self._on_table)

    # --- table -------------------------------------------------------------------------------

    def _on_table(self, table: EndpointSet) -> None:
        if table.stopped:
            self.pools.pop(table.service, None)
            self.applied.pop(table.service, None)
            return
        pool = self.pools.get(table.service)
        if pool is None:
            pool = self.pools[table.service] = ServicePool(table.service)
        gone = pool.update(table)
        self.applied[table.service] = table.version
        if gone:
            self._cut(gone)

    def _cut(self, addresses: set[str]) -> None:
        """Abort our connections to pods that left the table. A host that lost power answers
        nothing: a request waiting on it would wait out the read timeout, and an idle
        keep-alive connection to it would take the next one. Aborted, an idempotent request
        goes to another pod at once (a reset). aiohttp has no public call for this."""
        for session in (self.session, self.fresh_session):
            connector = session.connector if session is not None else None
            if connector is None:
                continue
            idle = [proto for conns in getattr(connector, "_conns", {}).values() for proto, _ in conns]
            for proto in [*getattr(connector, "_acquired", ()), *idle]:
                transport = getattr(proto, "transport", None)
                peer = transport.get_extra_info("peername") if transport is not None else None
                if peer and f"{peer[0]}:{peer[1]}" in addresses:
                    transport.abort()

    def pods_info(self, service: str) -> dict[str, Any]:
        pool = self.pools.get(service)
        if pool is None:
            return {}
        now = time.monotonic()
        floor = policy.best_latency(list(pool.pods.values()))
        return {
            p.pod: {"address": p.address, "state": "draining" if p.draining else "ready",
                    "outstanding": p.outstanding, "latency_ms": round(policy.latency(p, now, floor), 2),
                    "ejected": p.ejected(now), "ejections": p.total_ejections}
            for p in pool.pods.values()
        }

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s,
                                        sock_read=self.options.read_timeout_s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True),
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        self.fresh_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        for s in (self.session, self.fresh_session):
            if s is not None:
                await s.close()

    # --- proxy -------------------------------------------------------------------------------

    @staticmethod
    def _json_error(status: int, body: dict[str, Any], rid: str, **headers: str) -> web.Response:
        resp = web.json_response(body, status=status)
        resp.headers["X-Request-Id"] = rid
        resp.headers.update(headers)
        return resp

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.monotonic()
        service, tail = _SERVICE_PATH.match(request.raw_path).groups()  # type: ignore[union-attr]
        if not tail.startswith("/"):
            tail = "/" + tail
        rid = request.headers.get("X-Request-Id") or os.urandom(16).hex()
        pool = self.pools.get(service)
        if pool is None:
            return self._json_error(404, {"error": "unknown service", "service": service}, rid)
        ready, draining = pool.counts()
        if ready == 0 and pool.landed_until is not None:
            self.stats.record(service, "-", 503, time.monotonic() - t0)
            return self._json_error(503, landed_body(service, pool.landed_until), rid,
                                    **{"Retry-After": retry_after(pool.landed_until)})
        if ready == 0:
            self.stats.record(service, "-", 503, time.monotonic() - t0)
            reason = (f"no ready pod: {draining} draining" if draining
                      else "no ready pod: the service has no pod that passed its health check")
            return self._json_error(503, {"error": "no ready pod", "service": service, "reason": reason}, rid,
                                    **{"Retry-After": "1"})
        return await self._forward(request, pool, tail, rid, t0)

    def _headers(self, request: web.BaseRequest, rid: str) -> CIMultiDict[str]:
        h = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        h["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        h["X-Forwarded-Proto"] = request.scheme
        if request.host:
            h["X-Forwarded-Host"] = request.host
        h["X-Request-Id"] = rid
        return h

    async def _forward(self, request: web.BaseRequest, pool: ServicePool, tail: str, rid: str, t0: float
                       ) -> web.StreamResponse:
        headers = self._headers(request, rid)
        body: Any = None
        stream_started = False
        if request.body_exists:
            if request.content_length is not None and request.content_length <= BUFFER_BYTES:
                body = await request.read()
            else:
                async def stream() -> AsyncIterator[bytes]:
                    nonlocal stream_started
                    stream_started = True
                    async for chunk in request.content.iter_chunked(1 << 16):
                        yield chunk

                body = stream()
        pool.budget.record_request(t0)
        tried: set[str] = set()
        attempt = 0
        failed = _Failed(502, {"error": "no pod could take the request"}, None)
        while attempt < self.options.max_attempts:
            attempt += 1
            pod = policy.pick(pool.listed, time.monotonic(), self.rng, exclude=tried)
            if pod is None:
                break
            tried.add(pod.pod)
            token = policy.start_request(pod, time.monotonic())
            try:
                result = await self._attempt(request, pool, pod, tail, headers, body, rid, t0,
                                             last=attempt >= self.options.max_attempts)
            finally:
                policy.finish_request(pod, token)
            if not isinstance(result, _Failed):
                return result
            failed = result
            if failed.retry is None or stream_started or not pool.budget.try_spend(time.monotonic()):
                break
            self.stats.record_retry(pool.name, failed.retry)
        self.stats.record(pool.name, failed.info.get("pod", "-"), failed.status, time.monotonic() - t0)
        extra = {"X-HMS-Pod": failed.info["pod"]} if "pod" in failed.info else {}
        return self._json_error(failed.status, {**failed.info, "service": pool.name, "attempts": attempt}, rid,
                                **extra)

    async def _attempt(self, request: web.BaseRequest, pool: ServicePool, pod: policy.PodState, tail: str,
                       headers: CIMultiDict[str], body: Any, rid: str, t0: float, *, last: bool
                       ) -> web.StreamResponse | _Failed:
        """One try on one pod: the response, or how it failed and whether another pod may be tried."""
        idempotent = request.method in IDEMPOTENT
        session = self.session if idempotent else self.fresh_session
        assert session is not None
        sent = time.monotonic()
        try:
            # encoded: the caller's path as it came (already percent-encoded), not parsed again
            url = URL(f"http://{pod.address}{tail}", encoded=True)
            async with session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as up:
                ms = (time.monotonic() - sent) * 1000
                if up.status in RETRY_STATUSES and idempotent and not last:
                    await up.read()
                    self._failure(pool, pod, time.monotonic(), ms)
                    return _Failed(up.status, {"error": f"pod answered {up.status}", "pod": pod.pod,
                                               "reached_pod": True}, f"http_{up.status}")
                resp = await self._relay(request, up, pod, rid)
                now = time.monotonic()
                if up.status >= 500:
                    self._failure(pool, pod, now, ms)
                else:
                    policy.record_success(pod, ms, now)
                self.stats.record(pool.name, pod.pod, up.status, now - t0)
                return resp
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            # Refused, unreachable or no SYN-ACK in time: the pod never saw the request.
            self._failure(pool, pod, time.monotonic())
            return _Failed(502, {"error": f"could not connect to pod: {e}", "pod": pod.pod, "reached_pod": False},
                           "connect")
        except aiohttp.SocketTimeoutError:
            self._failure(pool, pod, time.monotonic())
            return _Failed(504, {"error": f"pod did not answer within {self.options.read_timeout_s:g}s",
                                 "pod": pod.pod, "reached_pod": True}, None)
        except (aiohttp.ClientError, OSError) as e:
            # Reset or closed mid-way: the pod may have acted on it; only idempotent requests go again.
            self._failure(pool, pod, time.monotonic())
            return _Failed(502, {"error": f"connection to pod failed: {e or type(e).__name__}", "pod": pod.pod,
                                 "reached_pod": True}, "reset" if idempotent else None)

    def _failure(self, pool: ServicePool, pod: policy.PodState, now: float, ms: float | None = None) -> None:
        if policy.record_failure(pod, now, self.options.ejection, ms):
            self.stats.record_ejection(pool.name, pod.pod)
            log.warning("ejected pod %s of %s for %.0fs after consecutive failures", pod.pod, pool.name,
                        pod.ejected_until - now)

    async def _relay(self, request: web.BaseRequest, up: aiohttp.ClientResponse, pod: policy.PodState, rid: str
                     ) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in up.headers.items()
                              if k.lower() not in HOP_BY_HOP and k.lower() != "content-length")
        headers["X-HMS-Pod"] = pod.pod
        headers["X-Request-Id"] = rid
        length = up.content_length
        if request.method == "HEAD" or up.status in (204, 304):
            resp = web.Response(status=up.status, headers=headers)
            if length is not None and request.method == "HEAD":
                resp.headers["Content-Length"] = str(length)
            return resp
        if length is not None and length <= BUFFER_BYTES:
            return web.Response(status=up.status, headers=headers, body=await up.read())
        resp = web.StreamResponse(status=up.status, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        try:
            async for chunk in up.content.iter_chunked(1 << 16):
                await resp.write(chunk)
        except (aiohttp.ClientError, OSError) as e:
            # Headers are gone already: all that is left is to cut the caller's connection.
            raise _Truncated(f"pod {pod.pod} failed mid-response: {e}") from e
        await resp.write_eof()
        return resp


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Dispatch:
    """The handler of a low-level aiohttp server (no URL router, no application per request):
    a control endpoint (``/-/...``, ``/metrics``) by its method and path, or by ``control``
    (a worker's relay to its primary); anything else is proxied."""

    def __init__(self, proxy: Handler, routes: dict[tuple[str, str], Handler] | None = None,
                 control: Handler | None = None) -> None:
        self.proxy = proxy
        self.routes = routes or {}
        self.control = control

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/-/") or path == "/metrics":
            if self.control is not None:
                return await self.control(request)
            handler = self.routes.get((request.method, path))
            if handler is not None:
                return await handler(request)
        return await self.proxy(request)


def server_runner(dispatch: Dispatch) -> web.ServerRunner:
    return web.ServerRunner(web.Server(dispatch, access_log=None), handle_signals=False)


def _control(engine: BuiltinEngine, table: EndpointTable, sync: FeedSync, stats: TrafficStats,
             workers: Workers | None) -> Control:
    if workers is None:
        return Control("builtin", table, sync, stats, pods_info=engine.pods_info, applied_versions=engine.applied)
    return Control("builtin", table, sync, stats, pods_info=lambda s: workers.pods_info(s, engine.pods_info),
                   before_metrics=workers.pull, before_stats=workers.pull,
                   applied_versions=workers.versions)  # type: ignore[arg-type]


async def run_builtin(table: EndpointTable, sync: FeedSync, stats: TrafficStats, *, host: str, port: int,
                      ready: asyncio.Event | None = None, options: ProxyOptions | None = None, procs: int = 1
                      ) -> None:
    """Serve until cancelled; with ``procs`` > 1, this process and ``procs - 1`` workers share
    the port (:mod:`router.workers`)."""
    engine = BuiltinEngine(table, stats, options)
    await engine.start()
    workers = None
    if procs > 1:
        workers = Workers(table, stats, engine.applied, host=host, port=port, count=procs)
    control = _control(engine, table, sync, stats, workers)
    runner = server_runner(Dispatch(engine.handle, control.routes()))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024, reuse_port=workers is not None).start()
        if workers is not None:
            await web.UnixSite(runner, str(workers.control_sock)).start()  # the workers' control relay
            await workers.start()
        log.info("router (builtin, %d process%s) on http://%s:%d", procs, "es" if procs > 1 else "", host, port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        if workers is not None:
            await workers.close()
        await runner.cleanup()
        await engine.close()
