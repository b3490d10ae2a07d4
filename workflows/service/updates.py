"""The update queue and the rollout: spec updates applied one at a time, newest first, either
in place (nothing a pod runs changed) or as a new revision rolled out by a rolling
DeployWorkflow, rolled back automatically when it fails."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import (
        DeployInput,
        DeployOutput,
        Failure,
        GovernanceInput,
        PodStatus,
        RevisionRecord,
        RolloutStatus,
        ServiceSpec,
        SpecUpdate,
        UpdateOutcome,
    )
    from hms_mgmt.names import SUPERVISED, S, rollout_id
    from hms_mgmt.policy import rollout
    from hms_mgmt.policy.phases import RollbackRefused, rollback_target
    from hms_mgmt.wire import DrainClaim

from workflows.common import NODE_PICKUP, stop_pod
from workflows.deploy import DeployWorkflow
from workflows.service.access import Access
from workflows.service.admission import Admission
from workflows.service.approvals import ApprovalGate
from workflows.service.feed import EndpointFeed
from workflows.service.slots import Slots
from workflows.service.state import CONTROL_TIMEOUT, ServiceRun, refuse
from workflows.service.supervision import Supervision

MAX_REVISIONS = 20


@dataclass(eq=False)
class Updates:
    """The update queue (newest first, an older one superseded) and the rollout with rollback."""

    run: ServiceRun
    access: Access
    admission: Admission
    approvals: ApprovalGate
    supervision: Supervision
    feed: EndpointFeed
    slots: Slots

    async def rollout_says(self, rollout_workflow_id: str, pods: set[str]) -> set[str]:
        """Of ``pods``, those the running rollout itself says it drains (asked by the control
        worker through its ``retiring`` query): a ``pods_draining`` signal is anyone's to send."""
        if not pods:
            return set()
        try:
            told = await workflow.execute_activity_method(
                ControlActivities.confirm_draining, DrainClaim(rollout_workflow_id=rollout_workflow_id,
                                                               pods=sorted(pods)),
                task_queue=self.run.placement.control_task_queue, start_to_close_timeout=CONTROL_TIMEOUT,
                summary=f"confirm {len(pods)} pod(s) draining with {rollout_workflow_id}"[:200])
        except ActivityError as e:  # not confirmed is not believed: the rollout drains them all the same
            workflow.logger.warning("drain of %s not confirmed: %s", sorted(pods), e)
            return set()
        return set(told) & pods

    def rollback_target(self, to_revision: int | None) -> RevisionRecord:
        """The revision a rollback goes to; refuses the caller when there is none."""
        run = self.run
        try:
            return rollback_target(run.spec.name, run.state.revisions, run.state.revision, to_revision)
        except RollbackRefused as e:
            raise refuse(FailureKind.REFUSED, str(e)) from None

    async def request(self, req: SpecUpdate, action: str) -> UpdateOutcome:
        """Queue an update (after checking who asks) and answer once it is admitted or refused."""
        run = self.run
        claim, bind = (("update", {"spec": req.spec.digest()}) if req.spec is not None
                       else ("rollback", {"to_revision": req.to_revision}))
        allowed = await self.access.authorize(action, req.proof, request_id=req.request_id, claim=claim, bind=bind)
        if not allowed.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"update {run.spec.name} refused: {allowed.reason}")
        key = req.request_id or str(workflow.uuid4())
        req = req.model_copy(update={"request_id": key, "grant": allowed.grant})
        run.spec_requests.append((req, allowed.user or ""))
        if run.updating is None:
            run.updating = asyncio.ensure_future(self._updater())
        await workflow.wait_condition(lambda: key in run.update_outcomes)
        outcome = run.update_outcomes.pop(key)
        if isinstance(outcome, Failure):
            raise refuse(outcome.kind, outcome.message)
        return outcome.model_copy(update={"status": run.status()})

    async def _updater(self) -> None:
        """Apply spec updates one at a time, newest first: an older one still waiting is
        superseded. Runs beside supervision, so pods stay watched while an update waits for
        approval or image trust; the rollout itself takes the lock, after heals and scaling."""
        run = self.run
        try:
            while run.spec_requests and not run.undeploy_requested:
                *older, (req, user) = run.spec_requests
                run.spec_requests = []
                for old, _ in older:
                    run.update_outcomes[old.request_id] = Failure(
                        kind=FailureKind.SUPERSEDED, message=f"superseded by a newer update of {run.spec.name}")
                before = run.spec
                await self._apply(req, user)
                await self.slots.spec_changed(before, req.grant)
            for req, _ in run.spec_requests:
                run.update_outcomes[req.request_id] = Failure(
                    kind=FailureKind.UNDEPLOYED, message=f"{run.spec.name} is being undeployed")
            run.spec_requests = []
        finally:
            run.updating = None

    async def _apply(self, req: SpecUpdate, user: str) -> None:
        run = self.run
        key = req.request_id
        target: RevisionRecord | None = None
        if req.spec is None:  # a rollback: an earlier revision, already admitted, its image pinned
            try:
                target = rollback_target(run.spec.name, run.state.revisions, run.state.revision, req.to_revision)
            except RollbackRefused as e:
                run.update_outcomes[key] = Failure(kind=FailureKind.REFUSED, message=str(e))
                return
            spec, image_id, why = target.spec, target.image_id, f"rollback to revision {target.revision} by {user}"
        else:
            spec, image_id, why = req.spec, "", f"update by {user}"
        same_pods = spec.pod_template() == run.spec.pod_template() and all(
            p.revision == run.state.revision for p in run.state.pods)
        if spec == run.spec and same_pods:
            run.update_outcomes[key] = UpdateOutcome(in_place=True, status=run.status())
            return
        prior = target
        revision = max([r.revision for r in run.state.revisions] + [run.state.revision]) + 1
        if prior is None:  # a rollback was admitted once: its ticket is the proof
            refused = await self._govern(spec, user, revision)
            if refused is not None:
                run.update_outcomes[key] = refused
                return
        if same_pods:
            await self._update_in_place(spec, why)
            run.update_outcomes[key] = UpdateOutcome(in_place=True, status=run.status())
            return
        if not image_id:
            content_id, problem, kind = await self.admission.resolve_image(spec)
            if content_id is None:
                await run.emit("image.untrusted" if kind == FailureKind.IMAGE_UNTRUSTED else "spec.refused",
                               problem, image=spec.image)
                run.update_outcomes[key] = Failure(kind=kind, message=problem)
                return
            image_id = content_id
        ticket, problem = await self.admission.ticket(spec, revision, image_id, grant=req.grant,
                                                      approval_grant=run.approval_grant if prior is None else "",
                                                      prior=prior)
        if ticket is None:
            run.update_outcomes[key] = Failure(kind=FailureKind.ACCESS_DENIED, message=problem)
            return
        record = RevisionRecord(revision=revision, spec=spec, image_id=image_id, ticket=ticket, deployed_by=user,
                                deployed_at=workflow.now(), outcome="rolling", reason=why)
        run.state.revisions = (run.state.revisions + [record])[-MAX_REVISIONS:]
        run.update_outcomes[key] = UpdateOutcome(revision=revision, status=run.status())
        await self._roll_out(record)

    async def _govern(self, spec: ServiceSpec, user: str, revision: int) -> Failure | None:
        """The governance policy on a changed spec (an in-place change too: raising max_replicas
        over the limit needs approval); a running service keeps running while it waits."""
        run = self.run
        run.approval_grant = ""
        verdict = await workflow.execute_activity_method(
            ControlActivities.check_governance,
            GovernanceInput(spec=spec),
            task_queue=run.placement.control_task_queue,
            start_to_close_timeout=CONTROL_TIMEOUT,
            summary="governance policy (update)",
        )
        if verdict.needs_approval:
            before = run.state.failure, run.state.message
            run.state.requested_by = user
            approved = await self.approvals.wait("; ".join(verdict.reasons), verdict.approval_timeout_s,
                                                 revision=revision, spec=spec, running=True)
            refusal = run.state.failure
            run.state.failure, run.state.message = before  # the running revision is not what failed
            if not approved:
                return refusal or Failure(kind=FailureKind.APPROVAL_REJECTED, message="update not approved")
        return None

    async def _update_in_place(self, spec: ServiceSpec, why: str) -> None:
        """Nothing a pod runs changed (bounds, targets, intervals): take the new spec as it is."""
        run = self.run
        changed = rollout.changed_fields(run.spec, spec)
        run.spec = spec
        reason = f"{why}: {', '.join(changed)} changed in place"
        run.decide("update", reason)
        run.pods_changed = True  # restart the watch with the new intervals and targets
        await run.emit("service.updated", reason, changed=changed)
        low, high = run.bounds()  # the active time slot's, if one is on
        desired = min(max(run.state.desired_replicas, low), high)
        if desired != run.state.desired_replicas and run.state.phase in SUPERVISED:
            await self.supervision.scale(desired, f"{reason}: replicas now within bounds")

    # --- the rollout -------------------------------------------------------------------------

    async def _roll_out(self, record: RevisionRecord) -> None:
        """Roll every pod to ``record``; on failure, roll back to the revision that ran before."""
        run = self.run
        async with run.lock:
            if run.heals or run.failing:  # status().rollout says what holds it (its clock starts after)
                run.state.rollout = RolloutStatus(from_revision=run.state.revision, to_revision=record.revision,
                                                  state="waiting", started_at=workflow.now(),
                                                  message="waits for the heals in flight to finish")
            with run.wait_for_heals(f"the rollout to revision {record.revision}"):
                await workflow.wait_condition(lambda: not run.heals and not run.failing)
            previous = next((r for r in run.state.revisions if r.revision == run.state.revision), None)
            prior_phase = run.state.phase
            rollout = RolloutStatus(from_revision=run.state.revision, to_revision=record.revision,
                                    state="rolling", started_at=workflow.now())
            run.state.rollout = rollout
            run.set_phase("Updating")
            run.pods_changed = True  # no watch while pods are replaced on purpose
            await run.emit("rollout.started", f"revision {run.state.revision} -> {record.revision}: {record.reason}",
                           from_revision=run.state.revision, to_revision=record.revision, image=record.spec.image,
                           image_id=record.image_id)
            result = await self._rolling_child(record, rollback=False)
            if result.error is None and not result.superseded:
                self._set_revision(record, "active")
                if previous is not None:
                    self._mark(previous.revision, "replaced")
                rollout.state = "completed"
                run.decide("rollout", f"revision {record.revision} runs on every pod ({record.reason})")
                await run.emit("rollout.completed", f"revision {record.revision}: {len(result.pods)} pods",
                               revision=record.revision)
            elif result.superseded:
                self._set_revision(record, "superseded")  # pods are mixed: the next rollout replaces the rest
                rollout.state = "superseded"
            else:
                await self._roll_back(record, previous, result, rollout)
            run.set_phase(prior_phase if prior_phase in SUPERVISED else "Running")
            run.pods_changed = True

    async def _roll_back(self, record: RevisionRecord, previous: RevisionRecord | None, result: DeployOutput,
                         rollout: RolloutStatus) -> None:
        """``record`` failed to roll out: back to ``previous`` (unless undeploying), and its
        update callers answered once the service is back where it was, not while it rolls back."""
        run = self.run
        self._mark(record.revision, "failed", result.error or "")
        await run.emit("rollout.failed", result.error or "", revision=record.revision)
        if previous is not None and not run.undeploy_requested:
            rollout.state = "rolling_back"
            back = await self._rolling_child(previous, rollback=True)
            self._set_revision(previous, "active")
            rollout.state = "rolled_back" if back.error is None else "failed"
            reason = f"revision {record.revision} failed ({result.error}); back on revision {previous.revision}"
            run.decide("rollback", reason)
            await run.emit("rollout.rolled_back", reason, from_revision=record.revision,
                           to_revision=previous.revision)
        run.revision_failures[record.revision] = Failure(
            kind=FailureKind.ROLLED_BACK, message=f"revision {record.revision} rolled back: {result.error}")

    async def _rolling_child(self, record: RevisionRecord, *, rollback: bool) -> DeployOutput:
        """Run one rolling DeployWorkflow to ``record`` (told to hand back when a newer update or
        an undeploy arrives, unless it is a rollback) and book the pods it leaves."""
        run = self.run
        current = [p for p in run.state.pods if p.health != "exited"]
        kind = "rollback" if rollback else "deploy"
        child_id = rollout_id(workflow.info().workflow_id, record.revision, rollback=rollback,
                              scale_count=run.state.scale_counter, decisions=len(run.state.decisions))
        child = await workflow.start_child_workflow(
            DeployWorkflow.run,
            DeployInput(spec=record.spec, revision=record.revision, pod_ids=[], placement=run.placement,
                        image_id=record.image_id, ticket=record.ticket, rolling=True, current=current,
                        replicas=run.state.desired_replicas, rollback=rollback),
            id=child_id,
            task_queue=run.placement.control_task_queue,
            static_summary=f"{kind} to revision {record.revision}: {record.spec.image}"[:200],
        )
        if run.state.rollout is not None:
            run.state.rollout.workflow_id = child_id  # the dashboard links to the child that rolls now
        run.rolling_to = record.revision  # what its pods_draining signals may name (workflow.py)
        try:
            return await self._await_rolling(child, current, rollback=rollback)
        finally:
            run.rolling_to = None

    async def _await_rolling(self, child: workflow.ChildWorkflowHandle[Any, DeployOutput], current: list[PodStatus], *,
                             rollback: bool) -> DeployOutput:
        run = self.run
        told = False
        while not child.done():
            await workflow.wait_condition(
                lambda: child.done() or (not told and (bool(run.spec_requests) or run.undeploy_requested)))
            if not child.done() and not told and not rollback:
                await child.signal(S.SUPERSEDE)
                told = True
            elif not child.done() and rollback:
                break  # a rollback is not superseded: let it finish
        result = await child
        await self._book(current, result)
        return result

    async def _book(self, current: list[PodStatus], result: DeployOutput) -> None:
        """The rolling child's pods are the service now: keep them, drop what it stopped, and
        stop the pods booked while it ran that it never saw."""
        run = self.run
        stopped = set(result.stopped) | {f.pod_id for f in result.failed}
        keep = {p.id for p in result.pods}
        given = {p.id for p in current}
        late = [p for p in run.state.pods if p.id not in given and p.id not in keep and p.id not in stopped]
        if late and workflow.patched("rollout-stops-late-pods"):
            # Booked while the child ran (a heal's replacement for a pod it had already counted
            # out): the child's pods are the whole service now, so these are surplus. Drain and
            # stop them here; dropped from the books unstopped, they would run unseen until the
            # orphan sweep.
            run.stopping |= {p.id for p in late}
            run.pods_changed = True
            await self.feed.drain()
            outcomes = await asyncio.gather(
                *(stop_pod(run.spec, p, run.node_queue(p.node), schedule_to_start=NODE_PICKUP) for p in late),
                return_exceptions=True)
            for p, outcome in zip(late, outcomes, strict=True):
                if isinstance(outcome, BaseException):  # its node is gone: the node sweep removes it there
                    workflow.logger.warning("could not stop surplus pod %s: %s", p.id, outcome)
            stopped |= {p.id for p in late}
        run.state.pods = [p for p in run.state.pods if p.id in keep and p.id not in stopped]
        for pod in result.pods:
            run.upsert_pod(pod)
        run.stopping -= stopped | keep  # a pod the child hands back serves (a forged drain of it ends here)

    def _set_revision(self, record: RevisionRecord, outcome: str) -> None:
        run = self.run
        run.spec = record.spec
        run.state.revision = record.revision
        run.state.image_id = record.image_id
        run.state.ticket = record.ticket
        self._mark(record.revision, outcome)

    def _mark(self, revision: int, outcome: str, reason: str = "") -> None:
        self.run.state.revisions = [
            r.model_copy(update={"outcome": outcome, **({"reason": reason} if reason else {})})
            if r.revision == revision else r
            for r in self.run.state.revisions
        ]
