"""Where pods' logs are streamed from (task queue ``hms-control``): ``locate_log_endpoints``
answers, for pods of one service, each one's node and that node's log endpoint, read from the
service's own workflow and the NodeRegistry (never from the caller). It reads no log line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from temporalio import activity
from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from hms_mgmt import names
from hms_mgmt.addresses import host_port
from hms_mgmt.config import Settings
from hms_mgmt.errors import FailureKind
from hms_mgmt.models import ServiceStatus
from hms_mgmt.nodes import registry_nodes
from hms_mgmt.wire import LogEndpoint, LogEndpoints, LogGrantInput


class LogActivities:
    def __init__(self, client: Client, settings: Callable[[], Settings]) -> None:
        self.client = client
        self.settings = settings

    @activity.defn(name="locate_log_endpoints")
    async def locate_log_endpoints(self, inp: LogGrantInput) -> LogEndpoints:
        try:
            status = await self.client.get_workflow_handle(names.service_workflow_id(inp.service)).query(
                names.Q.STATUS, result_type=ServiceStatus)
        except (RPCError, WorkflowQueryFailedError) as e:
            raise ApplicationError(f"no service named {inp.service!r}: {e}", type=FailureKind.NOT_FOUND.value,
                                   non_retryable=True) from None
        where = {p.id: p.node for p in status.pods}
        missing = [p for p in inp.pods if p not in where]
        if missing:
            raise ApplicationError(f"service {inp.service} has no pod {', '.join(missing)}",
                                   type=FailureKind.NOT_FOUND.value, non_retryable=True)
        settings = await asyncio.to_thread(self.settings)
        nodes = {r.spec.name: r.spec for r in await registry_nodes(self.client, settings) or []}
        out = []
        for pod in inp.pods:
            spec = nodes.get(where[pod])
            url = f"http://{host_port(spec.address, spec.log_port)}" if spec is not None and spec.log_port else ""
            out.append(LogEndpoint(pod=pod, node=where[pod], url=url))
        return LogEndpoints(endpoints=out)
