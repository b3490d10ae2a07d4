"""What one run of ServiceWorkflow carries: the durable ``ServiceState`` (handed whole to
continue-as-new, its signal inboxes included) and what lives only as long as the run (the
tasks in flight, the lock, the answers waiting for their update handlers).

Every helper of the workflow holds this one object; nothing else is shared between them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from hms_mgmt import constants
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import (
        Decision,
        EndpointSet,
        Failure,
        PendingEvent,
        Phase,
        PodStatus,
        RolloutStatus,
        ServiceInput,
        ServiceSpec,
        ServiceState,
        ServiceStatus,
        SpecUpdate,
        TimeSlot,
        UpdateOutcome,
        WaitingFor,
        WaitKind,
    )
    from hms_mgmt.policy import slots as clock
    from hms_mgmt.policy.phases import can_move

from workflows.common import emit, node_queue

PHASE_KEY = SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_PHASE)
SERVICE_KEY = SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_SERVICE)
MAX_DECISIONS = 20
CONTROL_TIMEOUT = timedelta(seconds=30)


def refuse(kind: FailureKind, message: str) -> ApplicationError:
    """The error an update fails its caller with: the kind travels as the error's type."""
    return ApplicationError(message, type=kind.value, non_retryable=True)


def cancel_quietly(task: asyncio.Future[object]) -> None:
    """Cancel a task nobody will await (its cancellation error is expected, not news)."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    task.cancel()


class ServiceRun:
    """The state of one run: ``state`` is what continue-as-new hands over; the rest is rebuilt
    empty by the next run (continue-as-new waits until no heal, scaling, update or handler is
    in flight, so none of it holds anything then)."""

    def __init__(self, inp: ServiceInput) -> None:
        self.spec: ServiceSpec = inp.spec
        self.placement = inp.placement
        self.state: ServiceState = inp.state or ServiceState(desired_replicas=inp.spec.min_replicas)
        self.history_threshold = inp.history_threshold
        self.request_id = inp.request_id
        self.undeploy_requested = False
        self.lock = asyncio.Lock()
        self.heals: dict[str, asyncio.Task[None]] = {}
        # Pods whose failure is being recorded (the event written) before their heal starts: a
        # rollout or scaling that waits for heals to finish must wait for these too.
        self.failing: set[str] = set()
        self.scaling: asyncio.Task[None] | None = None
        self.pods_changed = False
        self.stopping: set[str] = set()  # pods a scale-down is stopping on purpose
        self.rolling_to: int | None = None  # the revision a rolling DeployWorkflow of ours rolls to now
        self.approval_decision: tuple[str, str, str] | None = None  # (approve|reject, who, reason)
        self.approval_grant = ""  # the deciding gov_approver's grant: the admission ticket checks it
        self.deploy_grant = ""  # the deployer's grant, from the first authorize
        self.published: EndpointSet | None = None  # the endpoint feed's last table
        self.service_stopped = False
        self.spec_requests: list[tuple[SpecUpdate, str]] = []  # (request, who) waiting for the updater
        self.updating: asyncio.Task[None] | None = None
        self.update_outcomes: dict[str, UpdateOutcome | Failure] = {}  # request id -> what it became
        self.revision_failures: dict[int, Failure] = {}
        self.waits: list[WaitingFor] = []  # the waits in progress, the latest last (status().waiting_for)
        self.capacity: list[WaitingFor] = []  # placements waiting for room, as the Scheduler last said
        self.records: list[asyncio.Task[None]] = []  # events written beside the steps after them

    # --- what the run reports --------------------------------------------------------------

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
            web_ui_url=self.web_ui_url(),
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
            rollout=self.rollout_view(),
            revisions=s.revisions,
            waiting_for=self.waiting_for(),
            active_slot=s.active_slot,
        )

    # --- waits (issue 24): every wait says what it waits for -------------------------------

    @contextlib.contextmanager
    def waiting(self, kind: WaitKind, reason: str, *, until: datetime | None = None,
                command: str = "") -> Iterator[None]:
        """Around a wait: ``status().waiting_for`` says what it waits for and what ends it.
        Data only (no command), so histories from before it replay unchanged."""
        wait = WaitingFor(kind=kind, reason=reason, since=workflow.now(), until=until, command=command)
        self.waits.append(wait)
        try:
            yield
        finally:
            self.waits.remove(wait)

    def waiting_for(self) -> WaitingFor | None:
        placing = bool(self.heals) or self.scaling is not None or self.state.phase in ("Deploying", "Updating")
        if self.capacity and placing:  # first: a rollout or scaling waiting for a heal waits, at root, for room
            first, more = self.capacity[0], len(self.capacity) - 1
            return first if not more else first.model_copy(
                update={"reason": f"{first.reason} (and {more} more placement(s) waiting for room)"})
        if self.waits:
            return self.waits[-1]
        if self.heals:
            pods = ", ".join(sorted(p[:8] for p in self.heals))
            return WaitingFor(kind="heal", reason=f"a replacement for pod(s) {pods} to be ready")
        slot = self.state.active_slot
        if slot is not None and slot.landed:
            return WaitingFor(kind="time_slot", reason=f"landed by time slot {slot.name}: takes off when it ends",
                              since=slot.started_at or workflow.now(), until=slot.ends_at)
        return None

    def wait_for_heals(self, what: str) -> contextlib.AbstractContextManager[None]:
        pods = ", ".join(sorted(p[:8] for p in {*self.heals, *self.failing}))
        return self.waiting("heal", f"{what} waits for the heal of pod(s) {pods} to finish")

    def rollout_view(self) -> RolloutStatus | None:
        r = self.state.rollout
        if r is None:
            return None
        updated = sum(1 for p in self.state.pods if p.revision == r.to_revision and p.ready)
        return r.model_copy(update={"updated": updated, "desired": self.state.desired_replicas})

    def web_ui_url(self) -> str:
        base = self.placement.web_ui_base.rstrip("/")
        return f"{base}/namespaces/{self.placement.namespace}/workflows/{workflow.info().workflow_id}"

    # --- changes every helper makes ----------------------------------------------------------

    def set_phase(self, phase: Phase, *, force: bool = False) -> None:
        """Move to ``phase`` (and tell the Web UI's search attribute). A move the phase table
        does not allow is a bug: logged loudly, still made, so the run goes on."""
        if phase != self.state.phase or force:
            if not can_move(self.state.phase, phase):
                workflow.logger.error("phase move %s -> %s is not in the phase table (policy.phases)",
                                      self.state.phase, phase)
            self.state.phase = phase
            workflow.upsert_search_attributes([PHASE_KEY.value_set(phase)])

    def decide(self, kind: str, reason: str, **kw: object) -> None:
        decision = Decision(at=workflow.now(), kind=kind, reason=reason, **kw)  # type: ignore[arg-type]
        self.state.decisions = (self.state.decisions + [decision])[-MAX_DECISIONS:]

    def fail(self, kind: FailureKind, message: str) -> None:
        self.state.failure = Failure(kind=kind, message=message)
        self.state.message = message

    def upsert_pod(self, pod: PodStatus) -> None:
        for i, existing in enumerate(self.state.pods):
            if existing.id == pod.id:
                self.state.pods[i] = pod
                return
        self.state.pods.append(pod)

    def post(self, type_: str, reason: str, **data: object) -> None:
        """Leave an event for the run loop to write (a signal handler cannot run activities)."""
        self.state.outbox.append(PendingEvent(type=type_, reason=reason, data=data))

    async def emit(self, type_: str, reason: str, **data: object) -> None:
        await emit(self.placement, type_, self.spec.name, reason, **data)

    def emit_beside(self, type_: str, reason: str, **data: object) -> None:
        """Write an event without holding the next step up for it: a record of a step done, not
        a step (``settle_records`` waits for it before the run reports what came next)."""
        self.records.append(asyncio.ensure_future(self.emit(type_, reason, **data)))

    async def settle_records(self) -> None:
        records, self.records = self.records, []
        await asyncio.gather(*records)

    async def flush_outbox(self) -> None:
        while self.state.outbox:
            event = self.state.outbox.pop(0)
            await self.emit(event.type, event.reason, **event.data)

    # --- questions ---------------------------------------------------------------------------

    def slot(self) -> TimeSlot | None:
        """The time slot whose bounds apply now (of those on, the highest floor)."""
        on = [t for t in self.spec.time_slots if t.name in self.state.slots_on]
        return clock.winner(on, self.spec.max_replicas) if on else None  # type: ignore[return-value]

    def bounds(self) -> tuple[int, int]:
        """(min, max) replicas now: the active time slot's, else the spec's."""
        slot = self.slot()
        return (self.spec.min_replicas, self.spec.max_replicas) if slot is None else \
            clock.slot_bounds(slot, self.spec.max_replicas)

    def scaling_spec(self) -> ServiceSpec:
        """The spec the autoscaler works with: the active slot's bounds in place of the spec's
        (the spec itself when no slot is on). A landed service has no pod to scale."""
        if self.slot() is None:
            return self.spec
        low, high = self.bounds()
        return self.spec.model_copy(update={"min_replicas": low, "max_replicas": max(high, 1)})

    def node_queue(self, node: str) -> str:
        return node_queue(self.placement, node)

    def all_ready(self) -> bool:
        return sum(1 for p in self.state.pods if p.ready) >= self.state.desired_replicas

    def effective(self) -> int:
        """Pods that count toward the replica total (a pod being replaced counts once)."""
        return sum(1 for p in self.state.pods if p.id not in self.heals)

    def continue_as_new_ready(self) -> bool:
        """Continue-as-new is due (history long enough) and safe: no heal, no scaling action
        and no handler holding the lock, so the state handed over is settled."""
        info = workflow.info()
        due = info.is_continue_as_new_suggested() or (
            self.history_threshold is not None and info.get_current_history_length() >= self.history_threshold
        )
        return (due and not self.heals and self.scaling is None and self.updating is None
                and not self.lock.locked())
