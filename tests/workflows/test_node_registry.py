"""NodeRegistry against the real dev server, with a stand-in for the notify activity: nodes
join, stay Ready while they heartbeat, turn Lost after a silence (one durable timer), come
back, and survive continue-as-new."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest_asyncio
from conftest import eventually, make_settings
from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from hms_mgmt.models import NodeRecord, NodeSpec
from hms_mgmt.names import NR
from hms_mgmt.nodes import ready_nodes
from hms_mgmt.wire import (
    NodeCheckInput,
    NodeCheckOutput,
    NodeLost,
    NodeRegistration,
    NodeRegistryInput,
    NodesOutput,
    NodeVerdict,
    RegistrySettings,
)
from workflows.nodes import NodeRegistry

LOST_AFTER_S = 2.0


@dataclass
class Registry:
    env: WorkflowEnvironment
    queue: str
    lost: list[str] = field(default_factory=list)
    evicted: dict[str, bool] = field(default_factory=dict)  # node -> were its services told to replace its pods
    activities: list[object] = field(default_factory=list)
    worker: Worker | None = None
    seed: list[NodeSpec] = field(default_factory=list)  # the control worker's configured nodes
    gate: asyncio.Event | None = None  # when set, each check of signatures waits for it

    async def resume(self) -> None:
        self.worker = Worker(self.env.client, task_queue=self.queue, workflows=[NodeRegistry],
                             activities=self.activities)
        await self.worker.__aenter__()

    async def pause(self) -> None:
        """The registry's worker goes away (the control plane down)."""
        assert self.worker is not None
        await self.worker.__aexit__(None, None, None)
        self.worker = None

    async def start(self, seed: list[NodeSpec] | None = None, **kw: object) -> WorkflowHandle[NodeRegistry, None]:
        self.seed = seed or []
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
        r.evicted[inp.node] = inp.evict
        return 0

    @activity.defn(name="check_nodes")
    async def check_nodes(inp: NodeCheckInput) -> NodeCheckOutput:
        """A stand-in that believes every node (signatures are tests/workflows/test_node_enrolment.py's)."""
        if r.gate is not None:
            await r.gate.wait()
        return NodeCheckOutput(verdicts=[NodeVerdict(node=reg.spec.name, ok=True, at=time.time())
                                         for reg in inp.registrations])

    @activity.defn(name="registry_settings")
    async def registry_settings() -> RegistrySettings:
        return RegistrySettings(seed=r.seed, lost_after_s=LOST_AFTER_S)

    r.activities = [notify_node_lost, check_nodes, registry_settings]
    await r.resume()
    try:
        yield r
    finally:
        if r.worker is not None:
            await r.pause()
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
    # A heartbeat does not bring a Lost node back: its worker must register (after removing its stale pods).
    await handle.signal(NodeRegistry.heartbeat, reg("b"))
    await asyncio.sleep(1.0)
    assert (await registry.nodes(handle))["b"].state == "Lost"
    back = await handle.execute_update(NodeRegistry.register, reg("b", max_pods=3))
    assert back.was_lost and back.record.state == "Ready" and back.record.rejoins == 1
    assert (await registry.nodes(handle))["b"].spec.max_pods == 3
    assert registry.lost == ["b", "a"], "each loss is told once"


