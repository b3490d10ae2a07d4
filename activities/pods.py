"""Pod activities. They run on the node's own worker (task queue ``hms-node-<name>``), so a
second machine joins by running a worker for its node against the same Temporal cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.runtimes import PodHandle, PodRequest, PodRuntime, PodRuntimeError
from hms_mgmt.models import (
    ListPodsInput,
    ListPodsOutput,
    LogsOutput,
    PodLogsInput,
    PodStatus,
    StartPodInput,
    StopPodInput,
    WaitReadyInput,
)

T = TypeVar("T")


def pod_status(handle: PodHandle, *, health: str | None = None, ready: bool = False) -> PodStatus:
    return PodStatus(
        id=handle.pod_id,
        node=handle.node,
        endpoint=handle.endpoint,
        revision=handle.revision,
        image=handle.image,
        ready=ready,
        health=health or ("starting" if handle.running else "exited"),  # type: ignore[arg-type]
        started_at=handle.started_at,
    )


async def heartbeating(fn: Callable[..., T], *args: Any, every_s: float = 1.0) -> T:
    """Run a blocking runtime call on a thread while heartbeating, so a worker that dies in
    the middle is noticed within the heartbeat timeout and the call is retried elsewhere."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    while True:
        activity.heartbeat()
        done, _ = await asyncio.wait({task}, timeout=every_s)
        if done:
            try:
                return task.result()
            except PodRuntimeError as e:
                raise ApplicationError(str(e), type=e.kind, non_retryable=True) from e


async def probe(session: aiohttp.ClientSession, endpoint: str | None, path: str, timeout_s: float = 1.0) -> bool:
    """One health ping: any 2xx/3xx within the timeout is healthy."""
    if not endpoint:
        return False
    try:
        async with session.get(
            f"http://{endpoint}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as resp:
            return 200 <= resp.status < 400
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


class PodActivities:
    """Activities bound to one node's runtime."""

    def __init__(self, runtime: PodRuntime) -> None:
        self.runtime = runtime
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self.runtime.close)

    @activity.defn(name="start_pod")
    async def start_pod(self, inp: StartPodInput) -> PodStatus:
        """Idempotent by pod id: a retried or replayed start finds the pod it already started."""
        req = PodRequest(pod_id=inp.pod_id, service=inp.service, revision=inp.revision, node=inp.node, spec=inp.spec)
        handle = await heartbeating(self.runtime.start, req)
        return pod_status(handle)

    @activity.defn(name="wait_pod_ready")
    async def wait_pod_ready(self, inp: WaitReadyInput) -> PodStatus:
        """Poll the pod's health path until it answers; fail at once if the pod exits."""
        spec = inp.spec
        deadline = time.monotonic() + spec.ready_timeout_s
        handle = await asyncio.to_thread(self.runtime.find, inp.pod.pod_id)
        last_state_check = time.monotonic()
        delay = 0.05
        while True:
            if handle is None or not handle.running:
                code = handle.exit_code if handle else None
                raise ApplicationError(
                    f"pod {inp.pod.pod_id} exited before it was ready (exit code {code})",
                    {"exit_code": code},
                    type="PodExited",
                    non_retryable=True,
                )
            activity.heartbeat()
            if await probe(self.session(), handle.endpoint, spec.health_path):
                return pod_status(handle, health="healthy", ready=True)
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"pod {inp.pod.pod_id} did not answer {spec.health_path} within {spec.ready_timeout_s:g}s",
                    type="PodNotReady",
                    non_retryable=True,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
            if time.monotonic() - last_state_check > 0.5:
                handle = await asyncio.to_thread(self.runtime.find, inp.pod.pod_id)
                last_state_check = time.monotonic()

    @activity.defn(name="stop_pod")
    async def stop_pod(self, inp: StopPodInput) -> bool:
        return await heartbeating(self.runtime.stop, inp.pod_id, inp.grace_s)

    @activity.defn(name="list_pods")
    async def list_pods(self, inp: ListPodsInput) -> ListPodsOutput:
        handles = await heartbeating(self.runtime.list, inp.service or None)
        return ListPodsOutput(pods=[pod_status(h) for h in handles])

    @activity.defn(name="pod_logs")
    async def pod_logs(self, inp: PodLogsInput) -> LogsOutput:
        lines = await heartbeating(self.runtime.logs, inp.pod_id, inp.tail)
        return LogsOutput(lines=lines)


def utcnow() -> datetime:
    return datetime.now(UTC)
