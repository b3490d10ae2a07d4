"""What ``hms status`` and ``hms events`` show, once or watching: ``status --watch`` redraws on
every change (plain lines, or one JSON object a line, without a terminal); ``events --follow``
streams events as they are written (:func:`hms_mgmt.events.read_events`)."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hms_mgmt.cli.output import Format, show_item
from hms_mgmt.cli.progress import Lines, status_line, wait_text
from hms_mgmt.cli.render import _phase, _pods_table, _services_table, _short, _web_ui_url, _when, out, shown
from hms_mgmt.config import Settings
from hms_mgmt.events import Event
from hms_mgmt.models import ServiceStatus
from hms_mgmt.orchestrator import Orchestrator

WATCH_POLL_S = 1.0


# --- one service, or all, for people ------------------------------------------------------


def status_view(settings: Settings, statuses: list[ServiceStatus], name: str | None) -> RenderableType:
    """What ``hms status [NAME]`` draws: the services table, or one service in detail."""
    if name is None:
        return _services_table(settings, statuses) if statuses else Text(
            "no services (deploy one with `hms deploy FILE`)")
    st = statuses[0]
    parts: list[RenderableType] = [
        Text.assemble((st.name, "bold"), "  ", _phase(st.phase),
                      f"  revision {st.revision}  {st.ready_replicas}/{st.desired_replicas} ready  ", st.spec.image),
        Text.assemble(("Web UI ", "bold"), (shown(_web_ui_url(settings, st)), "cyan underline")),
    ]
    if st.message:  # a server's words (an approver's reason, a failure): shown, never obeyed
        parts.append(Text(shown(st.message), style="yellow"))
    if st.waiting_for is not None:
        parts.append(Text(wait_text(st.waiting_for), style="magenta"))
    parts.append(_pods_table([st]) if st.pods else Text("no pods"))
    if st.last_decisions:
        parts.append(_decisions_table(st))
    parts.extend(_approval_lines(st))
    return Group(*parts)


def _decisions_table(st: ServiceStatus) -> Table:
    table = Table(title="last decisions", title_justify="left")
    for col in ("at", "kind", "replicas", "pod", "reason"):
        table.add_column(col, no_wrap=col != "reason")
    for d in st.last_decisions:
        replicas = f"{d.from_replicas} -> {d.to_replicas}" if d.to_replicas is not None else "-"
        # Text cells, never markup, whatever console draws the view: a reason quotes a signal's words.
        table.add_row(_when(d.at), Text(shown(d.kind)), replicas, Text(shown(_short(d.pod))) if d.pod else "-",
                      Text(shown(d.reason)))
    return table


def _approval_lines(st: ServiceStatus) -> list[Text]:
    pa = st.pending_approval
    if pa is None:
        return []
    lines = [Text.assemble(("pending approval: ", "bold magenta"),
                           f"requested by {shown(pa.requested_by)} at {_when(pa.requested_at)}: {shown(pa.reason)}")]
    lines += [Text(f"  refused attempt: {shown(attempt)}", style="yellow") for attempt in pa.invalid_attempts]
    lines.append(Text(f"  decide with `hms approve {st.name}` or `hms reject {st.name}` (role gov_approver)"))
    return lines


# --- watching -----------------------------------------------------------------------------


async def fetch(orch: Orchestrator, name: str | None) -> list[ServiceStatus]:
    return await orch.list() if name is None else [await orch.status(name)]


def change_key(st: ServiceStatus) -> tuple[object, ...]:
    """What a watcher reports a change of: not every CPU sample, but phase, pods, waits, rollout."""
    pods = tuple(sorted((p.id, p.health, p.ready, p.node) for p in st.pods))
    return (st.phase, st.revision, st.desired_replicas, pods, st.waiting_for, st.message, st.rollout,
            st.pending_approval)


async def watch_status(orch: Orchestrator, name: str | None, fmt: Format, *, poll_s: float = WATCH_POLL_S) -> None:
    """Until Ctrl-C: a terminal redraws the view in place; otherwise each change is printed,
    as a plain line or (``-o json|yaml``) as the service's whole status."""
    if fmt is Format.table and sys.stdout.isatty():
        with Live(console=out, auto_refresh=False) as live:
            while True:
                live.update(status_view(orch.settings, await fetch(orch, name), name), refresh=True)
                await asyncio.sleep(poll_s)
    lines = Lines(heartbeat_s=float("inf"))
    seen: dict[str, tuple[object, ...]] = {}
    while True:
        statuses = await fetch(orch, name)
        for st in statuses:
            key = change_key(st)
            if seen.get(st.name) != key:
                seen[st.name] = key
                show_item(st, fmt, lambda st=st: lines.echo(status_line(st, datetime.now(UTC))))
        for gone in sorted(set(seen) - {st.name for st in statuses}):
            del seen[gone]
            if fmt is Format.table:
                lines.note(gone, "no longer running")
        await asyncio.sleep(poll_s)


# --- events -------------------------------------------------------------------------------


def event_line(ev: Event) -> str:
    return f"{_when(ev.time)}  {shown(ev.type):<20} {shown(ev.service):<14} {shown(ev.reason)}"
