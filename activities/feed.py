"""The endpoint feed's publisher (task queue ``hms-control``): ServiceWorkflow calls
``publish_endpoints`` whenever its set of ready and draining pods changes, and
``await_drained`` to learn when every router is done with the pods it drains. The routers are
the live ones of the RouterRegistry (workflows/routers.py), plus any ``HMS_ROUTERS`` (deprecated).

The control worker signs every push, so ``publish_endpoints`` believes nothing in the table it
is given but the service's name: it runs only for that service's own workflow (as the server
records the caller) and pushes what that workflow's ``endpoints`` query answers.

It must never hold the workflow up: each push has a short timeout and a failed one is logged,
not retried — routers also reload the whole table from the workflows every few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from temporalio import activity
from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.callers import Callers, deny
from hms_mgmt import constants, feed, names, nodeid
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import EventSink, RefusalLog
from hms_mgmt.models import EndpointSet
from hms_mgmt.nodes import NotOurRegistry, own_registry
from hms_mgmt.wire import DrainInput, DrainResult, PublishResult, RoutersOutput

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 1.0
DRAIN_ASK_S = 2.0  # each ask is a long poll: the router answers once the pods are idle, or after this
DRAIN_RETRY_S = 0.1  # after a router failed to answer
DRAIN_ANSWER_SLACK_S = 0.2
REGISTRY_TTL_S = 1.0  # publish_endpoints reads the RouterRegistry at most this often


class FeedActivities:
    def __init__(self, settings: Callable[[], Settings], *, client: Client | None = None,
                 sink: EventSink | None = None, callers: Callers | None = None) -> None:
        self.settings = settings
        self.client = client  # with sink: what publish_endpoints needs (await_drained only reads)
        self.sink = sink
        self.refusals = RefusalLog(sink) if sink is not None else None
        self.callers = callers or (Callers(client) if client is not None else None)
        self._session: aiohttp.ClientSession | None = None
        self._registry: dict[str, str] = {}  # url -> name of the Ready routers, as last read
        self._registry_at = -REGISTRY_TTL_S

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _truth(self, asked: EndpointSet, settings: Settings) -> EndpointSet:
        """The table of ``asked.service`` as its own workflow holds it, for that workflow only."""
        if self.client is None or self.sink is None or self.callers is None:
            raise RuntimeError("publish_endpoints needs the control worker's client and event sink")
        try:
            await self.callers.entitled(asked.service, settings.task_queue)
        except AccessDenied as e:
            caller = await self.callers.current()
            await deny(self.sink, asked.service, "publish_endpoints", f"endpoint table refused: {e}",
                       version=asked.version, **caller.data())
        handle = self.client.get_workflow_handle(names.service_workflow_id(asked.service))
        return await handle.query(names.Q.ENDPOINTS, result_type=EndpointSet)

    async def _routers(self, settings: Settings, *, fresh: bool = False) -> dict[str, str]:
        """``url -> router name`` of every live router: each Ready router in the RouterRegistry,
        then the deprecated ``HMS_ROUTERS`` URLs not registered (name ``""``: their drain answers
        still count only when signed by an enrolled router). Read at most once a second unless
        ``fresh``."""
        now = time.monotonic()
        if self.client is not None and (fresh or now - self._registry_at > REGISTRY_TTL_S):
            try:
                handle = await own_registry(self.client, constants.router_registry_id(settings.task_queue),
                                            names.ROUTER_REGISTRY_WORKFLOW, settings.task_queue)
                out = await handle.query(names.RR.ROUTERS, result_type=RoutersOutput,
                                         rpc_timeout=timedelta(seconds=PUSH_TIMEOUT_S))
                self._registry = {_norm(r.url): r.name for r in out.routers if r.state == "Ready"}
            except NotOurRegistry as e:  # no feed goes to the routers an impostor names
                self._registry = {}
                if self.refusals is not None:
                    await self.refusals.record("", str(e), action="read the router registry")
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:
                    self._registry = {}  # no router has registered yet
                else:
                    log.info("router registry not read (keeping the last list): %s", e)
            except WorkflowQueryFailedError as e:
                log.info("router registry not read (keeping the last list): %s", e)
            self._registry_at = now
        live = dict(self._registry)
        if settings.routers != [f"http://127.0.0.1:{settings.router_port}"]:  # the default: the local router registers
            for url in settings.routers:
                live.setdefault(_norm(url), "")
        return live

    @activity.defn(name="publish_endpoints")
    async def publish_endpoints(self, asked: EndpointSet) -> PublishResult:
        """Push the service's table to every live router (and write it under ``feed/``). Only
        the service's name is taken from ``asked``: the table is the one its workflow answers."""
        settings = await asyncio.to_thread(self.settings)
        table = await self._truth(asked, settings)
        await asyncio.to_thread(feed.write_table, settings.state_dir, table)
        body = table.model_dump_json().encode()
        signature = await asyncio.to_thread(feed.sign, settings.state_dir, body)
        result = PublishResult(written=True)

        async def push(url: str) -> None:
            try:
                async with self._http().post(
                    url + feed.FEED_PATH, data=body,
                    headers={"Content-Type": "application/json", feed.SIGNATURE_HEADER: signature},
                ) as resp:
                    if resp.status >= 300:
                        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                result.pushed.append(url)
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as e:
                result.failed[url] = str(e) or type(e).__name__
                log.info("endpoint feed: push of %s v%d to %s failed (the router resyncs): %s",
                         table.service, table.version, url, result.failed[url])

        await asyncio.gather(*(push(u) for u in await self._routers(settings)))
        return result

    @staticmethod
    def _signer(state_dir: Path, name: str, question: str, headers: Any, body: bytes) -> str:
        """The enrolled router that signed this drain answer (the one registered at that URL,
        when one is), or AccessDenied."""
        signer = headers.get(feed.ROUTER_HEADER, "")
        if not signer:
            raise AccessDenied("the answer is not signed by a router")
        if name and signer != name:
            raise AccessDenied(f"answered as router {signer[:63]!r}, not {name}, which registered there")
        pub = nodeid.node_public_key(state_dir, signer, role="router")
        nodeid.check_statement(pub, headers.get(feed.ROUTER_SIGNATURE_HEADER, ""), node=signer, kind="drained",
                               message=feed.drained_answer(question, body))
        return signer

    async def _ask(self, state_dir: Path, url: str, name: str, service: str, pods: str, wait: float,
                   deadline: float) -> tuple[bool, str]:
        """One signed drain question to one router: (idle, what it said), its answer signed by it."""
        w = f"{wait:.2f}"
        question = await asyncio.to_thread(feed.sign, state_dir, feed.drained_query(service, pods, w), kind="drained")
        async with self._http().get(
            url + feed.DRAINED_PATH, params={"service": service, "pods": pods, "wait": w},
            headers={feed.SIGNATURE_HEADER: question},
            # never past the drain's end: the router answers by ``wait``, a hung one is cut
            timeout=aiohttp.ClientTimeout(total=max(0.05, min(wait + PUSH_TIMEOUT_S, deadline - time.monotonic()))),
        ) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            signer = await asyncio.to_thread(self._signer, state_dir, name, question, resp.headers, raw)
        body = json.loads(raw)
        idle = isinstance(body, dict) and body.get("idle") is True
        return idle, f"idle (router {signer})" if idle else f"busy: {body.get('busy')}"

    @activity.defn(name="await_drained")
    async def await_drained(self, inp: DrainInput) -> DrainResult:
        """Return once every live router says it sends ``inp.pods`` nothing new and has no
        request in flight to any of them, or after ``inp.max_s``. The live routers are read
        again each round: a router that stops heartbeating (Lost in the RouterRegistry) is no
        longer waited for; one that joins is asked too.

        Unconfirmed (no router, or one that does not answer, signed, in time) means the caller
        waits out its full drain: a pod is never stopped early on a guess."""
        settings = await asyncio.to_thread(self.settings)
        start = time.monotonic()
        deadline = start + inp.max_s
        answers: dict[str, str] = {}
        confirmed: set[str] = set()
        pods = ",".join(inp.pods)

        async def ask(url: str, name: str, wait: float) -> bool:
            try:
                idle, answers[url] = await self._ask(settings.state_dir, url, name, inp.service, pods, wait, deadline)
                if not idle and wait < DRAIN_RETRY_S:  # a short poll near the end: do not spin
                    await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                return idle
            except AccessDenied as e:
                answers[url] = f"refused answer: {e}"
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError, ValueError) as e:
                answers[url] = f"no answer: {e or type(e).__name__}"
            await asyncio.sleep(min(DRAIN_RETRY_S, max(0.0, deadline - time.monotonic())))
            return False

        live = await self._routers(settings, fresh=True)
        while True:
            for url in [u for u in answers if u not in live and u not in confirmed]:
                answers[url] = f"dropped: no longer a live router ({answers[url]})"[:300]
                confirmed.add(url)  # not waited for any more
            pending = {u: n for u, n in live.items() if u not in confirmed}
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            # the router's long poll ends a little before the drain does, so its answer arrives in time
            wait = max(0.0, min(left - DRAIN_ANSWER_SLACK_S, DRAIN_ASK_S))
            idle = await asyncio.gather(*(ask(u, n, wait) for u, n in pending.items()))
            confirmed |= {u for u, ok in zip(pending, idle, strict=True) if ok}
            activity.heartbeat(len(pending))
            live = await self._routers(settings, fresh=True)
        ok = not pending and any(a.startswith("idle") for a in answers.values())
        return DrainResult(confirmed=ok, waited_s=round(time.monotonic() - start, 3), routers=answers)


def _norm(url: str) -> str:
    return url.strip().rstrip("/")