async def test_every_node_silent_at_once_keeps_their_pods_and_a_heartbeat_brings_them_back(registry: Registry):
    """A full disruption (every Ready node silent together: more likely the control plane's own
    trouble) marks the nodes Lost but replaces no pod; their next heartbeat makes them Ready
    again. One node silent among live ones is still evicted."""
    handle = await registry.start()
    for name in ("a", "b"):
        await handle.execute_update(NodeRegistry.register, reg(name))
    for _ in range(4):  # "a" heartbeats for 2x lost_after; "b" is silent: b is evicted
        await handle.signal(NodeRegistry.heartbeat, reg("a"))
        await asyncio.sleep(LOST_AFTER_S / 2)
    assert registry.evicted == {"b": True}
    await eventually(lambda: "a" in registry.evicted, timeout=3 * LOST_AFTER_S, what="a silent too")
    assert registry.evicted["a"] is False, "the last Ready node's pods stay"
    nodes = await registry.nodes(handle)
    assert nodes["a"].state == "Lost" and nodes["a"].pods_kept
    await handle.signal(NodeRegistry.heartbeat, reg("a"))  # heard again: no register, nothing to sweep
    await eventually(lambda: _state(registry, handle, "a", "Ready"), timeout=10, what="a Ready again")
    await handle.signal(NodeRegistry.heartbeat, reg("b"))  # an evicted node still has to register
    await asyncio.sleep(1.0)
    assert (await registry.nodes(handle))["b"].state == "Lost"


async def _state(registry: Registry, handle: WorkflowHandle[NodeRegistry, None], node: str, state: str) -> bool:
    return (await registry.nodes(handle))[node].state == state


async def test_seeded_nodes_and_continue_as_new_keep_the_nodes(registry: Registry):
    seed = [NodeSpec(name="static", task_queue="hms-node-static", cpu=2)]
    handle = await registry.start(seed=seed, history_threshold=40)
    nodes = await eventually(lambda: registry.nodes(handle), timeout=10, what="the seeded node")
    assert nodes["static"].source == "config"
    first_run = (await handle.describe()).run_id
    for _ in range(25):  # a heartbeat from a node the registry does not know registers it
        await handle.signal(NodeRegistry.heartbeat, reg("w"))
    latest = registry.env.client.get_workflow_handle(handle.id)
    await eventually(lambda: _run_changed(latest, first_run), timeout=10, what="continue-as-new")
    nodes = await registry.nodes(latest)
    assert set(nodes) == {"static", "w"} and nodes["w"].source == "worker"
    await eventually(lambda: "static" in registry.lost, timeout=3 * LOST_AFTER_S, what="silent static node lost")


async def test_a_node_lost_just_as_the_run_continues_as_new_is_still_told(registry: Registry):
    """The registry marks a silent node Lost and its history is due to continue as new in the
    same step: the next run still tells the node's services (as it does heartbeats not yet
    checked), instead of keeping a Lost node whose pods nobody replaces."""
    registry.gate = asyncio.Event()
    seed = [NodeSpec(name="static", task_queue="hms-node-static", cpu=2)]
    handle = await registry.start(seed=seed, history_threshold=30)
    await eventually(lambda: registry.nodes(handle), timeout=10, what="the seeded node")
    first_run = (await handle.describe()).run_id
    seeded = time.monotonic()
    await handle.signal(NodeRegistry.heartbeat, reg("w"))  # its check waits at the gate
    for _ in range(25):  # the run's history passes its threshold meanwhile
        await handle.signal(NodeRegistry.heartbeat, reg("w"))
    await asyncio.sleep(max(0.0, seeded + LOST_AFTER_S + 0.5 - time.monotonic()))  # static is silent now
    registry.gate.set()
    latest = registry.env.client.get_workflow_handle(handle.id)
    await eventually(lambda: _run_changed(latest, first_run), timeout=10, what="continue-as-new")
    await eventually(lambda: "static" in registry.lost, timeout=3 * LOST_AFTER_S, what="the services of static told")
    assert registry.evicted["static"] is True, "w was Ready: static's pods are replaced"
    assert (await registry.nodes(latest))["static"].state == "Lost"


async def _run_changed(handle: WorkflowHandle[NodeRegistry, None], run_id: str | None) -> bool:
    return (await handle.describe()).run_id != run_id


