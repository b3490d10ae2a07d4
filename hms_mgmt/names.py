"""The one module of names: workflow types, message (handler) names, child workflow ids, phase
groups and the visibility queries. The client, the worker, the workflows, the router, the
dashboard, bench and tests all import these; none of them spells a name or an id by hand.

Changing a value here changes what running workflows answer to: a handler name or an id
format is part of the wire protocol (recorded histories replay against it).
"""

from __future__ import annotations

from hms_mgmt.constants import SERVICE_WORKFLOW_ID_PREFIX, service_workflow_id

__all__ = [
    "Q", "U", "S", "NR", "SERVICE_WORKFLOW", "DEPLOY_WORKFLOW", "SCALE_WORKFLOW", "HEAL_WORKFLOW", "NODE_REGISTRY_WORKFLOW", "ROUTER_REGISTRY_WORKFLOW", "RR",
    "service_workflow_id", "deploy_id", "rollout_id", "scale_id", "heal_id", "service_of",
    "running_services_query", "SUPERVISED", "ENDED", "SERVING", "ADMITTING",
    "SLOT_EDGE_WORKFLOW", "POD_LOGS_WORKFLOW", "LOG_GRANT_WORKFLOW", "logs_id", "slot_schedule_id", "slot_schedule_prefix",
]

# --- workflow types ----------------------------------------------------------------------------
SERVICE_WORKFLOW = "ServiceWorkflow"
DEPLOY_WORKFLOW = "DeployWorkflow"
SCALE_WORKFLOW = "ScaleWorkflow"
HEAL_WORKFLOW = "HealWorkflow"
NODE_REGISTRY_WORKFLOW = "NodeRegistry"
ROUTER_REGISTRY_WORKFLOW = "RouterRegistry"
SLOT_EDGE_WORKFLOW = "SlotEdgeWorkflow"  # started by a time slot's Temporal Schedule
POD_LOGS_WORKFLOW = "PodLogsWorkflow"  # a snapshot of a pod's log, read through its node
LOG_GRANT_WORKFLOW = "PodLogGrantWorkflow"  # a signed grant to stream pods' logs from their nodes


class Q:
    """Queries of ServiceWorkflow (and ``progress``, of its DeployWorkflow and ScaleWorkflow children)."""

    STATUS = "status"
    ENDPOINTS = "endpoints"
    PROGRESS = "progress"  # DeployWorkflow, ScaleWorkflow: the pods brought up so far
    ATTEMPTS = "attempts"  # HealWorkflow: its replacements that failed (what heal_attempt_failed told)
    RETIRING = "retiring"  # a rolling DeployWorkflow: the old pods it drains (what pods_draining told)


class U:
    """Updates of ServiceWorkflow (a caller waits for the answer)."""

    ADMISSION = "admission"
    UNDEPLOY = "undeploy"
    APPROVE = "approve"
    REJECT = "reject"
    UPDATE_SPEC = "update_spec"
    ROLLBACK = "rollback"
    SCALE = "scale"


class S:
    """Signals: to ServiceWorkflow (approve/reject from people; the rest from its own children and
    the NodeRegistry, believed only after a check) and to its children."""

    APPROVE = "approve"
    REJECT = "reject"
    POD_REPORTED = "pod_reported"
    PODS_DRAINING = "pods_draining"
    HEAL_ATTEMPT_FAILED = "heal_attempt_failed"
    IMAGE_REVOKED = "image_revoked"
    NODE_LOST = "node_lost"
    SLOT_EDGE = "slot_edge"  # a time slot's schedule -> ServiceWorkflow (checked against a standing grant)
    CAPACITY = "capacity_changed"  # the Scheduler -> ServiceWorkflow: a hint to re-read its capacity waits
    SUPERSEDE = "supersede"  # ServiceWorkflow -> its rolling DeployWorkflow


