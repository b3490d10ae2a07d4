"""The whole fleet's status in one round: one visibility list, then the status queries run
concurrently with a bound. Shared by the dashboard and the worker's Prometheus metrics, so 50
services cost one refresh per interval however many viewers or scrapers there are."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError

from hms_mgmt import names
from hms_mgmt.errors import ServiceNotFound
from hms_mgmt.models import ServiceStatus
from hms_mgmt.orchestrator import Orchestrator

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16


async def service_names(orch: Orchestrator) -> list[str]:
    """Running services on this control task queue (one visibility call)."""
    query = names.running_services_query(orch.settings.task_queue)
    return sorted({names.service_of(wf.id) async for wf in orch.client.list_workflows(query)})


async def fleet_status(
    orch: Orchestrator, *, concurrency: int = DEFAULT_CONCURRENCY, live: bool = True
) -> list[ServiceStatus]:
    """Every running service's status, sorted by name. A service that cannot answer right now
    (ending, its worker busy) is left out of this round rather than failing the whole fleet."""
    names = await service_names(orch)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(name: str) -> ServiceStatus | None:
        async with gate:
            try:
                return await orch.read_status(name, live=live)
            except (ServiceNotFound, RPCError, WorkflowQueryFailedError) as e:
                log.debug("status of %s unavailable: %s", name, e)
                return None

    results = await asyncio.gather(*(one(n) for n in names))
    return [s for s in results if s is not None]
