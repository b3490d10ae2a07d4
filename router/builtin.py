"""The builtin engine: a reverse proxy, ``/<service>/<path>`` -> a ready pod, on the lean
HTTP/1.1 data path of :mod:`router.http1` (httptools parsers, pooled keep-alive connections).

Per request: power-of-two-choices on (outstanding + 1) x latency EWMA (:mod:`router.policy`);
draining and ejected pods get nothing new. A request that failed before reaching a pod
(connection refused, connect timeout) is retried on another pod whatever its method; a 502/503
or a reset is retried only for idempotent methods; every retry is paid from the service's
retry budget. Non-idempotent requests go on a fresh connection, so "did it reach the pod?" has
a sure answer: a reused keep-alive connection that turns out dead cannot tell.

Bodies stream both ways (content-length or chunked); request bodies of known length up to
:data:`BUFFER_BYTES` are buffered so that they can be sent again. Responses carry ``X-HMS-Pod`` and ``X-Request-Id`` (kept or created);
requests get ``X-Forwarded-For`` / ``-Proto`` / ``-Host``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from hms_mgmt.models import EndpointSet
from router import http1, policy
from router.control import CONTROL_ROUTES, Control
from router.feed import EndpointTable, FeedSync
from router.http1 import BUFFER_BYTES, CallerConnection, CallerServer, Exchange, PodPool, Request
from router.stats import TrafficStats
from router.workers import StatsBatch, Workers

log = logging.getLogger("hms.router.builtin")

__all__ = ["BUFFER_BYTES", "BuiltinEngine", "ControlRelay", "ProxyOptions", "dispatch", "run_builtin"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
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


@dataclass
class _Failed:
    """A failed attempt: what to answer if it is the last, and the retry reason if it may be retried."""

    status: int
    info: dict[str, Any]
    retry: str | None


class BuiltinEngine:
    def __init__(self, table: EndpointTable, stats: TrafficStats | StatsBatch, options: ProxyOptions | None = None
                 ) -> None:
        self.table = table
        self.stats = stats
        self.options = options or ProxyOptions()
        self.pools: dict[str, ServicePool] = {}
        self.rng = random.Random()  # for P2C and request ids: unique, not secret
        self.connections = PodPool(self.options.connect_timeout_s)
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
        goes to another pod at once (a reset)."""
        self.connections.cut(addresses)

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

    async def close(self) -> None:
        self.connections.close()

    # --- proxy -------------------------------------------------------------------------------

    async def handle(self, caller: CallerConnection, req: Request) -> None:
        t0 = time.monotonic()
        service, tail = _SERVICE_PATH.match(req.target).groups()  # type: ignore[union-attr]
        if not tail.startswith("/"):
            tail = "/" + tail
        rid = req.request_id or f"{self.rng.getrandbits(128):032x}"
        pool = self.pools.get(service)
        if pool is None:
            caller.send_json(404, {"error": "unknown service", "service": service}, [("X-Request-Id", rid)], req=req)
            return
        ready, draining = pool.counts()
        if ready == 0:
            self.stats.record(service, "-", 503, time.monotonic() - t0)
            if pool.landed_until is not None:
                body = landed_body(service, pool.landed_until)
                retry = retry_after(pool.landed_until)
            else:
                reason = (f"no ready pod: {draining} draining" if draining
                          else "no ready pod: the service has no pod that passed its health check")
                body, retry = {"error": "no ready pod", "service": service, "reason": reason}, "1"
            caller.send_json(503, body, [("X-Request-Id", rid), ("Retry-After", retry)], req=req)
            return
        await self._forward(caller, req, pool, tail, rid, t0)

    @staticmethod
    def _head(req: Request, peer: str, rid: str) -> bytes:
        """The headers a pod gets (after its request line and Host): the caller's, less hop-by-hop
        ones and those we set, plus ``X-Forwarded-*`` and ``X-Request-Id``."""
        prior = req.forwarded_for
        forwarded = f"X-Forwarded-For: {prior + ', ' + peer if prior else peer}\r\nX-Forwarded-Proto: http\r\n"
        if req.host:
            forwarded += f"X-Forwarded-Host: {req.host}\r\n"
        return req.header_block(_NOT_FORWARDED) + (forwarded + f"X-Request-Id: {rid}\r\n").encode("latin-1")

    async def _forward(self, caller: CallerConnection, req: Request, pool: ServicePool, tail: str, rid: str,
                       t0: float) -> None:
        body: bytes | None = None
        if req.has_body and req.buffers_body:
            try:
                body = await req.read()
            except ConnectionResetError:
                return
        head = self._head(req, caller.peer, rid)
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
                result = await self._attempt(req, pool, pod, tail, head, body, rid, t0,
                                             last=attempt >= self.options.max_attempts)
            finally:
                policy.finish_request(pod, token)
            if result is None:
                return
            failed = result
            if failed.retry is None or req.streamed or not pool.budget.try_spend(time.monotonic()):
                break
            self.stats.record_retry(pool.name, failed.retry)
        self.stats.record(pool.name, failed.info.get("pod", "-"), failed.status, time.monotonic() - t0)
        extra = [("X-HMS-Pod", failed.info["pod"])] if "pod" in failed.info else []
        caller.send_json(failed.status, {**failed.info, "service": pool.name, "attempts": attempt},
                         [("X-Request-Id", rid), *extra], req=req)

    async def _attempt(self, req: Request, pool: ServicePool, pod: policy.PodState, tail: str, head: bytes,
                       body: bytes | None, rid: str, t0: float, *, last: bool) -> _Failed | None:
        """One try on one pod: None once its answer went to the caller, else how it failed and
        whether another pod may be tried. Non-idempotent requests go on a fresh connection."""
        idempotent = req.method in IDEMPOTENT
        sent = time.monotonic()
        try:
            conn = await self.connections.acquire(pod.address, fresh=not idempotent)
        except (OSError, TimeoutError) as e:
            # Refused, unreachable or no SYN-ACK in time: the pod never saw the request.
            self._failure(pool, pod, time.monotonic())
            why = str(e) or f"no connection within {self.options.connect_timeout_s:g}s"
            return _Failed(502, {"error": f"could not connect to pod: Cannot connect to host {pod.address} [{why}]",
                                 "pod": pod.pod, "reached_pod": False}, "connect")
        extra = f"X-HMS-Pod: {pod.pod}\r\nX-Request-Id: {rid}\r\n".encode("latin-1")
        ex = Exchange(req, conn, extra=extra, retryable=idempotent and not last,
                      read_timeout_s=self.options.read_timeout_s)
        out = await ex.run(f"{req.method} {tail} HTTP/1.1\r\nHost: {pod.address}\r\n".encode("latin-1") + head, body)
        now = time.monotonic()
        ms = (out.head_at - sent) * 1000 if out.head_at else None
        if out.kind == http1.RELAYED:
            if out.status >= 500:
                self._failure(pool, pod, now, ms)
            else:
                policy.record_success(pod, ms or 0.0, now)
            self.stats.record(pool.name, pod.pod, out.status, now - t0)
            return None
        if out.kind == http1.CALLER_LEFT:
            return None
        self._failure(pool, pod, now, ms)
        if out.kind == http1.TRUNCATED:
            # Headers are gone already: all that is left is to cut the caller's connection.
            log.info("pod %s of %s failed mid-answer: %s", pod.pod, pool.name, out.error)
            req.caller.abort()
            return None
        if out.kind == http1.REFUSED_STATUS:
            return _Failed(out.status, {"error": f"pod answered {out.status}", "pod": pod.pod, "reached_pod": True},
                           f"http_{out.status}")
        if out.kind == http1.TIMEOUT:
            return _Failed(504, {"error": f"pod did not answer within {self.options.read_timeout_s:g}s",
                                 "pod": pod.pod, "reached_pod": True}, None)
        # Reset or closed mid-way: the pod may have acted on it; only idempotent requests go again.
        return _Failed(502, {"error": f"connection to pod failed: {out.error or 'closed'}", "pod": pod.pod,
                             "reached_pod": True}, "reset" if idempotent else None)

    def _failure(self, pool: ServicePool, pod: policy.PodState, now: float, ms: float | None = None) -> None:
        if policy.record_failure(pod, now, self.options.ejection, ms):
            self.stats.record_ejection(pool.name, pod.pod)
            log.warning("ejected pod %s of %s for %.0fs after consecutive failures", pod.pod, pool.name,
                        pod.ejected_until - now)


