"""The operators' dashboard: an aiohttp app serving ``dashboard/static/`` and a small JSON/SSE API.

One :class:`Dashboard` per process reads the fleet once per ``refresh_s`` (one list call, the
status queries concurrent with a bound), the router's ``/-/stats`` and the tail of
``events.jsonl``, and pushes the same prepared JSON to every open page over server-sent events:
the cost does not grow with the number of viewers.

Reading (``/api/*`` and the event stream) needs a token that may ``status`` (a viewer's, or any
role's) once identities are configured (``keys/token.pub`` exists); ``public_read``
(``hms dashboard --public-read``, ``hms up --public-read``) opens it to whoever reaches the port
(127.0.0.1 unless the stack listens on another address: ``hms up --listen``), as it was before.
The event stream is an ``EventSource``, which cannot send a header: the page trades its token
for a stream ticket (``POST /api/stream-ticket``), good for one connection within a minute, and
the stream ends when the token expires. At most ``max_subscribers`` pages stream at once (503
beyond). Approving or rejecting needs the
caller's own token (``Authorization: Bearer``), verified here; the workflow gets a one-time proof
made from it (never the token), which its worker checks again; the dashboard's own identity
never acts for a browser.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp_sse import sse_response
from temporalio.client import Client

from hms_mgmt import auth, feed, names
from hms_mgmt.addresses import LOOPBACK, check_address, host_port
from hms_mgmt.config import Settings, connect
from hms_mgmt.errors import AccessDenied, HmsError, ServiceNotFound
from hms_mgmt.events import EventFollower, EventSink, RefusalLog
from hms_mgmt.fleet import fleet_status
from hms_mgmt.logtext import shown
from hms_mgmt.models import RevisionRecord, ServiceStatus
from hms_mgmt.nodes import list_routers
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.tickets import b64url, unb64url
from hms_mgmt.webserve import serve_app

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DECIDE_TIMEOUT_S = 30.0
RECENT_EVENTS_BYTES = 256 * 1024  # of the event log read at start: ~1,500 events, enough for the page
MAX_SUBSCRIBERS = 64  # live pages at once: each holds a connection and a queue
MAX_LOG_STREAMS = 32  # live log panes at once: each holds a connection to a node
REFUSALS_PER_MINUTE = 30  # access.denied events written a minute; the rest are counted in the next
LOG_TAIL = 200
_POD = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STREAM_TICKET_TTL_S = 60.0


def child_url(status: ServiceStatus, child_id: str) -> str | None:
    """A child workflow's page in the Temporal Web UI, next to the service's own."""
    if not status.web_ui_url:
        return None
    return status.web_ui_url.rsplit("/", 1)[0] + "/" + child_id


def deploy_workflow_id(status: ServiceStatus) -> str | None:
    """The DeployWorkflow behind the service's current revision: the last rolling update's child
    once there was one (its id has counters no status field repeats, so the workflow records it
    in ``rollout.workflow_id``), else the first deploy's ``svc-<name>-deploy-<rev>``. None while
    no deploy has started (admission, approval, a refusal) or for a rollout that did not record
    its child (a run from before ``workflow_id``): no link rather than a dead one."""
    if status.phase in (*names.ADMITTING, "AwaitingApproval", "Rejected") or (
            status.phase == "Failed" and not status.revisions):
        return None
    if status.rollout is not None:
        return status.rollout.workflow_id or None
    return names.deploy_id(status.workflow_id, status.revision)


def revision_workflow_id(status: ServiceStatus, record: RevisionRecord) -> str | None:
    """The DeployWorkflow that rolled ``record`` out, where the status lets us know it: the
    latest rollout's child for its target revision, the first deploy's for revision 1 (every
    run starts at revision 1; a rollout makes a higher one)."""
    rollout = status.rollout
    if rollout is not None and rollout.to_revision == record.revision:
        child = rollout.workflow_id
        if child:
            return child
    if record.revision == 1:
        return names.deploy_id(status.workflow_id, 1)
    return None


def service_view(status: ServiceStatus) -> dict[str, Any]:
    """What the page shows of one service. The spec is trimmed: its env may hold secrets and
    every viewer (with ``public_read``, anyone reaching the port) may read this."""
    spec = status.spec
    decisions = []
    scale_n = status.scale_count
    # Decisions carry no child id: the newest scale decision is child scale-<scale_count>, the one
    # before it scale-<scale_count - 1>, and so on (exact while every scale finishes).
    for d in reversed(status.last_decisions):
        url = None
        if d.kind == "scale" and scale_n > 0:
            url = child_url(status, names.scale_id(status.workflow_id, scale_n))
            scale_n -= 1
        elif d.kind == "heal" and d.pod:
            url = child_url(status, names.heal_id(status.workflow_id, d.pod))
        decisions.append({**d.model_dump(mode="json"), "workflow_url": url})
    decisions.reverse()
    deploy_id = deploy_workflow_id(status)
    revisions = []
    for r in status.revisions:
        child = revision_workflow_id(status, r)
        revisions.append({"revision": r.revision, "image": r.spec.image, "outcome": r.outcome, "reason": r.reason,
                          "deployed_by": r.deployed_by,
                          "deployed_at": r.deployed_at.isoformat() if r.deployed_at else None,
                          "workflow_id": child, "workflow_url": child_url(status, child) if child else None})
    return {
        "name": status.name,
        "phase": status.phase,
        "revision": status.revision,
        "image": spec.image,
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "cpu_target": spec.cpu_target,
        "desired_replicas": status.desired_replicas,
        "ready_replicas": status.ready_replicas,
        "pods": [p.model_dump(mode="json") for p in status.pods],
        "pending_approval": status.pending_approval.model_dump(mode="json") if status.pending_approval else None,
        "decisions": decisions,
        "workflow_id": status.workflow_id,
        "web_ui_url": status.web_ui_url,
        "deploy_workflow_id": deploy_id,
        "deploy_url": child_url(status, deploy_id) if deploy_id else None,
        "revisions": revisions,
        "active_slot": status.active_slot.model_dump(mode="json") if status.active_slot else None,
        "message": status.message,
        "waiting_for": status.waiting_for.model_dump(mode="json") if status.waiting_for else None,
        "backoff_s": status.backoff_s,
        "crash_count": status.crash_count,
        "heal_count": status.heal_count,
        "scale_count": status.scale_count,
        "approved_by": status.approved_by,
        "refusals": [r.model_dump(mode="json", exclude={"request_id"}) for r in status.refusals[-5:]],
    }


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def merge_router_stats(answers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per service, across routers: requests/s summed, error rate weighted by requests, the
    worst p50/p99, and each pod's view (draining, in flight, latency, ejected) from the first
    router that has it. Accepts ``rps`` or ``requests_per_s``."""
    out: dict[str, dict[str, Any]] = {}
    for services in answers:
        for name, raw in services.items():
            if not isinstance(raw, dict):
                continue
            rps = _num(raw.get("rps", raw.get("requests_per_s"))) or 0.0
            err = _num(raw.get("error_rate")) or 0.0
            agg = out.setdefault(name, {"rps": 0.0, "errors_per_s": 0.0, "p50_ms": None, "p99_ms": None,
                                        "pods": {}})
            agg["rps"] += rps
            agg["errors_per_s"] += rps * err
            for q in ("p50_ms", "p99_ms"):
                v = _num(raw.get(q))
                if v is not None:
                    agg[q] = v if agg[q] is None else max(agg[q], v)
            pods = raw.get("pods")
            if isinstance(pods, dict):
                for pod, info in pods.items():
                    if isinstance(info, dict):
                        agg["pods"].setdefault(str(pod), {
                            k: info.get(k) for k in ("state", "outstanding", "latency_ms", "ejected", "weight")
                            if k in info})
    for agg in out.values():
        errors = agg.pop("errors_per_s")
        agg["error_rate"] = errors / agg["rps"] if agg["rps"] else 0.0
        agg["rps"] = round(agg["rps"], 2)
    return out


