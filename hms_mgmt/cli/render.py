"""How the CLI shows things: consoles, tables, progress bars, durations."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hms_mgmt.config import Settings
from hms_mgmt.logtext import shown
from hms_mgmt.models import ServiceStatus

T = TypeVar("T")


def _console(*, stderr: bool = False) -> Console:
    # Piped output (grep, CI logs, scripts) is never folded: a long line (a digest, a token) stays
    # one line whatever the width; tables get 160 columns rather than Rich's 80-column default.
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty()
    wide = piped and not os.environ.get("COLUMNS")
    # No markup: a string printed here may hold a service's message, a pod's label or a node's
    # reason, and '[link=...]' or a stray '[/]' in it must be shown, not obeyed (or crash).
    return Console(stderr=stderr, highlight=False, markup=False, width=160 if wide else None, soft_wrap=piped)


out = _console()
err = _console(stderr=True)


def _short(pod_id: str) -> str:
    return pod_id[:8]


def _when(dt: datetime | None) -> str:
    if dt is None:
        return "-"
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


_PHASE_STYLE = {
    "Running": "green",
    "Deploying": "yellow",
    "Scaling": "yellow",
    "Healing": "yellow",
    "Validating": "yellow",
    "VerifyingImage": "yellow",
    "AwaitingApproval": "magenta",
    "Degraded": "red",
    "Failed": "bold red",
    "Rejected": "bold red",
    "Undeploying": "dim",
    "Stopped": "dim",
}
_HEALTH_STYLE = {"healthy": "green", "starting": "yellow", "unhealthy": "red", "exited": "bold red"}


def _phase(phase: str) -> Text:
    return Text(phase, style=_PHASE_STYLE.get(phase, ""))


def _web_ui_url(settings: Settings, status: ServiceStatus) -> str:
    """The run's page in the Web UI this client is configured with (the run's own ``web_ui_url``
    is the placement its starter wrote: anyone who reaches Temporal can start one)."""
    return settings.web_ui_link(status.workflow_id)


def _pods_table(statuses: Iterable[ServiceStatus], *, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("service", "pod", "node", "endpoint", "health", "ready", "cpu %", "started"):
        table.add_column(col, no_wrap=True)
    for st in statuses:
        for pod in sorted(st.pods, key=lambda p: (p.node, p.started_at or datetime.min.replace(tzinfo=UTC), p.id)):
            table.add_row(
                st.name,
                _short(pod.id),
                Text(shown(pod.node)),
                Text(shown(pod.endpoint or "-")),
                Text(pod.health, style=_HEALTH_STYLE.get(pod.health, "")),
                Text("yes", style="green") if pod.ready else Text("no", style="yellow"),
                "-" if pod.cpu_percent is None else f"{pod.cpu_percent:.0f}",
                _when(pod.started_at),
            )
    return table


def _services_table(settings: Settings, statuses: Iterable[ServiceStatus]) -> Table:
    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("ready/desired", no_wrap=True, justify="right")
    table.add_column("image", no_wrap=True)
    table.add_column("Web UI", overflow="fold")
    for st in statuses:
        table.add_row(
            st.name,
            _phase(st.phase),
            f"{st.ready_replicas}/{st.desired_replicas}",
            st.spec.image,
            Text(shown(_web_ui_url(settings, st))),
        )
    return table


def _print_outcome(what: str, result: Any) -> None:
    if isinstance(result, ServiceStatus):
        out.print(
            Text.assemble(
                f"{what}: ", _phase(result.phase), f" ({result.ready_replicas}/{result.desired_replicas} ready)"
            )
        )
    else:
        out.print(f"{what}: done")


def _fail(message: str, code: int) -> typer.Exit:
    # Text, not markup: messages quote specs and paths that may contain '[...]'. A message may
    # quote what a server or a caller sent: its control characters are written out, and a line
    # after its first (a log's tail) is indented, so none reads as a line of its own.
    text = "\n  ".join(shown(line) for line in message.split("\n"))
    err.print(Text(f"error: {text}", style="red"), soft_wrap=True)
    return typer.Exit(code)


def print_records(columns: tuple[str, ...], rows: Iterable[tuple[str, ...]], *, empty: str) -> None:
    """A plain table of records (``hms image list``, ``hms secret list``), or ``empty`` when none."""
    rows = list(rows)
    if not rows:
        out.print(empty)
        return
    table = Table()
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*(shown(cell) for cell in row))
    out.print(table)