class ControlRelay:
    """The control endpoints (``/-/...``, ``/metrics``), served by the primary process alone on
    its unix socket: every process (the primary too) relays such a request there as it came,
    with the caller's address in ``X-Forwarded-For`` (set here, never the caller's own)."""

    def __init__(self, path: Path, read_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self.read_timeout_s = read_timeout_s

    async def __call__(self, caller: CallerConnection, req: Request) -> None:
        body = None
        if req.has_body and req.buffers_body:
            try:
                body = await req.read()
            except ConnectionResetError:
                return
        try:
            conn = await http1.open_unix(self.path)
        except OSError as e:
            caller.send_json(503, {"error": f"router primary process did not answer: {e}"}, (), req=req)
            return
        head = (f"{req.method} {req.target} HTTP/1.1\r\n".encode("latin-1") + req.header_block(_NOT_RELAYED)
                + f"X-Forwarded-For: {caller.peer}\r\n".encode("latin-1"))
        try:
            async with asyncio.timeout(self.read_timeout_s):
                out = await Exchange(req, conn, extra=b"", retryable=False,
                                     read_timeout_s=self.read_timeout_s).run(head, body)
        except TimeoutError:
            conn.abort()
            out = http1.Outcome(http1.TRUNCATED if caller.relaying is not None else http1.TIMEOUT,
                                error=f"no answer within {self.read_timeout_s:g}s")
        if out.kind == http1.TRUNCATED:
            caller.abort()
        elif out.kind not in (http1.RELAYED, http1.CALLER_LEFT):
            caller.send_json(503, {"error": f"router primary process did not answer: {out.error}"}, (), req=req)


_NOT_FORWARDED = http1.HOP_BY_HOP | {b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                                     b"x-forwarded-host", b"x-request-id"}
_NOT_RELAYED = (http1.HOP_BY_HOP - {b"host"}) | {b"content-length", b"x-forwarded-for"}


def dispatch(engine: BuiltinEngine, relay: ControlRelay) -> http1.Handler:
    """Each request: a control endpoint (by its method and path) to the primary, anything else proxied."""
    async def handle(caller: CallerConnection, req: Request) -> None:
        path = req.target.partition("?")[0]
        if (req.method, path) in CONTROL_ROUTES:
            await relay(caller, req)
        else:
            await engine.handle(caller, req)

    return handle


def control_runner(control: Control) -> web.ServerRunner:
    """The primary's control endpoints on its unix socket (aiohttp: they are few and rare)."""
    routes = control.routes()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        handler = routes.get((request.method, request.path))
        if handler is None:
            return web.json_response({"error": "no such control endpoint", "path": request.path}, status=404)
        return await handler(request)

    return web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)


