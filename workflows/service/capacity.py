"""The capacity wait (``status().waiting_for`` kind ``capacity``): a placement of this service's
(a rollout, a scaling action, a heal: child workflows) waits for room inside the Scheduler's
retries, which the service does not see. The Scheduler hints ``capacity_changed`` when one
starts or stops waiting; the service then asks the control worker which of its placements wait
now, and what each needs. The hint itself is believed for nothing (anyone can send it)."""

from __future__ import annotations

import asyncio

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from hms_mgmt.wire import CapacityWaitsInput

from workflows.service.state import CONTROL_TIMEOUT, ServiceRun

CAPACITY_WAIT = "capacity-wait"  # patch: a capacity_changed hint re-reads the waits (an activity)


class CapacityWaits:
    def __init__(self, run: ServiceRun) -> None:
        self.run = run
        self.lock = asyncio.Lock()  # one read at a time: the last hint's read is the last word

    async def hinted(self) -> None:
        if not workflow.patched(CAPACITY_WAIT):
            return  # a history from before this handler ran: the hint was never read there
        run = self.run
        async with self.lock:
            out = await workflow.execute_activity_method(
                ControlActivities.capacity_waits,
                CapacityWaitsInput(service=run.spec.name),
                task_queue=run.placement.control_task_queue,
                start_to_close_timeout=CONTROL_TIMEOUT,
                summary="which placements wait for room?",
            )
            run.capacity = out.waits
