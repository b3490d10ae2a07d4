"""The wire types: the inputs and results of every workflow, child workflow, activity, signal
and update (one model each, so fields can be added without breaking callers), and the state a
ServiceWorkflow carries across continue-as-new. Internal: what callers of
:mod:`hms_mgmt.orchestrator` see is in :mod:`hms_mgmt.models`.

Class names and fields are the payloads in recorded histories: rename nothing, add fields with
defaults. Workflows import this module through ``imports_passed_through``: keep it free of I/O.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from hms_mgmt.events import Event
from hms_mgmt.models import (
    MAX_REASON_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_TOKEN_CHARS,
    ActiveSlot,
    Approval,
    Decision,
    Failure,
    FailureKind,
    Health,
    NodePlan,
    NodeRecord,
    NodeSpec,
    PendingApproval,
    Phase,
    PodStatus,
    Refusal,
    RevisionRecord,
    RolloutStatus,
    ServiceSpec,
    SlotEdges,
    SpecChange,
    WaitingFor,
    _Model,
)
from hms_mgmt.policy.autoscale import AutoscaleDecision, CpuSample, Recommendation

__all__ = [
    "JoinAnswer",
    "RegistrySettings",
    "RouterCheckInput",
    "RouterRecord",
    "RouterRegistration",
    "RouterRegistryInput",
    "RoutersOutput",
    "PendingEvent",
    "SignalledApproval",
    "SlotEdge",
    "SlotEdgeCheck",
    "SlotEdgeVerdict",
    "SlotSchedules",
    "SlotSchedulesOutput",
    "AdmissionRequest",
    "AuthorizeInput",
    "AuthorizeOutput",
    "CapacityWaitsInput",
    "CapacityWaitsOutput",
    "DeployInput",
    "DeployOutput",
    "DrainInput",
    "DrainResult",
    "DryRunInput",
    "EventInput",
    "FailedPod",
    "GovernanceInput",
    "GovernanceOutput",
    "DrainClaim",
    "HealAttempt",
    "HealInput",
    "HealOutput",
    "ListPodsInput",
    "ListPodsOutput",
    "LogsOutput",
    "LogEndpoint",
    "LogEndpoints",
    "LogGrantInput",
    "LogGrantOutput",
    "NodeLost",
    "NodeVerdict",
    "NodeCheckInput",
    "NodeCheckOutput",
    "EnrolInput",
    "EnrolOutput",
    "PodReportCheck",
    "PodReportVerdict",
    "SealInput",
    "SealOutput",
    "StampInput",
    "StampOutput",
    "PodPlace",
    "RoundGrantsInput",
    "RoundGrantsOutput",
    "NodeRegistration",
    "NodeRegistryInput",
    "NodesOutput",
    "PickNodeInput",
    "PickNodeOutput",
    "PlanInput",
    "PlanOutput",
    "Placement",
    "PodFailure",
    "PodLogsInput",
    "PodProgress",
    "PublishResult",
    "RegisterResult",
    "ScaleInput",
    "ScaleOutput",
    "ScaleRequest",
    "ServiceInput",
    "ServiceState",
    "SpecUpdate",
    "StartPodInput",
    "StartTicketInput",
    "StopGrantInput",
    "StopPodInput",
    "TicketInput",
    "TicketOutput",
    "UndeployRequest",
    "VerifyImageInput",
    "VerifyImageOutput",
    "WatchCpuInput",
    "WatchHeartbeat",
    "WatchInput",
    "WatchResult",
]


def _check_uuid(v: str) -> str:
    try:
        if str(uuid.UUID(v)) == v:
            return v
    except ValueError:
        pass
    raise ValueError(f"not a UUID: {v[:60]!r}")


class NodeRegistration(_Model):
    """A worker's ``register`` update and ``heartbeat`` signal: the node as it runs now."""

    spec: NodeSpec
    worker: str = ""  # host/pid of the worker, for operators
    cert: str = Field(default="", max_length=4096)  # the node's certificate (hms_mgmt.nodeid), from enrolment
    proof: str = Field(default="", max_length=4096)  # the node's signature over the rest, fresh (nodeid.statement)
    # The node's own events (a refused pod start, a sandbox warning) for the control host's log:
    # believed, like the rest, only under a good signature (activities/enrolment.py).
    events: list[Event] = Field(default_factory=list, max_length=50)
    # A ``join`` signal's handle: the registry's answer is asked for by it (the ``joined`` query).
    request_id: str = Field(default="", max_length=64)

    def signed_part(self) -> dict[str, Any]:
        """What ``proof`` signs: everything but itself and the request handle (and no ``events``
        key when there are none, as a node that never forwards events signs it)."""
        return self.model_dump(mode="json", exclude={"proof", "request_id"} if self.events
                               else {"proof", "events", "request_id"})


