"""Control-plane activities (task queue ``hms-control``): scheduling and events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from hms_mgmt import auth, constants
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied, HmsError
from hms_mgmt.events import Event, EventSink
from hms_mgmt.governance_config import load_governance_policy
from hms_mgmt.models import (
    AuthorizeInput,
    AuthorizeOutput,
    EventInput,
    GovernanceInput,
    GovernanceOutput,
    PickNodeInput,
    PickNodeOutput,
    ServiceStatus,
)
from hms_mgmt.policy.governance import evaluate
from hms_mgmt.policy.scheduler import NodeUsage, PlacementRequest, pick_nodes

log = logging.getLogger(__name__)


class ControlActivities:
    def __init__(self, client: Client, settings: Callable[[], Settings], sink: EventSink) -> None:
        self.client = client
        self.settings = settings  # re-read on each call: an operator adds nodes without a restart
        self.sink = sink

    async def _other_services(self, exclude: str, task_queue: str) -> list[ServiceStatus]:
        query = f'WorkflowType = "ServiceWorkflow" AND ExecutionStatus = "Running" AND TaskQueue = "{task_queue}"'
        statuses = []
        async for wf in self.client.list_workflows(query):
            if wf.id == constants.service_workflow_id(exclude):
                continue
            try:
                statuses.append(await self.client.get_workflow_handle(wf.id).query("status", result_type=ServiceStatus))
            except Exception as e:  # noqa: BLE001 - a service that cannot answer holds no capacity we know of
                log.warning("could not read pods of %s: %s", wf.id, e)
        return statuses

    @activity.defn(name="pick_node")
    async def pick_node(self, inp: PickNodeInput) -> PickNodeOutput:
        """The Scheduler: place ``count`` pods, spreading across nodes, then packing."""
        settings = await asyncio.to_thread(self.settings)
        nodes = inp.nodes or settings.node_specs()
        usage = {n.name: NodeUsage(name=n.name, cpu=n.cpu, memory_mb=n.memory_mb, max_pods=n.max_pods) for n in nodes}

        def account(pods, own: bool) -> None:
            for pod in pods:
                u = usage.get(pod.node)
                if u is None or pod.health == "exited":
                    continue
                u.used_pods += 1
                u.used_cpu += spec_cpu
                u.used_memory_mb += spec_mem
                if own:
                    u.service_pods += 1

        spec_cpu, spec_mem = inp.spec.cpu_limit or 0.0, inp.spec.memory_mb or 0
        account(inp.placed, own=True)
        for other in await self._other_services(inp.service, settings.task_queue):
            spec_cpu, spec_mem = other.spec.cpu_limit or 0.0, other.spec.memory_mb or 0
            account(other.pods, own=False)
        request = PlacementRequest(cpu=inp.spec.cpu_limit or 0.0, memory_mb=inp.spec.memory_mb or 0)
        picked = pick_nodes(list(usage.values()), request, inp.count)
        by_name = {n.name: n for n in nodes}
        result = PickNodeOutput(nodes=[by_name[p] if p else None for p in picked])
        missing = sum(1 for p in picked if p is None)
        if missing and inp.require_all:
            info = activity.info()
            reason = (
                f"no node has room for {missing} more pod(s) of {inp.service} "
                f"(cpu {request.cpu:g}, memory {request.memory_mb} MB each); "
                + "; ".join(f"{u.name}: {u.used_pods}/{u.max_pods} pods, cpu {u.used_cpu:g}/{u.cpu:g}" for u in usage.values())
            )
            if info.attempt == 1 or info.attempt % 20 == 0:
                await self.sink.publish(Event(type="capacity.alert", service=inp.service, reason=reason,
                                              data={"missing": missing, "attempt": info.attempt}))
            raise ApplicationError(reason, type="CapacityUnavailable")
        return result

    @activity.defn(name="authorize")
    async def authorize(self, inp: AuthorizeInput) -> AuthorizeOutput:
        """Verify the caller's token and role in the worker (a client check alone can be
        skipped). A refusal is an answer, not an error, and an ``access.denied`` event."""
        settings = await asyncio.to_thread(self.settings)
        try:
            identity = await asyncio.to_thread(auth.verify_token, inp.token or None, state_dir=settings.state_dir)
            matrix = await asyncio.to_thread(auth.load_access_matrix, settings.state_dir)
            if inp.action == "approve" and inp.requester is not None:
                auth.check_approver(identity, inp.requester, matrix)
            else:
                auth.authorize(identity, inp.action, matrix)
        except (AccessDenied, HmsError) as e:
            reason = str(e)
            type_ = "approval.invalid" if inp.action in ("approve", "reject") else "access.denied"
            await self.sink.publish(Event(type=type_, service=inp.service, reason=f"{inp.action} refused: {reason}",
                                          data={"action": inp.action, "request_id": inp.request_id}))
            return AuthorizeOutput(allowed=False, reason=reason)
        return AuthorizeOutput(allowed=True, user=identity.user, role=identity.role)

    @activity.defn(name="check_governance")
    async def check_governance(self, inp: GovernanceInput) -> GovernanceOutput:
        settings = await asyncio.to_thread(self.settings)
        policy = await asyncio.to_thread(load_governance_policy, settings.state_dir)
        verdict = evaluate(inp.spec, policy)
        return GovernanceOutput(
            needs_approval=verdict.needs_approval,
            reasons=verdict.reasons,
            approval_timeout_s=min(policy.approval_timeout_s, inp.spec.approval_timeout_s),
        )

    @activity.defn(name="emit_event")
    async def emit_event(self, inp: EventInput) -> None:
        await self.sink.publish(Event(type=inp.type, service=inp.service, reason=inp.reason, data=inp.data))
