"""DeployWorkflow (id ``svc-<name>-deploy-<rev>``): one rollout.

A first rollout places pods, starts them in parallel and waits until they are ready. A rolling
update replaces every pod of another revision with pods of this one, ``max_surge`` above and at
most ``max_unavailable`` below the replica count: each new pod must answer and stay ready for
``min_ready_s`` before an old one is drained out of the routers and stopped. No progress within
``progress_deadline_s``, or new pods that keep dying, ends it with an ``error``: the service
then rolls back with another DeployWorkflow to the previous revision.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.pods import PodActivities
    from hms_mgmt.models import (
        DeployInput,
        DeployOutput,
        FailedPod,
        ListPodsInput,
        NodeSpec,
        PodStatus,
    )
    from hms_mgmt.names import DEPLOY_WORKFLOW, Q, S
    from hms_mgmt.policy import rollout

from workflows.common import (
    POD_HEARTBEAT,
    POD_RETRY,
    drain,
    error_message,
    node_queue,
    pick_nodes,
    require_parent,
    start_and_wait,
    start_pods,
    stop_pod,
)

CRASH_LIMIT = 3  # new pods of the revision failing in a rolling update before it gives up
PIPELINED = "rollout-pipelined"  # patch: min_ready_s watched in start_pod, placement asked a round ahead
# patch (issue 25): progress_deadline_s also ends a round in flight (a start that has not failed
# yet, a placement that waits for room), not only the check between rounds.
ROUND_DEADLINE = "rollout-deadline-in-round"


async def report_to_parent(pod: PodStatus) -> None:
    """Tell the ServiceWorkflow (the one writer of service state) as each pod comes up, so
    ``status()`` and the routers see it live rather than when the whole rollout ends."""
    parent = workflow.info().parent
    if parent is not None:
        await workflow.get_external_workflow_handle(parent.workflow_id).signal(S.POD_REPORTED, pod)


class RolloutProgress:
    """Pods of a rollout as they come up, answered by the ``progress`` query: ``status()``
    merges them in, so a many-pod rollout shows live progress without a signal per pod."""

    def __init__(self) -> None:
        self.pods: dict[str, PodStatus] = {}

    async def report(self, pod: PodStatus) -> None:
        self.pods[pod.id] = pod


@workflow.defn(name=DEPLOY_WORKFLOW)
class DeployWorkflow:
    def __init__(self) -> None:
        self.rollout = RolloutProgress()
        self.superseded = False
        self.retiring: list[str] = []  # old pods it told its parent it drains (pods_draining)

    @workflow.query
    def progress(self) -> list[PodStatus]:
        return list(self.rollout.pods.values())

    @workflow.query(name=Q.RETIRING)
    def retiring_pods(self) -> list[str]:
        """The pods it said it drains: the parent believes a ``pods_draining`` signal only as this
        rollout's own word (``confirm_draining``)."""
        return self.retiring

    @workflow.signal(name=S.SUPERSEDE)
    def supersede(self) -> None:
        """A newer update arrived: stop at the next safe point and hand back the pods as they are."""
        self.superseded = True

    @workflow.run
    async def run(self, inp: DeployInput) -> DeployOutput:
        await require_parent(DEPLOY_WORKFLOW, inp.spec.name)
        if inp.rolling:
            return await RollingUpdate(inp, self).run()
        ready, failed = await start_pods(
            inp.placement, inp.spec, inp.revision, inp.pod_ids, inp.existing, self.rollout.report,
            image_id=inp.image_id, ticket=inp.ticket,
        )
        return DeployOutput(pods=ready, failed=[FailedPod(pod_id=p, reason=r) for p, r in failed])