class RouterRegistration(_Model):
    """A router's ``register`` update and ``heartbeat`` signal: where it takes the feed."""

    # A DNS-1123 label, as NodeSpec.name: the name reaches `hms routers`, events and logs.
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    address: str = Field(max_length=253)  # the address it enrolled with (its certificate says)
    url: str = Field(max_length=300)  # where the feed is pushed and drains are asked: http://ADDR:PORT
    engine: str = Field(default="", max_length=20)
    worker: str = Field(default="", max_length=300)  # host/pid, for operators
    cert: str = Field(default="", max_length=4096)  # the router's certificate (hms_mgmt.nodeid, role router)
    proof: str = Field(default="", max_length=4096)  # the router's signature over the rest, fresh
    request_id: str = Field(default="", max_length=64)  # a ``join`` signal's handle, as for a node

    def signed_part(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"proof", "request_id"})


class RouterRecord(_Model):
    """What the RouterRegistry knows of one router."""

    name: str
    address: str
    url: str
    engine: str = ""
    worker: str = ""
    state: Literal["Ready", "Lost"] = "Ready"
    registered_at: datetime | None = None
    last_heartbeat: datetime | None = None
    lost_at: datetime | None = None
    key_id: str = ""
    last_proof_at: float = 0.0


class RoutersOutput(_Model):
    routers: list[RouterRecord] = Field(default_factory=list)


class RouterCheckInput(_Model):
    registrations: list[RouterRegistration] = Field(default_factory=list)
    kind: Literal["register", "heartbeat"] = "heartbeat"


class RegisterResult(_Model):
    """The registry's answer to a registration: ``was_lost`` (the node was Lost and its pods
    replaced elsewhere) tells the worker to sweep its stale pods; a node Lost with every other
    one (pods kept) has none."""

    record: NodeRecord
    was_lost: bool = False


class RegistrySettings(_Model):
    """What a registry takes from the control worker when it first starts, not from whoever
    started it: the static ``nodes:`` of the configuration, and the grace before Lost."""

    seed: list[NodeSpec] = Field(default_factory=list)
    lost_after_s: float = Field(gt=0)


class JoinAnswer(_Model):
    """A registry's answer to one ``join`` signal (the ``joined`` query): refused, with the
    reason, or the node's ``RegisterResult`` / the router's ``RouterRecord``."""

    refused: str = ""
    node: RegisterResult | None = None
    router: RouterRecord | None = None


class RouterRegistryInput(_Model):
    lost_after_s: float = Field(default=30.0, gt=0)
    control_task_queue: str = "hms-control"
    routers: list[RouterRecord] | None = None  # carried over by continue-as-new
    history_threshold: int | None = None
    # ``join`` signals not yet checked, and the answers not yet asked for: carried over too
    joining: list[RouterRegistration] = Field(default_factory=list)
    answers: dict[str, JoinAnswer] = Field(default_factory=dict)
    heartbeats: list[RouterRegistration] = Field(default_factory=list)  # not yet checked: carried over too