async def run_builtin(table: EndpointTable, sync: FeedSync, stats: TrafficStats, *, host: str, port: int,
                      ready: asyncio.Event | None = None, options: ProxyOptions | None = None, procs: int = 1
                      ) -> None:
    """Serve until cancelled; with ``procs`` > 1, this process and ``procs - 1`` workers share
    the port (:mod:`router.workers`)."""
    batch = StatsBatch()  # recorded per request at the cost of an append, summed once a second
    engine = BuiltinEngine(table, batch, options)
    workers = Workers(table, stats, engine.applied, host=host, port=port, count=procs, own=batch)
    control = Control("builtin", table, sync, stats, pods_info=lambda s: workers.pods_info(s, engine.pods_info),
                      before_metrics=workers.pull, before_stats=workers.pull,
                      applied_versions=workers.versions)  # type: ignore[arg-type]
    runner = control_runner(control)
    server = CallerServer(dispatch(engine, ControlRelay(workers.control_sock)))
    await runner.setup()
    try:
        await web.UnixSite(runner, str(workers.control_sock)).start()
        await server.listen(host, port, reuse_port=procs > 1)
        await workers.start()
        log.info("router (builtin, %d process%s) on http://%s:%d", procs, "es" if procs > 1 else "", host, port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await workers.close()
        await server.close()
        await runner.cleanup()
        await engine.close()
