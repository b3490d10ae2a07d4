"""RouterRegistry (id ``hms-routers``): the routers that take the endpoint feed and are asked
before a drain ends, and whether they are alive.

A router joins (the ``join`` signal, signal-with-start; the answer by the ``joined`` query) and
heartbeats with a signal, both signed with its own key and checked by the control worker (``check_routers``)
against its router certificate. One durable timer, for the earliest moment a Ready router would
have been silent for ``lost_after_s``, marks a silent router ``Lost``: the feed no longer goes to
it and no drain waits for it. A heartbeat brings it back.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.enrolment import NodeTrustActivities
    from hms_mgmt.errors import ActivityErrorType
    from hms_mgmt.names import ROUTER_REGISTRY_WORKFLOW, RR
    from hms_mgmt.wire import (
        EnrolInput,
        EnrolOutput,
        JoinAnswer,
        NodeVerdict,
        RouterCheckInput,
        RouterRecord,
        RouterRegistration,
        RouterRegistryInput,
        RoutersOutput,
    )

from workflows.registry import Heartbeats, Joins, SignedCheck, continue_as_new_due, control_settings, enrol, own_input


@workflow.defn(name=ROUTER_REGISTRY_WORKFLOW)
class RouterRegistry:
    @workflow.init
    def __init__(self, inp: RouterRegistryInput) -> None:
        self.inp, self.ask_settings = own_input(inp, "routers")
        inp = self.inp
        self.routers: dict[str, RouterRecord] = {r.name: r for r in inp.routers or []}
        self.beats: Heartbeats[RouterRegistration] = Heartbeats(inp.lost_after_s, lambda reg: reg.name, inp.heartbeats)
        self.check: SignedCheck[RouterRegistration] = SignedCheck(
            NodeTrustActivities.check_routers, RouterCheckInput, inp.control_task_queue, "signed router")
        self.joins = Joins(inp.joining, inp.answers)

    @workflow.query(name=RR.ROUTERS)
    def routers_query(self) -> RoutersOutput:
        return RoutersOutput(routers=sorted(self.routers.values(), key=lambda r: r.name))

    @workflow.signal(name=RR.JOIN)
    def join(self, reg: RouterRegistration) -> None:
        """A router (re)joins; the run loop checks it (only an enrolled router signing this very
        registration gets in) and the router asks for the answer (``joined``)."""
        if self.joins.offer(reg):
            self.beats.wake = True

    @workflow.query(name=RR.JOINED)
    def joined(self, request_id: str) -> JoinAnswer | None:
        return self.joins.answers.get(request_id)

    @workflow.update(name=RR.REGISTER)
    async def register(self, reg: RouterRegistration) -> RouterRecord:
        """A router (re)joins, as routers before the ``join`` signal did (kept for them)."""
        verdict = (await self.check([reg], "register"))[0]
        refusal = self._refusal(reg, verdict)
        if refusal:
            raise ApplicationError(refusal, type=ActivityErrorType.ACCESS_DENIED, non_retryable=True)
        return self._upsert(reg, verdict)

    @workflow.update(name=RR.ENROL)
    async def enrol(self, inp: EnrolInput) -> EnrolOutput:
        """``hms router join``: the control worker checks the join token and signs the certificate."""
        return await enrol(inp, self.inp.control_task_queue, "router")

    @workflow.signal(name=RR.HEARTBEAT)
    def heartbeat(self, reg: RouterRegistration) -> None:
        """A live router; checked (a batch at a time, by the run loop) before it counts."""
        self.beats.offer(reg)

    def _refusal(self, reg: RouterRegistration, verdict: NodeVerdict) -> str:
        if not verdict.ok:
            return verdict.reason or f"router {reg.name}: refused"
        rec = self.routers.get(reg.name)
        if rec is not None and verdict.at <= rec.last_proof_at:
            return f"router {reg.name}: a replayed statement"
        return ""

    async def _check_joins(self) -> None:
        batch = self.joins.take()
        for reg, verdict in zip(batch, await self.check(batch, "register"), strict=True):
            refusal = self._refusal(reg, verdict)
            self.joins.answer(reg.request_id, JoinAnswer(refused=refusal) if refusal
                              else JoinAnswer(router=self._upsert(reg, verdict)))

    async def _check_beats(self) -> None:
        batch = self.beats.take()
        for reg, verdict in zip(batch, await self.check(batch, "heartbeat"), strict=True):
            rec = self.routers.get(reg.name)
            if not verdict.ok:
                if rec is not None and rec.state == "Ready":  # revoked, or its key replaced: no more feed
                    self._lose(rec, verdict.reason)
            elif not self._refusal(reg, verdict):
                if rec is None or rec.state != "Ready" or rec.url != reg.url or rec.key_id != verdict.key_id:
                    self._upsert(reg, verdict)
                else:
                    rec.last_heartbeat = workflow.now()
                    rec.last_proof_at = verdict.at

    def _upsert(self, reg: RouterRegistration, verdict: NodeVerdict) -> RouterRecord:
        now = workflow.now()
        rec = RouterRecord(name=reg.name, address=reg.address, url=reg.url, engine=reg.engine, worker=reg.worker,
                           registered_at=now, last_heartbeat=now, key_id=verdict.key_id, last_proof_at=verdict.at)
        self.routers[reg.name] = rec
        self.beats.wake = True
        return rec

    def _lose(self, rec: RouterRecord, why: str) -> None:
        rec.state = "Lost"
        rec.lost_at = workflow.now()
        workflow.logger.warning("router %s lost: %s", rec.name, why)

    @workflow.run
    async def run(self, inp: RouterRegistryInput) -> None:
        if self.ask_settings:
            got = await control_settings(self.inp.control_task_queue)
            self.inp = self.inp.model_copy(update={"lost_after_s": got.lost_after_s})
            self.beats.lost_after = timedelta(seconds=got.lost_after_s)
        while not continue_as_new_due(self.inp.history_threshold):
            if self.joins.pending:
                await self._check_joins()
            if self.beats.pending:
                await self._check_beats()
            deadline = self.beats.deadline(r.last_heartbeat for r in self.routers.values() if r.state == "Ready")
            await self.beats.wait(deadline, lambda: bool(self.joins.pending) or continue_as_new_due(self.inp.history_threshold),
                                  "next router heartbeat due")
            now = workflow.now()
            for rec in self.routers.values():
                if rec.state == "Ready" and self.beats.silent(rec.last_heartbeat, now):
                    self._lose(rec, f"no heartbeat for {self.inp.lost_after_s:g}s")
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self.inp.model_copy(update={"routers": list(self.routers.values()), "joining": self.joins.pending,
                                                         "answers": self.joins.answers,
                                                         "heartbeats": list(self.beats.pending.values())}))

