"""ServiceWorkflow (id ``svc-<name>``): the one writer of a service's desired and actual state.

A long-lived entity. Rollouts, heals and scaling actions are child workflows so each is its
own execution in the Web UI; children report back and this workflow applies the result.
Between actions it waits on one long-running watch activity per node, which returns only
when something needs a decision — a steady service adds a handful of events per hour.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from activities.feed import FeedActivities
    from activities.pods import PodActivities
    from hms_mgmt import constants
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import (
        AdmissionRequest,
        Approval,
        AuthorizeInput,
        AuthorizeOutput,
        Decision,
        DeployInput,
        DeployOutput,
        Endpoint,
        EndpointSet,
        Failure,
        GovernanceInput,
        HealAttempt,
        HealInput,
        ListPodsInput,
        NodeLost,
        PendingApproval,
        Phase,
        PodFailure,
        PodStatus,
        Refusal,
        RevisionRecord,
        RolloutStatus,
        ScaleInput,
        ScaleRequest,
        ServiceInput,
        ServiceSpec,
        ServiceState,
        ServiceStatus,
        SpecUpdate,
        TicketInput,
        UndeployRequest,
        UpdateOutcome,
        VerifyImageInput,
        WatchCpuInput,
        WatchInput,
        WatchResult,
    )
    from hms_mgmt.policy.autoscale import AutoscaleInput, CpuSample, Recommendation, autoscale

from workflows.common import (
    NODE_PICKUP,
    POD_HEARTBEAT,
    POD_RETRY,
    drain,
    emit,
    error_message,
    error_type,
    node_queue,
    proof_jti,
    stop_pod,
)
from workflows.deploy import POD_REPORTED, PODS_DRAINING, SUPERSEDE, DeployWorkflow
from workflows.heal import HEAL_ATTEMPT_FAILED, HealWorkflow
from workflows.scale import ScaleWorkflow

PHASE_KEY = SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_PHASE)
SERVICE_KEY = SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_SERVICE)
MAX_DECISIONS = 20
MAX_REFUSALS = 20
CONTROL_TIMEOUT = timedelta(seconds=30)
DEGRADED_AFTER = 2  # replacements failing in a row before the service is Degraded
SUPERVISED = ("Running", "Scaling", "Healing", "Degraded")
ENDED = ("Rejected", "Failed", "Stopped")
IMAGE_REVOKED = "image_revoked"
MAX_REVISIONS = 20


def refuse(kind: FailureKind, message: str) -> ApplicationError:
    """The error an update fails its caller with: the kind travels as the error's type."""
    return ApplicationError(message, type=kind.value, non_retryable=True)


