"""``hms schedule list [NAME]``: the tower's clock — each time slot's next start and end, as its
Temporal Schedules will fire them (wired into the app by ``commands.py``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hms_mgmt.cli.common import _cli_errors, _connect, _run
from hms_mgmt.cli.render import _when, out, shown
from hms_mgmt.models import SlotClock

schedule_app = typer.Typer(help="Time slots and their Temporal Schedules.", no_args_is_help=True,
                           rich_markup_mode=None)


def _table(rows: list[SlotClock]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("SERVICE", "SLOT", "BOUNDS", "STATE", "NEXT START", "NEXT END", "START / END (TZ)", "SCHEDULES"):
        table.add_column(col)
    for c in rows:
        state = "active" if c.active else "on" if c.on else "off"
        if c.paused:
            state += f" (paused: {', '.join(c.paused)})"
        table.add_row(c.service, c.name, f"{c.min_replicas}/{c.max_replicas}" + (" landed" if c.max_replicas == 0 else ""),
                      shown(state), _when(c.next_start), _when(c.next_end), shown(f"{c.start} / {c.end} ({c.timezone})"),
                      shown(_ids(c)))
    return table


def _ids(c: SlotClock) -> str:
    """``svc-NAME-slot-SLOT-{start,end}``: the schedules that exist, in one short cell."""
    if not c.schedules:
        return "-"
    stem = next(iter(c.schedules.values())).rsplit("-", 1)[0]
    return f"{stem}-{{{','.join(c.schedules)}}}" if len(c.schedules) > 1 else next(iter(c.schedules.values()))


@schedule_app.command("list")
@_cli_errors
def schedule_list(name: Annotated[str | None, typer.Argument(help="A service; without it, every service.")] = None
                  ) -> None:
    """Each time slot with its next start and end (local time), and its Temporal Schedules."""

    async def go() -> None:
        orch = await _connect()
        services = [name] if name else [s.name for s in await orch.list() if s.spec.time_slots]
        rows = [c for svc in services for c in await orch.time_slots(svc)]
        if not rows:
            out.print("no time slots" + (f" in {name}" if name else ""))
            return
        out.print(_table(rows))

    _run(go())
