"""The data the management layer speaks: specs, pods, status, and the inputs and results of
every workflow and activity (one model each, so fields can be added without breaking callers).

Workflows import this module through ``imports_passed_through``: keep it free of I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hms_mgmt.errors import FailureKind
from hms_mgmt.policy.autoscale import AutoscaleDecision, CpuSample, Recommendation

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Docker's reference grammar, simplified: [registry[:port]/]path[:tag][@digest]
_IMAGE_REF = re.compile(
    r"^(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)

Phase = Literal[
    "Validating",
    "AwaitingApproval",
    "VerifyingImage",
    "Deploying",
    "Running",
    "Scaling",
    "Healing",
    "Updating",
    "Degraded",
    "Undeploying",
    "Stopped",
    "Rejected",
    "Failed",
]
Health = Literal["starting", "healthy", "unhealthy", "exited"]

# Input bounds: a spec is data anyone who reaches Temporal can send, so every size has a cap and
# every interval a floor (a 10 ms health interval is a denial of service on the node, not a setting).
MIN_INTERVAL_S = 1.0
MIN_TIMEOUT_S = 1.0
MIN_BACKOFF_S = 0.1
MAX_REPLICAS = 1000
MAX_ENV_ENTRIES = 64
MAX_ENV_BYTES = 32 * 1024
MAX_COMMAND_ARGS = 64
MAX_COMMAND_BYTES = 8 * 1024
# What a caller may put in a request: it is kept in the workflow's state (refusals, decisions)
# and comes back in every status(), so none of it may grow the state without bound.
MAX_TOKEN_CHARS = 16 * 1024
MAX_REASON_CHARS = 1024
MAX_REQUEST_ID_CHARS = 128
MAX_SELECTOR_LABELS = 32
MAX_LABEL_CHARS = 253
# Capabilities a Docker pod may take back after all are dropped: none a pod needs to escape with.
CAP_ADD_ALLOWED = frozenset({"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
                             "SETGID", "SETUID", "SETPCAP", "NET_RAW", "SYS_CHROOT", "AUDIT_WRITE", "MKNOD"})
RuntimeName = Literal["docker", "process"]


def _is_utf8(text: str) -> bool:
    """False for lone surrogates: Python holds them, but no JSON payload can carry them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceSpec(_Model):
    """What the user asks for. The seed's dict literal is valid as it stands."""

    name: str = Field(description="DNS-1123 label: lowercase letters, digits and '-', at most 63")
    image: str = Field(description="image reference, e.g. registry.gov/hms-ach:1.4")
    min_replicas: int = Field(ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS)
    cpu_target: int = Field(ge=1, le=100, description="percent of a pod's CPU limit")
    port: int = Field(default=8080, ge=1, le=65535)
    health_path: str = Field(default="/health", max_length=1024)
    health_interval_s: float = Field(default=5.0, ge=MIN_INTERVAL_S, le=3600)
    health_failures: int = Field(default=2, ge=1, le=100)
    scale_interval_s: float = Field(default=30.0, ge=MIN_INTERVAL_S, le=3600)
    scale_down_window_s: float = Field(default=300.0, ge=0, le=86400)
    cpu_limit: float | None = Field(default=None, gt=0, le=64, description="CPUs per pod")
    memory_mb: int | None = Field(default=None, ge=16, le=1024 * 1024)
    env: dict[str, str] = Field(default_factory=dict, description=f"at most {MAX_ENV_ENTRIES} variables, "
                                f"{MAX_ENV_BYTES // 1024} KiB in all")
    command: list[str] | None = Field(default=None, description=f"at most {MAX_COMMAND_ARGS} arguments, "
                                      f"{MAX_COMMAND_BYTES // 1024} KiB in all")
    cap_add: list[str] = Field(default_factory=list, description="Linux capabilities a Docker pod gets back "
                               f"(all are dropped otherwise); only {', '.join(sorted(CAP_ADD_ALLOWED))}")
    read_only_root: bool = Field(default=True, description="a Docker pod's root filesystem is read-only "
                                 "(a tmpfs on /tmp); false for images that write to it")
    stop_grace_s: float = Field(default=10.0, ge=0, le=600)
    ready_timeout_s: float = Field(default=120.0, ge=MIN_TIMEOUT_S, le=3600)
    backoff_initial_s: float = Field(default=1.0, ge=MIN_BACKOFF_S, le=3600)
    backoff_max_s: float = Field(default=300.0, ge=MIN_BACKOFF_S, le=86400)
    approval_timeout_s: float = Field(default=86400.0, ge=MIN_TIMEOUT_S, le=30 * 86400)
    image_verify_timeout_s: float = Field(default=300.0, ge=MIN_TIMEOUT_S, le=86400)
    drain_s: float = Field(default=2.0, ge=0, le=600,
                           description="seconds a pod stopped on purpose gets no new requests before it stops")
    max_surge: int | str = Field(default="25%", description="pods above the replica count during a rolling "
                                 "update: a count or a percent of it, rounded up; at least 1 when max_unavailable is 0")
    max_unavailable: int | str = Field(default=0, description="ready pods a rolling update may be short of the "
                                       "replica count: a count or a percent, rounded down; never below min_replicas")
    min_ready_s: float = Field(default=1.0, ge=0, le=3600,
                               description="a new pod must stay ready this long before an old one is stopped")
    progress_deadline_s: float = Field(default=120.0, ge=MIN_TIMEOUT_S, le=86400,
                                       description="a rolling update that makes no progress this long rolls back")

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels a pod's node must carry, e.g. {zone: a}"
    )

    @field_validator("max_surge", "max_unavailable")
    @classmethod
    def _count_or_percent(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            if not 0 <= v <= MAX_REPLICAS:
                raise ValueError(f"a count must be from 0 to {MAX_REPLICAS}")
            return v
        if not re.fullmatch(r"(100|[1-9]?[0-9])%", v):
            raise ValueError("must be a count (2) or a percent from 0% to 100% ('25%')")
        return v

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, v: str) -> str:
        if len(v) > 63 or not _DNS_LABEL.match(v):
            raise ValueError(
                "must be a DNS-1123 label: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return v

    @field_validator("image")
    @classmethod
    def _image_is_reference(cls, v: str) -> str:
        if not v or len(v) > 255 or not _IMAGE_REF.match(v):
            raise ValueError("must be an image reference like 'registry.gov/hms-ach:1.4'")
        return v

    @field_validator("health_path")
    @classmethod
    def _path_is_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ENV_ENTRIES:
            raise ValueError(f"at most {MAX_ENV_ENTRIES} variables (got {len(v)})")
        for key, value in v.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if "\0" in value:
                raise ValueError(f"{key}: a value may not contain a NUL byte")
        size = sum(len(k.encode()) + len(val.encode()) + 2 for k, val in v.items())
        if size > MAX_ENV_BYTES:
            raise ValueError(f"at most {MAX_ENV_BYTES} bytes in all (got {size})")
        return v

    @field_validator("command")
    @classmethod
    def _command_bounded(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or len(v) > MAX_COMMAND_ARGS:
            raise ValueError(f"must have 1 to {MAX_COMMAND_ARGS} arguments (got {len(v)})")
        if any("\0" in arg for arg in v):
            raise ValueError("an argument may not contain a NUL byte")
        size = sum(len(arg.encode()) + 1 for arg in v)
        if size > MAX_COMMAND_BYTES:
            raise ValueError(f"at most {MAX_COMMAND_BYTES} bytes in all (got {size})")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector_bounded(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_SELECTOR_LABELS:
            raise ValueError(f"at most {MAX_SELECTOR_LABELS} labels (got {len(v)})")
        for key, value in v.items():
            if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
                raise ValueError(f"label {key!r}: a name of 1 to {MAX_LABEL_CHARS} characters and a value "
                                 f"of at most {MAX_LABEL_CHARS}")
            if not (key + value).isprintable() or not _is_utf8(key + value):
                raise ValueError(f"label {key!r}: names and values are printable text")
        return v

    @field_validator("cap_add")
    @classmethod
    def _caps_allowed(cls, v: list[str]) -> list[str]:
        caps = [cap.upper().removeprefix("CAP_") for cap in v]
        refused = sorted(set(caps) - CAP_ADD_ALLOWED)
        if refused:
            raise ValueError(f"{', '.join(refused)} may not be added back; allowed: {', '.join(sorted(CAP_ADD_ALLOWED))}")
        return sorted(set(caps))

    def digest(self) -> str:
        """The whole spec, canonically hashed: what a deploy, an update or an approval names."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def pod_template(self) -> dict[str, Any]:
        """The fields that shape a pod: a change to any of them needs new pods (a rolling update);
        any other change (replica bounds, targets, intervals) applies in place."""
        return self.model_dump(include=POD_TEMPLATE_FIELDS)

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServiceSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


POD_TEMPLATE_FIELDS = {"image", "port", "health_path", "env", "command", "cpu_limit", "memory_mb", "cap_add",
                       "read_only_root"}


def rollout_budget(value: int | str, replicas: int, *, round_up: bool) -> int:
    """``max_surge``/``max_unavailable`` as a pod count for ``replicas`` pods."""
    if isinstance(value, int):
        return value
    percent = int(value.rstrip("%"))
    whole, rest = divmod(percent * replicas, 100)
    return whole + (1 if round_up and rest else 0)


class NodeSpec(_Model):
    """A place pods run. Its worker polls the task queue ``<prefix><name>``."""

    name: str
    runtime: RuntimeName = "process"
    cpu: float = Field(default=2.0, gt=0, description="CPUs offered to pods")
    memory_mb: int = Field(default=4096, gt=0)
    max_pods: int = Field(default=64, ge=0)
    task_queue: str
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _node_name(cls, v: str) -> str:
        if len(v) > 63 or not _DNS_LABEL.match(v):
            raise ValueError("node name must be a DNS-1123 label")
        return v


NodeState = Literal["Ready", "Lost"]


class NodeRecord(_Model):
    """What the NodeRegistry knows of one node: its spec, state and last heartbeat."""

    spec: NodeSpec
    state: NodeState = "Ready"
    source: Literal["config", "worker"] = "worker"
    registered_at: datetime | None = None
    last_heartbeat: datetime | None = None
    lost_at: datetime | None = None
    rejoins: int = 0


class NodeRegistration(_Model):
    """A worker's ``register`` update and ``heartbeat`` signal: the node as it runs now."""

    spec: NodeSpec
    worker: str = ""  # host/pid of the worker, for operators


class RegisterResult(_Model):
    """The registry's answer to ``register``: ``was_lost`` tells the worker to sweep stale pods."""

    record: NodeRecord
    was_lost: bool = False


class NodeRegistryInput(_Model):
    seed: list[NodeSpec] = Field(default_factory=list)  # the static ``nodes:`` of config.yaml
    lost_after_s: float = Field(default=30.0, gt=0)
    control_task_queue: str = "hms-control"
    nodes: list[NodeRecord] | None = None  # carried over by continue-as-new
    history_threshold: int | None = None  # continue-as-new past this many events (tests force it)


class NodesOutput(_Model):
    nodes: list[NodeRecord] = Field(default_factory=list)


class NodeLost(_Model):
    """The ``node_lost`` signal to a ServiceWorkflow (and the registry's notify activity input)."""

    node: str = Field(max_length=253)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class PodStatus(_Model):
    id: str
    node: str
    endpoint: str | None = None  # "127.0.0.1:PORT"
    revision: int = 1
    image: str = ""
    ready: bool = False
    health: Health = "starting"
    consecutive_failures: int = 0
    cpu_percent: float | None = None
    started_at: datetime | None = None


class Decision(_Model):
    """A scale or heal decision with its reason, kept for status() and the dashboard."""

    at: datetime
    kind: Literal["scale", "heal", "degraded", "recovered", "capacity", "update", "rollout", "rollback", "revoked"]
    reason: str
    from_replicas: int | None = None
    to_replicas: int | None = None
    pod: str | None = None


class RevisionRecord(_Model):
    """One revision of a service: what it ran, pinned to the image content admitted for it."""

    revision: int
    spec: ServiceSpec
    image_id: str = ""  # the content id resolved at admission; every pod of it starts from this
    ticket: str = ""  # the control plane's admission ticket: what start_pod checks
    deployed_by: str = ""
    deployed_at: datetime | None = None
    outcome: Literal["active", "rolling", "replaced", "rolled_back", "failed", "superseded"] = "active"
    reason: str = ""


class RolloutStatus(_Model):
    """The rolling update in progress (or the last one), for ``hms rollout status``."""

    from_revision: int
    to_revision: int
    state: Literal["waiting", "rolling", "rolling_back", "completed", "rolled_back", "failed", "superseded"]
    started_at: datetime
    updated: int = 0  # pods of to_revision ready
    desired: int = 0
    message: str = ""
    workflow_id: str = ""  # the rolling DeployWorkflow's id, so the dashboard can link to it


class Refusal(_Model):
    """A request the service turned down (access, four eyes, bad token): shown in status()."""

    at: datetime
    action: str
    reason: str
    request_id: str = ""
    user: str | None = None


class PendingApproval(_Model):
    requested_by: str
    requested_at: datetime
    reason: str
    # What an approval must name (``hms approve --print-signal`` reads them from here).
    id: str = ""
    revision: int = 0
    spec_hash: str = ""
    invalid_attempts: list[str] = Field(default_factory=list)


class Failure(_Model):
    """Why a service ended or stopped making progress, typed: the client maps ``kind`` to an
    exception class in one place (``hms_mgmt.errors.error_for``)."""

    kind: FailureKind
    message: str


class ServiceStatus(_Model):
    name: str
    phase: Phase
    revision: int
    spec: ServiceSpec
    desired_replicas: int
    ready_replicas: int
    pods: list[PodStatus] = Field(default_factory=list)
    pending_approval: PendingApproval | None = None
    last_decisions: list[Decision] = Field(default_factory=list)
    workflow_id: str
    web_ui_url: str | None = None
    message: str | None = None
    backoff_s: float = 0.0
    crash_count: int = 0
    heal_count: int = 0
    scale_count: int = 0
    refusals: list[Refusal] = Field(default_factory=list)
    approved_by: str | None = None
    failure: Failure | None = None
    deploy_request_id: str = ""  # which deploy() call started this service
    image_id: str = ""  # the current revision's image, pinned at admission
    rollout: RolloutStatus | None = None
    revisions: list[RevisionRecord] = Field(default_factory=list)


class Approval(_Model):
    """The payload of the ``approve`` / ``reject`` signals and updates (from Python, `hms`, the
    Temporal CLI or the Web UI: ``{"proof": "...", "reason": "..."}``, as printed by
    ``hms approve NAME --print-signal``). The proof names the service, the revision, the spec
    hash and the pending request, and is used once."""

    proof: str = Field(default="", max_length=MAX_TOKEN_CHARS)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    request_id: str = Field(default="", max_length=MAX_REQUEST_ID_CHARS)
    # Before request proofs, bearer tokens travelled here: still decoded (histories of that time
    # replay), never read, never sent.
    token: str = Field(default="", exclude=True, max_length=MAX_TOKEN_CHARS)


class DeployResult(_Model):
    workflow_id: str
    run_id: str | None = None
    web_ui_url: str
    already_running: bool = False
    revision: int | None = None  # a changed spec for a running service: the revision rolling out


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


class ServiceState(_Model):
    """Everything ServiceWorkflow owns; passed whole to continue-as-new, the signal inboxes too
    (a signal taken in just before continue-as-new is acted on by the next run)."""

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
    # Inboxes: what signal handlers leave for the run loop.
    lost_nodes: list[NodeLost] = Field(default_factory=list)  # from the NodeRegistry
    outbox: list[PendingEvent] = Field(default_factory=list)  # events to write
    approvals: list[SignalledApproval] = Field(default_factory=list)  # approve/reject signals to check
    revoke_check: bool = False  # an image_revoked hint: re-check the pinned image's trust


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


class UpdateOutcome(_Model):
    """What ``update_spec``/``rollback`` did: a new revision is rolling out (wait for it with
    the ``admission`` update, ``until="revision"``), or the change applied in place."""

    revision: int | None = None
    in_place: bool = False
    status: ServiceStatus


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
        try:
            if str(uuid.UUID(v)) == v:
                return v
        except ValueError:
            pass
        raise ValueError(f"not a UUID: {v[:60]!r}")


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


class StartPodInput(_Model):
    pod_id: str
    service: str
    revision: int
    node: str
    spec: ServiceSpec
    image_id: str = ""  # pinned at admission: start exactly this content, if it is still trusted
    ticket: str = ""  # the admission ticket of this revision (hms_mgmt.tickets)
    # A rolling update's new pod: it must stay up and answering this long after it first
    # answered before start_pod returns it as ready (0: return at the first answer).
    min_ready_s: float = Field(default=0.0, ge=0, le=3600)


class StopPodInput(_Model):
    pod_id: str
    grace_s: float = 10.0


class ListPodsInput(_Model):
    service: str


class ListPodsOutput(_Model):
    pods: list[PodStatus]


class LogsOutput(_Model):
    lines: list[str]


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


# --- the router's endpoint feed ------------------------------------------------------------


class Endpoint(_Model):
    """One pod the router may send to (``ready``) or must only let finish (``draining``)."""

    pod: str
    address: str  # "127.0.0.1:PORT"
    state: Literal["ready", "draining"] = "ready"
    node: str = ""
    revision: int = 1


class EndpointSet(_Model):
    """A service's routable pods. ``version`` grows with every change (across continue-as-new
    and redeploys), so a router applies a table only if it is newer than the one it has."""

    service: str
    version: int = 0
    endpoints: list[Endpoint] = Field(default_factory=list)
    stopped: bool = False  # the service is gone: a router forgets it

    def same_pods(self, other: EndpointSet | None) -> bool:
        """Equal but for the version: publishing it again would change nothing."""
        return (other is not None and other.service == self.service and other.stopped == self.stopped
                and other.endpoints == self.endpoints)


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
