"""A health ping that fails only because the worker's own event loop was stalled (its timeout
fired late) is inconclusive: it neither fails the pod nor clears its failures. A ping that times
out on time still counts. The watch activity runs for real (ActivityEnvironment) against a pod
endpoint that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from temporalio.testing import ActivityEnvironment

from activities.pods import PodActivities
from hms_mgmt.models import PodStatus, ServiceSpec
from hms_mgmt.wire import WatchInput


class QuietRuntime:
    """A node whose one pod never exits and whose CPU is never sampled (the watch's view of it)."""

    node = "n1"

    def cpu_seconds(self, pod_ids: list[str]) -> dict[str, float]:
        return {}

    def subscribe_exits(self, callback):  # noqa: ANN001, ANN201 - the runtime's interface
        return lambda: None

    def exited(self, pod_ids: list[str]) -> list[str]:
        return []

    def list(self, service: str | None = None) -> list:
        return []

    def close(self) -> None:
        pass


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """A port whose connections the kernel completes and nobody ever answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def watch_input(endpoint: str, max_s: float) -> WatchInput:
    spec = ServiceSpec(name="svc", image="img:1", min_replicas=1, max_replicas=1, cpu_target=60, health_interval_s=1.0,
                       health_failures=2)
    pod = PodStatus(id="pod-1", node="n1", endpoint=endpoint, ready=True, health="healthy")
    return WatchInput(service="svc", spec=spec, pods=[pod], known=["pod-1"], current=1, max_duration_s=max_s,
                      autoscale=False)


async def test_a_pod_that_does_not_answer_fails_after_health_failures_pings(hung_endpoint: str) -> None:
    acts = PodActivities(QuietRuntime())  # type: ignore[arg-type]
    try:
        result = await ActivityEnvironment().run(acts.watch_pods, watch_input(hung_endpoint, 30.0))
    finally:
        await acts.close()
    assert result.reason == "failed" and result.failed[0].kind == "unhealthy"


async def test_pings_that_time_out_late_because_this_worker_was_stalled_are_inconclusive(hung_endpoint: str) -> None:
    async def stall_the_loop() -> None:
        while True:  # the loop runs 0.2 s in every 1.7 s: each ping's 1 s timeout fires 0.5 s late or more
            await asyncio.sleep(0.2)
            time.sleep(1.5)

    acts = PodActivities(QuietRuntime())  # type: ignore[arg-type]
    stall = asyncio.ensure_future(stall_the_loop())
    try:
        result = await ActivityEnvironment().run(acts.watch_pods, watch_input(hung_endpoint, 8.0))
    finally:
        stall.cancel()
        await acts.close()
    assert result.reason == "timeout" and not result.failed
