"""The endpoint feed's publisher (task queue ``hms-control``): ServiceWorkflow calls
``publish_endpoints`` whenever its set of ready and draining pods changes, and
``await_drained`` to learn when every router is done with the pods it drains.

The control worker signs every push, so ``publish_endpoints`` believes nothing in the table it
is given but the service's name: it runs only for that service's own workflow (as the server
records the caller) and pushes what that workflow's ``endpoints`` query answers.

It must never hold the workflow up: each push has a short timeout and a failed one is logged,
not retried — routers also reload the whole table from the workflows every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from temporalio import activity
from temporalio.client import Client

from activities.callers import Callers, deny
from hms_mgmt import feed, names
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import EventSink
from hms_mgmt.models import EndpointSet
from hms_mgmt.wire import DrainInput, DrainResult, PublishResult

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 1.0
DRAIN_ASK_S = 2.0  # each ask is a long poll: the router answers once the pods are idle, or after this
DRAIN_RETRY_S = 0.1  # after a router failed to answer
DRAIN_ANSWER_SLACK_S = 0.2


class FeedActivities:
    def __init__(self, settings: Callable[[], Settings], *, client: Client | None = None,
                 sink: EventSink | None = None, callers: Callers | None = None) -> None:
        self.settings = settings
        self.client = client  # with sink: what publish_endpoints needs (await_drained only reads)
        self.sink = sink
        self.callers = callers or (Callers(client) if client is not None else None)
        self._session: aiohttp.ClientSession | None = None

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

    @activity.defn(name="publish_endpoints")
    async def publish_endpoints(self, asked: EndpointSet) -> PublishResult:
        """Push the service's table to every router (and write it under ``feed/``). Only the
        service's name is taken from ``asked``: the table is the one its workflow answers."""
        settings = await asyncio.to_thread(self.settings)
        table = await self._truth(asked, settings)
        await asyncio.to_thread(feed.write_table, settings.state_dir, table)
        key = await asyncio.to_thread(feed.feed_key, settings.state_dir)
        body = table.model_dump_json().encode()
        result = PublishResult(written=True)

        async def push(url: str) -> None:
            try:
                async with self._http().post(
                    url.rstrip("/") + feed.FEED_PATH, data=body,
                    headers={"Content-Type": "application/json", feed.SIGNATURE_HEADER: feed.sign(key, body)},
                ) as resp:
                    if resp.status >= 300:
                        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                result.pushed.append(url)
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as e:
                result.failed[url] = str(e) or type(e).__name__
                log.info("endpoint feed: push of %s v%d to %s failed (the router resyncs): %s",
                         table.service, table.version, url, result.failed[url])

        await asyncio.gather(*(push(u) for u in settings.routers))
        return result

    @activity.defn(name="await_drained")
    async def await_drained(self, inp: DrainInput) -> DrainResult:
        """Return once every router in ``settings.routers`` says it sends ``inp.pods`` nothing
        new and has no request in flight to any of them, or after ``inp.max_s``.

        Unconfirmed (a router down, slow, or none configured) means the caller waits out its
        full drain: a pod is never stopped early on a guess."""
        settings = await asyncio.to_thread(self.settings)
        start = time.monotonic()
        deadline = start + inp.max_s
        answers: dict[str, str] = {}
        if not settings.routers:
            return DrainResult(confirmed=False, routers={})
        pending = list(dict.fromkeys(settings.routers))
        key = await asyncio.to_thread(feed.feed_key, settings.state_dir)
        pods = ",".join(inp.pods)

        async def ask(url: str, wait: float) -> bool:
            w = f"{wait:.2f}"
            try:
                async with self._http().get(
                    url.rstrip("/") + feed.DRAINED_PATH, params={"service": inp.service, "pods": pods, "wait": w},
                    headers={feed.SIGNATURE_HEADER: feed.sign(key, feed.drained_query(inp.service, pods, w))},
                    # never past the drain's end: the router answers by ``wait``, a hung one is cut
                    timeout=aiohttp.ClientTimeout(total=max(0.05, min(wait + PUSH_TIMEOUT_S,
                                                                      deadline - time.monotonic()))),
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200 or not isinstance(body, dict):
                        raise RuntimeError(f"HTTP {resp.status}")
                    idle = body.get("idle") is True
                    answers[url] = "idle" if idle else f"busy: {body.get('busy')}"
                    if not idle and wait < DRAIN_RETRY_S:  # a short poll near the end: do not spin
                        await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                    return idle
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError, ValueError) as e:
                answers[url] = f"no answer: {e or type(e).__name__}"
                await asyncio.sleep(min(DRAIN_RETRY_S, max(0.0, deadline - time.monotonic())))
                return False

        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # the router's long poll ends a little before the drain does, so its answer arrives in time
            wait = max(0.0, min(left - DRAIN_ANSWER_SLACK_S, DRAIN_ASK_S))
            idle = await asyncio.gather(*(ask(u, wait) for u in pending))
            pending = [u for u, ok in zip(pending, idle, strict=True) if not ok]
            activity.heartbeat(len(pending))
        return DrainResult(confirmed=not pending, waited_s=round(time.monotonic() - start, 3), routers=answers)