class RollingUpdate:
    """Surge, wait ready, drain, stop — in rounds, until every pod runs ``inp.revision``.

    The critical path is one ``start_pod`` per round: each new pod's ``min_ready_s`` is watched
    on its node from its first answer (inside ``start_pod``), the next round's placement is
    asked for while the current round's pods start, and an old pod drains and stops beside
    the next round, not before it (a draining pod counts toward neither side of the budget).
    """

    def __init__(self, inp: DeployInput, wf: DeployWorkflow) -> None:
        self.inp = inp
        self.wf = wf
        self.surge, self.unavailable = rollout.budget(inp.spec, inp.replicas)
        self.new = [p for p in inp.current if p.revision == inp.revision and p.ready]
        self.old = [p for p in inp.current if p.revision != inp.revision and p.ready]
        self.stopped: list[str] = []
        self.failures: list[FailedPod] = []
        self.pipelined = False
        self.bounded = False  # ROUND_DEADLINE
        self.expired = False  # the deadline ended a round in flight
        self.in_flight: dict[str, str] = {}  # new pods starting now: id -> node
        self.reports: list[asyncio.Task[None]] = []  # ready reports in flight: a drain waits for them
        self.placing: tuple[int, asyncio.Task[list[NodeSpec | None]]] | None = None

    def _plan(self, new: int, old: int) -> tuple[int, int]:
        """(old pods to retire now, new pods to start now) with ``new`` and ``old`` ready."""
        return rollout.step(self.inp.replicas, self.surge, self.unavailable, new, old)

    async def run(self) -> DeployOutput:
        # Histories recorded before the pipelined rounds replay the way they ran.
        self.pipelined = workflow.patched(PIPELINED)
        self.bounded = self.pipelined and workflow.patched(ROUND_DEADLINE)
        n = self.inp.replicas
        last_progress = workflow.now()
        error: str | None = None
        retiring: list[asyncio.Task[None]] = []
        while len(self.new) < n or self.old:
            if self.wf.superseded:
                break
            error = self._given_up(last_progress)
            if error is not None:
                break
            k, room = self._plan(len(self.new), len(self.old))
            victims, self.old = self.old[:k], self.old[k:]
            if victims:
                retiring.append(asyncio.ensure_future(self._retire(victims, after=list(self.reports))))
            if room > 0:
                if await self._surge_by(last_progress, room):
                    last_progress = workflow.now()
            elif not victims:
                break  # no budget to move (max_surge 0 and max_unavailable 0): nothing can change
        await self._cancel_placing()
        await asyncio.gather(*retiring, *self.reports)
        return DeployOutput(pods=self.new + self.old, failed=self.failures, stopped=self.stopped, error=error,
                            superseded=self.wf.superseded and error is None)

    def _given_up(self, last_progress: datetime) -> str | None:
        """Why the rollout stops here: ``CRASH_LIMIT`` new pods failed, or no new pod became
        ready within ``progress_deadline_s`` of the last one that did (or of the start)."""
        inp = self.inp
        if len(self.failures) >= CRASH_LIMIT:
            return f"revision {inp.revision}: {len(self.failures)} new pods failed (last: {self.failures[-1].reason})"
        if self.expired or (workflow.now() - last_progress).total_seconds() > inp.spec.progress_deadline_s:
            return f"revision {inp.revision}: no progress within progress_deadline_s {inp.spec.progress_deadline_s:g}s"
        return None

    async def _surge_by(self, last_progress: datetime, count: int) -> bool:
        """``_surge``, cut short when ``progress_deadline_s`` passes while it runs: the pods still
        starting then are stopped and count as failed (a pod that never answers, a placement
        that waits for room, a start that keeps being retried: none holds the rollout past it)."""
        if not self.bounded:
            return await self._surge(count)
        deadline = self.inp.spec.progress_deadline_s
        left = deadline - (workflow.now() - last_progress).total_seconds()
        surge = asyncio.ensure_future(self._surge(count))
        try:
            await workflow.wait_condition(surge.done, timeout=max(left, 0.001),
                                          timeout_summary=f"progress_deadline_s {deadline:g}")
        except TimeoutError:
            self.expired = True
            starting = dict(self.in_flight)
            surge.cancel()  # each start in flight stops its pod before it lets go (start_and_wait)
            with contextlib.suppress(asyncio.CancelledError):
                await surge
            self.failures += [FailedPod(pod_id=p, reason=f"pod {p} not ready within progress_deadline_s {deadline:g}s")
                              for p in starting]
            return False
        return surge.result()

    async def _surge(self, count: int) -> bool:
        """Start ``count`` new pods, wait ``min_ready_s``, keep those still running."""
        if not self.pipelined:
            return await self._surge_then_check(count)
        inp = self.inp
        nodes = await self._nodes(count)
        ids = [str(workflow.uuid4()) for _ in nodes]
        starting = [PodStatus(id=i, node=node.name, revision=inp.revision, image=inp.spec.image)
                    for i, node in zip(ids, nodes, strict=True) if node is not None]
        self._place_next(starting)

        async def one(pod_id: str, node) -> PodStatus | None:  # noqa: ANN001 - a NodeSpec
            self.in_flight[pod_id] = node.name
            try:
                pod = await start_and_wait(inp.spec, inp.revision, pod_id, node, self._report_soon,
                                           image_id=inp.image_id, ticket=inp.ticket, min_ready_s=inp.spec.min_ready_s)
            except ActivityError as e:
                if not self.expired:  # else cancelled by the deadline: _surge_by books it, with why
                    self.failures.append(FailedPod(pod_id=pod_id, reason=error_message(e)))
                return None
            finally:
                self.in_flight.pop(pod_id, None)
            self.new.append(pod)  # now, not after the round: a round cut short keeps its ready pods
            return pod

        started = [p for p in await asyncio.gather(*(one(i, n) for i, n in zip(ids, nodes, strict=True))) if p]
        return bool(started)

    async def _report_soon(self, pod: PodStatus) -> None:
        """Tell the parent of a ready pod without holding the next round up for it."""
        self.reports.append(asyncio.ensure_future(report_to_parent(pod)))

    def _place_next(self, starting: list[PodStatus]) -> None:
        """Ask the Scheduler for the next round's nodes now, as if the pods starting come up."""
        new, old = self.new + starting, self.old
        k, room = self._plan(len(new), len(old))
        if room > 0:
            task = asyncio.ensure_future(pick_nodes(self.inp.placement, self.inp.spec, room, new + old[k:],
                                                    require_all=True))
            self.placing = (room, task)

    async def _nodes(self, count: int) -> list[NodeSpec | None]:
        if self.placing is not None and self.placing[0] == count:
            task = self.placing[1]
            self.placing = None
            try:
                return await task
            except ActivityError:
                pass  # asked again below, with the pods as they are now
        await self._cancel_placing()
        return await pick_nodes(self.inp.placement, self.inp.spec, count, self.new + self.old, require_all=True)

    async def _cancel_placing(self) -> None:
        if self.placing is None:
            return
        task = self.placing[1]
        self.placing = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ActivityError):
            await task

    async def _surge_then_check(self, count: int) -> bool:
        """The rounds as they ran before ``PIPELINED``: start, then a timer, then a listing."""
        inp = self.inp
        placed = self.new + self.old
        nodes = await pick_nodes(inp.placement, inp.spec, count, placed, require_all=True)
        ids = [str(workflow.uuid4()) for _ in nodes]

        async def one(pod_id: str, node) -> PodStatus | None:  # noqa: ANN001 - a NodeSpec
            try:
                return await start_and_wait(inp.spec, inp.revision, pod_id, node, report_to_parent,
                                            image_id=inp.image_id, ticket=inp.ticket)
            except ActivityError as e:
                self.failures.append(FailedPod(pod_id=pod_id, reason=error_message(e)))
                return None

        started = [p for p in await asyncio.gather(*(one(i, n) for i, n in zip(ids, nodes, strict=True))) if p]
        if not started:
            return False
        if inp.spec.min_ready_s > 0:
            await workflow.sleep(timedelta(seconds=inp.spec.min_ready_s), summary=f"min_ready_s {inp.spec.min_ready_s:g}")
        alive = await self._still_running(started)
        for pod in started:
            if pod.id in alive:
                self.new.append(pod)
            else:
                self.failures.append(FailedPod(pod_id=pod.id, reason=f"pod {pod.id} died within min_ready_s"))
                await stop_pod(inp.spec, pod, self._queue(pod.node), grace_s=0)
                await report_to_parent(pod.model_copy(update={"ready": False, "health": "exited"}))
        return bool(alive)

    async def _still_running(self, pods: list[PodStatus]) -> set[str]:
        alive: set[str] = set()
        for node in sorted({p.node for p in pods}):
            listed = await workflow.execute_activity_method(
                PodActivities.list_pods,
                ListPodsInput(service=self.inp.spec.name),
                task_queue=self._queue(node),
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=POD_HEARTBEAT,
                retry_policy=POD_RETRY,
                summary=f"still running after min_ready_s on {node}",
            )
            alive |= {p.id for p in listed.pods if p.health != "exited"}
        return {p.id for p in pods if p.id in alive}

    async def _retire(self, pods: list[PodStatus], *, after: list[asyncio.Task[None]]) -> None:
        """Drain (routers send nothing new for ``drain_s``), then stop gracefully. The parent
        hears of the new pods that replace these (``after``) before it hears these drain."""
        if not pods:
            return
        await asyncio.gather(*after)
        parent = workflow.info().parent
        if parent is not None:
            self.wf.retiring += [p.id for p in pods]
            await workflow.get_external_workflow_handle(parent.workflow_id).signal(S.PODS_DRAINING, [p.id for p in pods])
        await drain(self.inp.placement, self.inp.spec, [p.id for p in pods])
        await asyncio.gather(*(stop_pod(self.inp.spec, p, self._queue(p.node)) for p in pods))
        self.stopped += [p.id for p in pods]
        gone = [pod.model_copy(update={"ready": False, "health": "exited"}) for pod in pods]
        if self.pipelined:
            await asyncio.gather(*(report_to_parent(pod) for pod in gone))
        else:
            for pod in gone:
                await report_to_parent(pod)

    def _queue(self, node: str) -> str:
        return node_queue(self.inp.placement, node)