async def test_a_registry_that_could_not_run_gives_every_node_a_fresh_grace(registry: Registry):
    """Its worker down for longer than the grace while the nodes kept heartbeating: when it runs
    again, the queued heartbeats count and nobody is called Lost for the registry's own silence."""
    handle = await registry.start()
    await handle.execute_update(NodeRegistry.register, reg("a"))
    await handle.execute_update(NodeRegistry.register, reg("b"))
    await registry.pause()
    for _ in range(3):  # only "a" gets its heartbeats through while the registry cannot run
        await handle.signal(NodeRegistry.heartbeat, reg("a"))
        await asyncio.sleep(LOST_AFTER_S)
    await registry.resume()
    nodes = await eventually(lambda: _settled(registry, handle), timeout=5, what="the registry to run again")
    assert nodes["a"].state == "Ready" and nodes["b"].state == "Ready" and registry.lost == []
    await eventually(lambda: sorted(registry.lost) == ["a", "b"], timeout=3 * LOST_AFTER_S,
                     what="both lost, silent after their fresh grace")


async def _settled(registry: Registry, handle: WorkflowHandle[NodeRegistry, None]) -> dict[str, NodeRecord] | None:
    try:
        return await registry.nodes(handle)
    except Exception:  # noqa: BLE001 - the query waits for the worker
        return None


async def joined(handle: WorkflowHandle[NodeRegistry, None], registration: NodeRegistration, request_id: str):
    """A worker's join: the signal, then the registry's answer (``joined``) once it was checked."""
    await handle.signal(NodeRegistry.join, registration.model_copy(update={"request_id": request_id}))
    return await eventually(lambda: handle.query(NodeRegistry.joined, request_id), timeout=10,
                            interval=0.05, what=f"the answer to {request_id}")


async def test_a_join_is_answered_once_and_its_answer_survives_continue_as_new(registry: Registry):
    handle = await registry.start(history_threshold=60)
    first = await joined(handle, reg("a", cpu=4), "join-1")
    assert first.node.record.state == "Ready" and not first.node.was_lost and not first.refused
    # The same join again (a worker that re-sent it) does not change the answer.
    await handle.signal(NodeRegistry.join, reg("a", cpu=8).model_copy(update={"request_id": "join-1"}))
    await asyncio.sleep(0.5)
    assert (await handle.query(NodeRegistry.joined, "join-1")).node.record.spec.cpu == 4
    assert await handle.query(NodeRegistry.joined, "never-sent") is None
    # A join without its handle is not kept: nothing could ever ask for its answer.
    await handle.signal(NodeRegistry.join, reg("nameless"))
    first_run = (await handle.describe()).run_id
    for _ in range(30):  # heartbeats until the registry continues as new
        await handle.signal(NodeRegistry.heartbeat, reg("a", cpu=4))
    latest = registry.env.client.get_workflow_handle(handle.id)
    await eventually(lambda: _run_changed(latest, first_run), timeout=10, what="continue-as-new")
    assert (await latest.query(NodeRegistry.joined, "join-1")).node.record.spec.name == "a"
    assert "nameless" not in await registry.nodes(latest)
    # Lost with every node (its pods kept), then back through a join: a rejoin, but nothing of it
    # was replaced, so its worker has no stale pod to sweep.
    await eventually(lambda: _state(registry, latest, "a", "Lost"), timeout=5 * LOST_AFTER_S, what="a lost")
    back = await joined(latest, reg("a"), "join-2")
    assert not back.node.was_lost and back.node.record.rejoins == 1


