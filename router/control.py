"""The router's own endpoints, the same for both engines:

- ``GET /-/health``  200 once the first full table load has succeeded (503 before), with counts;
- ``GET /-/table``   the endpoint table as JSON;
- ``GET /-/stats``   per service over the last minute: requests/s, error rate, p50/p99 ms, per pod;
- ``GET /metrics``   Prometheus text;
  these three show pod addresses and traffic, so they answer a caller in ``router_inspect_from``
  (``HMS_ROUTER_INSPECT_FROM``, loopback by default) or a read the control plane signed (kind
  ``inspect``, over the path: :func:`hms_mgmt.feed.inspect_headers`); anyone else gets 401 and
  the refusal is an ``access.denied`` event. ``/-/health`` says only whether the router is ready;
- ``POST /-/feed``   an endpoint table signed by the control plane's key (401 unless it verifies);
- ``GET /-/drained?service=S&pods=A,B[&wait=2]``  whether this router is done with pods being
  drained: it sends them nothing new and has no request in flight to any of them. With ``wait``
  (at most 5 s) it answers as soon as that holds, else when ``wait`` is up. A rolling update
  stops an old pod once every router says so, instead of always waiting ``drain_s``. The question
  is signed by the control plane like a feed push (nobody else may ask); the answer is signed by
  this router's own key (``X-HMS-Router``, ``X-HMS-Router-Signature``), so the control plane
  knows which enrolled router confirmed. At most ``MAX_DRAIN_WAITERS`` asks wait at once (429 beyond).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hms_mgmt import feed as wire
from hms_mgmt.addresses import within
from hms_mgmt.events import EventSink, RefusalLog
from router.feed import EndpointTable, FeedSync
from router.names import service_problem
from router.stats import TrafficStats

MAX_FEED_BYTES = 1 << 20
MAX_DRAIN_WAIT_S = 5.0
MAX_DRAIN_PODS = 256
DRAIN_POLL_S = 0.02
MAX_DRAIN_WAITERS = 64


GET_PATHS = ("/-/health", "/-/table", "/-/stats", "/metrics", wire.DRAINED_PATH)
CONTROL_ROUTES = frozenset({*(("GET", p) for p in GET_PATHS), *(("HEAD", p) for p in GET_PATHS),
                            ("POST", wire.FEED_PATH)})


def remote(request: web.BaseRequest) -> str:
    """Who asked: the peer; through the builtin engine's relay (our own unix socket, which only
    the router's user may reach), the caller's address the relay put in ``X-Forwarded-For``."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return request.headers.get("X-Forwarded-For", "")
    return request.remote or ""


