"""Seeing the clock: each time slot of a service with its next start and end, read from its
Temporal Schedules (what will really fire, paused or not) and, where a schedule is missing, from
the spec itself. Used by ``orchestrator.time_slots`` and ``hms schedule list``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from temporalio.client import Client, ScheduleDescription
from temporalio.service import RPCError, RPCStatusCode

from hms_mgmt import names
from hms_mgmt.models import ServiceStatus, SlotClock, TimeSlot
from hms_mgmt.policy import slots as clock


async def _describe(client: Client, schedule_id: str) -> ScheduleDescription | None:
    try:
        return await client.get_schedule_handle(schedule_id).describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def slot_clock(client: Client, status: ServiceStatus, slot: TimeSlot, *,
                     now: datetime | None = None) -> SlotClock:
    now = now or datetime.now(UTC)
    next_start, next_end = clock.next_edges(slot, now)
    low, high = clock.slot_bounds(slot, status.spec.max_replicas)
    view = SlotClock(service=status.name, name=slot.name, start=slot.start, end=slot.end, timezone=slot.timezone,
                     min_replicas=low, max_replicas=high, next_start=next_start, next_end=next_end,
                     on=clock.is_on(slot, now),
                     active=status.active_slot is not None and status.active_slot.name == slot.name)
    edges = {edge: names.slot_schedule_id(status.workflow_id, slot.name, edge) for edge in clock.EDGES}
    described = await asyncio.gather(*(_describe(client, sid) for sid in edges.values()))
    for (edge, sid), desc in zip(edges.items(), described, strict=True):
        if desc is None:
            continue
        view.schedules[edge] = sid
        if desc.schedule.state.paused:
            view.paused.append(edge)
        fires = desc.info.next_action_times
        nxt = fires[0].astimezone(UTC) if fires and not desc.schedule.state.paused else None
        view = view.model_copy(update={f"next_{edge}": nxt})
    return view


async def service_clock(client: Client, status: ServiceStatus) -> list[SlotClock]:
    now = datetime.now(UTC)
    return list(await asyncio.gather(*(slot_clock(client, status, s, now=now) for s in status.spec.time_slots)))
