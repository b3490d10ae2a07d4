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
from router.http1 import BUFFER_BYTES, CallerConnection, CallerServer, Exchange, PodConnection, PodPool, Request
from router.stats import TrafficStats
from router.workers import StatsBatch, Workers

log = logging.getLogger("hms.router.builtin")

__all__ = ["BUFFER_BYTES", "BuiltinEngine", "ControlRelay", "ProxyOptions", "caller_server", "run_builtin"]

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


class _Job:
    """One request through the engine: its service and pod path, and what its tries gave."""

    __slots__ = ("caller", "req", "pool", "tail", "rid", "t0", "head", "body", "tried", "attempt", "failed")

    def __init__(self, caller: CallerConnection, req: Request, pool: ServicePool, tail: str, rid: str, t0: float
                 ) -> None:
        self.caller, self.req, self.pool, self.tail, self.rid, self.t0 = caller, req, pool, tail, rid, t0
        self.head = b""
        self.body: bytes | None = None
        self.tried: set[str] = set()
        self.attempt = 0
        self.failed: _Failed | None = None


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

    def _route(self, caller: CallerConnection, req: Request) -> _Job | None:
        """The request's service, or its answer at once (404, 503) and None."""
        t0 = time.monotonic()
        service, tail = _SERVICE_PATH.match(req.target).groups()  # type: ignore[union-attr]
        if not tail.startswith("/"):
            tail = "/" + tail
        rid = req.request_id or f"{self.rng.getrandbits(128):032x}"
        pool = self.pools.get(service)
        if pool is None:
            caller.send_json(404, {"error": "unknown service", "service": service}, [("X-Request-Id", rid)], req=req)
            return None
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
            return None
        return _Job(caller, req, pool, tail, rid, t0)

    def _begin(self, job: _Job) -> None:
        """The headers a pod gets (after its request line and Host): the caller's, less hop-by-hop
        ones and those we set, plus ``X-Forwarded-*`` and ``X-Request-Id``; and the request
        counted toward the service's retry budget."""
        req = job.req
        key = (req.forwarded_for, req.host)
        forwarded = job.caller.forwarded.get(key)  # the same on most requests of a connection
        if forwarded is None:
            prior, peer = key[0], job.caller.peer
            text = f"X-Forwarded-For: {prior + ', ' + peer if prior else peer}\r\nX-Forwarded-Proto: http\r\n"
            if req.host:
                text += f"X-Forwarded-Host: {req.host}\r\n"
            forwarded = text.encode("latin-1")
            if len(job.caller.forwarded) < 8:
                job.caller.forwarded[key] = forwarded
        job.head = b"%s%sX-Request-Id: %s\r\n" % (req.header_block(_NOT_FORWARDED), forwarded, job.rid.encode("latin-1"))
        job.pool.budget.record_request(job.t0)

    def _exchange(self, job: _Job, pod: policy.PodState, conn: PodConnection, *, last: bool) -> Exchange:
        extra = b"X-HMS-Pod: %s\r\nX-Request-Id: %s\r\n" % (pod.pod.encode("latin-1"), job.rid.encode("latin-1"))
        return Exchange(job.req, conn, extra=extra, retryable=job.req.method in IDEMPOTENT and not last,
                        read_timeout_s=self.options.read_timeout_s)

    def _request_line(self, job: _Job, pod: policy.PodState) -> bytes:
        return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (job.req.method.encode("latin-1"), job.tail.encode("latin-1"),
                                                       pod.address.encode("latin-1"), job.head)

    async def handle(self, caller: CallerConnection, req: Request) -> None:
        """A request in a task: its body read if it is held, then its tries."""
        job = self._route(caller, req)
        if job is None:
            return
        if req.has_body and req.buffers_body:
            try:
                job.body = await req.read()
            except ConnectionResetError:
                return
        self._begin(job)
        await self._tries(job)

    def start(self, caller: CallerConnection, req: Request) -> bool | None:
        """:data:`router.http1.Starter`: the first try of an idempotent request without a body
        sent at once on an idle pooled connection, its outcome a callback (no task, no future:
        most requests). None (declined: :meth:`handle` serves it) when that cannot be."""
        job = self._route(caller, req)
        if job is None:
            return False
        if req.method not in IDEMPOTENT:
            return None
        pod = policy.pick(job.pool.listed, job.t0, self.rng)
        conn = self.connections.take_idle(pod.address) if pod is not None else None
        if pod is None or conn is None:
            return None
        self._begin(job)
        job.attempt = 1
        job.tried.add(pod.pod)
        sent = time.monotonic()
        token = policy.start_request(pod, sent)
        ex = self._exchange(job, pod, conn, last=self.options.max_attempts <= 1)
        ex.on_done = lambda out: self._started(job, pod, token, sent, out)
        if not ex.start(self._request_line(job, pod), None):
            self._started(job, pod, token, sent, http1.Outcome(http1.LOST, error="the pod closed the connection"))
        return True

    def _started(self, job: _Job, pod: policy.PodState, token: int, sent: float, out: http1.Outcome) -> None:
        policy.finish_request(pod, token)
        failed = self._outcome(job, pod, out, sent)
        if failed is None:
            job.caller.done(job.req)
            return
        job.failed = failed
        job.caller.loop.create_task(self._resume(job))

    async def _resume(self, job: _Job) -> None:
        """The tries after a failed first one that :meth:`start` made."""
        try:
            await self._tries(job)
        except Exception:  # noqa: BLE001 - one caller's failure must not reach the loop's handler
            log.exception("router: serving a caller failed")
            job.caller.abort()
            return
        job.caller.done(job.req)

    def _again(self, job: _Job) -> bool:
        """After a failed try: may another pod be tried (retryable, the body still held, the
        service's retry budget not spent)?"""
        failed = job.failed
        assert failed is not None
        if failed.retry is None or job.req.streamed or not job.pool.budget.try_spend(time.monotonic()):
            return False
        self.stats.record_retry(job.pool.name, failed.retry)
        return True

    async def _tries(self, job: _Job) -> None:
        """Pods tried one after another (P2C among those not tried yet) until one answers, a
        failure may not be retried, or ``max_attempts``; the last failure is the answer."""
        while job.failed is None or self._again(job):
            if job.attempt >= self.options.max_attempts:
                break
            job.attempt += 1
            pod = policy.pick(job.pool.listed, time.monotonic(), self.rng, exclude=job.tried)
            if pod is None:
                break
            job.tried.add(pod.pod)
            token = policy.start_request(pod, time.monotonic())
            try:
                failed = await self._attempt(job, pod, last=job.attempt >= self.options.max_attempts)
            finally:
                policy.finish_request(pod, token)
            if failed is None:
                return
            job.failed = failed
        failed = job.failed or _Failed(502, {"error": "no pod could take the request"}, None)
        self.stats.record(job.pool.name, failed.info.get("pod", "-"), failed.status, time.monotonic() - job.t0)
        extra = [("X-HMS-Pod", failed.info["pod"])] if "pod" in failed.info else []
        job.caller.send_json(failed.status, {**failed.info, "service": job.pool.name, "attempts": job.attempt},
                             [("X-Request-Id", job.rid), *extra], req=job.req)

    async def _attempt(self, job: _Job, pod: policy.PodState, *, last: bool) -> _Failed | None:
        """One try on one pod: None once its answer went to the caller, else how it failed and
        whether another pod may be tried. Non-idempotent requests go on a fresh connection."""
        try:
            conn = await self.connections.acquire(pod.address, fresh=job.req.method not in IDEMPOTENT)
        except (OSError, TimeoutError) as e:
            # Refused, unreachable or no SYN-ACK in time: the pod never saw the request.
            self._failure(job.pool, pod, time.monotonic())
            why = str(e) or f"no connection within {self.options.connect_timeout_s:g}s"
            return _Failed(502, {"error": f"could not connect to pod: Cannot connect to host {pod.address} [{why}]",
                                 "pod": pod.pod, "reached_pod": False}, "connect")
        if job.caller.closed:  # gone while we connected (or its stream broke): nobody to send it for
            conn.release(True)
            return None
        # The latency sample starts once the request goes out, as HAProxy's Tr: a new connection's
        # setup (a thread started in a threaded pod, on a busy host) is no measure of the pod's answers.
        sent = time.monotonic()
        out = await self._exchange(job, pod, conn, last=last).run(self._request_line(job, pod), job.body)
        return self._outcome(job, pod, out, sent)

    def _outcome(self, job: _Job, pod: policy.PodState, out: http1.Outcome, sent: float) -> _Failed | None:
        """What a try's outcome means: the pod's score and the figures updated; None if the
        caller has its answer (or is gone), else the failure."""
        pool, now = job.pool, time.monotonic()
        ms = (out.head_at - sent) * 1000 if out.head_at else None
        if out.kind == http1.RELAYED:
            if out.status >= 500:
                self._failure(pool, pod, now, ms)
            else:
                policy.record_success(pod, ms or 0.0, now)
            self.stats.record(pool.name, pod.pod, out.status, now - job.t0, now=now)
            return None
        if out.kind == http1.CALLER_LEFT:
            return None
        self._failure(pool, pod, now, ms)
        if out.kind == http1.TRUNCATED:
            # Headers are gone already: all that is left is to cut the caller's connection.
            log.info("pod %s of %s failed mid-answer: %s", pod.pod, pool.name, out.error)
            job.caller.abort()
            return None
        if out.kind == http1.REFUSED_STATUS:
            return _Failed(out.status, {"error": f"pod answered {out.status}", "pod": pod.pod, "reached_pod": True},
                           f"http_{out.status}")
        if out.kind == http1.TIMEOUT:
            return _Failed(504, {"error": f"pod did not answer within {self.options.read_timeout_s:g}s",
                                 "pod": pod.pod, "reached_pod": True}, None)
        # Reset or closed mid-way: the pod may have acted on it; only idempotent requests go again.
        return _Failed(502, {"error": f"connection to pod failed: {out.error or 'closed'}", "pod": pod.pod,
                             "reached_pod": True}, "reset" if job.req.method in IDEMPOTENT else None)

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


# Most requests are told from a control endpoint by the first letter of their path ("/-/..." and "/metrics").
_CONTROL_INITIALS = frozenset(path[1:2] for _, path in CONTROL_ROUTES)


def _is_control(req: Request) -> bool:
    return (req.method, req.target.partition("?")[0]) in CONTROL_ROUTES


def caller_server(engine: BuiltinEngine, relay: ControlRelay) -> CallerServer:
    """The listening side: a control endpoint (by its method and path) to the primary, anything
    else proxied (most requests started at once, :meth:`BuiltinEngine.start`)."""
    async def handle(caller: CallerConnection, req: Request) -> None:
        if _is_control(req):
            await relay(caller, req)
        else:
            await engine.handle(caller, req)

    def start(caller: CallerConnection, req: Request) -> bool | None:
        if req.target[1:2] in _CONTROL_INITIALS and _is_control(req):
            return None
        return engine.start(caller, req)

    return CallerServer(handle, start)


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
    server = caller_server(engine, ControlRelay(workers.control_sock))
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
