"""NodeRegistry (id ``hms-nodes``): which nodes exist, their capacity and labels, and whether
they are alive.

Workers join with the ``join`` signal (signal-with-start, so whichever comes first starts the
registry), ask for the answer with the ``joined`` query, and then heartbeat with a signal. One durable timer, set for the
earliest moment a Ready node would have been silent for ``lost_after_s``, is all the
registry waits on: a node whose heartbeat did not come is ``Lost``, and every service with
pods there is told (``node_lost``) so it replaces them on other nodes through its heal path.

A Lost node comes back only through ``register``, which its worker sends after removing the
pods it still runs that no service has on record: a heartbeat alone does not make it Ready.
Heartbeats that arrived are checked before anyone is called Lost, and a registry that could
not run for a while (its timer fired late) gives every node a fresh grace instead of calling
them all Lost at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from activities.enrolment import NodeTrustActivities
    from hms_mgmt.errors import ActivityErrorType
    from hms_mgmt.models import (
        DryRunVerdict,
        EventInput,
        NodeLost,
        NodeRecord,
        NodeRegistration,
        NodeRegistryInput,
        NodesOutput,
        NodeSpec,
        RegisterResult,
    )
    from hms_mgmt.names import NODE_REGISTRY_WORKFLOW, NR
    from hms_mgmt.wire import DryRunInput, EnrolInput, EnrolOutput, JoinAnswer, NodeCheckInput, NodeVerdict

from workflows.dryrun import dry_run
from workflows.registry import (
    CHECK_TIMEOUT,
    Heartbeats,
    Joins,
    SignedCheck,
    continue_as_new_due,
    control_settings,
    enrol,
    own_input,
)

NOTIFY_TIMEOUT = timedelta(seconds=60)
LATE_TIMER = timedelta(seconds=2)  # a timer this late (or half the grace) means the registry itself stalled
# patch: only enrolled nodes, with a fresh signature, register and heartbeat (checked by the control worker)
ENROLMENT = "node-enrolment"
# patch: heartbeats checked before Lost is decided; a late timer gives a fresh grace; a Lost node must register
GRACE = "node-lost-grace"
# patch: when every Ready node falls silent at once, they are Lost but their pods are not replaced
FULL_DISRUPTION = "node-lost-full-disruption"
# patch: the Ready nodes kept in the run's memo, so a placement reads them with a describe, not a query
READY_IN_MEMO = "ready-in-memo"


@workflow.defn(name=NODE_REGISTRY_WORKFLOW)
class NodeRegistry:
    @workflow.init
    def __init__(self, inp: NodeRegistryInput) -> None:
        self.inp, self.ask_settings = own_input(inp, "nodes", "removals", "untold_evicted", "untold_held")
        inp = self.inp
        self.nodes: dict[str, NodeRecord] = {}
        if inp.nodes is not None:
            self.nodes = {r.spec.name: r for r in inp.nodes}
        elif not self.ask_settings:
            self._seed(inp.seed)
        self.newly_lost: list[str] = list(inp.untold_evicted)
        self.held_lost: list[str] = list(inp.untold_held)  # Lost in a full disruption: told as an event only
        self.beats: Heartbeats[NodeRegistration] = Heartbeats(inp.lost_after_s, lambda reg: reg.spec.name, inp.heartbeats)
        self.check: SignedCheck[NodeRegistration] = SignedCheck(
            NodeTrustActivities.check_nodes, NodeCheckInput, inp.control_task_queue, "signed")
        self.removals: list[str] = list(inp.removals)  # `remove` hints to check
        self.joins = Joins(inp.joining, inp.answers)
        self.published: list[NodeSpec] | None = None  # the Ready nodes in the memo (READY_IN_MEMO)

    def _seed(self, seed: list[NodeSpec]) -> None:
        """A static node counts as heard from at the registry's start: its worker has
        lost_after_s to show up before pods stop being placed there."""
        now = workflow.now()
        for spec in seed:
            self.nodes.setdefault(spec.name, NodeRecord(spec=spec, source="config", registered_at=now, last_heartbeat=now))

    async def _take_settings(self) -> None:
        got = await control_settings(self.inp.control_task_queue)
        self.inp = self.inp.model_copy(update={"seed": got.seed, "lost_after_s": got.lost_after_s})
        self.beats.lost_after = timedelta(seconds=got.lost_after_s)
        self._seed(got.seed)

    @workflow.query
    def nodes(self) -> NodesOutput:
        return NodesOutput(nodes=sorted(self.nodes.values(), key=lambda r: r.spec.name))

    @workflow.signal(name=NR.JOIN)
    def join(self, reg: NodeRegistration) -> None:
        """A worker (re)joins; the run loop checks it, and the worker asks for the answer
        (``joined``). Only an enrolled node, signing this very registration, is let in."""
        if self.joins.offer(reg):
            self.beats.wake = True

    @workflow.query(name=NR.JOINED)
    def joined(self, request_id: str) -> JoinAnswer | None:
        """The answer to the join with this ``request_id``; None while it waits for its check.
        ``node.was_lost`` tells the worker to remove the stale pods it still runs."""
        return self.joins.answers.get(request_id)

    @workflow.update(name=NR.REGISTER)
    async def register(self, reg: NodeRegistration) -> RegisterResult:
        """A worker (re)joins, as workers before the ``join`` signal did (kept for them and for
        the histories they made): checked at once, the answer is the update's result."""
        if not workflow.patched(ENROLMENT):
            return self._upsert(reg)
        verdict = (await self.check([reg], "register"))[0]
        refusal = self._refusal(reg, verdict)
        if refusal:
            if verdict.ok:  # the control worker wrote the event for a bad signature; this one is ours
                await self._denied(refusal, reg.spec.name)
            raise ApplicationError(refusal, type=ActivityErrorType.ACCESS_DENIED, non_retryable=True)
        return self._upsert(reg, verdict)

    @workflow.update(name=NR.ENROL)
    async def enrol(self, inp: EnrolInput) -> EnrolOutput:
        """``hms node join``: the control worker checks the join token's signature and signs the
        node's certificate (the registry only carries the message; it learns of the node when
        its worker registers)."""
        return await enrol(inp, self.inp.control_task_queue, "node")

    @workflow.update(name=NR.DRY_RUN)
    async def dry_run(self, inp: DryRunInput) -> DryRunVerdict:
        """``deploy(spec, dry_run=True)``: the admission verdict for ``spec`` on the Ready nodes, by
        the control worker's own checks; a long-lived workflow answers it, so no workflow starts."""
        return await dry_run(inp, self.inp.control_task_queue, self._ready())

    def _ready(self) -> list[NodeSpec]:
        return [r.spec for r in sorted(self.nodes.values(), key=lambda r: r.spec.name) if r.state == "Ready"]

    def _publish_ready(self) -> None:
        """Keep the Ready nodes in the run's memo when they change: a deploy's client and the
        Scheduler read them with the describe that checks this run is ours, with no query for
        the control worker to answer (a heartbeat changes nothing there: no event per beat)."""
        ready = self._ready()
        if ready != self.published and workflow.patched(READY_IN_MEMO):
            workflow.upsert_memo({NR.READY_MEMO: ready})
            self.published = ready

    @workflow.signal(name=NR.HEARTBEAT)
    def heartbeat(self, reg: NodeRegistration) -> None:
        """A live node. A heartbeat from a node the registry does not know (or knew as Lost)
        registers it again, so a registry restarted from its seed relearns every node. Each is
        checked (a batch at a time, by the run loop) before it counts."""
        if workflow.patched(ENROLMENT):
            self.beats.offer(reg)
            return
        self._beat(reg)

    def _beat(self, reg: NodeRegistration, verdict: NodeVerdict | None = None) -> None:
        rec = self.nodes.get(reg.spec.name)
        if rec is not None and rec.state == "Lost" and workflow.patched(GRACE):
            if not rec.pods_kept:
                return  # its worker registers again once it removed its stale pods
            rec.state, rec.pods_kept = "Ready", False  # nothing of it was replaced: back as it was
            workflow.logger.warning("node %s heard again after a full disruption: Ready", rec.spec.name)
        if rec is None or rec.state != "Ready" or rec.spec != reg.spec:
            self._upsert(reg, verdict)
        else:
            rec.last_heartbeat = workflow.now()
            if verdict is not None:
                rec.last_proof_at = verdict.at

    @workflow.signal(name=NR.REMOVE)
    def remove(self, node: str) -> None:
        """A hint from `hms node remove`: the registry asks the control worker whether the node
        was really revoked before it drops it (anyone who reaches Temporal can send this)."""
        if node in self.nodes and node not in self.removals:
            self.removals.append(node)
            self.beats.wake = True

    def _refusal(self, reg: NodeRegistration, verdict: NodeVerdict) -> str:
        """Why a checked registration or heartbeat is still refused here, or ""."""
        if not verdict.ok:
            return verdict.reason or f"node {reg.spec.name}: refused"
        rec = self.nodes.get(reg.spec.name)
        if rec is None:
            return ""
        if rec.state == "Ready" and rec.key_id and rec.key_id != verdict.key_id:
            return f"node {reg.spec.name} is Ready with another key: a second worker for it is refused"
        if verdict.at <= rec.last_proof_at:
            return f"node {reg.spec.name}: a replayed signature (not newer than its last)"
        return ""

    async def _denied(self, reason: str, node: str) -> None:
        await workflow.execute_activity_method(
            ControlActivities.emit_event,
            EventInput(type="access.denied", service="", reason=reason, data={"node": node}),
            task_queue=self.inp.control_task_queue, start_to_close_timeout=CHECK_TIMEOUT)

    async def _check_beats(self) -> None:
        batch = self.beats.take()
        for reg, verdict in zip(batch, await self.check(batch, "heartbeat"), strict=True):
            refusal = self._refusal(reg, verdict)
            if not refusal:
                self._beat(reg, verdict)
            elif verdict.ok and "replayed" not in refusal:
                await self._denied(refusal, reg.spec.name)

    async def _check_joins(self) -> None:
        batch = self.joins.take()
        for reg, verdict in zip(batch, await self.check(batch, "register"), strict=True):
            refusal = self._refusal(reg, verdict)
            if refusal and verdict.ok:  # the control worker wrote the event for a bad signature
                await self._denied(refusal, reg.spec.name)
            self.joins.answer(reg.request_id, JoinAnswer(refused=refusal) if refusal
                              else JoinAnswer(node=self._upsert(reg, verdict)))

    async def _check_removals(self) -> None:
        while self.removals:
            node = self.removals.pop(0)
            revoked = await workflow.execute_activity_method(
                NodeTrustActivities.node_removed, NodeLost(node=node), task_queue=self.inp.control_task_queue,
                start_to_close_timeout=CHECK_TIMEOUT, summary=f"was {node} removed?")
            rec = self.nodes.get(node)
            if not revoked or rec is None or rec.removed:
                continue
            rec.removed = True
            if rec.state == "Ready":
                rec.state = "Lost"
                rec.lost_at = workflow.now()
                self.newly_lost.append(node)
                workflow.logger.warning("node %s removed: its pods are replaced elsewhere", node)

    def _upsert(self, reg: NodeRegistration, verdict: NodeVerdict | None = None) -> RegisterResult:
        now = workflow.now()
        old = self.nodes.get(reg.spec.name)
        was_lost = old is not None and old.state == "Lost"
        # Lost with every node (its pods kept): nothing of it was replaced, so nothing to sweep.
        stale = was_lost and old is not None and not old.pods_kept
        rec = NodeRecord(
            spec=reg.spec,
            state="Ready",
            source=old.source if old is not None else "worker",
            registered_at=now,
            last_heartbeat=now,
            rejoins=(old.rejoins + 1) if was_lost and old is not None else (old.rejoins if old else 0),
            key_id=verdict.key_id if verdict is not None else "",
            last_proof_at=verdict.at if verdict is not None else 0.0,
        )
        self.nodes[reg.spec.name] = rec
        if was_lost:
            workflow.logger.info("node %s is back", reg.spec.name)
        self.beats.wake = True  # the timer may be unset (no Ready node) or later than this node's deadline
        return RegisterResult(record=rec, was_lost=stale)

    @workflow.run
    async def run(self, inp: NodeRegistryInput) -> None:
        if self.ask_settings:
            await self._take_settings()
        while not continue_as_new_due(self.inp.history_threshold):
            if self.joins.pending:
                await self._check_joins()
            if self.beats.pending:
                await self._check_beats()
            if self.removals:
                await self._check_removals()
            while self.newly_lost:
                await self._notify(self.newly_lost.pop(0))
            while self.held_lost:
                await self._notify(self.held_lost.pop(0), evict=False)
            self._publish_ready()
            deadline = self.beats.deadline(r.last_heartbeat for r in self.nodes.values() if r.state == "Ready")
            await self.beats.wait(
                deadline, lambda: bool(self.removals or self.joins.pending) or continue_as_new_due(self.inp.history_threshold),
                "next node heartbeat due")
            if workflow.patched(GRACE):
                if self.beats.pending:
                    await self._check_beats()
                self._grace_if_late(deadline)
            self._mark_lost()
        await workflow.wait_condition(workflow.all_handlers_finished)
        # what this run had still to do goes with it: a node marked Lost just now is still told
        workflow.continue_as_new(self.inp.model_copy(update={
            "nodes": list(self.nodes.values()), "joining": self.joins.pending, "answers": self.joins.answers,
            "heartbeats": list(self.beats.pending.values()), "removals": self.removals,
            "untold_evicted": self.newly_lost, "untold_held": self.held_lost}))

    def _grace_if_late(self, deadline: datetime | None) -> None:
        """Woken well after its deadline (the control worker was down, the server busy): the
        silence was the registry's own, so every Ready node gets a fresh grace from now."""
        now = workflow.now()
        if deadline is None or now - deadline <= max(self.beats.lost_after / 2, LATE_TIMER):
            return
        workflow.logger.warning("node registry woke %.1fs late: every node gets a fresh grace",
                                (now - deadline).total_seconds())
        for rec in self.nodes.values():
            if rec.state == "Ready":
                rec.last_heartbeat = now

    def _mark_lost(self) -> None:
        """Every Ready node silent past the grace is Lost, and its services replace its pods. When
        that is every Ready node at once, the pods stay (as Kubernetes' node controller stops
        evicting in a full disruption): there is nowhere to put them, and a control plane that
        hears no node is more likely cut off or overloaded itself."""
        now = workflow.now()
        ready = [rec for rec in self.nodes.values() if rec.state == "Ready"]
        silent = [rec for rec in ready if self.beats.silent(rec.last_heartbeat, now)]
        hold = bool(silent) and len(silent) == len(ready) and workflow.patched(FULL_DISRUPTION)
        for rec in silent:
            rec.state, rec.lost_at, rec.pods_kept = "Lost", now, hold
            (self.held_lost if hold else self.newly_lost).append(rec.spec.name)
            workflow.logger.warning("node %s lost: no heartbeat for %ss%s", rec.spec.name, self.inp.lost_after_s,
                                    " (every node silent: its pods stay)" if hold else "")

    async def _notify(self, node: str, *, evict: bool = True) -> None:
        rec = self.nodes[node]
        silent = (workflow.now() - rec.last_heartbeat).total_seconds() if rec.last_heartbeat else 0.0
        why = f"node {node} lost: no heartbeat for {silent:.0f}s"
        await workflow.execute_activity_method(
            ControlActivities.notify_node_lost,
            NodeLost(node=node, reason=why if evict else f"{why}; every node is silent, so its pods stay", evict=evict),
            task_queue=self.inp.control_task_queue,
            start_to_close_timeout=NOTIFY_TIMEOUT,
            summary=f"node {node} lost: tell its services" if evict else f"node {node} lost with every node: event only",
        )