class NodeRegistryInput(_Model):
    seed: list[NodeSpec] = Field(default_factory=list)  # the static ``nodes:`` of config.yaml
    lost_after_s: float = Field(default=6.0, gt=0)
    control_task_queue: str = "hms-control"
    nodes: list[NodeRecord] | None = None  # carried over by continue-as-new
    history_threshold: int | None = None  # continue-as-new past this many events (tests force it)
    # ``join`` signals not yet checked, and the answers not yet asked for: carried over too
    joining: list[NodeRegistration] = Field(default_factory=list)
    answers: dict[str, JoinAnswer] = Field(default_factory=dict)
    # and what the run had still to do: heartbeats and removal hints to check, Lost nodes whose
    # services were not told yet (evicted: replace its pods; held: an event only)
    heartbeats: list[NodeRegistration] = Field(default_factory=list)
    removals: list[str] = Field(default_factory=list)
    untold_evicted: list[str] = Field(default_factory=list)
    untold_held: list[str] = Field(default_factory=list)


class NodeVerdict(_Model):
    """The control plane's check of one signed registration or heartbeat (``check_nodes``)."""

    node: str
    ok: bool
    reason: str = ""
    key_id: str = ""  # which key signed: a second key for a Ready node is refused
    at: float = 0.0  # the statement's time: each must be newer than the node's last


class NodeCheckInput(_Model):
    registrations: list[NodeRegistration] = Field(default_factory=list)
    kind: Literal["register", "heartbeat"] = "heartbeat"


class NodeCheckOutput(_Model):
    verdicts: list[NodeVerdict] = Field(default_factory=list)


class EnrolInput(_Model):
    """``hms node join``'s ``enrol`` update: an enrolment request signed with a join token's key."""

    request: str = Field(max_length=4096)


class EnrolOutput(_Model):
    cert: str
    control_pub: str  # the control plane's public key (PEM): the joining host checks its fingerprint


class PodReportCheck(_Model):
    """Is this ``pod_reported`` signal a node's own report about its own pod (``check_pod_report``)?"""

    service: str
    pod: PodStatus
    recorded_node: str = ""  # the node the service has this pod on, if it knows the pod
    asked_pod: str = ""  # ``check_started_pod``: the pod id the start asked for


class PodReportVerdict(_Model):
    ok: bool
    reason: str = ""


class StampInput(_Model):
    """Ask the control plane for a trust stamp for one pod start (``stamp_start``)."""

    service: str
    revision: int
    spec: ServiceSpec
    image_id: str
    ticket: str
    pod_id: str
    node: str


class StampOutput(_Model):
    stamp: str


MAX_ROUND_PODS = 1000  # pods of one round asked for at once (a service's max_replicas is far below)


class PodPlace(_Model):
    pod_id: str
    node: str


class RoundGrantsInput(_Model):
    """Ask the control plane for every pod of a round at once (``stamp_round``, ``start_tickets``):
    the revision's facts once, then each pod and the node it starts on."""

    service: str
    revision: int
    spec: ServiceSpec
    image_id: str = ""
    ticket: str = ""
    pods: list[PodPlace] = Field(min_length=1, max_length=MAX_ROUND_PODS)


class RoundGrantsOutput(_Model):
    grants: list[str]  # one per pod, in the order asked




class SealOutput(_Model):
    bundle: str  # signed by the control plane, the values encrypted to the node's key
    versions: dict[str, int] = Field(default_factory=dict)  # name -> version sealed: names and versions only


class NodesOutput(_Model):
    nodes: list[NodeRecord] = Field(default_factory=list)


class NodeLost(_Model):
    """The ``node_lost`` signal to a ServiceWorkflow (and the registry's notify activity input)."""

    node: str = Field(max_length=253)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    # False: every node fell silent at once, so its pods are not replaced (nowhere to go, and the
    # silence is more likely the control plane's own); only the event is written
    evict: bool = True


