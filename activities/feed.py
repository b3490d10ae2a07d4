"""The endpoint feed's publisher (task queue ``hms-control``): ServiceWorkflow calls
``publish_endpoints`` whenever its set of ready and draining pods changes.

It must never hold the workflow up: each push has a short timeout and a failed one is logged,
not retried — routers also reload the whole table from the workflows every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
from temporalio import activity

from hms_mgmt import feed
from hms_mgmt.config import Settings
from hms_mgmt.models import EndpointSet, PublishResult

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 1.0


class FeedActivities:
    def __init__(self, settings: Callable[[], Settings]) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @activity.defn(name="publish_endpoints")
    async def publish_endpoints(self, table: EndpointSet) -> PublishResult:
        settings = await asyncio.to_thread(self.settings)
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
