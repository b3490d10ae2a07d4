"""Progress of the long commands (deploy, rollout, scale, undeploy, demo): bars on a terminal;
without one (a pipe, a CI log) or with ``--progress plain``, one line per change with the time,
the service, its phase and what it waits for, and a line at least every ``HEARTBEAT_S`` while
nothing changes, so a script's log never goes silent.

A deploy whose image is not signed says so at once, with the command that ends the wait: the
admission's ``verify_image`` activity is retrying, and its last failure says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, TextIO, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from hms_mgmt.cli.render import _when, out, shown
from hms_mgmt.durations import format_duration
from hms_mgmt.errors import HmsError
from hms_mgmt.models import ServiceSpec, ServiceStatus, WaitingFor
from hms_mgmt.orchestrator import Orchestrator

T = TypeVar("T")

HEARTBEAT_S = 10.0
POLL_S = 0.5

ProgressOpt = Annotated[str, typer.Option(
    "--progress", help="auto: bars on a terminal, plain lines otherwise; plain: one line per change (time, "
                       "service, phase, what it waits for), and one at least every 10 s while waiting; tty: bars.")]


def plain_wanted(mode: str, stream: TextIO | None = None) -> bool:
    if mode not in ("auto", "plain", "tty"):
        raise typer.BadParameter("choose auto, plain or tty", param_hint="--progress")
    return mode == "plain" or (mode == "auto" and not (stream or sys.stdout).isatty())


def wait_text(w: WaitingFor) -> str:
    """``waiting for approval: a gov_approver to decide: ...; until 14:05:00; run `hms approve x```
    (its reason and command as :func:`shown`: a server's words, for a terminal)."""
    parts = [f"waiting for {shown(w.kind.replace('_', ' '))}: {shown(w.reason)}"]
    if w.until is not None:
        parts.append(f"until {_when(w.until)}")
    if w.command:
        parts.append(f"run `{shown(w.command)}`")
    return "; ".join(parts)


_DOING = {
    "Validating": "checking access and governance",
    "VerifyingImage": "verifying the image on every node",
    "Deploying": "starting pods until they pass their health checks",
    "Scaling": "changing the number of pods",
    "Healing": "replacing a failed pod",
    "Updating": "rolling pods to the new revision",
    "Undeploying": "draining and stopping pods",
}


def doing(st: ServiceStatus) -> str:
    """What the service is doing or waiting for, in a few words (as :func:`shown`: the message
    may quote an approver's reason or a failure's)."""
    if st.waiting_for is not None:
        return wait_text(st.waiting_for)
    r = st.rollout
    if st.phase == "Updating" and r is not None:
        return f"rollout {r.from_revision} -> {r.to_revision}: {r.updated}/{r.desired} pods updated ({shown(r.state)})"
    if st.phase in ("Failed", "Rejected", "Degraded") and st.message:
        return shown(st.message)
    return _DOING.get(st.phase, "")


def status_line(st: ServiceStatus, at: datetime, *, still_s: float | None = None) -> str:
    """One plain line: time, service, phase, ready/desired, and what it does or waits for."""
    still = f"  (still, {format_duration(still_s)})" if still_s is not None else ""
    what = doing(st)
    return (f"{_when(at)}  {st.name}  {st.phase}  {st.ready_replicas}/{st.desired_replicas} ready{still}"
            + (f"  {what}" if what else ""))


def _key(st: ServiceStatus) -> tuple[object, ...]:
    return st.phase, st.ready_replicas, st.desired_replicas, doing(st)


class View(Protocol):
    def update(self, st: ServiceStatus) -> None: ...
    def silent(self, name: str, why: str) -> None: ...
    def note(self, name: str, text: str) -> None: ...


class Lines:
    """The plain view: a line when something changes, a heartbeat line when nothing has for
    ``heartbeat_s`` (it says how long and what the service waits for)."""

    def __init__(self, *, echo: Callable[[str], None] | None = None, heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.echo = echo or _echo
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.now = now
        self.keys: dict[str, tuple[object, ...]] = {}
        self.changed: dict[str, float] = {}
        self.printed: dict[str, float] = {}

    def update(self, st: ServiceStatus) -> None:
        t, key = self.clock(), _key(st)
        if self.keys.get(st.name) != key:
            self.keys[st.name], self.changed[st.name], self.printed[st.name] = key, t, t
            self.echo(status_line(st, self.now()))
        elif t - self.printed[st.name] >= self.heartbeat_s:
            self.printed[st.name] = t
            self.echo(status_line(st, self.now(), still_s=t - self.changed[st.name]))

    def silent(self, name: str, why: str) -> None:
        """No status yet (the workflow is starting): say so, at most once a heartbeat."""
        t = self.clock()
        if t - self.printed.setdefault(name, t - self.heartbeat_s) >= self.heartbeat_s:
            self.printed[name] = t
            self.echo(f"{_when(self.now())}  {shown(name)}  waiting for its workflow to answer ({shown(why)})")

    def note(self, name: str, text: str) -> None:
        self.echo(f"{_when(self.now())}  {shown(name)}  {shown(text)}")


def _echo(line: str) -> None:
    typer.echo(line)
    sys.stdout.flush()


class Bars:
    """The terminal view: a bar per service counting ready pods, with its phase and wait."""

    def __init__(self, progress: Progress, tasks: dict[str, TaskID]) -> None:
        self.progress = progress
        self.tasks = tasks

    def update(self, st: ServiceStatus) -> None:
        task = self.tasks.get(st.name)
        if task is not None:
            self.progress.update(task, total=max(st.desired_replicas, 1), completed=st.ready_replicas,
                                 phase=f"{st.phase}  {doing(st)}"[:100])

    def silent(self, name: str, why: str) -> None:
        pass

    def note(self, name: str, text: str) -> None:
        self.progress.console.print(Text.assemble((shown(name), "bold"), f"  {shown(text)}", style="yellow"),
                                    soft_wrap=True)


def bars(console: Any) -> Progress:
    """The bars; their text is never markup (a phase's words may quote a server's message)."""
    return Progress(SpinnerColumn(), TextColumn("{task.fields[service]:<12}", markup=False), BarColumn(),
                    MofNCompleteColumn(), TextColumn("pods ready  {task.fields[phase]}", markup=False),
                    TimeElapsedColumn(), console=console if console is not None else out)


async def signature_hint(orch: Orchestrator, st: ServiceStatus) -> str | None:
    """While admission waits for a signature: the exact command, once the verify activity has
    failed for want of one (its retries are the wait), else None."""
    w = st.waiting_for
    if w is None or w.kind != "image_signature":
        return None
    desc = await orch.client.get_workflow_handle(st.workflow_id).describe()
    for pending in desc.raw_description.pending_activities:
        if pending.activity_type.name == "verify_image" and pending.HasField("last_failure"):
            return (f"image.awaiting_signature  {pending.last_failure.message}: run `{w.command}` before "
                    f"{_when(w.until)}, or the deploy fails")
    return None


class Poller:
    """Polls each service's status into a view while a command's work runs."""

    def __init__(self, orch: Orchestrator, names: list[str], view: View) -> None:
        self.orch = orch
        self.names = names
        self.view = view
        self.hinted: set[str] = set()

    async def once(self) -> None:
        for name in self.names:
            try:
                st = await self.orch.status(name)
            except Exception as e:  # noqa: BLE001 - the display is best effort; the work reports errors
                self.view.silent(name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            self.view.update(st)
            if name not in self.hinted:
                with contextlib.suppress(Exception):
                    hint = await signature_hint(self.orch, st)
                    if hint:
                        self.hinted.add(name)
                        self.view.note(name, hint)

    async def forever(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(POLL_S)


async def with_progress(orch: Orchestrator, names: list[str], work: Awaitable[T], *, mode: str = "auto",
                        console: Any = None, totals: dict[str, int] | None = None) -> T:
    """Run ``work`` while showing the services' progress (bars, or plain lines; see module doc)."""
    if plain_wanted(mode):
        return await _polling(Poller(orch, names, Lines()), work)
    progress = bars(console)
    with progress:
        tasks = {n: progress.add_task(n, total=max((totals or {}).get(n, 1), 1), service=n, phase="starting")
                 for n in names}
        return await _polling(Poller(orch, names, Bars(progress, tasks)), work)


async def _polling(poller: Poller, work: Awaitable[T]) -> T:
    task = asyncio.create_task(poller.forever())
    try:
        return await work
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The poller may have been cancelled mid-way: show the final state, not a stale one.
        with contextlib.suppress(Exception):
            await poller.once()


async def deploy_with_progress(orch: Orchestrator, specs: list[ServiceSpec], *, timeout: float,
                               mode: str = "auto") -> list[Any]:
    """Deploy in parallel (``wait=True``) while showing each service's progress."""
    work = asyncio.gather(*(orch.deploy(s, wait=True, timeout=timeout) for s in specs), return_exceptions=True)
    results = await with_progress(orch, [s.name for s in specs], work, mode=mode, console=out,
                                  totals={s.name: s.min_replicas for s in specs})
    errors = [r for r in results if isinstance(r, BaseException)]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise HmsError("; ".join(str(e) or type(e).__name__ for e in errors))
    return results