# --- workflow inputs and results -------------------------------------------------------


class Placement(_Model):
    """Where new pods go and on which task queue their activities run."""

    control_task_queue: str
    nodes: list[NodeSpec]
    web_ui_base: str = "http://localhost:8233"
    namespace: str = "default"
    capacity_retry_max_s: float = 30.0
    node_queue_prefix: str = "hms-node-"
    watch_max_s: float = 1800.0  # the monitor returns at least this often, so the workflow can continue-as-new


class PendingEvent(_Model):
    """An event a signal handler raised (handlers cannot run activities): the run loop writes it."""

    type: str
    reason: str
    data: dict[str, Any] = Field(default_factory=dict)


class SignalledApproval(_Model):
    """An ``approve`` / ``reject`` signal waiting for the run loop to check it."""

    kind: Literal["approve", "reject"]
    approval: Approval


class SlotEdge(_Model):
    """A time slot's edge, as its Temporal Schedule starts it (the action's input) and as the
    ``slot_edge`` signal delivers it. ``grant`` is the deployer's standing grant for exactly
    this schedule, revision and edge; the workflow ids are set by the run that delivers it."""

    service: str = Field(max_length=63)
    slot: str = Field(max_length=30)
    edge: Literal["start", "end"]
    schedule_id: str = Field(max_length=200)
    revision: int
    grant: str = Field(default="", max_length=MAX_TOKEN_CHARS)
    workflow_id: str = Field(default="", max_length=300)
    run_id: str = Field(default="", max_length=64)


class SlotEdgeCheck(_Model):
    """``check_slot_edge``: is this edge the act of the deployer's standing grant for what the
    service runs now (its revision and spec), delivered by the run its schedule started?"""

    edge: SlotEdge
    revision: int
    spec_digest: str


class SlotEdgeVerdict(_Model):
    allowed: bool
    user: str | None = None
    reason: str = ""


class SlotSchedules(_Model):
    """``sync_slot_schedules``: make the service's Temporal Schedules match ``spec.time_slots``
    for ``revision`` (none, with ``spec=None``: the service is being undeployed)."""

    service: str
    workflow_id: str
    revision: int
    spec: ServiceSpec | None = None
    grant: str = ""  # the deployer's grant (deploy, update or rollback) for this revision
    known: list[str] = Field(default_factory=list)  # the schedule ids made before
    task_queue: str = "hms-control"


class SlotSchedulesOutput(_Model):
    schedules: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)


class ServiceState(_Model):
    """Everything ServiceWorkflow owns; passed whole to continue-as-new."""

    phase: Phase = "Validating"
    revision: int = 1
    desired_replicas: int = 0
    pods: list[PodStatus] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)
    pending_approval: PendingApproval | None = None
    crash_count: int = 0
    backoff_s: float = 0.0
    heal_counter: int = 0
    scale_counter: int = 0
    message: str | None = None
    requested_by: str = ""
    history: list[Recommendation] = Field(default_factory=list)  # autoscale stabilisation window
    at_max_reported: bool = False
    refusals: list[Refusal] = Field(default_factory=list)
    approved_by: str | None = None
    last_samples: list[CpuSample] = Field(default_factory=list)
    failure: Failure | None = None
    image_id: str = ""
    ticket: str = ""  # the current revision's admission ticket
    rollout: RolloutStatus | None = None
    revisions: list[RevisionRecord] = Field(default_factory=list)
    endpoints_version: int = 0  # the feed's last published version, carried across continue-as-new
    used_proofs: dict[str, float] = Field(default_factory=dict)  # jti -> expiry (epoch s): each is used once
    # Inboxes: what signal handlers leave for the run loop, carried across continue-as-new.
    lost_nodes: list[NodeLost] = Field(default_factory=list)  # from the NodeRegistry
    outbox: list[PendingEvent] = Field(default_factory=list)  # events to write
    approvals: list[SignalledApproval] = Field(default_factory=list)  # approve/reject signals to check
    revoke_check: bool = False  # an image_revoked hint: re-check the pinned image's trust
    # Time slots: the slots whose start edge came (and no end since), the view status() shows,
    # the schedules made for them, and the slot_edge signals waiting for their check.
    slots_on: list[str] = Field(default_factory=list)
    active_slot: ActiveSlot | None = None
    slot_schedules: list[str] = Field(default_factory=list)
    slot_edges: list[SlotEdge] = Field(default_factory=list)