def _cancel_quietly(task: asyncio.Future[object]) -> None:
    """Cancel a task nobody will await (its cancellation error is expected, not news)."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    task.cancel()


@workflow.defn
class ServiceWorkflow:
    @workflow.init
    def __init__(self, inp: ServiceInput) -> None:
        self.spec: ServiceSpec = inp.spec
        self.placement = inp.placement
        self.state: ServiceState = inp.state or ServiceState(desired_replicas=inp.spec.min_replicas)
        self.undeploy_requested = False
        self.lock = asyncio.Lock()
        self.history_threshold = inp.history_threshold
        self.request_id = inp.request_id
        self.heals: dict[str, asyncio.Task[None]] = {}
        # Pods whose failure is being recorded (the event written) before their heal starts: a
        # rollout or scaling that waits for heals to finish must wait for these too.
        self.failing: set[str] = set()
        self.scaling: asyncio.Task[None] | None = None
        self.pods_changed = False
        self.stopping: set[str] = set()  # pods a scale-down is stopping on purpose
        self.approvals: list[tuple[str, Approval]] = []  # from the signals, checked by the run loop
        self.approval_decision: tuple[str, str, str] | None = None  # (approve|reject, who, reason)
        self.approval_grant = ""  # the deciding gov_approver's grant: the admission ticket checks it
        self.deploy_grant = ""  # the deployer's grant, from the first authorize
        self.outbox: list[tuple[str, str, dict[str, object]]] = []  # events raised by handlers
        self.published: EndpointSet | None = None  # the endpoint feed's last table
        self.service_stopped = False
        self.spec_requests: list[tuple[SpecUpdate, str]] = []  # (request, who) waiting for the updater
        self.updating: asyncio.Task[None] | None = None
        self.update_outcomes: dict[str, UpdateOutcome | Failure] = {}  # request id -> what it became
        self.revision_failures: dict[int, Failure] = {}
        self.revoke_check = False
        self.lost_nodes: list[NodeLost] = []  # from the NodeRegistry, handled by the run loop

    # --- messages --------------------------------------------------------------------

    @workflow.query
    def status(self) -> ServiceStatus:
        s = self.state
        return ServiceStatus(
            name=self.spec.name,
            phase=s.phase,
            revision=s.revision,
            spec=self.spec,
            desired_replicas=s.desired_replicas,
            ready_replicas=sum(1 for p in s.pods if p.ready),
            pods=list(s.pods),
            pending_approval=s.pending_approval,
            last_decisions=s.decisions[-MAX_DECISIONS:],
            workflow_id=workflow.info().workflow_id,
            web_ui_url=self._web_ui_url(),
            message=s.message,
            backoff_s=s.backoff_s,
            crash_count=s.crash_count,
            heal_count=s.heal_counter,
            scale_count=s.scale_counter,
            refusals=s.refusals,
            approved_by=s.approved_by,
            failure=s.failure,
            deploy_request_id=self.request_id,
            image_id=s.image_id,
            rollout=self._rollout_view(),
            revisions=s.revisions,
        )

    def _rollout_view(self) -> RolloutStatus | None:
        r = self.state.rollout
        if r is None:
            return None
        updated = sum(1 for p in self.state.pods if p.revision == r.to_revision and p.ready)
        return r.model_copy(update={"updated": updated, "desired": self.state.desired_replicas})

    @workflow.query
    def endpoints(self) -> EndpointSet:
        """The routable pods as last published to the routers: what a router loads at start."""
        return self.published or self._endpoint_set()

    @workflow.update
    async def admission(self, req: AdmissionRequest) -> ServiceStatus:
        """Answer once admission is decided (access, governance, image trust) or, with
        ``until="running"``, once the service runs; a refusal fails the update with its kind.
        Bounded by ``req.timeout_s``: then it answers with the phase reached so far."""
        try:
            await workflow.wait_condition(lambda: self._reached(req), timeout=timedelta(seconds=req.timeout_s))
        except TimeoutError:
            return self.status()
        if req.until == "revision" and req.revision in self.revision_failures:
            failure = self.revision_failures[req.revision]
            raise refuse(failure.kind, failure.message)
        failure = self.state.failure
        if self.state.phase in ENDED or (req.until != "admitted" and self.state.phase == "Degraded"):
            if failure is not None:
                raise refuse(failure.kind, failure.message)
            raise refuse(FailureKind.UNDEPLOYED, f"{self.spec.name} is {self.state.phase}")
        return self.status()

    def _reached(self, req: AdmissionRequest) -> bool:
        phase = self.state.phase
        if phase in ENDED or phase == "Undeploying":
            return True
        if req.until == "admitted":
            return phase not in ("Validating", "VerifyingImage")
        if req.until == "revision" and req.revision is not None:
            if req.revision in self.revision_failures:
                return True
            return self.state.revision >= req.revision and phase in SUPERVISED and self.updating is None
        return phase in SUPERVISED

    @workflow.update
    async def undeploy(self, req: UndeployRequest) -> ServiceStatus:
        """Only an ops_admin may undeploy (checked here, in the worker); the answer comes once
        the request is accepted, and the run ends when every pod is stopped."""
        allowed = await self._authorize("undeploy", req.proof, request_id=req.request_id)
        if not allowed.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"undeploy {self.spec.name} refused: {allowed.reason}")
        self.undeploy_requested = True
        return self.status()

    @undeploy.validator
    def _validate_undeploy(self, req: UndeployRequest) -> None:
        if self.undeploy_requested or self.state.phase in ENDED or self.state.phase == "Undeploying":
            raise refuse(FailureKind.REFUSED, f"{self.spec.name} is already {self.state.phase.lower()}")

    @workflow.update(name="approve")
    async def approve_update(self, approval: Approval) -> ServiceStatus:
        """Approve a deployment in AwaitingApproval: a gov_approver who did not ask for it."""
        return await self._decide_by_update("approve", approval)

    @approve_update.validator
    def _validate_approve(self, approval: Approval) -> None:
        self._require_pending("approve")

    @workflow.update(name="reject")
    async def reject_update(self, approval: Approval) -> ServiceStatus:
        return await self._decide_by_update("reject", approval)

    @reject_update.validator
    def _validate_reject(self, approval: Approval) -> None:
        self._require_pending("reject")

    @workflow.signal(name="approve")
    def approve_signal(self, approval: Approval) -> None:
        """The same decision as a signal, for the Temporal CLI and the Web UI's "Send a signal"
        form (``hms approve NAME --print-signal`` prints the input); checked exactly like the
        update, by the run loop."""
        self._signalled("approve", approval)

    @workflow.signal(name="reject")
    def reject_signal(self, approval: Approval) -> None:
        self._signalled("reject", approval)

    def _signalled(self, kind: str, approval: Approval) -> None:
        jti = proof_jti(approval.proof)
        if jti and jti in self.state.used_proofs:
            self.outbox.append(("access.denied", f"ignored a {kind} signal: its proof was already used "
                                                 f"(jti {jti[:12]})", {"action": kind}))
            return
        if self.state.pending_approval is None or self.approval_decision is not None:
            self.outbox.append(("access.denied", f"ignored a {kind} signal: {self.spec.name} is "
                                                 f"{self.state.phase}, not awaiting approval", {"action": kind}))
            return
        self.approvals.append((kind, approval))

    def _require_pending(self, kind: str) -> None:
        if self.state.pending_approval is None or self.approval_decision is not None:
            raise refuse(FailureKind.REFUSED, f"cannot {kind} {self.spec.name}: it is {self.state.phase}, "
                                              "not awaiting approval")

    async def _decide_by_update(self, kind: str, approval: Approval) -> ServiceStatus:
        verdict, counted = await self._judge(kind, approval)
        if not verdict.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"{kind} {self.spec.name} refused: {verdict.reason}")
        if not counted:
            raise refuse(FailureKind.REFUSED, f"cannot {kind} {self.spec.name}: it was decided meanwhile")
        await workflow.wait_condition(lambda: self.state.pending_approval is None
                                      and self.state.phase != "AwaitingApproval")
        return self.status()

    async def _judge(self, kind: str, approval: Approval) -> tuple[AuthorizeOutput, bool]:
        """Check one approve/reject (from a signal or an update); the first valid one decides."""
        pending = self.state.pending_approval
        bind = ({"revision": pending.revision, "spec": pending.spec_hash, "request": pending.id}
                if pending is not None else {"request": "none pending"})
        result = await self._authorize(kind, approval.proof, request_id=approval.request_id,
                                       requester=self.state.requested_by if kind == "approve" else None, bind=bind)
        pending = self.state.pending_approval
        if not result.allowed:
            if pending is not None:
                pending.invalid_attempts.append(f"{kind}: {result.reason}")
            return result, False
        if self.approval_decision is not None or self.state.pending_approval is None:
            return result, False
        self.approval_decision = (kind, result.user or "", approval.reason)
        self.approval_grant = result.grant  # the admission ticket checks it again
        return result, True

    @workflow.signal(name=PODS_DRAINING)
    def pods_draining(self, pod_ids: list[str]) -> None:
        """A rolling update is about to stop these: routers get them as draining at once."""
        if self.state.phase == "Updating":
            self.stopping |= set(pod_ids) & {p.id for p in self.state.pods}

    @workflow.signal(name=IMAGE_REVOKED)
    def image_revoked(self, image: str) -> None:
        """A hint that an image lost its trust: the workflow checks for itself, with the trust
        store, before it marks anything (anyone who reaches Temporal can send this)."""
        if image == self.spec.image:
            self.revoke_check = True

    @workflow.update
    async def update_spec(self, req: SpecUpdate) -> UpdateOutcome:
        """A changed spec: a new revision rolled out with surge and automatic rollback, or —
        when no pod field changed — applied in place. Answers once it is admitted (or refused);
        a newer update supersedes one that has not finished."""
        return await self._request_update(req, "deploy")

    @update_spec.validator
    def _validate_update_spec(self, req: SpecUpdate) -> None:
        self._require_updatable()
        if req.spec is None:
            raise refuse(FailureKind.SPEC_INVALID, "update_spec needs a spec")
        if req.spec.name != self.spec.name:
            raise refuse(FailureKind.SPEC_INVALID, f"spec names {req.spec.name}, not {self.spec.name}")

    @workflow.update
    async def rollback(self, req: SpecUpdate) -> UpdateOutcome:
        """Go back to an earlier revision (default: the one before the current), its pinned image."""
        return await self._request_update(req, "deploy")

    @rollback.validator
    def _validate_rollback(self, req: SpecUpdate) -> None:
        self._require_updatable()
        self._rollback_target(req.to_revision)

    def _require_updatable(self) -> None:
        if self.undeploy_requested or self.state.phase not in (*SUPERVISED, "Updating"):
            raise refuse(FailureKind.REFUSED, f"{self.spec.name} is {self.state.phase}; it can be updated once it runs")

    def _rollback_target(self, to_revision: int | None) -> RevisionRecord:
        current = self.state.revision
        earlier = [r for r in self.state.revisions if r.revision != current]
        if to_revision is not None:
            found = next((r for r in self.state.revisions if r.revision == to_revision), None)
            if found is None:
                known = ", ".join(str(r.revision) for r in self.state.revisions)
                raise refuse(FailureKind.REFUSED, f"{self.spec.name} has no revision {to_revision} (known: {known})")
            if found.revision == current:
                raise refuse(FailureKind.REFUSED, f"{self.spec.name} already runs revision {current}")
            return found
        before = [r for r in earlier if r.revision < current and r.outcome in ("replaced", "active")]
        if not before:
            raise refuse(FailureKind.REFUSED, f"{self.spec.name} has no earlier revision to roll back to")
        return before[-1]

    async def _request_update(self, req: SpecUpdate, action: str) -> UpdateOutcome:
        claim, bind = (("update", {"spec": req.spec.digest()}) if req.spec is not None
                       else ("rollback", {"to_revision": req.to_revision}))
        allowed = await self._authorize(action, req.proof, request_id=req.request_id, claim=claim, bind=bind)
        if not allowed.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"update {self.spec.name} refused: {allowed.reason}")
        key = req.request_id or str(workflow.uuid4())
        req = req.model_copy(update={"request_id": key, "grant": allowed.grant})
        self.spec_requests.append((req, allowed.user or ""))
        if self.updating is None:
            self.updating = asyncio.ensure_future(self._updater())
        await workflow.wait_condition(lambda: key in self.update_outcomes)
        outcome = self.update_outcomes.pop(key)
        if isinstance(outcome, Failure):
            raise refuse(outcome.kind, outcome.message)
        return outcome.model_copy(update={"status": self.status()})

    @workflow.signal(name=POD_REPORTED)
    def pod_reported(self, pod: PodStatus) -> None:
        """Live progress from a child; the child's result is still the authority."""
        if not (self.heals or self.state.phase in ("Deploying", "Scaling", "Updating")):
            self.outbox.append(("access.denied", f"ignored a pod_reported signal for pod {pod.id[:8]}: "
                                                  "no rollout, scaling or heal is running", {}))
            return
        if pod.health == "exited" and not any(p.id == pod.id for p in self.state.pods):
            return
        self._upsert_pod(pod)

    @workflow.signal(name=constants.NODE_LOST_SIGNAL)
    def node_lost(self, lost: NodeLost) -> None:
        """The NodeRegistry lost a node: its pods are failed, and healed elsewhere."""
        self.lost_nodes.append(lost)
        self.pods_changed = True  # stop watching the lost node's pods

    @workflow.signal(name=HEAL_ATTEMPT_FAILED)
    def heal_attempt_failed(self, attempt: HealAttempt) -> None:
        # From a heal this workflow runs, about a replacement that is not a live pod of ours:
        # anything else is not ours to believe (anyone can signal), and could unbook a live pod.
        if attempt.failed_pod not in self.heals or any(p.id == attempt.replacement and p.ready
                                                       for p in self.state.pods):
            self.outbox.append(("access.denied", f"ignored a heal_attempt_failed signal for pod "
                                                  f"{attempt.failed_pod[:8]}: no heal of it is running", {}))
            return
        self.state.crash_count += 1
        self.state.backoff_s = attempt.next_delay_s
        self.state.pods = [p for p in self.state.pods if p.id != attempt.replacement]
        reason = (
            f"replacement {attempt.replacement[:8]} for pod {attempt.failed_pod[:8]} failed "
            f"(attempt {attempt.attempt}): {attempt.reason}; next try in {attempt.next_delay_s:g}s"
        )
        self.state.message = reason
        if self.state.crash_count >= DEGRADED_AFTER:
            self._fail(FailureKind.CRASH_LOOP, reason)
        if self.state.crash_count >= DEGRADED_AFTER and self.state.phase != "Degraded":
            self._set_phase("Degraded")
            self._decide("degraded", reason, pod=attempt.failed_pod)
            self.outbox.append(("service.degraded", reason, {"crash_count": self.state.crash_count,
                                                            "backoff_s": attempt.next_delay_s}))

    @workflow.update
    async def scale(self, req: ScaleRequest) -> ServiceStatus:
        """Set the replica count by hand, like ``kubectl scale`` on an HPA-managed deployment:
        the autoscaler keeps running and its next decision may change the count again, but a
        manual value holds off its scale-down for the stabilisation window."""
        allowed = await self._authorize("scale", req.proof, request_id="", bind={"replicas": req.replicas})
        if not allowed.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"scale {self.spec.name} refused: {allowed.reason}")
        # One scaling action at a time, and always the one recorded in self.scaling, so
        # continue-as-new never hands over a half-applied scale.
        await workflow.wait_condition(lambda: self.scaling is None)
        self.state.history = self.state.history + [Recommendation(at=workflow.now(), replicas=req.replicas)]
        self.scaling = asyncio.ensure_future(
            self._scale_to(req.replicas, req.reason or f"manual scale to {req.replicas}", samples=[])
        )
        await self.scaling
        return self.status()

    @scale.validator
    def _validate_scale(self, req: ScaleRequest) -> None:
        spec = self.spec
        if not spec.min_replicas <= req.replicas <= spec.max_replicas:
            raise refuse(FailureKind.REFUSED,
                         f"scale {spec.name} to {req.replicas} refused: replicas {req.replicas} is outside "
                         f"[min_replicas {spec.min_replicas}, max_replicas {spec.max_replicas}]")
        if self.state.phase not in SUPERVISED or self.undeploy_requested:
            raise refuse(FailureKind.REFUSED,
                         f"scale {spec.name} refused: it is {self.state.phase}; it can be scaled once it runs")

    # --- run ---------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: ServiceInput) -> ServiceStatus:
        feed = asyncio.ensure_future(self._feed_loop())
        try:
            return await self._run(inp)
        finally:
            _cancel_quietly(feed)

    async def _run(self, inp: ServiceInput) -> ServiceStatus:
        if inp.state is not None and workflow.info().continued_run_id is None:
            # Carried-over state skips admission: only this workflow's own continue-as-new may.
            reason = "a ServiceWorkflow started with state of its own (only continue-as-new carries state)"
            self.state = ServiceState(phase="Rejected", failure=Failure(kind=FailureKind.ACCESS_DENIED, message=reason),
                                      message=reason)
            await emit(self.placement, "access.denied", self.spec.name, reason)
            return self.status()
        if inp.state is None:
            workflow.upsert_search_attributes([SERVICE_KEY.value_set(self.spec.name)])
            self._set_phase("Validating", force=True)
            if not await self._admit(inp.proof):
                await workflow.wait_condition(workflow.all_handlers_finished)
                return self.status()  # refused before any pod started: nothing to undo
            await self._deploy()
        while True:
            await self._supervise()
            if self.undeploy_requested:
                break
            # Continue-as-new was due. Handlers still running may change the picture (an undeploy
            # accepted, an update that started a rollout): decide again once they are done.
            await workflow.wait_condition(workflow.all_handlers_finished)
            if not self.undeploy_requested and self._continue_as_new_ready():
                workflow.continue_as_new(inp.model_copy(update={"state": self.state, "spec": self.spec}))
        await self._undeploy()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    async def _supervise(self) -> None:
        watch: asyncio.Task[WatchResult | None] | None = None
        while True:
            await self._flush_outbox()
            await self._replace_lost()
            if self.undeploy_requested or self._continue_as_new_ready():
                break
            if self.revoke_check:
                await self._check_revoked()
            if watch is None and self.state.phase in SUPERVISED:
                watch = asyncio.ensure_future(self._watch())
            await workflow.wait_condition(
                lambda: self.undeploy_requested
                or (watch is not None and watch.done())
                or self.pods_changed
                or bool(self.outbox)
                or self.revoke_check
                or bool(self.lost_nodes)
                or self._continue_as_new_ready()
            )
            if self.pods_changed and watch is not None and not watch.done():
                _cancel_quietly(watch)  # the pod set changed: watch the new one
            self.pods_changed = False
            if watch is not None and watch.done():
                try:
                    result = watch.result()
                except asyncio.CancelledError:
                    result = None
                except ActivityError as e:
                    workflow.logger.warning("watch failed: %s", e)
                    await workflow.sleep(timedelta(seconds=1))
                    result = None
                watch = None
                if result is not None:
                    await self._on_watch(result)
        if watch is not None and not watch.done():
            _cancel_quietly(watch)
        for task in list(self.heals.values()) + ([self.scaling] if self.scaling else []):
            if self.undeploy_requested:
                task.cancel()
        # An update in flight stops at its next safe point (the rollout is told to hand back).
        await workflow.wait_condition(lambda: self.updating is None)
        if not self.undeploy_requested:
            await workflow.wait_condition(lambda: not self.heals and self.scaling is None)

    async def _replace_lost(self) -> None:
        """Pods on a lost node are failed ("exited"): the usual heal path replaces them."""
        while self.lost_nodes and not self.undeploy_requested:
            lost = self.lost_nodes.pop(0)
            if workflow.patched("node-lost-confirmed"):
                confirmed = await workflow.execute_activity_method(
                    ControlActivities.node_is_lost,
                    lost,
                    task_queue=self.placement.control_task_queue,
                    start_to_close_timeout=CONTROL_TIMEOUT,
                    summary=f"is node {lost.node} lost?",
                )
                if not confirmed:
                    self.outbox.append(("access.denied", f"ignored a node_lost signal for node {lost.node[:64]}: "
                                                          "the node registry does not hold it as Lost", {}))
                    continue
            for pod in [p for p in self.state.pods if p.node == lost.node]:
                await self._pod_failed(PodFailure(pod_id=pod.id, kind="exited", node_lost=True,
                                                  detail=lost.reason or f"node {lost.node} lost"))

    async def _watch(self) -> WatchResult | None:
        """One watch activity per node that runs ready pods, plus one ``watch_cpu`` on the
        control queue that autoscales on all nodes' samples at once; the first to return wins."""
        healthy = [p for p in self.state.pods if p.ready and p.id not in self.heals and p.id not in self.stopping]
        by_node: dict[str, list[PodStatus]] = {}
        for pod in healthy:
            by_node.setdefault(pod.node, []).append(pod)
        if not by_node:
            await workflow.wait_condition(lambda: False)  # until cancelled: nothing to watch
        max_s = self.placement.watch_max_s
        if self.state.phase == "Degraded" or self.state.crash_count:
            # Recovery is "pods stay ready": a quiet round of this length proves it.
            max_s = min(max_s, max(10.0, 3 * self.spec.health_interval_s))
        known = [p.id for p in self.state.pods]
        autoscaling = self.spec.min_replicas < self.spec.max_replicas and self.scaling is None
        tasks = [
            asyncio.ensure_future(
                workflow.execute_activity_method(
                    PodActivities.watch_pods,
                    WatchInput(
                        service=self.spec.name, spec=self.spec, pods=pods, known=known,
                        current=self._effective(), max_duration_s=max_s, autoscale=False,
                        history=self.state.history, at_max_reported=self.state.at_max_reported,
                    ),
                    task_queue=self._node_queue(node),
                    start_to_close_timeout=timedelta(seconds=max_s + 120),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                             maximum_interval=timedelta(seconds=10)),
                    summary=f"watch {len(pods)} pod(s) on {node}",
                )
            )
            for node, pods in sorted(by_node.items())
        ]
        if autoscaling:
            tasks.append(asyncio.ensure_future(
                workflow.execute_activity_method(
                    ControlActivities.watch_cpu,
                    WatchCpuInput(workflow_id=workflow.info().workflow_id, spec=self.spec, current=self._effective(),
                                  pods=[p.id for p in healthy], history=self.state.history,
                                  at_max_reported=self.state.at_max_reported, max_duration_s=max_s),
                    task_queue=self.placement.control_task_queue,
                    start_to_close_timeout=timedelta(seconds=max_s + 120),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                             maximum_interval=timedelta(seconds=10)),
                    summary=f"autoscale {len(healthy)} pod(s) on {len(by_node)} node(s)",
                )
            ))
        try:
            done, pending = await workflow.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for t in tasks:
                _cancel_quietly(t)
            raise
        for t in pending:
            _cancel_quietly(t)
        return next(iter(done)).result()

    async def _on_watch(self, result: WatchResult) -> None:
        self._apply_progress(result)
        if result.reason == "failed":
            for failure in result.failed:
                await self._pod_failed(failure)
        elif result.reason == "scale" and result.decision is not None:
            self.state.history = result.history
            await self._autoscale(result.samples)
        elif result.reason == "at_max" and result.decision is not None:
            self.state.at_max_reported = True
            self.state.history = result.history
            await emit(self.placement, "service.at_max", self.spec.name, result.decision.reason,
                       max_replicas=self.spec.max_replicas, mean_cpu=result.decision.mean_cpu)
        elif result.reason == "unknown_pods":
            for pod_id in result.unknown_pods:
                orphan = PodStatus(id=pod_id, node=self._node_of_watch(result), health="exited")
                await stop_pod(self.spec, orphan, self._node_queue(orphan.node), grace_s=0)
                await emit(self.placement, "pod.stopped", self.spec.name,
                           f"removed pod {pod_id}: it carries our labels but no record (orphan)", pod=pod_id)
        elif result.reason == "timeout":
            self.state.history = result.history or self.state.history
            if self.state.crash_count and not self.heals and self._all_ready():
                recovered = self.state.phase == "Degraded"
                self.state.crash_count = 0
                self.state.backoff_s = 0.0
                self.state.message = None
                self.state.failure = None
                if recovered:
                    self._set_phase("Running")
                    reason = f"all {self.state.desired_replicas} pods ready and staying ready"
                    self._decide("recovered", reason)
                    await emit(self.placement, "service.recovered", self.spec.name, reason)

    def _node_of_watch(self, result: WatchResult) -> str:
        ids = {p.pod_id for p in result.progress}
        return next((p.node for p in self.state.pods if p.id in ids), self.placement.nodes[0].name)

    def _apply_progress(self, result: WatchResult) -> None:
        self.state.last_samples = result.samples
        for prog in result.progress:
            for i, pod in enumerate(self.state.pods):
                if pod.id == prog.pod_id:
                    self.state.pods[i] = pod.model_copy(
                        update={"consecutive_failures": prog.consecutive_failures,
                                "cpu_percent": prog.cpu_percent if prog.cpu_percent is not None else pod.cpu_percent}
                    )

    # --- healing -----------------------------------------------------------------------

    async def _pod_failed(self, failure: PodFailure) -> None:
        pod = next((p for p in self.state.pods if p.id == failure.pod_id), None)
        if pod is None or pod.id in self.heals or pod.id in self.stopping:
            return
        now = workflow.now()
        stable_s = max(10.0, 3 * self.spec.health_interval_s)
        if pod.started_at is not None and (now - pod.started_at).total_seconds() < stable_s:
            self.state.crash_count += 1  # it died young: part of a crash loop
        self._upsert_pod(pod.model_copy(update={"ready": False, "health": failure.kind,
                                                "consecutive_failures": failure.consecutive_failures}))
        event = "pod.exited" if failure.kind == "exited" else "pod.unhealthy"
        self.failing.add(pod.id)
        try:
            await emit(self.placement, event, self.spec.name, f"pod {pod.id}: {failure.detail}",
                       pod=pod.id, node=pod.node, exit_code=failure.exit_code)
            self._start_heal(pod, failure)
        finally:
            self.failing.discard(pod.id)

    def _start_heal(self, pod: PodStatus, failure: PodFailure) -> None:
        if self.state.phase == "Running":
            self._set_phase("Healing")
        self.state.heal_counter += 1
        self.heals[pod.id] = asyncio.ensure_future(self._heal(pod, failure))

    async def _heal(self, pod: PodStatus, failure: PodFailure) -> None:
        try:
            result = await workflow.execute_child_workflow(
                HealWorkflow.run,
                HealInput(spec=self.spec, revision=self.state.revision, failed=pod, failure=failure,
                          placement=self.placement, existing=[p for p in self.state.pods if p.id != pod.id],
                          crash_count=self.state.crash_count, image_id=self.state.image_id,
                          ticket=self.state.ticket),
                id=f"{workflow.info().workflow_id}-heal-{pod.id}",
                task_queue=self.placement.control_task_queue,
                static_summary=f"replace {failure.kind} pod {pod.id[:8]}: {failure.detail}"[:200],
            )
        except (ChildWorkflowError, asyncio.CancelledError):
            self.heals.pop(pod.id, None)
            if self.undeploy_requested:
                return
            raise
        self.heals.pop(pod.id, None)
        self.state.pods = [p for p in self.state.pods if p.id != pod.id]
        self._upsert_pod(result.replacement)
        reason = f"pod {pod.id} {failure.kind} ({failure.detail}); replaced by {result.replacement.id}"
        self._decide("heal", reason, pod=pod.id)
        self.pods_changed = True
        if self.state.phase == "Healing" and not self.heals:
            self._set_phase("Running")
        await emit(self.placement, "pod.replaced", self.spec.name, reason, old_pod=pod.id,
                   new_pod=result.replacement.id, attempts=result.attempts, endpoint=result.replacement.endpoint)

    # --- scaling -----------------------------------------------------------------------

    async def _autoscale(self, samples: list[CpuSample]) -> None:
        """Re-check the watch's recommendation with the same pure policy before acting."""
        decision = autoscale(
            AutoscaleInput(
                current=self._effective(), samples=samples, min_replicas=self.spec.min_replicas,
                max_replicas=self.spec.max_replicas, cpu_target=self.spec.cpu_target,
                scale_down_window_s=self.spec.scale_down_window_s, history=self.state.history,
                now=workflow.now(),
            )
        )
        self.state.history = decision.history
        if decision.desired == self._effective() or self.scaling is not None or self.heals:
            return
        if decision.at_max and not self.state.at_max_reported:
            self.state.at_max_reported = True
            await emit(self.placement, "service.at_max", self.spec.name, decision.reason,
                       max_replicas=self.spec.max_replicas, mean_cpu=decision.mean_cpu)
        elif not decision.at_max:
            self.state.at_max_reported = False
        self.scaling = asyncio.ensure_future(self._scale_to(decision.desired, decision.reason, samples=samples))

    async def _scale_to(self, replicas: int, reason: str, *, samples: list[CpuSample]) -> None:
        try:
            async with self.lock:
                await workflow.wait_condition(lambda: not self.heals and not self.failing)
                current = [p for p in self.state.pods if p.id not in self.heals]
                if replicas == len(current):
                    self.state.desired_replicas = replicas
                    return
                self.state.scale_counter += 1
                before = len(current)
                self.state.desired_replicas = replicas
                previous_phase = self.state.phase
                self._set_phase("Scaling")
                new_ids = [str(workflow.uuid4()) for _ in range(max(0, replicas - before))]
                # Scale down newest or least healthy first.
                victims = sorted(
                    current,
                    key=lambda p: (p.ready, p.health == "healthy", -p.consecutive_failures,
                                   -(p.started_at.timestamp() if p.started_at else 0)),
                )[: max(0, before - replicas)]
                if victims:  # the monitor must not mistake a pod we stop for a crash
                    self.stopping |= {v.id for v in victims}
                    self.pods_changed = True
                    await self._drain()
                result = await workflow.execute_child_workflow(
                    ScaleWorkflow.run,
                    ScaleInput(spec=self.spec, revision=self.state.revision, from_replicas=before,
                               to_replicas=replicas, reason=reason, samples=samples, placement=self.placement,
                               existing=current, new_pod_ids=new_ids, victims=victims,
                               image_id=self.state.image_id, ticket=self.state.ticket),
                    id=f"{workflow.info().workflow_id}-scale-{self.state.scale_counter}",
                    task_queue=self.placement.control_task_queue,
                    static_summary=f"{before} -> {replicas} pods: {reason}"[:200],
                )
                stopped = set(result.stopped) | {f.pod_id for f in result.failed}
                self.state.pods = [p for p in self.state.pods if p.id not in stopped]
                self.stopping -= stopped
                for pod in result.started:
                    self._upsert_pod(pod)
                self._decide("scale", reason, from_replicas=before, to_replicas=replicas)
                self._set_phase("Running" if previous_phase in ("Scaling", "Healing") else previous_phase)
                await emit(self.placement, "service.scaled", self.spec.name, reason,
                           from_replicas=before, to_replicas=replicas,
                           samples=[s.model_dump() for s in samples])
        finally:
            self.scaling = None
            self.pods_changed = True  # restart the watch on the new pod set, autoscaling again

    def _effective(self) -> int:
        """Pods that count toward the replica total (a pod being replaced counts once)."""
        return sum(1 for p in self.state.pods if p.id not in self.heals)

    # --- admission: access, governance, image trust ------------------------------------------

    async def _authorize(self, action: str, proof: str, *, request_id: str, requester: str | None = None,
                         claim: str = "", bind: dict[str, object] | None = None) -> AuthorizeOutput:
        """Verify a request proof in the control worker; each proof is used once (its jti is
        remembered, across continue-as-new, until it expires)."""
        jti = proof_jti(proof)
        if jti and jti in self.state.used_proofs:
            reason = f"its proof was already used (jti {jti[:12]}): a proof is good for one request"
            await emit(self.placement, "access.denied", self.spec.name, f"{action} refused: {reason}",
                       action=action, request_id=request_id)
            result = AuthorizeOutput(allowed=False, reason=reason)
        else:
            if jti:
                self._remember_proof(jti)
            result = await self._verify_proof(action, proof, request_id=request_id, requester=requester,
                                              claim=claim, bind=bind or {})
        if not result.allowed:
            refusal = Refusal(at=workflow.now(), action=action, reason=result.reason, request_id=request_id)
            self.state.refusals = (self.state.refusals + [refusal])[-MAX_REFUSALS:]
        return result

    def _remember_proof(self, jti: str) -> None:
        now = workflow.now().timestamp()
        kept = {k: exp for k, exp in self.state.used_proofs.items() if exp > now}
        # A proof lives at most an hour (plus clock skew): remembered that long, it cannot come back.
        kept[jti] = now + 3600 + 120
        self.state.used_proofs = kept

    async def _verify_proof(self, action: str, proof: str, *, request_id: str, requester: str | None,
                            claim: str, bind: dict[str, object]) -> AuthorizeOutput:
        return await workflow.execute_activity_method(
            ControlActivities.authorize,
            AuthorizeInput(proof=proof, action=action, service=self.spec.name, requester=requester,
                           request_id=request_id, claim=claim, bind=bind),
            task_queue=self.placement.control_task_queue,
            start_to_close_timeout=CONTROL_TIMEOUT,
            summary=f"authorize {action}",
        )

    async def _admit(self, proof: str) -> bool:
        """Validating -> (AwaitingApproval) -> VerifyingImage. False: refused, no pod started."""
        allowed = await self._authorize("deploy", proof, request_id="deploy", bind={"spec": self.spec.digest()})
        self.deploy_grant = allowed.grant
        if not allowed.allowed:
            self._fail(FailureKind.ACCESS_DENIED, f"deploy {self.spec.name} refused: {allowed.reason}")
            self._set_phase("Rejected")
            return False
        self.state.requested_by = allowed.user or ""
        verdict = await workflow.execute_activity_method(
            ControlActivities.check_governance,
            GovernanceInput(spec=self.spec),
            task_queue=self.placement.control_task_queue,
            start_to_close_timeout=CONTROL_TIMEOUT,
            summary="governance policy",
        )
        if verdict.needs_approval and not await self._await_approval("; ".join(verdict.reasons),
                                                                     verdict.approval_timeout_s,
                                                                     revision=self.state.revision, spec=self.spec):
            self._set_phase("Rejected")
            return False
        if self.undeploy_requested:
            return False
        if not await self._verify_image():
            return False
        ticket, problem = await self._ticket(self.spec, self.state.revision, self.state.image_id,
                                             grant=self.deploy_grant, approval_grant=self.approval_grant)
        if ticket is None:
            self._fail(FailureKind.ACCESS_DENIED, problem)
            self._set_phase("Rejected")
            return False
        self._use_ticket(self.state.revision, ticket)
        return True

    async def _ticket(self, spec: ServiceSpec, revision: int, image_id: str, *, grant: str, approval_grant: str = "",
                      prior: RevisionRecord | None = None) -> tuple[str | None, str]:
        """The control plane's admission ticket for this revision, or (None, why not)."""
        try:
            out = await workflow.execute_activity_method(
                ControlActivities.issue_ticket,
                TicketInput(service=spec.name, revision=revision, spec=spec, image_id=image_id, grant=grant,
                            approval_grant=approval_grant, prior_ticket=prior.ticket if prior else "",
                            prior_revision=prior.revision if prior else None),
                task_queue=self.placement.control_task_queue,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10), non_retryable_error_types=["AccessDenied"]),
                summary=f"admission ticket for revision {revision}",
            )
        except ActivityError as e:
            return None, error_message(e)
        return out.ticket, ""

    def _use_ticket(self, revision: int, ticket: str) -> None:
        self.state.ticket = ticket
        self.state.revisions = [r.model_copy(update={"ticket": ticket}) if r.revision == revision else r
                                for r in self.state.revisions]

    async def _await_approval(self, reason: str, timeout_s: float, *, revision: int, spec: ServiceSpec,
                              running: bool = False) -> bool:
        """Wait for a gov_approver. A running service (an update that needs approval) keeps its
        phase and its pods meanwhile; only a first deploy sits in AwaitingApproval. An approval
        must name this request: the service, ``revision``, the spec's hash and the request id."""
        self.approval_decision = None
        now = workflow.now()
        self.state.pending_approval = PendingApproval(
            requested_by=self.state.requested_by, requested_at=now, reason=reason, revision=revision,
            spec_hash=spec.digest(), id=f"{revision}-{int(now.timestamp() * 1000)}",
        )
        if not running:
            self._set_phase("AwaitingApproval")
        await emit(self.placement, "approval.requested", self.spec.name, reason,
                   requested_by=self.state.requested_by, timeout_s=timeout_s)
        deadline = workflow.now() + timedelta(seconds=timeout_s)
        while self.approval_decision is None and not self.undeploy_requested:
            remaining = (deadline - workflow.now()).total_seconds()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await workflow.wait_condition(
                    lambda: bool(self.approvals) or self.approval_decision is not None or self.undeploy_requested,
                    timeout=timedelta(seconds=remaining),
                )
            except TimeoutError:
                self.state.pending_approval = None
                self._fail(FailureKind.APPROVAL_TIMED_OUT, f"approval timed out after {timeout_s:g}s: {reason}")
                await emit(self.placement, "approval.rejected", self.spec.name, self.state.message or "")
                return False
            while self.approvals and self.approval_decision is None:
                kind, approval = self.approvals.pop(0)
                await self._judge(kind, approval)  # an invalid one changes nothing: keep waiting
        self.approvals.clear()
        self.state.pending_approval = None
        if self.approval_decision is None:  # undeployed while waiting
            self._fail(FailureKind.UNDEPLOYED, "withdrawn by undeploy while awaiting approval")
            return False
        kind, user, why = self.approval_decision
        why = f" ({why})" if why else ""
        if kind == "approve":
            self.state.approved_by = user
            await emit(self.placement, "approval.granted", self.spec.name, f"approved by {user}{why}", approver=user)
            return True
        self._fail(FailureKind.APPROVAL_REJECTED, f"rejected by {user}{why}")
        await emit(self.placement, "approval.rejected", self.spec.name, self.state.message or "", approver=user)
        return False

    async def _verify_image(self) -> bool:
        """No pod of an image starts until it is marked signed and safe on every node; the
        content it resolves to now is pinned for every pod of this revision."""
        self._set_phase("VerifyingImage")
        content_id, problem, kind = await self._resolve_image(self.spec)
        if content_id is None:
            self._fail(kind, problem)
            self._set_phase("Failed")
            await emit(self.placement, "image.untrusted" if kind == FailureKind.IMAGE_UNTRUSTED else "spec.refused",
                       self.spec.name, problem, image=self.spec.image)
            return False
        self.state.image_id = content_id
        self.state.revisions = [RevisionRecord(revision=self.state.revision, spec=self.spec, image_id=content_id,
                                               deployed_by=self.state.requested_by, deployed_at=workflow.now())]
        return True

    async def _resolve_image(self, spec: ServiceSpec) -> tuple[str | None, str, FailureKind]:
        """(content id, detail, _) once every node vouches for the image and would run the spec,
        or (None, why not, the failure's kind): a spec a node's runtime refuses is refused here,
        naming the field, rather than crash-looping pod after pod."""
        queues = sorted({n.task_queue for n in self.placement.nodes})
        try:
            results = await asyncio.gather(*(
                workflow.execute_activity_method(
                    PodActivities.verify_image,
                    VerifyImageInput(service=spec.name, image=spec.image, spec=spec),
                    task_queue=q,
                    schedule_to_close_timeout=timedelta(seconds=spec.image_verify_timeout_s),
                    start_to_close_timeout=CONTROL_TIMEOUT,
                    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                             maximum_interval=timedelta(seconds=10)),
                    summary=f"verify {spec.image}",
                )
                for q in queues
            ))
        except ActivityError as e:
            if error_type(e) == "InvalidSpec":
                return None, error_message(e), FailureKind.INVALID_SPEC
            return None, f"{error_message(e)} (gave up after {spec.image_verify_timeout_s:g}s)", \
                FailureKind.IMAGE_UNTRUSTED
        ids = {r.content_id for r in results}
        if len(ids) != 1:
            return (None, f"image {spec.image} resolves to different content on different nodes: {sorted(ids)}",
                    FailureKind.IMAGE_UNTRUSTED)
        await emit(self.placement, "image.verified", spec.name, results[0].detail, image=spec.image,
                   content_id=results[0].content_id)
        return results[0].content_id, results[0].detail, FailureKind.IMAGE_UNTRUSTED

    async def _check_revoked(self) -> None:
        """After an ``image_revoked`` hint: is the pinned content still trusted? If not, the
        service is Degraded with the reason; running pods stay (no new pod of it may start)."""
        self.revoke_check = False
        node = self.placement.nodes[0].task_queue if self.placement.nodes else self._node_queue("local")
        try:
            await workflow.execute_activity_method(
                PodActivities.verify_image,
                VerifyImageInput(service=self.spec.name, image=self.spec.image, content_id=self.state.image_id,
                                 one_try=True),
                task_queue=node,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=["ImageUntrusted"]),
                summary=f"still trusted? {self.spec.image}",
            )
        except ActivityError as e:
            reason = f"image {self.spec.image} lost its trust ({error_message(e)}): running pods stay, no new pod starts"
            self._fail(FailureKind.IMAGE_UNTRUSTED, reason)
            self._set_phase("Degraded")
            self._decide("revoked", reason)
            await emit(self.placement, "image.revoked", self.spec.name, reason, image=self.spec.image)

    # --- updates: in place, or a new revision rolled out ---------------------------------------

    async def _updater(self) -> None:
        """Apply spec updates one at a time, newest first: an older one still waiting is
        superseded. Runs beside supervision, so pods stay watched while an update waits for
        approval or image trust; the rollout itself takes the lock, after heals and scaling."""
        try:
            while self.spec_requests and not self.undeploy_requested:
                *older, (req, user) = self.spec_requests
                self.spec_requests = []
                for old, _ in older:
                    self.update_outcomes[old.request_id] = Failure(
                        kind=FailureKind.SUPERSEDED, message=f"superseded by a newer update of {self.spec.name}")
                await self._apply_update(req, user)
            for req, _ in self.spec_requests:
                self.update_outcomes[req.request_id] = Failure(
                    kind=FailureKind.UNDEPLOYED, message=f"{self.spec.name} is being undeployed")
            self.spec_requests = []
        finally:
            self.updating = None

    async def _apply_update(self, req: SpecUpdate, user: str) -> None:
        key = req.request_id
        target: RevisionRecord | None = None
        if req.spec is None:  # a rollback: an earlier revision, already admitted, its image pinned
            try:
                target = self._rollback_target(req.to_revision)
            except ApplicationError as e:
                self.update_outcomes[key] = Failure(kind=FailureKind.REFUSED, message=e.message)
                return
            spec, image_id, why = target.spec, target.image_id, f"rollback to revision {target.revision} by {user}"
        else:
            spec, image_id, why = req.spec, "", f"update by {user}"
        same_pods = spec.pod_template() == self.spec.pod_template() and all(
            p.revision == self.state.revision for p in self.state.pods)
        if spec == self.spec and same_pods:
            self.update_outcomes[key] = UpdateOutcome(in_place=True, status=self.status())
            return
        prior = target
        revision = max([r.revision for r in self.state.revisions] + [self.state.revision]) + 1
        if prior is None:  # a rollback was admitted once: its ticket is the proof
            refused = await self._govern(spec, user, revision)
            if refused is not None:
                self.update_outcomes[key] = refused
                return
        if same_pods:
            await self._update_in_place(spec, why)
            self.update_outcomes[key] = UpdateOutcome(in_place=True, status=self.status())
            return
        if not image_id:
            content_id, problem, kind = await self._resolve_image(spec)
            if content_id is None:
                await emit(self.placement, "image.untrusted" if kind == FailureKind.IMAGE_UNTRUSTED
                           else "spec.refused", spec.name, problem, image=spec.image)
                self.update_outcomes[key] = Failure(kind=kind, message=problem)
                return
            image_id = content_id
        ticket, problem = await self._ticket(spec, revision, image_id, grant=req.grant,
                                             approval_grant=self.approval_grant if prior is None else "", prior=prior)
        if ticket is None:
            self.update_outcomes[key] = Failure(kind=FailureKind.ACCESS_DENIED, message=problem)
            return
        record = RevisionRecord(revision=revision, spec=spec, image_id=image_id, ticket=ticket, deployed_by=user,
                                deployed_at=workflow.now(), outcome="rolling", reason=why)
        self.state.revisions = (self.state.revisions + [record])[-MAX_REVISIONS:]
        self.update_outcomes[key] = UpdateOutcome(revision=revision, status=self.status())
        await self._roll_out(record)

    async def _govern(self, spec: ServiceSpec, user: str, revision: int) -> Failure | None:
        """The governance policy on a changed spec (an in-place change too: raising max_replicas
        over the limit needs approval); a running service keeps running while it waits."""
        self.approval_grant = ""
        verdict = await workflow.execute_activity_method(
            ControlActivities.check_governance,
            GovernanceInput(spec=spec),
            task_queue=self.placement.control_task_queue,
            start_to_close_timeout=CONTROL_TIMEOUT,
            summary="governance policy (update)",
        )
        if verdict.needs_approval:
            before = self.state.failure, self.state.message
            self.state.requested_by = user
            approved = await self._await_approval("; ".join(verdict.reasons), verdict.approval_timeout_s,
                                                  revision=revision, spec=spec, running=True)
            refusal = self.state.failure
            self.state.failure, self.state.message = before  # the running revision is not what failed
            if not approved:
                return refusal or Failure(kind=FailureKind.APPROVAL_REJECTED, message="update not approved")
        return None

    async def _update_in_place(self, spec: ServiceSpec, why: str) -> None:
        """Nothing a pod runs changed (bounds, targets, intervals): take the new spec as it is."""
        changed = sorted(k for k in ServiceSpec.model_fields if getattr(spec, k) != getattr(self.spec, k))
        self.spec = spec
        reason = f"{why}: {', '.join(changed)} changed in place"
        self._decide("update", reason)
        self.pods_changed = True  # restart the watch with the new intervals and targets
        await emit(self.placement, "service.updated", spec.name, reason, changed=changed)
        desired = min(max(self.state.desired_replicas, spec.min_replicas), spec.max_replicas)
        if desired != self.state.desired_replicas and self.state.phase in SUPERVISED:
            await workflow.wait_condition(lambda: self.scaling is None)
            self.scaling = asyncio.ensure_future(self._scale_to(desired, f"{reason}: replicas now within bounds",
                                                                samples=[]))
            await self.scaling

    async def _roll_out(self, record: RevisionRecord) -> None:
        """Roll every pod to ``record``; on failure, roll back to the revision that ran before."""
        async with self.lock:
            await workflow.wait_condition(lambda: not self.heals and not self.failing)
            previous = next((r for r in self.state.revisions if r.revision == self.state.revision), None)
            prior_phase = self.state.phase
            self.state.rollout = RolloutStatus(from_revision=self.state.revision, to_revision=record.revision,
                                               state="rolling", started_at=workflow.now())
            self._set_phase("Updating")
            self.pods_changed = True  # no watch while pods are replaced on purpose
            await emit(self.placement, "rollout.started", self.spec.name,
                       f"revision {self.state.revision} -> {record.revision}: {record.reason}",
                       from_revision=self.state.revision, to_revision=record.revision, image=record.spec.image,
                       image_id=record.image_id)
            result = await self._rolling_child(record, rollback=False)
            if result.error is None and not result.superseded:
                self._set_revision(record, "active")
                if previous is not None:
                    self._mark(previous.revision, "replaced")
                self.state.rollout.state = "completed"
                self._decide("rollout", f"revision {record.revision} runs on every pod ({record.reason})")
                await emit(self.placement, "rollout.completed", self.spec.name,
                           f"revision {record.revision}: {len(result.pods)} pods", revision=record.revision)
            elif result.superseded:
                self._set_revision(record, "superseded")  # pods are mixed: the next rollout replaces the rest
                self.state.rollout.state = "superseded"
            else:
                self._mark(record.revision, "failed", result.error or "")
                await emit(self.placement, "rollout.failed", self.spec.name, result.error or "",
                           revision=record.revision)
                if previous is not None and not self.undeploy_requested:
                    self.state.rollout.state = "rolling_back"
                    back = await self._rolling_child(previous, rollback=True)
                    self._set_revision(previous, "active")
                    self.state.rollout.state = "rolled_back" if back.error is None else "failed"
                    reason = f"revision {record.revision} failed ({result.error}); back on revision {previous.revision}"
                    self._decide("rollback", reason)
                    await emit(self.placement, "rollout.rolled_back", self.spec.name, reason,
                               from_revision=record.revision, to_revision=previous.revision)
                # Answered once the service is back where it was, not while it rolls back.
                self.revision_failures[record.revision] = Failure(
                    kind=FailureKind.ROLLED_BACK, message=f"revision {record.revision} rolled back: {result.error}")
            self._set_phase(prior_phase if prior_phase in SUPERVISED else "Running")
            self.pods_changed = True

    async def _rolling_child(self, record: RevisionRecord, *, rollback: bool) -> DeployOutput:
        current = [p for p in self.state.pods if p.health != "exited"]
        kind = "rollback" if rollback else "deploy"
        child = await workflow.start_child_workflow(
            DeployWorkflow.run,
            DeployInput(spec=record.spec, revision=record.revision, pod_ids=[], placement=self.placement,
                        image_id=record.image_id, ticket=record.ticket, rolling=True, current=current,
                        replicas=self.state.desired_replicas, rollback=rollback),
            id=f"{workflow.info().workflow_id}-{kind}-{record.revision}-{self.state.scale_counter}-{len(self.state.decisions)}",
            task_queue=self.placement.control_task_queue,
            static_summary=f"{kind} to revision {record.revision}: {record.spec.image}"[:200],
        )
        told = False
        while not child.done():
            await workflow.wait_condition(
                lambda: child.done() or (not told and (bool(self.spec_requests) or self.undeploy_requested)))
            if not child.done() and not told and not rollback:
                await child.signal(SUPERSEDE)
                told = True
            elif not child.done() and rollback:
                break  # a rollback is not superseded: let it finish
        result = await child
        stopped = set(result.stopped) | {f.pod_id for f in result.failed}
        keep = {p.id for p in result.pods}
        given = {p.id for p in current}
        late = [p for p in self.state.pods if p.id not in given and p.id not in keep and p.id not in stopped]
        if late and workflow.patched("rollout-stops-late-pods"):
            # Booked while the child ran (a heal's replacement for a pod it had already counted
            # out): the child's pods are the whole service now, so these are surplus. Drain and
            # stop them here; dropped from the books unstopped, they would run unseen until the
            # orphan sweep.
            self.stopping |= {p.id for p in late}
            self.pods_changed = True
            await self._drain()
            outcomes = await asyncio.gather(
                *(stop_pod(self.spec, p, self._node_queue(p.node), schedule_to_start=NODE_PICKUP) for p in late),
                return_exceptions=True)
            for p, outcome in zip(late, outcomes, strict=True):
                if isinstance(outcome, BaseException):  # its node is gone: the node sweep removes it there
                    workflow.logger.warning("could not stop surplus pod %s: %s", p.id, outcome)
            stopped |= {p.id for p in late}
        self.state.pods = [p for p in self.state.pods if p.id in keep and p.id not in stopped]
        for pod in result.pods:
            self._upsert_pod(pod)
        self.stopping -= stopped
        return result

    def _set_revision(self, record: RevisionRecord, outcome: str) -> None:
        self.spec = record.spec
        self.state.revision = record.revision
        self.state.image_id = record.image_id
        self.state.ticket = record.ticket
        self._mark(record.revision, outcome)

    def _mark(self, revision: int, outcome: str, reason: str = "") -> None:
        self.state.revisions = [
            r.model_copy(update={"outcome": outcome, **({"reason": reason} if reason else {})})
            if r.revision == revision else r
            for r in self.state.revisions
        ]

    # --- deploy and undeploy ---------------------------------------------------------------

    async def _deploy(self) -> None:
        self._set_phase("Deploying")
        count = self.state.desired_replicas
        pod_ids = [str(workflow.uuid4()) for _ in range(count)]
        child = asyncio.ensure_future(
            workflow.execute_child_workflow(
                DeployWorkflow.run,
                DeployInput(spec=self.spec, revision=self.state.revision, pod_ids=pod_ids, placement=self.placement,
                            image_id=self.state.image_id, ticket=self.state.ticket),
                id=f"{workflow.info().workflow_id}-deploy-{self.state.revision}",
                task_queue=self.placement.control_task_queue,
                static_summary=f"deploy {count} pod(s) of {self.spec.image}",
            )
        )
        await workflow.wait_condition(lambda: child.done() or self.undeploy_requested)
        if not child.done():
            child.cancel()
        try:
            result = await child
        except (ChildWorkflowError, asyncio.CancelledError) as e:
            if self.undeploy_requested:
                return
            self._fail(FailureKind.DEPLOY_FAILED, f"deployment failed: {error_message(e)}")
            self._set_phase("Failed")
            await emit(self.placement, "service.failed", self.spec.name, self.state.message)
            return
        ready = {p.id for p in result.pods}
        self.state.pods = [p for p in self.state.pods if p.id in ready]
        for pod in result.pods:
            self._upsert_pod(pod)
        self._set_phase("Running")
        await asyncio.gather(
            *(emit(self.placement, "pod.started", self.spec.name, f"pod {pod.id} ready on {pod.node} at {pod.endpoint}",
                   pod=pod.id, node=pod.node, endpoint=pod.endpoint) for pod in result.pods),
            emit(self.placement, "service.deployed", self.spec.name, f"{len(result.pods)}/{count} pods ready",
                 revision=self.state.revision),
        )
        for failed in result.failed:
            # A pod that could not start at all is healed like any other: replaced, with backoff.
            node = self.placement.nodes[0].name if self.placement.nodes else ""
            pod = PodStatus(id=failed.pod_id, node=node, revision=self.state.revision, image=self.spec.image,
                            health="exited")
            self._upsert_pod(pod)
            self.state.crash_count += 1
            await emit(self.placement, "pod.exited", self.spec.name, f"pod {pod.id}: {failed.reason}", pod=pod.id)
            self._start_heal(pod, PodFailure(pod_id=pod.id, kind="exited", detail=failed.reason))

    async def _undeploy(self) -> None:
        self._set_phase("Undeploying")
        self.stopping |= {p.id for p in self.state.pods}
        await self._drain()
        stops = await asyncio.gather(*(stop_pod(self.spec, p, self._node_queue(p.node), schedule_to_start=NODE_PICKUP)
                                       for p in self.state.pods), return_exceptions=True)
        for pod, stopped in zip(self.state.pods, stops, strict=True):
            if isinstance(stopped, ActivityError):  # its node is gone: its worker removes it when back
                workflow.logger.warning("pod %s on %s not stopped: %s", pod.id, pod.node, error_message(stopped))
        # Sweep every node for pods of this service that a record missed (a start that raced
        # the undeploy): nothing may be left behind.
        nodes = {p.node for p in self.state.pods} | {n.name for n in self.placement.nodes}
        for node in sorted(nodes):
            try:
                left = await workflow.execute_activity_method(
                    PodActivities.list_pods,
                    ListPodsInput(service=self.spec.name),
                    task_queue=self._node_queue(node),
                    start_to_close_timeout=timedelta(seconds=60),
                    schedule_to_start_timeout=timedelta(seconds=60),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=POD_RETRY,
                )
            except ActivityError as e:
                workflow.logger.warning("could not sweep node %s: %s", node, e)
                continue
            await asyncio.gather(*(stop_pod(self.spec, p, self._node_queue(node), grace_s=0) for p in left.pods))
        self.state.pods = []
        self.service_stopped = True
        await self._publish_endpoints()
        self._set_phase("Stopped")
        await emit(self.placement, "service.undeployed", self.spec.name, "undeployed on request")

    # --- the routers' endpoint feed ---------------------------------------------------------

    def _endpoint_set(self) -> EndpointSet:
        """Ready pods, and pods still serving but on their way out (a planned stop, or unhealthy
        and being replaced) as draining: a router sends them nothing new."""
        eps = []
        for p in sorted(self.state.pods, key=lambda p: p.id):
            if p.endpoint is None or p.health == "exited":
                continue
            if p.id in self.stopping or (p.id in self.heals and p.health == "unhealthy"):
                state = "draining"
            elif p.ready:
                state = "ready"
            else:
                continue
            eps.append(Endpoint(pod=p.id, address=p.endpoint, state=state, node=p.node, revision=p.revision))
        return EndpointSet(service=self.spec.name, version=self.state.endpoints_version, endpoints=eps,
                           stopped=self.service_stopped)

    def _feed_due(self) -> bool:
        table = self._endpoint_set()
        return not table.same_pods(self.published) and (self.published is not None or bool(table.endpoints))

    async def _feed_loop(self) -> None:
        """Publish on every change of the routable set, wherever in the workflow it happens."""
        while True:
            await workflow.wait_condition(self._feed_due)
            await self._publish_endpoints()

    async def _publish_endpoints(self) -> None:
        """Send the current table to the routers, unless it is the one last sent. A failed push
        is the activity's to log: routers reload the full table on their own."""
        table = self._endpoint_set()
        if table.same_pods(self.published):
            return
        # Milliseconds since the epoch, never backwards: newer than anything a previous run of
        # this service (a redeploy after an undeploy) published.
        self.state.endpoints_version = max(self.state.endpoints_version + 1, int(workflow.now().timestamp() * 1000))
        table.version = self.state.endpoints_version
        self.published = table
        ready = sum(1 for e in table.endpoints if e.state == "ready")
        try:
            await workflow.execute_activity_method(
                FeedActivities.publish_endpoints,
                table,
                task_queue=self.placement.control_task_queue,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary=f"endpoints v{table.version}: {ready} ready, {len(table.endpoints) - ready} draining",
            )
        except ActivityError as e:
            if isinstance(e.cause, CancelledError):
                raise  # the run is ending (continue-as-new): nothing to report
            workflow.logger.warning("endpoint feed: could not publish %s: %s", table.version, e)

    async def _drain(self) -> None:
        """Publish the pods in ``stopping`` as draining, then give their in-flight requests
        up to ``spec.drain_s`` (less once every router is done with them) before anything stops them."""
        await self._publish_endpoints()
        await drain(self.placement, self.spec, sorted(self.stopping))

    # --- helpers -----------------------------------------------------------------------

    async def _flush_outbox(self) -> None:
        while self.outbox:
            type_, reason, data = self.outbox.pop(0)
            await emit(self.placement, type_, self.spec.name, reason, **data)

    def _all_ready(self) -> bool:
        return sum(1 for p in self.state.pods if p.ready) >= self.state.desired_replicas

    def _node_queue(self, node: str) -> str:
        return node_queue(self.placement, node)

    def _upsert_pod(self, pod: PodStatus) -> None:
        for i, existing in enumerate(self.state.pods):
            if existing.id == pod.id:
                self.state.pods[i] = pod
                return
        self.state.pods.append(pod)

    def _set_phase(self, phase: Phase, *, force: bool = False) -> None:
        if phase != self.state.phase or force:
            self.state.phase = phase
            workflow.upsert_search_attributes([PHASE_KEY.value_set(phase)])

    def _decide(self, kind: str, reason: str, **kw: object) -> None:
        decision = Decision(at=workflow.now(), kind=kind, reason=reason, **kw)  # type: ignore[arg-type]
        self.state.decisions = (self.state.decisions + [decision])[-MAX_DECISIONS:]

    def _continue_as_new_ready(self) -> bool:
        """Continue-as-new is due (history long enough) and safe: no heal, no scaling action
        and no handler holding the lock, so the state handed over is settled."""
        info = workflow.info()
        due = info.is_continue_as_new_suggested() or (
            self.history_threshold is not None and info.get_current_history_length() >= self.history_threshold
        )
        return (due and not self.heals and self.scaling is None and self.updating is None
                and not self.lock.locked())

    def _fail(self, kind: FailureKind, message: str) -> None:
        self.state.failure = Failure(kind=kind, message=message)
        self.state.message = message

    def _web_ui_url(self) -> str:
        base = self.placement.web_ui_base.rstrip("/")
        return f"{base}/namespaces/{self.placement.namespace}/workflows/{workflow.info().workflow_id}"

