"""Pod logs straight from the node that runs the pod, as ``kubectl logs -f`` reads the kubelet.

No log line passes through Temporal. The caller asks the control plane (``PodLogGrantWorkflow``:
its viewer check, then where each pod runs) for a grant, signed with the control plane's key,
bound to the service, the pods, and the hash of a secret the caller made and kept (so the grant
read from that workflow's history reads nothing). It then connects to each pod's node, whose worker
serves ``GET /v1/pods/{pod}/logs?service=S&tail=N&follow=1`` on ``NodeSpec.address:log_port``
and streams server-sent events: one ``data:`` per line, then an ``end`` event naming why it ended
(the pod is gone). The node checks the grant's signature, binding, age, the secret, and that
the pod is one of the service's pods on this node; anything else is 401/403/404 and no line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import re
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp_sse import sse_response

from hms_mgmt import tickets
from hms_mgmt.addresses import host_port
from hms_mgmt.errors import AccessDenied, HmsError, ServiceNotFound
from hms_mgmt.events import EventSink, RefusalLog
from hms_mgmt.runtimes.base import PodRuntime, PodRuntimeError, check_pod_id
from hms_mgmt.runtimes.follow import LogFollow
from hms_mgmt.webserve import serve_app
from hms_mgmt.wire import LogEndpoint, LogGrantOutput

log = logging.getLogger(__name__)

KEY_HEADER = "X-Hms-Log-Key"
MAX_KEY_CHARS = 128  # a key is ASCII, at most this long (``new_key`` makes 43); anything else is no key
# A grant opens a stream within this long of being issued (a stream once open runs on, as a
# `kubectl logs -f` does past its token's check); a later connection asks for a fresh one.
GRANT_MAX_AGE_S = 60.0
MAX_TAIL = 10_000
QUEUE_LINES = 1000  # lines read ahead of a slow reader; then the reading thread waits
MAX_FOLLOWS = 128  # follow streams open at once on one node: each holds a thread and a file or engine stream
FOLLOWS_PER_GRANT = 2  # per pod and grant (a reconnect may overlap the stream it replaces)
REFUSALS_PER_MINUTE = 30  # access.denied events a minute from this door; the rest are counted in the next
_SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a DNS-1123 label, as ServiceSpec.name


# --- the grant --------------------------------------------------------------------------


def new_key() -> tuple[str, str]:
    """A stream secret and the hash the grant is bound to."""
    key = secrets.token_urlsafe(32)
    return key, key_hash(key)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def grant_bind(pods: list[str], key_hash_: str) -> dict[str, str]:
    """What the caller's proof and the grant are bound to."""
    return {"pods": ",".join(pods), "key": key_hash_}


def check_log_grant(state_dir: Path, grant: str, key: str, *, service: str, pod: str) -> dict[str, Any]:
    """The grant's claims, or AccessDenied unless it is the control plane's grant to read ``logs``
    of ``service`` for this pod, issued within ``GRANT_MAX_AGE_S``, to a role that may read logs
    (this node's access matrix, else the defaults), and ``key`` is its secret."""
    from hms_mgmt.auth import load_access_matrix

    claims = tickets.check_grant(state_dir, grant, service=service, actions={"logs"}, bind={"key": key_hash(key)},
                                 max_age_s=GRANT_MAX_AGE_S)
    if "logs" not in load_access_matrix(state_dir).get(str(claims.get("role")), []):
        raise AccessDenied(f"{claims.get('sub')} ({claims.get('role')}) may not read logs")
    if pod not in str(claims["bind"].get("pods", "")).split(","):
        raise AccessDenied(f"the grant is for other pods of {service}, not {pod}")
    return claims


# --- the node's side --------------------------------------------------------------------