class ServiceInput(_Model):
    spec: ServiceSpec
    placement: Placement
    proof: str = ""  # the deployer's request proof, bound to the spec's digest
    # Before request proofs, bearer tokens travelled here: still decoded (histories of that time
    # replay), never read, never sent.
    token: str = Field(default="", exclude=True)
    state: ServiceState | None = None
    history_threshold: int | None = None  # continue-as-new past this many events (tests force it)
    request_id: str = ""  # the deploy() call that started the service, so it can tell it was first


class DeployInput(_Model):
    """A first rollout (``pod_ids`` to start), or a rolling update: replace every pod in
    ``current`` that is not of ``revision`` with ``replicas`` pods of it."""

    spec: ServiceSpec
    revision: int
    pod_ids: list[str]
    placement: Placement
    existing: list[PodStatus] = Field(default_factory=list)
    image_id: str = ""
    ticket: str = ""
    rolling: bool = False
    current: list[PodStatus] = Field(default_factory=list)
    replicas: int = 0
    rollback: bool = False


class FailedPod(_Model):
    pod_id: str
    reason: str


class DeployOutput(_Model):
    pods: list[PodStatus]
    failed: list[FailedPod] = Field(default_factory=list)
    stopped: list[str] = Field(default_factory=list)  # old pods a rolling update removed
    error: str | None = None  # a rolling update that gave up (deadline, crash loop): roll back
    superseded: bool = False  # stopped early for a newer update


class SpecUpdate(_Model):
    """The ``update_spec`` update (a new revision, or an in-place change) and ``rollback``."""

    spec: ServiceSpec | None = None
    proof: str = Field(default="", max_length=MAX_TOKEN_CHARS)  # bound to the spec's digest (update) or to ``to_revision`` (rollback)
    request_id: str = Field(default="", max_length=MAX_REQUEST_ID_CHARS)
    to_revision: int | None = None  # rollback: this revision (default: the one before)
    grant: str = Field(default="", max_length=MAX_TOKEN_CHARS)  # set by the workflow once the proof is verified
    # Before request proofs, bearer tokens travelled here: still decoded (histories of that time
    # replay), never read, never sent.
    token: str = Field(default="", exclude=True, max_length=MAX_TOKEN_CHARS)