class NR:
    """Messages of the NodeRegistry: the ``nodes`` query, the ``join`` signal (answered by the
    ``joined`` query) and the ``heartbeat`` signal (a node's worker sends both, signed), ``enrol``
    and ``remove``; the ``register`` update of older workers."""

    NODES = "nodes"
    REGISTER = "register"  # the update workers before the ``join`` signal sent (kept for them)
    JOIN = "join"  # a worker (re)joins: the signed registration, answered by the ``joined`` query
    JOINED = "joined"
    HEARTBEAT = "heartbeat"
    ENROL = "enrol"  # `hms node join`: a joining host's signed request, answered with its certificate
    REMOVE = "remove"  # `hms node remove`: a hint; the registry checks the revocation itself
    DRY_RUN = "dry_run"  # `hms deploy --dry-run`: admission's checks on the control worker, nothing started
    READY_MEMO = "ready"  # the run's memo: its Ready nodes' specs, read with the describe that checks the run


class RR:
    """Messages of the RouterRegistry: the ``routers`` query, the ``join`` signal (answered by
    ``joined``) and the ``heartbeat`` signal (a router sends both, signed with its key), ``enrol``
    (`hms router join`); the ``register`` update of older routers."""

    ROUTERS = "routers"
    REGISTER = "register"  # as for nodes: kept for routers that still send the update
    JOIN = "join"
    JOINED = "joined"
    HEARTBEAT = "heartbeat"
    ENROL = "enrol"


# --- child workflow ids ------------------------------------------------------------------------

def deploy_id(service_wf_id: str, revision: int) -> str:
    """The first rollout of a service: ``svc-<name>-deploy-<rev>``."""
    return f"{service_wf_id}-deploy-{revision}"


def rollout_id(service_wf_id: str, revision: int, *, rollback: bool, scale_count: int, decisions: int) -> str:
    """A rolling update (or its rollback) to ``revision``. Two counters make it unique: the
    same revision may be rolled to again after a rollback."""
    kind = "rollback" if rollback else "deploy"
    return f"{service_wf_id}-{kind}-{revision}-{scale_count}-{decisions}"


def scale_id(service_wf_id: str, n: int) -> str:
    """The n-th scaling action of a service: ``svc-<name>-scale-<n>``."""
    return f"{service_wf_id}-scale-{n}"


def heal_id(service_wf_id: str, pod_id: str) -> str:
    """The replacement of one failed pod: ``svc-<name>-heal-<pod>``."""
    return f"{service_wf_id}-heal-{pod_id}"


def logs_id(service_wf_id: str, nonce: str) -> str:
    """One logs request of a caller (a snapshot or a stream grant): ``svc-<name>-logs-<nonce>``."""
    return f"{service_wf_id}-logs-{nonce}"


def slot_schedule_prefix(service_wf_id: str) -> str:
    """Every time-slot schedule of a service starts with this: ``svc-<name>-slot-``."""
    return f"{service_wf_id}-slot-"


def slot_schedule_id(service_wf_id: str, slot: str, edge: str) -> str:
    """The Temporal Schedule of one edge of a time slot: ``svc-<name>-slot-<slot>-<start|end>``."""
    return f"{slot_schedule_prefix(service_wf_id)}{slot}-{edge}"


def service_of(workflow_id: str) -> str:
    """The service name in a ServiceWorkflow id (``svc-hms-ach`` -> ``hms-ach``)."""
    return workflow_id.removeprefix(SERVICE_WORKFLOW_ID_PREFIX)


# --- visibility --------------------------------------------------------------------------------

def running_services_query(task_queue: str) -> str:
    """Visibility query for the running ServiceWorkflows of one control plane (its task queue)."""
    return (f'WorkflowType = "{SERVICE_WORKFLOW}" AND ExecutionStatus = "Running" '
            f'AND TaskQueue = "{task_queue}"')


# --- phase groups ------------------------------------------------------------------------------
SUPERVISED = ("Running", "Scaling", "Healing", "Degraded")  # pods are watched, healed and scaled
SERVING = ("Running", "Scaling", "Healing")  # a deploy or update a caller waits for is done
ENDED = ("Rejected", "Failed", "Stopped")  # the run is over (or about to return)
ADMITTING = ("Validating", "VerifyingImage")  # admission not decided yet