def mean_cpu(status: ServiceStatus) -> float | None:
    samples = [p.cpu_percent for p in status.pods if p.cpu_percent is not None and p.health != "exited"]
    return round(sum(samples) / len(samples), 2) if samples else None


class _Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=256)


def _json_error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json")


class _StreamTickets:
    """Short-lived tickets for the event stream (an ``EventSource`` sends no header): signed with
    a key of this process, good for one connection within ``STREAM_TICKET_TTL_S``, and carrying
    the token's expiry, when the stream ends."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._used: dict[str, float] = {}  # ticket id -> its expiry, until then

    def issue(self, identity: auth.Identity) -> str:
        body = json.dumps({"id": secrets.token_urlsafe(12), "exp": time.time() + STREAM_TICKET_TTL_S,
                           "until": identity.expires_at.timestamp(), "user": identity.user}).encode()
        payload = b64url(body)
        return f"{payload}.{self._mac(payload)}"

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def redeem(self, ticket: str) -> float | None:
        """The token's expiry for a good, unused, unexpired ticket (now used); else None."""
        payload, _, mac = ticket.partition(".")
        if len(ticket) > 512 or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            claims = json.loads(unb64url(payload))
            tid, exp, until = str(claims["id"]), float(claims["exp"]), float(claims["until"])
        except (ValueError, KeyError, TypeError):
            return None
        now = time.time()
        self._used = {t: e for t, e in self._used.items() if e > now}
        if exp <= now or until <= now or tid in self._used:
            return None
        self._used[tid] = exp
        return until