class PodLogsInput(_Model):
    pod_id: str
    node_task_queue: str = ""
    tail: int = Field(default=100, ge=1, le=10_000)
    service: str = ""
    proof: str = ""  # a viewer's (or better) request proof, bound to the pod
    grant: str = ""  # set by PodLogsWorkflow once the proof is verified; what the node checks

    @field_validator("pod_id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        return _check_uuid(v)


# --- activity inputs and results ------------------------------------------------------


class PickNodeInput(_Model):
    service: str
    spec: ServiceSpec
    nodes: list[NodeSpec]
    count: int = 1
    placed: list[PodStatus] = Field(default_factory=list)
    require_all: bool = False


class PickNodeOutput(_Model):
    nodes: list[NodeSpec | None]


class CapacityWaitsInput(_Model):
    service: str


class CapacityWaitsOutput(_Model):
    """The service's pods the Scheduler has no room for now, one wait per placement that waits."""

    waits: list[WaitingFor] = Field(default_factory=list)


class DryRunInput(_Model):
    """The NodeRegistry's ``dry_run`` update: admission's checks for ``spec``, nothing started.
    ``proof`` is the caller's, made for ``dry_run`` and bound to the spec's digest."""

    spec: ServiceSpec
    proof: str = Field(default="", max_length=MAX_TOKEN_CHARS)
    request_id: str = Field(default="", max_length=MAX_REQUEST_ID_CHARS)


class PlanInput(_Model):
    """``plan_deploy``: the dry run's read-only checks, for the holder of a ``dry_run`` grant."""

    spec: ServiceSpec
    grant: str = ""


class PlanOutput(_Model):
    needs_approval: bool = False
    approval_reasons: list[str] = Field(default_factory=list)
    secrets_problem: str = ""
    secrets_kind: FailureKind | None = None
    replicas: int = 0
    unplaced: int = 0
    placement: list[NodePlan] = Field(default_factory=list)
    pod_nodes: list[str | None] = Field(default_factory=list)
    capacity: str = ""  # why pods do not fit, as pick_node says it
    change: SpecChange | None = None
    time_slots: list[SlotEdges] = Field(default_factory=list)


class StartPodInput(_Model):
    pod_id: str
    service: str
    revision: int
    node: str
    spec: ServiceSpec
    image_id: str = ""  # pinned at admission: start exactly this content, if it is still trusted
    ticket: str = ""  # the admission ticket of this revision (hms_mgmt.tickets)
    stamp: str = ""  # the control plane's word, for this start, that the image is trusted now (nodeid)
    # A rolling update's new pod: it must stay up and answering this long after it first
    # answered before start_pod returns it as ready (0: return at the first answer).
    min_ready_s: float = Field(default=0.0, ge=0, le=3600)
    # The spec's secrets, sealed by the control plane for this pod on this node (hms_mgmt/secrets.py):
    # only that node's key opens it. "" when the spec names none.
    secrets: str = Field(default="", max_length=1024 * 1024)


class StopPodInput(_Model):
    pod_id: str
    grace_s: float = 10.0
    # The control plane's signed word that this service's workflow stops this pod on this node
    # (``stop_grant``), and what it names; empty only in histories from before it was asked for.
    service: str = ""
    node: str = ""
    grant: str = ""


class StopGrantInput(_Model):
    """Ask the control worker to sign one stop: this pod, of this service, on this node."""

    service: str
    pod_id: str
    node: str


class StartTicketInput(_Model):
    """Ask the control worker for a short-lived ticket to start one pod of an admitted revision;
    ``ticket`` is the revision's admission ticket (its record: proof it was admitted)."""

    service: str
    revision: int
    spec: ServiceSpec
    image_id: str = ""
    ticket: str = ""
    pod_id: str
    node: str


class SealInput(StartTicketInput):
    """Ask the control plane to seal a spec's secrets for one pod start (``seal_secrets``):
    the same facts as a start ticket; the answer opens only on ``node``."""


class ListPodsInput(_Model):
    service: str


class ListPodsOutput(_Model):
    pods: list[PodStatus]


class LogsOutput(_Model):
    lines: list[str]


class LogGrantInput(_Model):
    """``PodLogGrantWorkflow``: a reader asks to stream pods' logs straight from their nodes."""

    service: str
    pods: list[str] = Field(min_length=1, max_length=500)
    # The sha256 of a secret only the caller holds: the grant is good only with that secret,
    # so a grant read from this workflow's history reads nothing.
    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    proof: str = Field(default="", max_length=MAX_TOKEN_CHARS)  # bound to the pods and key_hash

    @field_validator("pods")
    @classmethod
    def _uuids(cls, v: list[str]) -> list[str]:
        return [_check_uuid(p) for p in v]


class LogEndpoint(_Model):
    """Where one pod's log is streamed from: its node's log endpoint ("" if the node serves none)."""

    pod: str
    node: str
    url: str = ""


class LogEndpoints(_Model):
    endpoints: list[LogEndpoint]


class LogGrantOutput(_Model):
    """The control plane's signed grant (no log line) and each pod's node endpoint."""

    grant: str
    endpoints: list[LogEndpoint]


class EventInput(_Model):
    type: str
    service: str
    reason: str
    data: dict[str, Any] = Field(default_factory=dict)


# --- health monitor, healing and scaling ----------------------------------------------

class PodFailure(_Model):
    pod_id: str
    kind: Literal["unhealthy", "exited"]
    detail: str
    consecutive_failures: int = 0
    exit_code: int | None = None
    node_lost: bool = False  # its node is Lost: the heal does not wait long to stop what is left of it


class PodProgress(_Model):
    """What the watch sees of one pod between its returns (its heartbeat details)."""

    pod_id: str
    health: Health
    consecutive_failures: int = 0
    cpu_percent: float | None = None


class WatchInput(_Model):
    service: str
    spec: ServiceSpec
    pods: list[PodStatus]  # the ready pods this node's watch pings and samples
    known: list[str] = Field(default_factory=list)  # every pod id the workflow knows (incl. starting)
    current: int = 0  # pods of the service in total, for the autoscale policy
    max_duration_s: float = 1800.0
    autoscale: bool = True
    history: list[Recommendation] = Field(default_factory=list)
    at_max_reported: bool = False


class WatchResult(_Model):
    reason: Literal["failed", "scale", "at_max", "timeout", "unknown_pods"]
    failed: list[PodFailure] = Field(default_factory=list)
    samples: list[CpuSample] = Field(default_factory=list)
    decision: AutoscaleDecision | None = None
    history: list[Recommendation] = Field(default_factory=list)
    unknown_pods: list[str] = Field(default_factory=list)
    progress: list[PodProgress] = Field(default_factory=list)


class WatchCpuInput(_Model):
    """The service's one autoscaler: merges every node watch's heartbeat samples."""

    workflow_id: str
    spec: ServiceSpec
    current: int
    pods: list[str] = Field(default_factory=list)  # the ready pods whose samples count
    history: list[Recommendation] = Field(default_factory=list)
    at_max_reported: bool = False
    max_duration_s: float = 1800.0


class WatchHeartbeat(_Model):
    progress: list[PodProgress] = Field(default_factory=list)
    samples: list[CpuSample] = Field(default_factory=list)
    history: list[Recommendation] = Field(default_factory=list)
    round: int = 0  # CPU sampling rounds so far: watch_cpu counts a node's samples once


class HealInput(_Model):
    spec: ServiceSpec
    revision: int
    failed: PodStatus
    failure: PodFailure
    placement: Placement
    existing: list[PodStatus] = Field(default_factory=list)
    crash_count: int = 0  # earlier failures in a row: the first attempt already backs off
    image_id: str = ""
    ticket: str = ""


class DrainClaim(_Model):
    """A ``pods_draining`` signal's pods, to be confirmed by the rolling child that sent it."""

    rollout_workflow_id: str
    pods: list[str] = Field(max_length=10_000)


class HealAttempt(_Model):
    """Sent to the parent after each failed replacement, so status() shows the crash loop."""

    failed_pod: str
    replacement: str
    attempt: int
    reason: str
    next_delay_s: float


class HealOutput(_Model):
    old_pod: str
    replacement: PodStatus
    attempts: int
    stop_error: str | None = None  # the old pod could not be stopped (its node is gone)


class ScaleInput(_Model):
    spec: ServiceSpec
    revision: int
    from_replicas: int
    to_replicas: int
    reason: str
    samples: list[CpuSample] = Field(default_factory=list)
    placement: Placement
    existing: list[PodStatus] = Field(default_factory=list)
    new_pod_ids: list[str] = Field(default_factory=list)
    victims: list[PodStatus] = Field(default_factory=list)
    image_id: str = ""
    ticket: str = ""


class ScaleOutput(_Model):
    started: list[PodStatus] = Field(default_factory=list)
    stopped: list[str] = Field(default_factory=list)
    failed: list[FailedPod] = Field(default_factory=list)


class ScaleRequest(_Model):
    replicas: int
    proof: str = Field(default="", max_length=MAX_TOKEN_CHARS)  # bound to ``replicas``
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    # Before request proofs, bearer tokens travelled here: still decoded (histories of that time
    # replay), never read, never sent.
    token: str = Field(default="", exclude=True, max_length=MAX_TOKEN_CHARS)


# --- access, governance, image trust ---------------------------------------------------


class AuthorizeInput(_Model):
    proof: str = ""
    action: str  # what the access matrix is asked
    service: str
    requester: str | None = None  # for approve: the deployer, who may not approve their own request
    request_id: str = ""
    claim: str = ""  # what the proof must ask for, when it differs from ``action`` (update, rollback)
    bind: dict[str, Any] = Field(default_factory=dict)  # what the proof must be bound to
    # Before request proofs, bearer tokens travelled here: still decoded (histories of that time
    # replay), never read, never sent.
    token: str = Field(default="", exclude=True)


class TicketInput(_Model):
    """Admission, checked once more where it cannot be skipped, before the ticket is signed."""

    service: str
    revision: int
    spec: ServiceSpec
    image_id: str
    grant: str = ""  # the deployer's, from ``authorize``
    approval_grant: str = ""  # a gov_approver's, when the spec is over the governance limit
    prior_ticket: str = ""  # a rollback: the earlier revision's ticket (it was admitted then)
    prior_revision: int | None = None


    token: str = Field(default="", exclude=True)  # before grants; still decoded, never read
    approval_token: str = Field(default="", exclude=True)


class TicketOutput(_Model):
    ticket: str


class AuthorizeOutput(_Model):
    allowed: bool
    user: str | None = None
    role: str | None = None
    reason: str = ""
    grant: str = ""  # the control plane's signed word for the verified identity and request


class GovernanceInput(_Model):
    spec: ServiceSpec


class GovernanceOutput(_Model):
    needs_approval: bool
    reasons: list[str] = Field(default_factory=list)
    approval_timeout_s: float = 86400.0


class VerifyImageInput(_Model):
    service: str
    image: str
    content_id: str = ""  # check this pinned content rather than what the tag points to now
    one_try: bool = False  # a revocation check: answer now, do not wait for a signature
    spec: ServiceSpec | None = None  # admission: would this node's runtime run it? (``check_spec``)


class VerifyImageOutput(_Model):
    content_id: str
    detail: str


class PublishResult(_Model):
    written: bool = False
    pushed: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)