async def follow_lines(follow: LogFollow) -> AsyncIterator[str]:
    """A blocking ``LogFollow`` read on a thread of its own (a follow may last hours: never on
    the loop's shared pool), with a bounded queue between; closed when the reader stops."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=QUEUE_LINES)
    done = object()

    def put(item: object) -> bool:
        try:
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                fut.result(0.5)
                return True
            except concurrent.futures.TimeoutError:
                if follow.closed:
                    fut.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False

    def pump() -> None:
        try:
            for line in follow:
                if not put(line):
                    return
        except Exception as e:  # noqa: BLE001 - handed to the reader, who raises it
            put(e)
        put(done)

    threading.Thread(target=pump, name="hms-log-follow", daemon=True).start()
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]
    finally:
        follow.close()


def _error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json")


class LogServer:
    """A node's log endpoint (its worker runs it beside the pod activities)."""

    def __init__(self, runtime: PodRuntime, state_dir: Path, *, sink: EventSink | None = None) -> None:
        self.runtime = runtime
        self.state_dir = state_dir
        self.sink = sink
        # Anyone who reaches the node's address may knock: a flood of refusals must not rotate the
        # node's real events out of its log, its webhook spool or its outbox to the control host.
        self.refusals = RefusalLog(sink, REFUSALS_PER_MINUTE) if sink is not None else None
        self.follows: Counter[tuple[str, str]] = Counter()  # (grant key, pod) -> follow streams open
        self.port = 0
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/v1/pods/{pod}/logs", self._logs)
        self.app = app

    async def start(self, host: str, port: int = 0) -> int:
        self._runner, self.port = await serve_app(self.app, host, port, "the node's log stream", per_peer=True)
        log.info("node log stream on %s", host_port(host, self.port))
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _refused(self, service: str, pod: str, error: Exception) -> None:
        """A refusal is an ``access.denied`` event on this node, as every refusal is (at most
        :data:`REFUSALS_PER_MINUTE`). What the caller named is recorded only if it is a service
        name and a pod id: anything else is "-", never the caller's text."""
        service = service if len(service) <= 63 and _SERVICE_NAME.fullmatch(service) else "-"
        try:
            check_pod_id(pod)
        except PodRuntimeError:
            pod = "-"
        # A reason may quote what the caller asked for (a grant "not for <service>"): printable only, bounded.
        why = "".join(c if c.isprintable() else "?" for c in str(error)[:300])
        log.warning("log stream of pod %s (%s) refused: %s", pod, service, why)
        if self.refusals is not None:
            await self.refusals.record(service, f"log stream of pod {pod} refused: {why}",
                                       action="logs", pod=pod, node=self.runtime.node)

    async def _request(self, request: web.Request) -> tuple[str, str, int, bool, str]:
        """The checked request: service, pod, tail, follow, the grant's key hash; or the HTTP refusal."""
        scheme, _, grant = request.headers.get("Authorization", "").partition(" ")
        key = request.headers.get(KEY_HEADER, "")
        if not (key.isascii() and len(key) <= MAX_KEY_CHARS):
            key = ""  # undecodable bytes, or a key no client made: no key
        service, pod = request.query.get("service", ""), request.match_info["pod"]
        if scheme.lower() != "bearer" or not grant.strip() or not key:
            await self._refused(service, pod, AccessDenied("no grant, or no key"))
            raise _error(web.HTTPUnauthorized, f"send Authorization: Bearer <grant> and {KEY_HEADER}")
        # The grant first: a caller without one learns nothing of what the node would accept.
        try:
            await asyncio.to_thread(check_log_grant, self.state_dir, grant.strip(), key, service=service, pod=pod)
        except (AccessDenied, HmsError, ValueError) as e:
            why = e if isinstance(e, HmsError) else AccessDenied("the grant cannot be read")
            await self._refused(service, pod, why)
            raise _error(web.HTTPForbidden, str(why)) from None
        raw_tail = request.query.get("tail", "100")
        try:
            check_pod_id(pod)
            if not (raw_tail.isascii() and raw_tail.isdigit() and len(raw_tail) <= len(str(MAX_TAIL))):
                raise ValueError(f"tail must be 0..{MAX_TAIL}")
            tail = int(raw_tail)
            if not 0 <= tail <= MAX_TAIL:
                raise ValueError(f"tail must be 0..{MAX_TAIL}")
        except (ValueError, PodRuntimeError):
            raise _error(web.HTTPBadRequest, f"a pod id, and tail 0..{MAX_TAIL}") from None
        try:
            handle = await asyncio.to_thread(self.runtime.find, pod)
        except (AccessDenied, HmsError) as e:
            await self._refused(service, pod, e)
            raise _error(web.HTTPForbidden, str(e)) from None
        if handle is None or handle.service != service:
            raise _error(web.HTTPNotFound, f"no pod {pod} of {service} on node {self.runtime.node}")
        return service, pod, tail, request.query.get("follow", "") in ("1", "true"), key_hash(key)

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        service, pod, tail, follow, grant_key = await self._request(request)
        held = (grant_key, pod)
        if follow:  # one viewer's grant must not hold every thread and file of the node
            if sum(self.follows.values()) >= MAX_FOLLOWS:
                raise _error(web.HTTPTooManyRequests, f"{MAX_FOLLOWS} log streams are open on node "
                                                      f"{self.runtime.node}: try again later")
            if self.follows[held] >= FOLLOWS_PER_GRANT:
                raise _error(web.HTTPTooManyRequests, f"{FOLLOWS_PER_GRANT} streams of pod {pod} are open "
                                                      "for this grant already")
            self.follows[held] += 1
        resp: web.StreamResponse | None = None
        try:
            async with sse_response(request, ping_interval=15) as resp:
                if not follow:
                    for line in await asyncio.to_thread(self.runtime.logs, pod, tail):
                        await resp.send(one_line(line))
                    await resp.send("end of snapshot", event="end")
                    return resp
                async for line in follow_lines(await asyncio.to_thread(self.runtime.follow, pod, tail)):
                    await resp.send(one_line(line))
                await resp.send(await self._why_ended(pod), event="end")
        except (ConnectionResetError, PodRuntimeError) as e:
            log.info("log stream of pod %s ended: %s", pod, e or "the reader went away")
        finally:
            if follow:
                self.follows[held] -= 1
                if self.follows[held] <= 0:
                    del self.follows[held]
        return resp if resp is not None else web.Response(status=204)

    async def _why_ended(self, pod: str) -> str:
        handle = await asyncio.to_thread(self.runtime.find, pod)
        if handle is None:
            return f"pod {pod} is gone (stopped and removed): end of log"
        return f"pod {pod} is gone ({handle.state}): end of log"


