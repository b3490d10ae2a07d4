"""NodeRegistry against the real dev server, with a stand-in for the notify activity: nodes
join, stay Ready while they heartbeat, turn Lost after a silence (one durable timer), come
back, and survive continue-as-new."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest_asyncio
from conftest import eventually
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from hms_mgmt.models import NodeRecord, NodeSpec
from hms_mgmt.wire import (
    NodeCheckInput,
    NodeCheckOutput,
    NodeLost,
    NodeRegistration,
    NodeRegistryInput,
    NodesOutput,
    NodeVerdict,
)
from workflows.nodes import NodeRegistry

LOST_AFTER_S = 2.0


@dataclass
class Registry:
    env: WorkflowEnvironment
    queue: str
    lost: list[str] = field(default_factory=list)

    async def start(self, **kw: object) -> WorkflowHandle[NodeRegistry, None]:
        inp = NodeRegistryInput(lost_after_s=LOST_AFTER_S, control_task_queue=self.queue, **kw)  # type: ignore[arg-type]
        return await self.env.client.start_workflow(NodeRegistry.run, inp, id=f"hms-nodes-{self.queue}",
                                                    task_queue=self.queue)

    async def nodes(self, handle: WorkflowHandle[NodeRegistry, None]) -> dict[str, NodeRecord]:
        out: NodesOutput = await handle.query(NodeRegistry.nodes)
        return {r.spec.name: r for r in out.nodes}


def reg(name: str, **kw: object) -> NodeRegistration:
    return NodeRegistration(spec=NodeSpec(name=name, task_queue=f"hms-node-{name}", **kw))  # type: ignore[arg-type]


@pytest_asyncio.fixture(loop_scope="session")
async def registry(temporal_env: WorkflowEnvironment) -> AsyncIterator[Registry]:
    r = Registry(temporal_env, f"hms-control-{uuid.uuid4().hex[:8]}")

    @activity.defn(name="notify_node_lost")
    async def notify_node_lost(inp: NodeLost) -> int:
        r.lost.append(inp.node)
        return 0

    @activity.defn(name="check_nodes")
    async def check_nodes(inp: NodeCheckInput) -> NodeCheckOutput:
        """A stand-in that believes every node (signatures are tests/workflows/test_node_enrolment.py's)."""
        return NodeCheckOutput(verdicts=[NodeVerdict(node=reg.spec.name, ok=True, at=time.time())
                                         for reg in inp.registrations])

    async with Worker(temporal_env.client, task_queue=r.queue, workflows=[NodeRegistry],
                      activities=[notify_node_lost, check_nodes]):
        yield r
        async for wf in temporal_env.client.list_workflows(f'TaskQueue = "{r.queue}" AND ExecutionStatus = "Running"'):
            await temporal_env.client.get_workflow_handle(wf.id).terminate("test teardown")


async def test_silent_node_is_lost_once_and_rejoins(registry: Registry):
    handle = await registry.start()
    first = await handle.execute_update(NodeRegistry.register, reg("a", cpu=4, labels={"zone": "a"}))
    assert first.record.state == "Ready" and not first.was_lost
    await handle.execute_update(NodeRegistry.register, reg("b"))
    for _ in range(4):  # "a" heartbeats for 2x lost_after; "b" is silent
        await handle.signal(NodeRegistry.heartbeat, reg("a", cpu=4, labels={"zone": "a"}))
        await asyncio.sleep(LOST_AFTER_S / 2)
    nodes = await registry.nodes(handle)
    assert nodes["a"].state == "Ready" and nodes["a"].spec.labels == {"zone": "a"}
    assert nodes["b"].state == "Lost" and registry.lost == ["b"]

    await eventually(lambda: registry.lost == ["b", "a"], timeout=3 * LOST_AFTER_S, what="a lost too")
    back = await handle.execute_update(NodeRegistry.register, reg("b", max_pods=3))
    assert back.was_lost and back.record.state == "Ready" and back.record.rejoins == 1
    assert (await registry.nodes(handle))["b"].spec.max_pods == 3
    assert registry.lost == ["b", "a"], "each loss is told once"


async def test_seeded_nodes_and_continue_as_new_keep_the_nodes(registry: Registry):
    seed = [NodeSpec(name="static", task_queue="hms-node-static", cpu=2)]
    handle = await registry.start(seed=seed, history_threshold=40)
    assert (await registry.nodes(handle))["static"].source == "config"
    first_run = (await handle.describe()).run_id
    for _ in range(25):  # a heartbeat from a node the registry does not know registers it
        await handle.signal(NodeRegistry.heartbeat, reg("w"))
    latest = registry.env.client.get_workflow_handle(handle.id)
    await eventually(lambda: _run_changed(latest, first_run), timeout=10, what="continue-as-new")
    nodes = await registry.nodes(latest)
    assert set(nodes) == {"static", "w"} and nodes["w"].source == "worker"
    await eventually(lambda: "static" in registry.lost, timeout=3 * LOST_AFTER_S, what="silent static node lost")


async def _run_changed(handle: WorkflowHandle[NodeRegistry, None], run_id: str | None) -> bool:
    return (await handle.describe()).run_id != run_id
