"""The worker process: workflows and control activities on ``hms-control``, pod activities on
this node's queue ``hms-node-<name>``. ``--node NAME`` on another machine adds a node."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.worker import Worker

from activities.control import ControlActivities
from activities.feed import FeedActivities
from activities.pods import PodActivities
from hms_mgmt import constants
from hms_mgmt.config import Settings, connect
from hms_mgmt.events import EventSink
from hms_mgmt.runtimes import make_runtime
from hms_mgmt.trust import TrustStore
from workflows import ALL_WORKFLOWS

log = logging.getLogger("hms.worker")


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register HmsService/HmsPhase so the Web UI can filter (a no-op once they exist)."""
    wanted = {constants.SEARCH_ATTR_SERVICE, constants.SEARCH_ATTR_PHASE}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = wanted - set(existing.custom_attributes)
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=namespace,
                    search_attributes={k: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in missing},
                )
            )
    except Exception as e:  # noqa: BLE001 - e.g. Temporal Cloud, where an admin registers them once
        log.warning("could not register search attributes %s: %s", sorted(wanted), e)


class HmsWorker:
    """Both workers of one process, built from settings; ``run()`` until ``stop()``."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        *,
        control: bool = True,
        node: bool = True,
        settings_loader: Callable[[], Settings] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.workers: list[Worker] = []
        self.pods: PodActivities | None = None
        self.feed: FeedActivities | None = None
        sink = EventSink(settings.state_dir, settings.event_webhook)
        if control:
            ctl = ControlActivities(client, settings_loader or (lambda: settings), sink)
            self.feed = FeedActivities(settings_loader or (lambda: settings))
            self.workers.append(
                Worker(
                    client,
                    task_queue=settings.task_queue,
                    workflows=ALL_WORKFLOWS,
                    activities=[ctl.pick_node, ctl.emit_event, ctl.authorize, ctl.check_governance,
                                self.feed.publish_endpoints],
                )
            )
        if node:
            runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir,
                                   limits=settings.pod_limits(), events=sink)
            log.info("node %s: %s runtime, task queue %s", settings.node, runtime.name, settings.node_task_queue())
            self.pods = PodActivities(runtime, TrustStore(settings.state_dir))
            self.workers.append(
                Worker(
                    client,
                    task_queue=settings.node_task_queue(),
                    activities=[
                        self.pods.start_pod,
                        self.pods.stop_pod,
                        self.pods.list_pods,
                        self.pods.pod_logs,
                        self.pods.watch_pods,
                        self.pods.verify_image,
                    ],
                    max_concurrent_activities=500,
                    # Heartbeats carry the monitor's live view (failures, CPU) to status():
                    # send them each second rather than at 80% of the heartbeat timeout.
                    max_heartbeat_throttle_interval=timedelta(seconds=1),
                    default_heartbeat_throttle_interval=timedelta(seconds=1),
                )
            )

    @property
    def runtime_name(self) -> str | None:
        return self.pods.runtime.name if self.pods else None

    async def run(self) -> None:
        await ensure_search_attributes(self.client, self.settings.namespace)
        try:
            await asyncio.gather(*(w.run() for w in self.workers))
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.pods is not None:
            await self.pods.close()
        if self.feed is not None:
            await self.feed.close()

    async def stop(self) -> None:
        await asyncio.gather(*(w.shutdown() for w in self.workers))

    async def __aenter__(self) -> HmsWorker:
        await ensure_search_attributes(self.client, self.settings.namespace)
        self._task = asyncio.ensure_future(asyncio.gather(*(w.run() for w in self.workers)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        try:
            await self._task
        finally:
            await self._close()


async def main(
    settings: Settings | None = None, *, control: bool = True, node_worker: bool = True, **overrides: object
) -> None:
    """Run until SIGINT/SIGTERM. The Scheduler re-reads the configuration with
    ``settings.reload()``, which keeps the overrides the settings were built with (e.g. ``node=``),
    so a ``--node`` flag places pods where this worker runs."""
    settings = settings or Settings.from_env(**overrides)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    client = await connect(settings)
    worker = HmsWorker(client, settings, control=control, node=node_worker, settings_loader=settings.reload)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    task = asyncio.create_task(worker.run())
    log.info("worker ready: control queue %s, node %s", settings.task_queue, settings.node)
    await asyncio.wait({task, asyncio.create_task(stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        await worker.stop()
    await task
