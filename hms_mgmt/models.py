"""The public types of the management layer: what callers of :mod:`hms_mgmt.orchestrator`, the
``hms`` CLI, the dashboard and the router see — the spec, a service's status (pods, decisions,
revisions, rollout, approval, failure), nodes, the approval payload people send, and the router's
endpoint feed.

The inputs and results of workflows and activities are internal wire types in
:mod:`hms_mgmt.wire`. For compatibility every one of them can still be imported from here
(``from hms_mgmt.models import Placement``); new code imports them from ``hms_mgmt.wire``.

Workflows import this module through ``imports_passed_through``: keep it free of I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from hms_mgmt.addresses import LOOPBACK, check_address
from hms_mgmt.errors import FailureKind
from hms_mgmt.policy import slots as _clock

# The autoscale policy's types, importable from here as before (the wire types use them).
from hms_mgmt.policy.autoscale import AutoscaleDecision as AutoscaleDecision
from hms_mgmt.policy.autoscale import CpuSample as CpuSample
from hms_mgmt.policy.autoscale import Recommendation as Recommendation

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
    # defer_build: each model's validator is built on first use, not at import: a client script
    # that deploys uses a handful of the ~90 models, and pays the import of all of them.
    model_config = ConfigDict(extra="forbid", defer_build=True)


def _at_most(count: int, limit: int, what: str) -> None:
    """Refuse a list, map or size over its bound, saying the bound and what was given."""
    if count > limit:
        raise ValueError(f"at most {limit} {what} (got {count})")


def _labels_bounded(v: dict[str, str]) -> dict[str, str]:
    """Labels (a node's, a selector's): at most ``MAX_SELECTOR_LABELS``, each a name and a value
    of bounded length, printable text (no control, format or separator characters)."""
    _at_most(len(v), MAX_SELECTOR_LABELS, "labels")
    for key, value in v.items():
        if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise ValueError(f"label {key!r}: a name of 1 to {MAX_LABEL_CHARS} characters and a value "
                             f"of at most {MAX_LABEL_CHARS}")
        if not (key + value).isprintable() or not _is_utf8(key + value):
            raise ValueError(f"label {key!r}: names and values are printable text")
    return v


def _label(v: str, limit: int, message: str) -> str:
    """``v`` when it is a DNS-1123 label of at most ``limit`` characters."""
    if len(v) > limit or not _DNS_LABEL.match(v):
        raise ValueError(message)
    return v


MAX_TIME_SLOTS = 16
MAX_SECRETS = 32
_SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class SecretRef(_Model):
    """A secret a pod gets as a file: ``name`` in the control host's store (``hms secret set``),
    ``target`` the file's name (``/run/secrets/TARGET``; ``$HMS_SECRETS_DIR/TARGET`` for a process
    pod), the name by default. A spec carries names only, never a value."""

    name: str = Field(description="a stored secret: letters, digits, '_', '.', '-', at most 63")
    target: str = Field(default="", description="the file's name (default: the secret's name)")
    version: int | None = Field(default=None, ge=1, description="a stored version (default: the latest at each "
                                "pod start); `hms secret set` pins the new one in every running spec that names it")

    @field_validator("name", "target")
    @classmethod
    def _file_name(cls, v: str, info: Any) -> str:
        if (v or info.field_name == "name") and not _SECRET_NAME.match(v):
            raise ValueError("must be 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return v

    @property
    def file(self) -> str:
        return self.target or self.name


def check_secret_name(name: str) -> str:
    """``name`` if it can name a secret (and a file), else ValueError."""
    if not _SECRET_NAME.match(name):
        raise ValueError(f"secret name {name[:80]!r}: 1 to 63 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


class SecretInfo(_Model):
    """A stored secret as ``hms secret list`` shows it: never its value."""

    name: str
    version: int
    set_by: str
    set_at: datetime
    used_by: list[str] = Field(default_factory=list, description="running services whose spec names it")


class TimeSlot(_Model):
    """A window whose replica bounds replace the spec's (KEDA's cron scaler, with bounds).
    ``start``/``end``: both 5-field cron expressions (read in ``timezone``) or both ISO-8601
    instants (a one-off). ``min_replicas: 0, max_replicas: 0`` lands the service."""

    name: str = Field(description="DNS-1123 label, at most 30 characters: it names the slot's schedules")
    # Syntax only here (the zone matters once both edges are read, in _window).
    start: Annotated[str, AfterValidator(_clock.check_edge)] = Field(
        max_length=64, description="cron ('0 8 * * 1-5') or an ISO-8601 instant")
    end: Annotated[str, AfterValidator(_clock.check_edge)] = Field(
        max_length=64, description="cron or an ISO-8601 instant, of the same kind as start")
    timezone: Annotated[str, AfterValidator(_clock.check_zone)] = Field(
        default="UTC", max_length=64, description="IANA time zone for cron and naive instants")
    min_replicas: int = Field(ge=0, le=MAX_REPLICAS)
    max_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS,
                                     description="default: the spec's max_replicas (at least min_replicas)")

    @field_validator("name")
    @classmethod
    def _slot_name(cls, v: str) -> str:
        return _label(v, 30, "must be a DNS-1123 label of at most 30 characters")

    @model_validator(mode="after")
    def _window(self) -> TimeSlot:
        _clock.check_slot(self.start, self.end, self.timezone)
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


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
    cpu_limit: float | None = Field(default=None, ge=0.01, le=64, description="CPUs per pod (at least 0.01, as Docker)")
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
    time_slots: list[TimeSlot] = Field(default_factory=list, max_length=MAX_TIME_SLOTS,
                                       description="windows whose bounds replace min/max_replicas "
                                       "(README: Time slots)")
    secrets: list[SecretRef] = Field(default_factory=list, max_length=MAX_SECRETS,
                                     description="secrets each pod gets as a file (names, or {name, target}; "
                                     "README: Secrets)")

    @field_validator("secrets", mode="before")
    @classmethod
    def _secret_names(cls, v: Any) -> Any:
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

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
        _at_most(len(v), MAX_ENV_ENTRIES, "variables")
        for key, value in v.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if "\0" in value:
                raise ValueError(f"{key}: a value may not contain a NUL byte")
        _at_most(sum(len(k.encode()) + len(val.encode()) + 2 for k, val in v.items()), MAX_ENV_BYTES, "bytes in all")
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
        _at_most(sum(len(arg.encode()) + 1 for arg in v), MAX_COMMAND_BYTES, "bytes in all")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector_bounded(cls, v: dict[str, str]) -> dict[str, str]:
        return _labels_bounded(v)

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
        # Without time slots (secrets), the digest is the one specs had before slots (secrets) existed.
        absent = {field for field in ("time_slots", "secrets") if not getattr(self, field)}
        dump = self.model_dump(mode="json", exclude=absent or None)
        blob = json.dumps(dump, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def pod_template(self) -> dict[str, Any]:
        """The fields that shape a pod: a change to any of them needs new pods (a rolling update);
        any other change (replica bounds, targets, intervals) applies in place."""
        return self.model_dump(include=POD_TEMPLATE_FIELDS | ({"secrets"} if self.secrets else set()))

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServiceSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        names = [slot.name for slot in self.time_slots]
        if len(set(names)) != len(names):
            raise ValueError(f"time_slots: each slot needs its own name (got {', '.join(names)})")
        files = [ref.file for ref in self.secrets]
        if len(set(files)) != len(files):
            raise ValueError(f"secrets: each needs its own file (target) (got {', '.join(files)})")
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
    address: str = LOOPBACK  # where its pods are reached: they publish or bind here, endpoints name it
    log_port: int = Field(default=0, ge=0, le=65535)  # its worker's log stream on ``address`` (0: none)

    @field_validator("name")
    @classmethod
    def _node_name(cls, v: str) -> str:
        return _label(v, 63, "node name must be a DNS-1123 label")

    @field_validator("labels")
    @classmethod
    def _node_labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _labels_bounded(v)  # as a service's node_selector: they are matched against it

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)


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
    key_id: str = ""  # the enrolled key it registered with (another key is refused while Ready)
    last_proof_at: float = 0.0  # its last signed statement's time: a replayed one is older
    removed: bool = False  # `hms node remove`: its certificate is revoked, its pods replaced
    pods_kept: bool = False  # Lost with every node at once: nothing was replaced, a heartbeat brings it back


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
    # The node's signature over this report (hms_mgmt.nodeid), checked before it changes anything;
    # empty once the service has checked it.
    report: str = Field(default="", max_length=4096)


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


WaitKind = Literal["approval", "image_signature", "capacity", "heal", "time_slot", "drain"]


class WaitingFor(_Model):
    """What a service waits for now and what ends the wait (``status().waiting_for``): the CLI,
    the dashboard and scripts show it so that no wait is silent."""

    kind: WaitKind
    reason: str
    since: datetime | None = None
    until: datetime | None = None  # the wait's deadline, when it has one
    command: str = ""  # what ends it from a shell, e.g. ``hms image sign IMAGE``


class Failure(_Model):
    """Why a service ended or stopped making progress, typed: the client maps ``kind`` to an
    exception class in one place (``hms_mgmt.errors.error_for``)."""

    kind: FailureKind
    message: str


class ActiveSlot(_Model):
    """The time slot whose bounds apply now (``status().active_slot``)."""

    name: str
    min_replicas: int
    max_replicas: int
    started_at: datetime | None = None
    ends_at: datetime | None = None  # its next end edge
    landed: bool = False  # 0/0: every pod stopped until ends_at


class SlotClock(_Model):
    """One time slot as ``orchestrator.time_slots`` and ``hms schedule list`` show it."""

    service: str
    name: str
    start: str
    end: str
    timezone: str
    min_replicas: int
    max_replicas: int
    active: bool = False  # its bounds apply now
    on: bool = False  # started and not ended (an overlapping slot may win)
    next_start: datetime | None = None
    next_end: datetime | None = None
    schedules: dict[str, str] = Field(default_factory=dict)  # edge -> Temporal Schedule id
    paused: list[str] = Field(default_factory=list)  # edges whose schedule is paused


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
    waiting_for: WaitingFor | None = None
    active_slot: ActiveSlot | None = None


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


class UpdateOutcome(_Model):
    """What ``update_spec``/``rollback`` did: a new revision is rolling out (wait for it with
    the ``admission`` update, ``until="revision"``), or the change applied in place."""

    revision: int | None = None
    in_place: bool = False
    status: ServiceStatus



# --- a dry run's verdict (``deploy(spec, dry_run=True)``, ``hms deploy FILE --dry-run``) --------------


class DryRunCheck(_Model):
    """One admission check of a dry run, in the order a deploy makes them."""

    name: Literal["access", "approval", "secrets", "image", "placement", "change"]
    ok: bool
    detail: str = ""
    kind: FailureKind | None = None  # failing: the failure a deploy would meet


class NodePlan(_Model):
    """Where the Scheduler would put new pods on one Ready node, and the room left after them."""

    node: str
    pods: int = 0  # new pods placed here
    pods_left: int  # pod slots left after placing them
    cpu_left: float
    memory_left_mb: int


class FieldChange(_Model):
    field: str
    old: Any = None
    new: Any = None


class RolloutRound(_Model):
    """One round of a rolling update: old pods drained and stopped, new pods started."""

    retire: int
    start: int


class RolloutPlan(_Model):
    """How a rolling update would replace the running pods: ``max_surge`` and
    ``max_unavailable`` as pod counts, and its rounds if every new pod comes up."""

    replicas: int
    surge: int
    unavailable: int
    rounds: list[RolloutRound] = Field(default_factory=list)


class SpecChange(_Model):
    """What a deploy of this spec would change on the running service."""

    from_revision: int
    phase: Phase
    changes: list[FieldChange] = Field(default_factory=list)
    no_op: bool = False  # the same spec already runs (or is rolling out): a deploy changes nothing
    in_place: bool = False  # no pod field changed: applied without new pods
    rollout: RolloutPlan | None = None


class SlotEdges(_Model):
    """A time slot of the spec and its next edges (UTC)."""

    name: str
    on: bool = False  # started and not ended now
    next_start: datetime | None = None
    next_end: datetime | None = None


class DryRunVerdict(_Model):
    """What ``deploy`` would do with this spec, decided by the control plane with the same
    checks a deploy makes, and nothing started: admitted (maybe after an approval) or refused
    with a typed ``failure``."""

    service: str
    admitted: bool = False
    failure: Failure | None = None
    user: str | None = None
    role: str | None = None
    needs_approval: bool = False
    approval_reasons: list[str] = Field(default_factory=list)
    image: str = ""
    image_id: str = ""  # the content every pod of the revision would start from
    replicas: int = 0  # new pods to place now (a rolling update: its first round)
    unplaced: int = 0  # of those, pods no node has room for
    placement: list[NodePlan] = Field(default_factory=list)
    pod_nodes: list[str | None] = Field(default_factory=list)  # each new pod's node, as pick_node places them
    change: SpecChange | None = None  # a running service: what would change
    time_slots: list[SlotEdges] = Field(default_factory=list)
    checks: list[DryRunCheck] = Field(default_factory=list)

    def error(self) -> Exception | None:
        """The exception a deploy of this spec would raise (None when it would be admitted)."""
        from hms_mgmt.errors import error_for

        return None if self.failure is None else error_for(self.failure.kind, self.failure.message)

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

    # A DNS label, as ServiceSpec.name: it names the router's file for the table and its routes.
    service: str = Field(max_length=63, pattern=_DNS_LABEL.pattern)
    version: int = 0
    endpoints: list[Endpoint] = Field(default_factory=list)
    stopped: bool = False  # the service is gone: a router forgets it
    landed_until: datetime | None = None  # landed by a time slot: routers answer 503, Retry-After this

    def same_pods(self, other: EndpointSet | None) -> bool:
        """Equal but for the version: publishing it again would change nothing."""
        return (other is not None and other.service == self.service and other.stopped == self.stopped
                and other.endpoints == self.endpoints and other.landed_until == self.landed_until)


# --- compatibility: the wire types, importable from here as before ---------------------------
# hms_mgmt.wire builds on the types above, so it is imported after them; a module-level
# __getattr__ answers for its names, whichever of the two modules is imported first.
import hms_mgmt.wire as _wire  # noqa: E402

if TYPE_CHECKING:
    from hms_mgmt.wire import (  # noqa: F401
        AdmissionRequest,
        AuthorizeInput,
        AuthorizeOutput,
        DeployInput,
        DeployOutput,
        DrainInput,
        DrainResult,
        EventInput,
        FailedPod,
        GovernanceInput,
        GovernanceOutput,
        HealAttempt,
        HealInput,
        HealOutput,
        ListPodsInput,
        ListPodsOutput,
        LogsOutput,
        NodeLost,
        NodeRegistration,
        NodeRegistryInput,
        NodesOutput,
        PickNodeInput,
        PickNodeOutput,
        Placement,
        PodFailure,
        PodLogsInput,
        PodProgress,
        PublishResult,
        RegisterResult,
        ScaleInput,
        ScaleOutput,
        ScaleRequest,
        ServiceInput,
        ServiceState,
        SpecUpdate,
        StartPodInput,
        StopPodInput,
        TicketInput,
        TicketOutput,
        UndeployRequest,
        VerifyImageInput,
        VerifyImageOutput,
        WatchCpuInput,
        WatchHeartbeat,
        WatchInput,
        WatchResult,
    )


def __getattr__(name: str) -> Any:
    if name in _wire.__all__:
        return getattr(_wire, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
