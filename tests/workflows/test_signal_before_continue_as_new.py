"""A signal taken in while the run waits for its handlers before continue-as-new is acted on
by the next run: the signal inboxes travel in the state handed over (issue 23).

The moment is built, not hoped for: a ``scale`` update is held in its ``authorize`` activity
(a handler in flight), the history is pushed past ``history_threshold`` with harmless signals
(continue-as-new is due: the supervision loop ends and cancels its watch), and only then the
``image_revoked`` hint arrives. Released, the update finishes and the run continues as new.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest_asyncio
from conftest import eventually, seed_spec
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment
from test_service_logic import FakeCluster, as_user, fake_cluster

from hms_mgmt.config import Settings
from hms_mgmt.errors import FailureKind
from hms_mgmt.models import AuthorizeInput, AuthorizeOutput
from hms_mgmt.names import S, service_workflow_id

THRESHOLD = 40  # events: above a steady run's history, crossed by the test's own signals


@dataclass
class HeldCluster(FakeCluster):
    """A FakeCluster whose ``authorize`` of a scale waits until the test lets it go."""

    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @activity.defn(name="authorize")
    async def authorize(self, inp: AuthorizeInput) -> AuthorizeOutput:
        if inp.action == "scale":
            self.held.set()
            await self.release.wait()
        return await super().authorize(inp)


@pytest_asyncio.fixture(loop_scope="session")
async def held(temporal_env: WorkflowEnvironment, tmp_path) -> AsyncIterator[tuple[HeldCluster, Settings]]:
    async with fake_cluster(temporal_env, tmp_path, HeldCluster, "hms-can") as running:
        yield running  # type: ignore[misc]


async def test_image_revoked_while_waiting_to_continue_as_new_is_checked_by_the_next_run(temporal_env, held):
    cluster, settings = held
    alice = as_user(temporal_env, settings, "t-alice", history_threshold=THRESHOLD)
    spec = seed_spec(image="registry.gov/hms-ach:1.4")
    await alice.deploy(spec, wait=True, timeout=30)
    handle = temporal_env.client.get_workflow_handle(service_workflow_id("hms-ach"))
    await asyncio.sleep(1.0)  # a deploy past the threshold continues as new at once: let it settle
    run_id = (await handle.describe()).run_id
    run = temporal_env.client.get_workflow_handle(handle.id, run_id=run_id)

    scaling = asyncio.create_task(alice.scale("hms-ach", 2))  # a handler in flight, held in authorize
    await asyncio.wait_for(cluster.held.wait(), 10)
    pumped_from = (await run.describe()).history_length
    while (await run.describe()).history_length < THRESHOLD:
        await run.signal(S.PODS_DRAINING, [])  # changes nothing outside a rollout
    await eventually(lambda: _watch_cancelled(run, after=pumped_from), timeout=10,
                     what="supervision ended: continue-as-new due")

    cluster.trusted.discard("registry.gov/hms-ach:1.4")
    await run.signal(S.IMAGE_REVOKED, "registry.gov/hms-ach:1.4")
    cluster.release.set()
    await asyncio.wait_for(scaling, 30)

    async def next_run_degraded():
        desc = await handle.describe()
        st = await alice.status("hms-ach", live=False)
        return st if desc.run_id != run_id and st.phase == "Degraded" else None
    st = await eventually(next_run_degraded, timeout=20, what="the next run checked the revoked image")
    assert st.failure is not None and st.failure.kind == FailureKind.IMAGE_UNTRUSTED
    assert "image.revoked" in cluster.event_types()


async def _watch_cancelled(run, *, after: int) -> bool:
    """The run asked its watch activity to stop (after event ``after``): the supervision loop
    saw continue-as-new due."""
    async for event in run.fetch_history_events():
        if event.event_id > after and event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED:
            return True
    return False
