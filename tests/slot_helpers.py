"""What the time-slot tests share: one-off slots a few seconds ahead, the events they wait for,
and the service's Temporal Schedules as the server holds them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from hms_mgmt import names
from hms_mgmt.events import read_events


def instant(seconds: float) -> str:
    """An ISO-8601 instant ``seconds`` from now, whole seconds (a schedule fires on the second)."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0).isoformat()


def one_off(name: str, start_in: float, end_in: float, low: int, high: int | None) -> dict[str, object]:
    return {"name": name, "start": instant(start_in), "end": instant(end_in), "min_replicas": low,
            "max_replicas": high}


def events(settings, type_: str) -> list:
    return [e for e in read_events(settings.state_dir) if e.type == type_]


async def schedules(client: Client, service: str) -> list[str]:
    """The service's slot schedules that exist now (described one by one: the list is eventual)."""
    prefix = names.slot_schedule_prefix(names.service_workflow_id(service))
    listed = {s.id async for s in await client.list_schedules() if s.id.startswith(prefix)}
    alive = []
    for sid in sorted(listed | {f"{prefix}{slot}-{edge}" for slot in ("quiet", "rush")
                                for edge in ("start", "end")}):
        try:
            await client.get_schedule_handle(sid).describe()
            alive.append(sid)
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
    return alive


async def no_schedules(client: Client, service: str, timeout: float = 10.0) -> None:
    """Until the service has no slot schedule (a deleted schedule may answer a describe briefly)."""
    from conftest import eventually

    await eventually(lambda: _none(client, service), timeout=timeout, what=f"no schedule of {service}")


async def _none(client: Client, service: str) -> bool:
    return not await schedules(client, service)