async def test_a_registry_started_by_an_outsider_believes_only_the_control_worker(registry: Registry):
    """Anyone who reaches Temporal can start the registry (after terminating it, say), with any
    input: a forged Ready node, a seed, a grace of a year, its own queue for the checks. The
    registry takes its seed and grace from the control worker, runs its checks on the queue it
    runs on, and carries members over only from its own continue-as-new."""
    registry.seed = []
    forged = NodeRecord(spec=NodeSpec(name="evil", task_queue="hms-node-evil"), source="worker", state="Ready")
    inp = NodeRegistryInput(lost_after_s=3e7, control_task_queue="attacker-queue", nodes=[forged],
                            seed=[NodeSpec(name="evil-static", task_queue="hms-node-evil")],
                            untold_evicted=["victim"], untold_held=["victim2"], removals=["victim3"],
                            heartbeats=[reg("evil-beat")])
    handle = await registry.env.client.start_workflow(NodeRegistry.run, inp, id=f"hms-nodes-{registry.queue}",
                                                      task_queue=registry.queue)
    answer = await joined(handle, reg("a"), "honest-join")  # checked on the control queue: answered
    assert answer.node.record.state == "Ready"
    assert set(await registry.nodes(handle)) == {"a"}
    await eventually(lambda: _state(registry, handle, "a", "Lost"), timeout=5 * LOST_AFTER_S,
                     what="a lost after the control worker's grace, not the starter's")
    assert registry.lost == ["a"], "no services told of a loss the starter made up"


async def test_a_retried_run_of_an_outsiders_registry_believes_no_more_than_its_first(registry: Registry):
    """The server names a previous run in a retry (and in a cron run) as it does in a
    continue-as-new, and hands it the first run's input again. An outsider who starts the
    registry with a run timeout and a retry policy gets a second run that is no continue-as-new
    of ours: it believes their forged members and pending work no more than the first did."""
    registry.seed = []
    forged = NodeRecord(spec=NodeSpec(name="evil", task_queue="hms-node-evil"), source="worker", state="Ready")
    inp = NodeRegistryInput(lost_after_s=3e7, control_task_queue="attacker-queue", nodes=[forged],
                            untold_evicted=["victim"], removals=["victim3"], heartbeats=[reg("evil-beat")])
    wf_id = f"hms-nodes-{registry.queue}"
    first = await registry.env.client.start_workflow(
        NodeRegistry.run, inp, id=wf_id, task_queue=registry.queue, run_timeout=timedelta(seconds=3),
        retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=2))
    latest = registry.env.client.get_workflow_handle(wf_id)

    async def retried() -> bool:
        return (await latest.describe()).run_id != first.run_id

    await eventually(retried, timeout=20, what="the retry's run")
    assert "evil" not in await registry.nodes(latest), "a forged member believed in the retried run"
    await asyncio.sleep(0.5)
    assert registry.lost == [], "services told of a loss the starter made up"


async def test_the_ready_nodes_are_read_from_the_runs_memo_without_a_query(registry: Registry, tmp_path: Path):
    """A placement (and a deploying client) reads the Ready nodes with the one describe that
    checks the registry run is ours: the run keeps them in its memo, and a Lost node leaves it."""
    handle = await registry.start()
    settings = make_settings(registry.env, tmp_path / "state", "process", trusted=False, task_queue=registry.queue)
    await handle.execute_update(NodeRegistry.register, reg("a", cpu=4))
    await handle.execute_update(NodeRegistry.register, reg("b"))

    async def memo() -> list[str] | None:
        desc = await handle.describe()
        kept = await desc.memo_value(NR.READY_MEMO, None, type_hint=list[NodeSpec])
        return None if kept is None else [s.name for s in kept]

    await eventually(lambda: _equal(memo(), ["a", "b"]), timeout=10, what="both Ready in the memo")
    await registry.pause()  # no worker to answer a query: the memo is read all the same
    try:
        assert [s.name for s in await ready_nodes(registry.env.client, settings) or []] == ["a", "b"]
    finally:
        await registry.resume()
    for _ in range(4):  # "a" heartbeats; "b" is silent and turns Lost
        await handle.signal(NodeRegistry.heartbeat, reg("a", cpu=4))
        await asyncio.sleep(LOST_AFTER_S / 2)
    await eventually(lambda: _equal(memo(), ["a"]), timeout=10, what="b gone from the memo")
    assert [(s.name, s.cpu) for s in await ready_nodes(registry.env.client, settings) or []] == [("a", 4)]


async def _equal(got: Awaitable[object], want: object) -> bool:
    return await got == want