def one_line(line: str) -> str:
    """A pod's log line as one server-sent event line: an event's data ends at any CR or LF, and
    the reader would make a line of its own of what a pod wrote after one (a line with no
    ``POD@NODE`` prefix, or one forging another pod's). They are sent as ``\\r`` and ``\\n``."""
    return line.replace("\r", "\\r").replace("\n", "\\n")


# --- the reader's side ------------------------------------------------------------------


@dataclass
class StreamLine:
    pod: str
    text: str
    end: bool = False  # the node's last word: the pod is gone


async def _sse(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a server-sent event stream."""
    event, data = "message", []
    async for raw in resp.content:
        line = raw.decode(errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()


async def read_pod(session: aiohttp.ClientSession, endpoint: LogEndpoint, grant: str, key: str, *, service: str,
                   tail: int, follow: bool) -> AsyncIterator[StreamLine]:
    """One pod's lines from its node; the typed error of a refusal."""
    if not endpoint.url:
        raise HmsError(f"node {endpoint.node} serves no log stream (its worker predates it, or runs with log_port -1)")
    url = f"{endpoint.url}/v1/pods/{endpoint.pod}/logs"
    params = {"service": service, "tail": str(tail), "follow": "1" if follow else "0"}
    headers = {"Authorization": f"Bearer {grant}", KEY_HEADER: key}
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)
    try:
        async with session.get(url, params=params, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                text = (await resp.text())[:500]
                kind = AccessDenied if resp.status in (401, 403) else ServiceNotFound if resp.status == 404 else HmsError
                raise kind(f"node {endpoint.node} refused the log stream of pod {endpoint.pod} ({resp.status}): {text}")
            async for event, data in _sse(resp):
                if event == "end":
                    if follow:
                        yield StreamLine(endpoint.pod, data, end=True)
                    return
                yield StreamLine(endpoint.pod, data)
    except aiohttp.ClientError as e:
        raise HmsError(f"the log stream of pod {endpoint.pod} from node {endpoint.node} ({endpoint.url}) "
                       f"broke: {e}") from None
    raise HmsError(f"the log stream of pod {endpoint.pod} from node {endpoint.node} ended without its last word")


class PodStreams:
    """Pods' lines as they arrive, interleaved (``docker service logs``); pods may join while it
    runs (``add``: a replacement, a scale-up). Iteration ends once every pod's stream has ended.
    A pod's error ends it all, raised; unless ``each_alone``: then it is that pod's last line
    (a pod replaced between the grant and the connection, a node gone), and the others go on."""

    def __init__(self, key: str, *, service: str, tail: int, follow: bool, each_alone: bool = False) -> None:
        self.key, self.service, self.tail, self.follow = key, service, tail, follow
        self.each_alone = each_alone
        self.queue: asyncio.Queue[StreamLine | BaseException | None] = asyncio.Queue(maxsize=QUEUE_LINES)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.open = 0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def pods(self) -> set[str]:
        return set(self.tasks)

    def add(self, grant: LogGrantOutput) -> None:
        """Read each pod of ``grant`` not read yet."""
        if self._closed:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        for endpoint in grant.endpoints:
            if endpoint.pod not in self.tasks:
                self.open += 1
                self.tasks[endpoint.pod] = asyncio.create_task(self._pump(endpoint, grant.grant))

    async def _pump(self, endpoint: LogEndpoint, grant: str) -> None:
        assert self._session is not None
        try:
            async for item in read_pod(self._session, endpoint, grant, self.key, service=self.service, tail=self.tail,
                                       follow=self.follow):
                await self.queue.put(item)
        except Exception as e:  # noqa: BLE001 - raised by the reader, or that pod's last line
            await self.queue.put(StreamLine(endpoint.pod, f"cannot read pod {endpoint.pod}: {e}", end=True)
                                 if self.each_alone else e)
        await self.queue.put(None)

    async def lines(self) -> AsyncIterator[StreamLine]:
        try:
            while self.open:
                item = await self.queue.get()
                if item is None:
                    self.open -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            await self.close()

    async def close(self) -> None:
        self._closed = True
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
