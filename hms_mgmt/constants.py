"""Names shared by the client, the worker and the workflows (one place, never repeated)."""

from __future__ import annotations

CONTROL_TASK_QUEUE = "hms-control"
NODE_TASK_QUEUE_PREFIX = "hms-node-"
SERVICE_WORKFLOW_ID_PREFIX = "svc-"
NODE_REGISTRY_ID = "hms-nodes"
ROUTER_REGISTRY_ID = "hms-routers"

LABEL_SERVICE = "hms.service"
LABEL_POD = "hms.pod"
LABEL_REVISION = "hms.revision"
LABEL_IMAGE = "hms.image"  # the reference the spec names (the container runs its pinned id)
LABEL_NODE = "hms.node"
LABEL_MANAGED = "hms.managed"

SEARCH_ATTR_SERVICE = "HmsService"
SEARCH_ATTR_PHASE = "HmsPhase"

DEFAULT_TEMPORAL_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
DEFAULT_UI_PORT = 8233
DEFAULT_ROUTER_PORT = 8000
DEFAULT_DASHBOARD_PORT = 8088


def service_workflow_id(name: str) -> str:
    return f"{SERVICE_WORKFLOW_ID_PREFIX}{name}"


def node_task_queue(node: str, prefix: str = NODE_TASK_QUEUE_PREFIX) -> str:
    return f"{prefix}{node}"


def node_registry_id(control_task_queue: str = CONTROL_TASK_QUEUE) -> str:
    """``hms-nodes`` for the default control plane; one registry per control queue otherwise,
    so control planes sharing a Temporal namespace (tests, staging) keep their own nodes."""
    if control_task_queue == CONTROL_TASK_QUEUE:
        return NODE_REGISTRY_ID
    return f"{NODE_REGISTRY_ID}-{control_task_queue}"


def router_registry_id(control_task_queue: str = CONTROL_TASK_QUEUE) -> str:
    """``hms-routers`` (the RouterRegistry), one per control queue like the NodeRegistry."""
    if control_task_queue == CONTROL_TASK_QUEUE:
        return ROUTER_REGISTRY_ID
    return f"{ROUTER_REGISTRY_ID}-{control_task_queue}"
