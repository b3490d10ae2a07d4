"""``min_ready_s`` is watched where the pod runs, inside ``start_pod``, from the pod's first
answer: a pod that answers and then dies within it is never handed back as ready. A real
process pod, the real activity (no Temporal server needed for the activity itself)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import pytest
from conftest import eventually, seed_spec
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.pods import PodActivities
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import make_runtime
from hms_mgmt.wire import PodProgress, StartPodInput


@pytest.fixture
def runtime_name() -> str:
    return "process"  # the behaviour is the activity's; one runtime is enough


def answering(settings, pod_id: str) -> str | None:  # noqa: ANN001 - Settings
    """The pod's endpoint once it answers its health path."""
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        handle = rt.find(pod_id)
    finally:
        rt.close()
    if handle is None or not handle.endpoint:
        return None
    try:
        with urllib.request.urlopen(f"http://{handle.endpoint}/health", timeout=1) as resp:
            return handle.endpoint if resp.status == 200 else None
    except OSError:
        return None


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=2).read()


async def test_start_pod_waits_min_ready_s_from_the_first_answer_and_refuses_a_pod_that_dies_in_it(settings):
    spec = ServiceSpec.model_validate(seed_spec())
    acts = PodActivities(make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir))

    first_answer: dict[str, float] = {}

    def start(min_ready_s: float) -> tuple[str, asyncio.Future, asyncio.Event]:
        """Run start_pod; the event is set once its heartbeat says it has seen the pod answer."""
        pod_id = str(uuid.uuid4())
        inp = StartPodInput(pod_id=pod_id, service="hms-ach", revision=1, node=settings.node, spec=spec,
                            min_ready_s=min_ready_s)
        answered = asyncio.Event()

        def beat(*details: PodProgress) -> None:
            if details and details[0].health == "healthy" and not answered.is_set():
                first_answer[pod_id] = time.monotonic()
                answered.set()

        env = ActivityEnvironment()
        env.on_heartbeat = beat
        return pod_id, asyncio.ensure_future(env.run(acts.start_pod, inp)), answered

    try:
        # Answers, then dies inside its min_ready_s: the start fails, naming why.
        pod_id, task, answered = start(30.0)
        await asyncio.wait_for(answered.wait(), 60)
        endpoint = await eventually(lambda: asyncio.to_thread(answering, settings, pod_id), timeout=10,
                                    what="the pod answering")
        assert not task.done()  # answering is not enough: it must stay up min_ready_s
        await asyncio.to_thread(post, f"http://{endpoint}/admin/exit")
        with pytest.raises(ApplicationError, match="within min_ready_s 30s") as failed:
            await asyncio.wait_for(task, 30)
        assert failed.value.type == "PodExited"

        # Stays up: handed back ready, no sooner than min_ready_s after it first answered.
        pod_id, task, answered = start(2.0)
        ready = await asyncio.wait_for(task, 60)
        assert answered.is_set() and ready.ready and ready.health == "healthy" and ready.id == pod_id
        assert time.monotonic() - first_answer[pod_id] >= 2.0  # counted from that first answer
    finally:
        await acts.close()