class Dashboard:
    """The dashboard's state and its aiohttp app. ``start()`` / ``stop()`` run it in-process
    (the local stack); :func:`serve` runs it until cancelled (``hms dashboard``)."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        *,
        token: str | None = None,
        refresh_s: float = 1.0,
        sample_s: float = 2.0,
        history: int = 300,
        router_url: str | list[str] | None = None,
        concurrency: int = 16,
        events_kept: int = 200,
        public_read: bool = False,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self.client = client
        self.public_read = public_read
        self.max_subscribers = max_subscribers
        self._tickets = _StreamTickets()
        self.settings = settings.model_copy(update={"token": token}) if token else settings
        self._refusals = RefusalLog(EventSink(self.settings.state_dir, webhooks=self.settings.webhook_urls()),
                                    REFUSALS_PER_MINUTE)
        self.token = token
        self.orch = Orchestrator(client, self.settings)
        self.refresh_s = refresh_s
        self.sample_s = sample_s
        self.concurrency = concurrency
        # None: every live router in the RouterRegistry (routers on any host), read each round.
        self.router_urls: list[str] | None = (None if router_url is None else
                                              [router_url] if isinstance(router_url, str) else list(router_url))
        self.history: dict[str, collections.deque[list[Any]]] = {}
        self.history_len = history
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=events_kept)
        self.services: list[ServiceStatus] = []
        self.state_json = json.dumps({"services": [], "ok": False, "error": "starting", "router": None})
        self.router: dict[str, Any] | None = None
        self.fleet_error: str | None = "starting"
        self.refreshed_at: datetime | None = None
        self._subscribers: set[_Subscriber] = set()
        self._log_streams = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._follower: EventFollower | None = None
        self.port: int | None = None
        self.host = LOOPBACK
        self.app = self._make_app()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{host_port(self.host, self.port or 0)}"

    @property
    def sign_in_url(self) -> str | None:
        """A link that signs the browser in with the process's token. The token travels in the
        fragment, which browsers never send to a server or put in a Referer."""
        return f"{self.url}/#token={self.token}" if self.token else None

    async def start(self, *, port: int, host: str = LOOPBACK) -> str:
        """Listen on ``host``: loopback, or one IP address of this machine (never all of them)."""
        if host != "localhost":
            try:
                host = check_address(host)
            except ValueError as e:
                raise HmsError(f"the dashboard cannot listen on {host}: {e}") from None
        self.host = host
        self._follower = EventFollower(self.settings.state_dir, tail_bytes=RECENT_EVENTS_BYTES)
        self.events.extend(e.model_dump(mode="json") for e in await asyncio.to_thread(self._follower.poll))
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="dashboard fleet"),
            asyncio.create_task(self._router_loop(), name="dashboard router"),
            asyncio.create_task(self._events_loop(), name="dashboard events"),
        ]
        try:
            self._runner, self.port = await serve_app(self.app, host, port, "the dashboard")
        except HmsError:
            await self.stop()  # the background readers started above
            raise
        log.info("dashboard on %s", self.url)
        return self.url

    async def stop(self) -> None:
        for sub in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Dashboard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- background readers ---------------------------------------------------------------

    def _broadcast(self, name: str, data: str) -> None:
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait((name, data))
            except asyncio.QueueFull:  # a page that stopped reading: drop it, it reconnects
                self._subscribers.discard(sub)
                with contextlib.suppress(asyncio.QueueEmpty):
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_sample = 0.0
        while True:
            try:
                self.services = await fleet_status(self.orch, concurrency=self.concurrency)
                self.fleet_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - show it on the page; keep the last snapshot
                self.fleet_error = f"cannot read the fleet from Temporal: {e}"
                log.warning("%s", self.fleet_error)
            self.refreshed_at = datetime.now(UTC)
            if self.fleet_error is None and loop.time() >= next_sample:
                next_sample = loop.time() + self.sample_s
                self._broadcast("sample", json.dumps(self._take_sample()))
            self.state_json = self._state_json()
            self._broadcast("state", self.state_json)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)

    def _take_sample(self) -> dict[str, Any]:
        t = round(time.time(), 1)
        sample: dict[str, list[Any]] = {}
        for s in self.services:
            point = [mean_cpu(s), s.desired_replicas, s.ready_replicas]
            ring = self.history.setdefault(s.name, collections.deque(maxlen=self.history_len))
            ring.append([t, *point])
            sample[s.name] = point
        live = {s.name for s in self.services}
        for gone in set(self.history) - live:
            del self.history[gone]
        return {"t": t, "services": sample}

    def _state_json(self) -> str:
        return json.dumps({
            "generated_at": (self.refreshed_at or datetime.now(UTC)).isoformat(),
            "ok": self.fleet_error is None,
            "error": self.fleet_error,
            "web_ui_url": self.settings.web_ui_url,
            "namespace": self.settings.namespace,
            "refresh_s": self.refresh_s,
            # Web UI links from this dashboard's settings: a run's own web_ui_url is the placement
            # its starter wrote, and anyone who reaches Temporal can start one.
            "services": [service_view(s.model_copy(update={"web_ui_url": self.settings.web_ui_link(s.workflow_id)}))
                         for s in self.services],
            "router": self.router,
        })

    async def _router_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                urls = self.router_urls if self.router_urls is not None else await self._registered_routers()
                # A router answers its figures to loopback, or to a read the control plane signed.
                signed = await asyncio.to_thread(feed.inspect_headers, self.settings.state_dir, "/-/stats")
                answers = await asyncio.gather(*(self._router_stats(session, u, signed) for u in urls))
                live = [a for a in answers if isinstance(a, dict)]
                errors = [a for a in answers if isinstance(a, str)]
                self.router = {
                    "ok": bool(live),
                    "routers": len(urls),
                    "live": len(live),
                    "errors": errors,
                    "services": merge_router_stats(live),
                }
                await asyncio.sleep(max(1.0, self.refresh_s * 2))

    async def _registered_routers(self) -> list[str]:
        """The stats URL of every Ready router in the RouterRegistry; the configured routers
        while none has registered (or the registry cannot be read)."""
        try:
            records = await list_routers(self.client, self.settings)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the page shows the configured routers meanwhile
            log.debug("cannot read the router registry: %s", e)
            records = []
        urls = [r.url for r in records if r.state == "Ready"] or self.settings.routers
        return [u.rstrip("/") + "/-/stats" for u in urls]

    @staticmethod
    async def _router_stats(session: aiohttp.ClientSession, url: str,
                            headers: dict[str, str] | None = None) -> dict[str, Any] | str:
        """One router's ``services`` object, or why there is none (no router yet: the page says so)."""
        try:
            async with session.get(url, headers=headers) as resp:
                if resp.status == 401:
                    return (f"{url}: the router shows its figures only to HMS_ROUTER_INSPECT_FROM or to a read "
                            "the control plane signed: run the dashboard beside the control plane's keys")
                resp.raise_for_status()
                body = await resp.json()
            services = body.get("services") if isinstance(body, dict) else None
            if not isinstance(services, dict):
                raise ValueError("no 'services' object in the answer")
            return services
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            return f"{url}: {e or type(e).__name__}"

    async def _events_loop(self) -> None:
        """New events to every page within ~0.3 s (the same follower that read the recent ones,
        so none falls between the two)."""
        follower = self._follower
        assert follower is not None
        try:
            while True:
                new = await asyncio.to_thread(follower.poll)
                for event in new:
                    data = event.model_dump(mode="json")
                    self.events.append(data)
                    self._broadcast("event", json.dumps(data))
                if new:
                    self._wake.set()  # an event usually means the state changed: refresh now
                await asyncio.sleep(0.3)
        finally:
            follower.close()

    # --- HTTP -----------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._local_only, self._record_refusals], client_max_size=64 * 1024)
        app.on_response_prepare.append(self._security_headers)
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/api/stream", self._api_stream)
        app.router.add_post("/api/stream-ticket", self._api_stream_ticket)
        app.router.add_get("/api/me", self._api_me)
        app.router.add_post("/api/services/{name}/{action:approve|reject}", self._api_decide)
        app.router.add_get("/api/services/{name}/pods/{pod}/logs", self._api_logs)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        return app

    @web.middleware
    async def _local_only(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Refuse a Host that is not this machine: a web page elsewhere cannot reach in by
        pointing its own name at 127.0.0.1 (DNS rebinding)."""
        raw = request.host or ""
        host = raw[: raw.find("]") + 1] if raw.startswith("[") else raw.rsplit(":", 1)[0]
        if host.lower() not in LOCAL_HOSTS | {self.host, f"[{self.host}]"}:
            refused = _json_error(web.HTTPMisdirectedRequest, "unknown host")
            await self._refused(request, refused)  # what a rebinding page sends: recorded too
            return web.json_response({"error": "unknown host"}, status=421)
        return await handler(request)

    @web.middleware
    async def _record_refusals(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every refusal (401, 403) is an ``access.denied`` event, as the workers' are."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status in (401, 403):
                await self._refused(request, e)
            raise

    async def _refused(self, request: web.Request, error: web.HTTPException) -> None:
        try:
            why = json.loads(error.text or "{}").get("error") or error.reason
        except ValueError:
            why = error.reason
        name = request.match_info.get("name", "")
        path = shown(request.path)  # what a caller with no token sent: never raw into events and webhooks
        await self._refusals.record(
            name if _NAME.match(name) else "-",
            f"dashboard {request.method} {path[:100]} refused ({error.status}): {shown(str(why))[:500]}",
            action="dashboard", path=path[:200], status=error.status, remote=request.remote or "")

    @staticmethod
    async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cache-Control", "no-store")

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": self.fleet_error is None, "services": len(self.services)})

    async def _api_state(self, request: web.Request) -> web.Response:
        await self._reader(request)
        return web.Response(text=self.state_json, content_type="application/json")

    async def _api_events(self, request: web.Request) -> web.Response:
        await self._reader(request)
        return web.json_response(list(self.events))

    def _init_payload(self) -> str:
        history = {name: list(ring) for name, ring in self.history.items()}
        return json.dumps({"history": history, "events": list(self.events), "history_len": self.history_len})

    # --- who may read (issue 19: the fleet's state is not for whoever reaches the port) ------

    def _read_is_open(self) -> bool:
        """Open with ``public_read``, or where no identity can be checked (no ``keys/token.pub``)."""
        return self.public_read or not (auth.keys_dir(self.settings.state_dir) / auth.TOKEN_PUB_FILE).exists()

    async def _reader(self, request: web.Request) -> auth.Identity | None:
        """The caller's identity, which may ``status``; None when reading is open to anyone."""
        if self._read_is_open():
            return None
        _token, identity = await self._identity(request, why="reading needs a viewer token")
        matrix = await asyncio.to_thread(auth.load_access_matrix, self.settings.state_dir)
        try:
            auth.authorize(identity, "status", matrix)
        except AccessDenied as e:
            raise _json_error(web.HTTPForbidden, str(e)) from None
        return identity

    async def _api_stream_ticket(self, request: web.Request) -> web.Response:
        identity = await self._reader(request)
        if identity is None:
            return web.json_response({"ticket": None, "expires_in": None})  # open: the stream needs none
        return web.json_response({"ticket": self._tickets.issue(identity), "expires_in": STREAM_TICKET_TTL_S})

    async def _api_stream(self, request: web.Request) -> web.StreamResponse:
        until: float | None = None  # the token's expiry, as a time.time()
        if not self._read_is_open():
            ticket = request.query.get("ticket", "")
            until = self._tickets.redeem(ticket) if ticket else None
            if until is None:
                raise _json_error(web.HTTPUnauthorized, "sign in: the stream needs a fresh ticket "
                                  "(POST /api/stream-ticket with Authorization: Bearer <token>)")
        if len(self._subscribers) >= self.max_subscribers:
            raise _json_error(web.HTTPServiceUnavailable, f"too many live pages ({self.max_subscribers} stream "
                              "already): close one, or try again later")
        sub = _Subscriber()
        self._subscribers.add(sub)
        resp: web.StreamResponse | None = None
        try:
            async with sse_response(request, ping_interval=10) as resp:
                await resp.send(self._init_payload(), event="init")
                await resp.send(self.state_json, event="state")
                while resp.is_connected():
                    if until is None:
                        item = await sub.queue.get()
                    else:
                        try:
                            item = await asyncio.wait_for(sub.queue.get(), max(0.0, until - time.time()))
                        except TimeoutError:
                            break  # the token expired: the page signs in again
                    if item is None:
                        break
                    name, data = item
                    await resp.send(data, event=name)
        except ConnectionResetError:  # the page went away; nothing to answer
            pass
        finally:
            self._subscribers.discard(sub)
        return resp if resp is not None else web.Response(status=204)

    async def _identity(self, request: web.Request, *, why: str = "sign in") -> tuple[str, auth.Identity]:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _json_error(web.HTTPUnauthorized, f"{why}: send Authorization: Bearer <token>")
        try:
            identity = await asyncio.to_thread(auth.verify_token, token, state_dir=self.settings.state_dir)
        except (AccessDenied, HmsError) as e:
            raise web.HTTPUnauthorized(text=json.dumps({"error": str(e)}), content_type="application/json") from None
        except (UnicodeError, ValueError):  # bytes no token is made of: no token, not a 500
            raise _json_error(web.HTTPUnauthorized, f"{why}: that is not a token") from None
        return token, identity

    async def _api_me(self, request: web.Request) -> web.Response:
        _token, identity = await self._identity(request)
        matrix = await asyncio.to_thread(auth.load_access_matrix, self.settings.state_dir)
        allowed = matrix.get(identity.role, [])
        return web.json_response({
            "user": identity.user,
            "role": identity.role,
            "expires_at": identity.expires_at.isoformat(),
            "can_approve": "approve" in allowed,
            "can_reject": "reject" in allowed,
        })

    async def _api_decide(self, request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if request.content_type != "application/json":
            return web.json_response({"error": "send JSON"}, status=415)
        token, identity = await self._identity(request)
        if not _NAME.match(name):
            return web.json_response({"error": "no such service"}, status=404)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        reason = body.get("reason", "") if isinstance(body, dict) else ""
        if not isinstance(reason, str) or len(reason) > 500:
            return web.json_response({"error": "reason must be text of at most 500 characters"}, status=400)
        matrix = await asyncio.to_thread(auth.load_access_matrix, self.settings.state_dir)
        try:
            auth.authorize(identity, action, matrix)
        except AccessDenied as e:
            log.warning("dashboard: %s %s refused for %s (%s): %s", action, name, identity.user, identity.role, e)
            raise _json_error(web.HTTPForbidden, str(e)) from None
        orch = Orchestrator(self.client, self.settings.model_copy(update={"token": token}))
        decide = orch.approve if action == "approve" else orch.reject
        log.info("dashboard: %s %s by %s", action, name, identity.user)
        try:
            status = await asyncio.wait_for(decide(name, reason=reason), DECIDE_TIMEOUT_S)
        except AccessDenied as e:
            return web.json_response({"error": str(e)}, status=403)
        except ServiceNotFound as e:
            return web.json_response({"error": str(e)}, status=404)
        except TimeoutError:
            return web.json_response({"error": f"no answer from {name} within {DECIDE_TIMEOUT_S:g}s"}, status=504)
        except HmsError as e:
            return web.json_response({"error": str(e)}, status=409)
        self._wake.set()
        return web.json_response({"ok": True, "service": name, "action": action, "phase": status.phase,
                                  "by": identity.user})

    async def _api_logs(self, request: web.Request) -> web.StreamResponse:
        """A pod's live log pane: the node's stream (``logs -f``), read with the signed-in user's
        own token, so the control plane checks that user (viewer or better) and no one else's
        right; relayed as server-sent events: one per line, ``end`` when the pod is gone."""
        name, pod = request.match_info["name"], request.match_info["pod"]
        token, identity = await self._identity(request, why="logs need a viewer token")
        if not _NAME.match(name) or not _POD.match(pod):
            raise _json_error(web.HTTPNotFound, "no such pod")
        matrix = await asyncio.to_thread(auth.load_access_matrix, self.settings.state_dir)
        try:
            auth.authorize(identity, "logs", matrix)
        except AccessDenied as e:
            raise _json_error(web.HTTPForbidden, str(e)) from None
        if self._log_streams >= MAX_LOG_STREAMS:
            raise _json_error(web.HTTPServiceUnavailable, f"too many log panes open ({MAX_LOG_STREAMS})")
        orch = Orchestrator(self.client, self.settings.model_copy(update={"token": token}))
        lines = orch.follow_logs(name, pod, LOG_TAIL)
        self._log_streams += 1
        try:
            return await self._relay_logs(request, lines, until=identity.expires_at.timestamp())
        finally:
            self._log_streams -= 1
            await lines.aclose()

    @staticmethod
    async def _relay_logs(request: web.Request, lines: AsyncIterator[str], *, until: float) -> web.StreamResponse:
        try:  # the grant and the node's answer, before the stream: a refusal is an HTTP status
            first = await asyncio.wait_for(anext(lines, None), DECIDE_TIMEOUT_S)
        except AccessDenied as e:
            raise _json_error(web.HTTPForbidden, str(e)) from None
        except ServiceNotFound as e:
            raise _json_error(web.HTTPNotFound, str(e)) from None
        except (HmsError, TimeoutError) as e:
            raise _json_error(web.HTTPBadGateway, str(e) or "no answer from the node") from None
        resp: web.StreamResponse | None = None
        try:
            async with sse_response(request, ping_interval=15) as resp:
                line = first
                try:
                    while line is not None and time.time() < until:  # the token expired: the page signs in again
                        await resp.send(line)
                        line = await anext(lines, None)
                    await resp.send("end", event="end")
                except HmsError as e:  # the node went away mid-stream
                    await resp.send(str(e), event="error")
        except ConnectionResetError:  # the pane was closed
            pass
        return resp if resp is not None else web.Response(status=204)


@contextlib.asynccontextmanager
async def running_dashboard(
    client: Client, settings: Settings, *, port: int | None = None, token: str | None = None,
    host: str = LOOPBACK, **kw: Any
) -> AsyncIterator[Dashboard]:
    """The dashboard for the local stack: started on ``host``:``port`` (default 127.0.0.1 and
    ``settings.dashboard_port``; 0 picks a free one), stopped on exit."""
    dash = Dashboard(client, settings, token=token, **kw)
    await dash.start(port=settings.dashboard_port if port is None else port, host=host)
    try:
        yield dash
    finally:
        await dash.stop()


async def serve(settings: Settings, *, port: int, token: str | None = None, **kw: Any) -> None:
    """Connect to Temporal and serve the dashboard until cancelled (``hms dashboard``)."""
    client = await connect(settings)
    async with running_dashboard(client, settings, port=port, token=token, **kw):
        await asyncio.Event().wait()
