"""ServiceWorkflow (id ``svc-<name>``): the one writer of a service's desired and actual state.

A long-lived entity. Rollouts, heals and scaling actions are child workflows so each is its
own execution in the Web UI; children report back and this workflow applies the result.
Between actions it waits on one long-running watch activity per node, which returns only
when something needs a decision — a steady service adds a handful of events per hour.

This class holds the messages (handlers and their validators) and the run loop; its state is
one ``ServiceRun`` and each concern is a helper over it (approvals, admission, updates,
supervision, the endpoint feed), like samples-python's ``updatable_timer``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import (
        AdmissionRequest,
        Approval,
        EndpointSet,
        Failure,
        HealAttempt,
        NodeLost,
        PodStatus,
        ScaleRequest,
        ServiceInput,
        ServiceState,
        ServiceStatus,
        SlotEdge,
        SpecUpdate,
        UndeployRequest,
        UpdateOutcome,
        WatchResult,
    )
    from hms_mgmt.names import ADMITTING, ENDED, SERVICE_WORKFLOW, SUPERVISED, Q, S, U

from workflows.common import own_continuation
from workflows.service.access import Access
from workflows.service.admission import Admission
from workflows.service.approvals import ApprovalGate
from workflows.service.capacity import CapacityWaits
from workflows.service.feed import EndpointFeed
from workflows.service.lifecycle import Lifecycle
from workflows.service.reports import PodReports
from workflows.service.slots import Slots
from workflows.service.state import SERVICE_KEY, ServiceRun, cancel_quietly, refuse
from workflows.service.supervision import HEAL_ATTEMPT_CONFIRMED, Supervision
from workflows.service.updates import Updates

DEGRADED_AFTER = 2  # replacements failing in a row before the service is Degraded


REPLAYER_QUEUE_PREFIX = "replay-"
# patch: a pods_draining signal is believed only as the running rollout's own word
DRAIN_CONFIRMED_BY_ROLLOUT = "drain-confirmed-by-rollout"


@workflow.defn(name=SERVICE_WORKFLOW)
class ServiceWorkflow:
    @workflow.init
    def __init__(self, inp: ServiceInput) -> None:
        self.run_state = run = ServiceRun(inp)
        self.access = Access(run)
        self.feed = EndpointFeed(run)
        self.approvals = ApprovalGate(run, self.access)
        self.admission = Admission(run, self.access, self.approvals)
        self.supervision = Supervision(run, self.feed)
        self.lifecycle = Lifecycle(run, self.feed, self.supervision)
        self.slots = Slots(run, self.supervision)
        self.updates = Updates(run, self.access, self.admission, self.approvals, self.supervision, self.feed,
                               self.slots)
        self.reports = PodReports(run)
        self.capacity = CapacityWaits(run)

    # --- queries -----------------------------------------------------------------------

    @workflow.query(name=Q.STATUS)
    def status(self) -> ServiceStatus:
        return self.run_state.status()

    @workflow.query(name=Q.ENDPOINTS)
    def endpoints(self) -> EndpointSet:
        """The routable pods as last published to the routers: what a router loads at start."""
        return self.feed.current()

    # --- admission and undeploy --------------------------------------------------------

    @workflow.update(name=U.ADMISSION)
    async def admission(self, req: AdmissionRequest) -> ServiceStatus:
        """Answer once admission is decided (access, governance, image trust) or, with
        ``until="running"``, once the service runs; a refusal fails the update with its kind.
        Bounded by ``req.timeout_s``: then it answers with the phase reached so far."""
        run = self.run_state
        try:
            await workflow.wait_condition(lambda: self._reached(req), timeout=timedelta(seconds=req.timeout_s))
        except TimeoutError:
            return run.status()
        if req.until == "revision" and req.revision in run.revision_failures:
            failure = run.revision_failures[req.revision]
            raise refuse(failure.kind, failure.message)
        failure = run.state.failure
        if run.state.phase in ENDED or (req.until != "admitted" and run.state.phase == "Degraded"):
            if failure is not None:
                raise refuse(failure.kind, failure.message)
            raise refuse(FailureKind.UNDEPLOYED, f"{run.spec.name} is {run.state.phase}")
        return run.status()

    def _reached(self, req: AdmissionRequest) -> bool:
        run = self.run_state
        phase = run.state.phase
        if phase in ENDED or phase == "Undeploying":
            return True
        if req.until == "admitted":
            return phase not in ADMITTING
        if req.until == "revision" and req.revision is not None:
            if req.revision in run.revision_failures:
                return True
            return run.state.revision >= req.revision and phase in SUPERVISED and run.updating is None
        return phase in SUPERVISED

    @workflow.update(name=U.UNDEPLOY)
    async def undeploy(self, req: UndeployRequest) -> ServiceStatus:
        """Only an ops_admin may undeploy (checked here, in the worker); the answer comes once
        the request is accepted, and the run ends when every pod is stopped."""
        run = self.run_state
        allowed = await self.access.authorize("undeploy", req.proof, request_id=req.request_id)
        if not allowed.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"undeploy {run.spec.name} refused: {allowed.reason}")
        run.undeploy_requested = True
        return run.status()

    @undeploy.validator
    def _validate_undeploy(self, req: UndeployRequest) -> None:
        run = self.run_state
        if run.undeploy_requested or run.state.phase in ENDED or run.state.phase == "Undeploying":
            raise refuse(FailureKind.REFUSED, f"{run.spec.name} is already {run.state.phase.lower()}")

    # --- approvals ---------------------------------------------------------------------

    @workflow.update(name=U.APPROVE)
    async def approve_update(self, approval: Approval) -> ServiceStatus:
        """Approve a deployment in AwaitingApproval: a gov_approver who did not ask for it."""
        await self.approvals.decide_by_update("approve", approval)
        return self.run_state.status()

    @approve_update.validator
    def _validate_approve(self, approval: Approval) -> None:
        self.approvals.require_pending("approve")

    @workflow.update(name=U.REJECT)
    async def reject_update(self, approval: Approval) -> ServiceStatus:
        await self.approvals.decide_by_update("reject", approval)
        return self.run_state.status()

    @reject_update.validator
    def _validate_reject(self, approval: Approval) -> None:
        self.approvals.require_pending("reject")

    @workflow.signal(name=S.APPROVE)
    def approve_signal(self, approval: Approval) -> None:
        """The same decision as a signal, for the Temporal CLI and the Web UI's "Send a signal"
        form (``hms approve NAME --print-signal`` prints the input); checked exactly like the
        update, by the run loop."""
        self.approvals.signalled("approve", approval)

    @workflow.signal(name=S.REJECT)
    def reject_signal(self, approval: Approval) -> None:
        self.approvals.signalled("reject", approval)

    # --- hints and reports from children and the NodeRegistry ----------------------------

    @workflow.signal(name=S.PODS_DRAINING)
    async def pods_draining(self, pod_ids: list[str]) -> None:
        """A rolling update is about to stop these: routers get them as draining at once (once
        the reports of the pods replacing them are checked and in the table). Anyone can send
        it: only ready pods of another revision than the one a rolling child of ours is rolling
        to are taken (those are what a rollout retires), never the pods it rolls to."""
        run = self.run_state
        target = run.rolling_to  # as it arrived: the rollout may end while earlier reports are checked
        asked = set(pod_ids)
        if target is None:
            run.post("access.denied", "ignored a pods_draining signal: no rollout is running")
            return
        foreign = {p.id for p in run.state.pods if p.id in asked and p.revision == target}
        rollout = run.state.rollout.workflow_id if run.state.rollout is not None else ""
        if workflow.patched(DRAIN_CONFIRMED_BY_ROLLOUT):
            # Old pods, but does the rollout itself say it drains them now? (An outsider could drain
            # them all at the rollout's start, before any new pod serves.)
            candidates = {p.id for p in run.state.pods if p.id in asked - foreign}
            foreign |= candidates - await self.updates.rollout_says(rollout, candidates)
        if foreign:
            run.post("access.denied", f"ignored a pods_draining signal for {len(foreign)} pod(s): not pods the "
                                      f"rollout to revision {target} retires now")
        await self.reports.settled()
        run.stopping |= {p.id for p in run.state.pods if p.id in asked - foreign and p.revision != target}

    @workflow.signal(name=S.IMAGE_REVOKED)
    def image_revoked(self, image: str) -> None:
        """A hint that an image lost its trust: the workflow checks for itself, with the trust
        store, before it marks anything (anyone who reaches Temporal can send this)."""
        if image == self.run_state.spec.image:
            self.run_state.state.revoke_check = True

    @workflow.signal(name=S.POD_REPORTED)
    async def pod_reported(self, pod: PodStatus) -> None:
        """Live progress from a child; the child's result is still the authority. A report
        changes the pods (and the routers' table) only as its node's own signed word."""
        run = self.run_state
        if not (run.heals or run.state.phase in ("Deploying", "Scaling", "Updating")):
            run.post("access.denied", f"ignored a pod_reported signal for pod {pod.id[:8]}: "
                                      "no rollout, scaling or heal is running")
            return
        if pod.health == "exited" and not any(p.id == pod.id for p in run.state.pods):
            return
        if not await self.reports.believe(pod) or not (run.heals or run.state.phase in ("Deploying", "Scaling",
                                                                                          "Updating")):
            return
        run.upsert_pod(pod.model_copy(update={"report": ""}))

    @workflow.signal(name=S.NODE_LOST)
    def node_lost(self, lost: NodeLost) -> None:
        """The NodeRegistry lost a node: its pods are failed, and healed elsewhere."""
        self.run_state.state.lost_nodes.append(lost)
        self.run_state.pods_changed = True  # stop watching the lost node's pods

    @workflow.signal(name=S.SLOT_EDGE)
    def slot_edge(self, edge: SlotEdge) -> None:
        """A time slot's edge, from the SlotEdgeWorkflow its Temporal Schedule started: believed
        only once the control worker has checked its standing grant (the run loop asks)."""
        self.slots.signalled(edge)

    @workflow.signal(name=S.CAPACITY)
    async def capacity_changed(self) -> None:
        """A hint from the Scheduler that a placement of this service started or stopped waiting
        for room: ``status().waiting_for`` is re-read from the control worker."""
        await self.capacity.hinted()

    @workflow.signal(name=S.HEAL_ATTEMPT_FAILED)
    async def heal_attempt_failed(self, attempt: HealAttempt) -> None:
        run = self.run_state
        # From a heal this workflow runs, about a replacement that is not a live pod of ours, and
        # as that heal's own word: anything else is not ours to believe (anyone can signal); it
        # would unbook a pod, count a crash and put its own text in a service.degraded event.
        if attempt.failed_pod not in run.heals or any(p.id == attempt.replacement and p.ready
                                                      for p in run.state.pods):
            run.post("access.denied", f"ignored a heal_attempt_failed signal for pod "
                                      f"{attempt.failed_pod[:8]}: no heal of it is running")
            return
        if workflow.patched(HEAL_ATTEMPT_CONFIRMED) and not await self.supervision.heal_says(attempt):
            run.post("access.denied", f"ignored a heal_attempt_failed signal for pod {attempt.failed_pod[:8]}: "
                                      "its heal did not say so")
            return
        state = run.state
        state.crash_count += 1
        state.backoff_s = attempt.next_delay_s
        state.pods = [p for p in state.pods if p.id != attempt.replacement]
        reason = (
            f"replacement {attempt.replacement[:8]} for pod {attempt.failed_pod[:8]} failed "
            f"(attempt {attempt.attempt}): {attempt.reason}; next try in {attempt.next_delay_s:g}s"
        )
        state.message = reason
        if state.crash_count >= DEGRADED_AFTER:
            run.fail(FailureKind.CRASH_LOOP, reason)
        if state.crash_count >= DEGRADED_AFTER and state.phase != "Degraded":
            run.set_phase("Degraded")
            run.decide("degraded", reason, pod=attempt.failed_pod)
            run.post("service.degraded", reason, crash_count=state.crash_count, backoff_s=attempt.next_delay_s)

    # --- spec updates and scaling ------------------------------------------------------

    @workflow.update(name=U.UPDATE_SPEC)
    async def update_spec(self, req: SpecUpdate) -> UpdateOutcome:
        """A changed spec: a new revision rolled out with surge and automatic rollback, or —
        when no pod field changed — applied in place. Answers once it is admitted (or refused);
        a newer update supersedes one that has not finished."""
        return await self.updates.request(req, "deploy")

    @update_spec.validator
    def _validate_update_spec(self, req: SpecUpdate) -> None:
        self._require_updatable()
        name = self.run_state.spec.name
        if req.spec is None:
            raise refuse(FailureKind.SPEC_MALFORMED, "update_spec needs a spec")
        if req.spec.name != name:
            raise refuse(FailureKind.SPEC_MALFORMED, f"spec names {req.spec.name}, not {name}")

    @workflow.update(name=U.ROLLBACK)
    async def rollback(self, req: SpecUpdate) -> UpdateOutcome:
        """Go back to an earlier revision (default: the one before the current), its pinned image."""
        return await self.updates.request(req, "deploy")

    @rollback.validator
    def _validate_rollback(self, req: SpecUpdate) -> None:
        self._require_updatable()
        self.updates.rollback_target(req.to_revision)

    def _require_updatable(self) -> None:
        run = self.run_state
        if run.undeploy_requested or run.state.phase not in (*SUPERVISED, "Updating"):
            raise refuse(FailureKind.REFUSED, f"{run.spec.name} is {run.state.phase}; it can be updated once it runs")

    @workflow.update(name=U.SCALE)
    async def scale(self, req: ScaleRequest) -> ServiceStatus:
        """Set the replica count by hand, like ``kubectl scale`` on an HPA-managed deployment:
        the autoscaler keeps running and its next decision may change the count again, but a
        manual value holds off its scale-down for the stabilisation window."""
        run = self.run_state
        allowed = await self.access.authorize("scale", req.proof, request_id="", bind={"replicas": req.replicas})
        if not allowed.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"scale {run.spec.name} refused: {allowed.reason}")
        await self.supervision.scale(req.replicas, req.reason or f"manual scale to {req.replicas}", manual=True)
        return run.status()

    @scale.validator
    def _validate_scale(self, req: ScaleRequest) -> None:
        run = self.run_state
        spec = run.spec
        low, high = run.bounds()
        if not low <= req.replicas <= high:
            slot = run.slot()
            raise refuse(FailureKind.REFUSED,
                         f"scale {spec.name} to {req.replicas} refused: replicas {req.replicas} is outside "
                         f"[min_replicas {low}, max_replicas {high}]"
                         + (f" of time slot {slot.name}" if slot is not None else ""))
        if run.state.phase not in SUPERVISED or run.undeploy_requested:
            raise refuse(FailureKind.REFUSED,
                         f"scale {spec.name} refused: it is {run.state.phase}; it can be scaled once it runs")

    # --- run ---------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: ServiceInput) -> ServiceStatus:
        feed = asyncio.ensure_future(self.feed.loop())
        try:
            return await self._run(inp)
        finally:
            cancel_quietly(feed)

    async def _run(self, inp: ServiceInput) -> ServiceStatus:
        run = self.run_state
        if inp.state is not None and not own_continuation():
            # Carried-over state skips admission: only this workflow's own continue-as-new may.
            reason = "a ServiceWorkflow started with state of its own (only continue-as-new carries state)"
            run.state = ServiceState(phase="Rejected", failure=Failure(kind=FailureKind.ACCESS_DENIED, message=reason),
                                     message=reason)
            await run.emit("access.denied", reason)
            return run.status()
        own_queue = workflow.info().task_queue
        # Temporal's Replayer serves every history on a queue of its own ("replay-<build id>"):
        # there the recorded run's queue is not known, and the check is the recorded run's to make.
        if inp.placement.control_task_queue != own_queue and not own_queue.startswith(REPLAYER_QUEUE_PREFIX):
            # Whoever starts the workflow writes its placement: the control queue it names is where
            # authorize and the tickets would run. Only the queue this run is served on is ours.
            reason = (f"a ServiceWorkflow whose placement names control queue {inp.placement.control_task_queue[:80]!r}, "
                      f"not the queue it runs on ({own_queue}): refused, nothing started")
            run.placement = run.placement.model_copy(update={"control_task_queue": own_queue})
            run.state = ServiceState(phase="Rejected", failure=Failure(kind=FailureKind.ACCESS_DENIED, message=reason),
                                     message=reason)
            await run.emit("access.denied", reason)
            return run.status()
        if inp.state is None:
            workflow.upsert_search_attributes([SERVICE_KEY.value_set(run.spec.name)])
            run.set_phase("Validating", force=True)
            if not await self.admission.admit(inp.proof):
                await run.settle_records()
                await workflow.wait_condition(workflow.all_handlers_finished)
                return run.status()  # refused before any pod started: nothing to undo
            await self.slots.take_the_clock()
            await self.lifecycle.deploy()
        while True:
            await self._supervise()
            if run.undeploy_requested:
                break
            # Continue-as-new was due. Handlers still running may change the picture (an undeploy
            # accepted, an update that started a rollout): decide again once they are done. The
            # inboxes signals fill meanwhile are in the state handed over.
            await workflow.wait_condition(workflow.all_handlers_finished)
            if not run.undeploy_requested and run.continue_as_new_ready():
                workflow.continue_as_new(inp.model_copy(update={"state": run.state, "spec": run.spec}))
        await self.lifecycle.undeploy()
        await self.slots.release()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return run.status()

    async def _supervise(self) -> None:
        """Act on what the signals left and on what the watch returns, until an undeploy or
        until continue-as-new is due; then let what is in flight settle."""
        run = self.run_state
        watch: asyncio.Task[WatchResult | None] | None = None
        while True:
            await run.flush_outbox()
            await self.supervision.replace_lost()
            if run.undeploy_requested or run.continue_as_new_ready():
                break
            if run.state.revoke_check:
                await self.admission.check_revoked()
            if run.state.slot_edges:
                await self.slots.on_edges()
            if watch is None and run.state.phase in SUPERVISED:
                watch = asyncio.ensure_future(self.supervision.watch())
            await workflow.wait_condition(
                lambda: run.undeploy_requested
                or (watch is not None and watch.done())
                or run.pods_changed
                or bool(run.state.outbox)
                or run.state.revoke_check
                or bool(run.state.slot_edges)
                or bool(run.state.lost_nodes)
                or run.continue_as_new_ready()
            )
            if run.pods_changed and watch is not None and not watch.done():
                cancel_quietly(watch)  # the pod set changed: watch the new one
            run.pods_changed = False
            if watch is not None and watch.done():
                result = await self._watch_result(watch)
                watch = None
                if result is not None:
                    await self.supervision.on_watch(result)
        if watch is not None and not watch.done():
            cancel_quietly(watch)
        for task in list(run.heals.values()) + ([run.scaling] if run.scaling else []):
            if run.undeploy_requested:
                task.cancel()
        # An update in flight stops at its next safe point (the rollout is told to hand back).
        await workflow.wait_condition(lambda: run.updating is None)
        if not run.undeploy_requested:
            await workflow.wait_condition(lambda: not run.heals and run.scaling is None)

    @staticmethod
    async def _watch_result(watch: asyncio.Task[WatchResult | None]) -> WatchResult | None:
        """What a finished watch returned; None when it was cancelled or failed (then after a
        second's pause, so a failing watch does not spin)."""
        try:
            return watch.result()
        except asyncio.CancelledError:
            return None
        except ActivityError as e:
            workflow.logger.warning("watch failed: %s", e)
            await workflow.sleep(timedelta(seconds=1))
            return None
