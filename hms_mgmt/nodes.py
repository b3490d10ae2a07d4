"""The nodes as an operator sees them (``hms nodes``): the registry's records joined with
what the services run on each node."""

from __future__ import annotations

import builtins
import logging
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from hms_mgmt import constants, names
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.models import NodeRecord, NodeSpec, ServiceStatus
from hms_mgmt.wire import NodesOutput, RouterRecord, RoutersOutput

log = logging.getLogger("hms.nodes")


class NodeView(BaseModel):
    """One node: capacity, use (pods of every service placed there) and state."""

    spec: NodeSpec
    state: str  # Ready | Lost | Removed (`hms node remove`) | Configured (no registry yet)
    last_heartbeat: datetime | None = None
    pods: int = 0
    cpu_used: float = 0.0
    memory_used_mb: int = 0
    services: dict[str, int] = Field(default_factory=dict)


class NotOurRegistry(AccessDenied):
    """The run under a registry's id is not this control plane's (another type, another queue)."""


async def own_run(client: Client, workflow_id: str, workflow_type: str, control_queue: str) -> WorkflowExecutionDescription:
    """This control plane's own registry run, described: the latest run under ``workflow_id``
    must be ``workflow_type`` on ``control_queue``. Anyone who reaches Temporal can start a run
    with that id on a queue of their own, whose worker would answer; that run raises
    ``NotOurRegistry`` (``RPCError`` NOT_FOUND: none ever ran)."""
    desc = await client.get_workflow_handle(workflow_id).describe()
    if desc.workflow_type != workflow_type or desc.task_queue != control_queue:
        raise NotOurRegistry(f"{workflow_id} is a {desc.workflow_type} on task queue {desc.task_queue}, "
                             f"not this control plane's registry (queue {control_queue}): not believed")
    return desc


async def own_registry(client: Client, workflow_id: str, workflow_type: str, control_queue: str) -> WorkflowHandle:
    """The handle of this control plane's own registry run (:func:`own_run`), to query or update."""
    desc = await own_run(client, workflow_id, workflow_type, control_queue)
    return client.get_workflow_handle(workflow_id, run_id=desc.run_id)


async def node_registry(client: Client, settings: Settings) -> WorkflowHandle:
    return await own_registry(client, constants.node_registry_id(settings.task_queue), names.NODE_REGISTRY_WORKFLOW,
                              settings.task_queue)


async def ready_nodes(client: Client, settings: Settings) -> builtins.list[NodeSpec] | None:
    """The registry's Ready nodes, None when no registry of this control plane runs. Read from
    the memo its run keeps them in, with the one describe that checks the run is ours: no query
    for the control worker to answer on a deploy's path. A run from before the memo is queried.
    Raises ``NotOurRegistry`` and ``RPCError`` (NOT_FOUND: none runs) as :func:`own_run` does."""
    wf_id = constants.node_registry_id(settings.task_queue)
    desc = await own_run(client, wf_id, names.NODE_REGISTRY_WORKFLOW, settings.task_queue)
    kept = await desc.memo_value(names.NR.READY_MEMO, None, type_hint=builtins.list[NodeSpec])
    if kept is not None:
        return kept
    try:
        out = await client.get_workflow_handle(wf_id, run_id=desc.run_id).query(names.NR.NODES, result_type=NodesOutput)
    except WorkflowQueryFailedError:
        return None
    return [r.spec for r in out.nodes if r.state == "Ready"]


async def registry_nodes(client: Client, settings: Settings) -> builtins.list[NodeRecord] | None:
    """The registry's records, or None when no registry of this control plane runs (none, or
    an impostor: ``NotOurRegistry`` is logged)."""
    try:
        handle = await node_registry(client, settings)
        return (await handle.query(names.NR.NODES, result_type=NodesOutput)).nodes
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    except NotOurRegistry as e:
        log.warning("%s", e)
        return None
    except WorkflowQueryFailedError:
        return None


async def list_routers(client: Client, settings: Settings) -> builtins.list[RouterRecord]:
    """The RouterRegistry's records (none when no router ever registered, or an impostor runs)."""
    try:
        handle = await own_registry(client, constants.router_registry_id(settings.task_queue),
                                    names.ROUTER_REGISTRY_WORKFLOW, settings.task_queue)
        return (await handle.query(names.RR.ROUTERS, result_type=RoutersOutput)).routers
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return []
        raise
    except NotOurRegistry as e:
        log.warning("%s", e)
        return []
    except WorkflowQueryFailedError:
        return []


async def service_statuses(client: Client, task_queue: str) -> builtins.list[ServiceStatus]:
    out = []
    async for wf in client.list_workflows(names.running_services_query(task_queue)):
        try:
            out.append(await client.get_workflow_handle(wf.id).query(names.Q.STATUS, result_type=ServiceStatus))
        except (RPCError, WorkflowQueryFailedError):
            continue
    return out


async def list_nodes(client: Client, settings: Settings) -> builtins.list[NodeView]:
    records = await registry_nodes(client, settings)
    views: dict[str, NodeView] = {}
    if records is None:
        for spec in settings.node_specs():
            views[spec.name] = NodeView(spec=spec, state="Configured")
    else:
        for rec in records:
            views[rec.spec.name] = NodeView(spec=rec.spec, state="Removed" if rec.removed else rec.state,
                                            last_heartbeat=rec.last_heartbeat)
    for st in await service_statuses(client, settings.task_queue):
        for pod in st.pods:
            if pod.health == "exited":
                continue
            view = views.get(pod.node)
            if view is None:  # pods on a node the registry no longer lists
                view = views[pod.node] = NodeView(
                    spec=NodeSpec(name=pod.node, task_queue=settings.node_task_queue(pod.node), cpu=1, memory_mb=1),
                    state="Unknown",
                )
            view.pods += 1
            view.cpu_used += st.spec.cpu_limit or 0.0
            view.memory_used_mb += st.spec.memory_mb or 0
            view.services[st.name] = view.services.get(st.name, 0) + 1
    return sorted(views.values(), key=lambda v: v.spec.name)


def as_rows(views: builtins.list[NodeView]) -> builtins.list[dict[str, Any]]:
    """Plain rows for tables and ``--json``."""
    return [v.model_dump(mode="json") for v in views]