class DrainInput(_Model):
    """Pods being drained out of the routers: wait until every router says none of them has a
    request in flight (and it sends them nothing new), at most ``max_s``."""

    service: str = Field(max_length=63)
    pods: list[str] = Field(max_length=256)
    max_s: float = Field(ge=0, le=600)


class DrainResult(_Model):
    confirmed: bool = False  # every router answered idle for every pod
    waited_s: float = 0.0
    routers: dict[str, str] = Field(default_factory=dict)  # url -> "idle" or why not


class UndeployRequest(_Model):
    proof: str = Field(default="", max_length=MAX_TOKEN_CHARS)
    request_id: str = Field(default="", max_length=MAX_REQUEST_ID_CHARS)
    # Before request proofs, bearer tokens travelled here: still decoded (histories of that time
    # replay), never read, never sent.
    token: str = Field(default="", exclude=True, max_length=MAX_TOKEN_CHARS)


class AdmissionRequest(_Model):
    """The ``admission`` update: answer once the service has passed (or failed) admission,
    or, with ``until="running"``, once it runs. Bounded, so no update outlives its caller."""

    until: Literal["admitted", "running", "revision"] = "admitted"
    revision: int | None = None  # until="revision": that revision runs (or was rolled back)
    timeout_s: float = Field(default=300.0, gt=0, le=3600)