@dataclass(eq=False)
class Control:
    """Handlers for the control endpoints; ``pods_info(service)`` adds the engine's per-pod view."""

    engine: str
    table: EndpointTable
    sync: FeedSync
    stats: TrafficStats
    pods_info: Callable[[str], dict[str, Any]] | None = None
    before_metrics: Callable[[], Any] | None = None
    before_stats: Callable[[], Any] | None = None  # awaited before /-/stats (builtin: pull the workers' figures)
    applied: asyncio.Event | None = None  # set once the engine carries the first full table (default: at load)
    applied_versions: dict[str, int] | None = None  # service -> table version the engine carries
    drain_waiters: int = field(default=0, init=False)
    refusals: RefusalLog = field(init=False)

    def __post_init__(self) -> None:
        # In this router's state dir: on the control host (`hms up`), the control plane's event log.
        settings = self.sync.settings
        self.refusals = RefusalLog(EventSink(settings.state_dir, webhooks=settings.webhook_urls()))

    async def _refused(self, request: web.Request, action: str, error: str, service: str = "-") -> None:
        await self.refusals.record(service, f"router {self.engine}: {error}", action=action,
                                   remote=remote(request), port=request.url.port)

    def routes(self) -> dict[tuple[str, str], Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]]:
        """(method, path) -> handler."""
        gets = dict(zip(GET_PATHS, (self.health, self.table_json, self.stats_json, self.metrics, self.drained),
                        strict=True))
        routes = {**{("GET", p): h for p, h in gets.items()}, **{("HEAD", p): h for p, h in gets.items()},
                  ("POST", wire.FEED_PATH): self.feed}
        assert routes.keys() == CONTROL_ROUTES
        return routes

    def add_routes(self, app: web.Application) -> None:
        for (method, path), handler in self.routes().items():
            if method != "HEAD":  # add_get answers HEAD too
                (app.router.add_get if method == "GET" else app.router.add_post)(path, handler)

    async def health(self, request: web.Request) -> web.Response:
        synced = self.sync.synced.is_set() and (self.applied is None or self.applied.is_set())
        body = {"status": "ok" if synced else "starting", "engine": self.engine,
                "services": len(self.table.services), "resync_error": self.table.resync_error}
        return web.json_response(body, status=200 if synced else 503)

    async def _not_inspectable(self, request: web.Request) -> web.Response | None:
        """None when the caller may read this inspection path, else the 401 to answer."""
        if within(remote(request), self.sync.settings.router_inspect_from):
            return None
        why = self.sync.check_control(wire.inspect_query(request.path), request.headers.get(wire.SIGNATURE_HEADER),
                                      kind="inspect")
        if why is None:
            return None
        await self._refused(request, "router_inspect", f"{request.path} refused: {why}")
        return web.json_response({"error": f"{request.path} refused: {why} (this router answers it to "
                                           "HMS_ROUTER_INSPECT_FROM, or to a read the control plane signed)"},
                                 status=401)

    async def table_json(self, request: web.Request) -> web.Response:
        """The feed's tables; ``applied_version`` says which version the engine carries."""
        if (refused := await self._not_inspectable(request)) is not None:
            return refused
        snap = self.table.snapshot()
        if self.applied_versions is not None:
            for name, t in snap["services"].items():
                t["applied_version"] = self.applied_versions.get(name)
        return web.json_response({"engine": self.engine, **snap})

    async def stats_json(self, request: web.Request) -> web.Response:
        if (refused := await self._not_inspectable(request)) is not None:
            return refused
        if self.before_stats is not None:
            await self.before_stats()
        out = self.stats.summary(list(self.table.services))
        if self.pods_info is not None:
            for name, svc in out["services"].items():
                svc["pods"] = self.pods_info(name)
        return web.json_response(out)

    async def metrics(self, request: web.Request) -> web.Response:
        if (refused := await self._not_inspectable(request)) is not None:
            return refused
        if self.before_metrics is not None:
            await self.before_metrics()
        return web.Response(body=generate_latest(self.stats.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def feed(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_FEED_BYTES:
            return web.json_response({"error": "feed push too large"}, status=413)
        body = await request.content.read(MAX_FEED_BYTES + 1)
        if len(body) > MAX_FEED_BYTES:
            return web.json_response({"error": "feed push too large"}, status=413)
        status, answer = self.sync.accept_push(body, request.headers.get(wire.SIGNATURE_HEADER))
        if status == 401:
            await self._refused(request, "router_feed", answer["error"])
        return web.json_response(answer, status=status)

    async def drained(self, request: web.Request) -> web.Response:
        service = request.query.get("service", "")
        pods = [p for p in request.query.get("pods", "").split(",") if p]
        if not service or not pods:
            return web.json_response({"error": "service and pods are required"}, status=400)
        if len(pods) > MAX_DRAIN_PODS:
            return web.json_response({"error": f"at most {MAX_DRAIN_PODS} pods"}, status=400)
        try:
            wait = min(MAX_DRAIN_WAIT_S, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return web.json_response({"error": "wait must be a number of seconds"}, status=400)
        question = request.headers.get(wire.SIGNATURE_HEADER)
        why = self.sync.check_control(wire.drained_query(service, request.query["pods"], request.query.get("wait", "")),
                                      question, kind="drained")
        if why is not None:
            # The caller's text is the event's service only when it could be one: a refused
            # caller's words reach operators' logs and terminals.
            named = service if service_problem(service) is None else "-"
            await self._refused(request, "router_drained", f"drained query refused: {why}", named)
            return web.json_response({"error": f"drained query refused: {why}"}, status=401)
        if self.drain_waiters >= MAX_DRAIN_WAITERS:
            return web.json_response({"error": "too many drain queries waiting"}, status=429)
        self.drain_waiters += 1
        try:
            deadline = time.monotonic() + wait
            while True:
                busy = await self._busy(service, pods)
                if not busy or time.monotonic() >= deadline:
                    return self._signed_answer(question or "", {"service": service, "idle": not busy, "busy": busy})
                await asyncio.sleep(DRAIN_POLL_S)
        finally:
            self.drain_waiters -= 1

    def _signed_answer(self, question: str, answer: dict[str, Any]) -> web.Response:
        """The answer, signed by this router's key over the question it answers."""
        body = json.dumps(answer).encode()
        headers = {}
        ident = self.sync.identity
        if ident is not None:
            headers = {wire.ROUTER_HEADER: ident.node,
                       wire.ROUTER_SIGNATURE_HEADER: ident.say("drained", wire.drained_answer(question, body))}
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _busy(self, service: str, pods: list[str]) -> dict[str, str]:
        """Pods of ``pods`` this router may still send to or has requests in flight to, and why."""
        if not (self.sync.synced.is_set() and (self.applied is None or self.applied.is_set())):
            return {p: "router not synced yet" for p in pods}
        if self.pods_info is None:
            return {}
        if self.before_metrics is not None:
            await self.before_metrics()  # the engine's own counters, fresh (HAProxy: show stat)
        info = self.pods_info(service)
        busy: dict[str, str] = {}
        for pod in pods:
            p = info.get(pod)
            if p is None:
                continue  # this router does not route to it (gone, or never had it)
            status = p.get("haproxy_status")
            if p.get("state") == "ready" or (isinstance(status, str) and status.startswith("UP")):
                busy[pod] = "still routed to"
            elif p.get("outstanding"):
                busy[pod] = f"{p['outstanding']} in flight"
        return busy
