"""What the NodeRegistry and the RouterRegistry share: signed messages checked by the control
worker, heartbeats and joins kept for that check a batch at a time (with the answers to joins),
the one durable timer for the earliest member that would have been silent too long, and when to
continue-as-new.

A helper object inside a workflow (like samples-python's ``updatable_timer``): it issues the
same commands each registry issued on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from temporalio import workflow

from workflows.common import own_continuation

with workflow.unsafe.imports_passed_through():
    from activities.enrolment import NodeTrustActivities
    from hms_mgmt.wire import EnrolInput, EnrolOutput, JoinAnswer, NodeVerdict, RegistrySettings

CHECK_TIMEOUT = timedelta(seconds=30)
MAX_PENDING_BEATS = 1000  # heartbeats waiting for their check (one per member is kept)
MAX_PENDING_JOINS = 1000  # join signals waiting for their check
MAX_ANSWERS = 1000  # answers to joins kept for their ``joined`` query (the oldest go first)

R = TypeVar("R")
In = TypeVar("In", bound=Any)
# patch: a registry's first run takes its seed and grace from the control worker, not its input
OWN_SETTINGS = "registry-own-settings"


class Heartbeats(Generic[R]):
    """The heartbeats waiting for their check (the latest per member) and the wait for the next
    one due; ``wake`` cuts the wait short (a member (re)joined, a hint arrived)."""

    def __init__(self, lost_after_s: float, key: Callable[[R], str], carried: Iterable[R] = ()) -> None:
        self.lost_after = timedelta(seconds=lost_after_s)
        self.key = key
        self.pending: dict[str, R] = {}
        self.wake = False
        for reg in carried:  # not yet checked when the last run continued as new
            self.offer(reg)

    def offer(self, reg: R) -> None:
        name = self.key(reg)
        if name in self.pending or len(self.pending) < MAX_PENDING_BEATS:
            self.pending[name] = reg
            self.wake = True

    def take(self) -> list[R]:
        """The heartbeats to check now; the inbox starts empty again."""
        batch = list(self.pending.values())
        self.pending.clear()
        return batch

    def deadline(self, last_heartbeats: Iterable[datetime | None]) -> datetime | None:
        """When the earliest of these (the Ready members') would have been silent too long."""
        beats = [b for b in last_heartbeats if b]
        return min(beats) + self.lost_after if beats else None

    def silent(self, last_heartbeat: datetime | None, now: datetime) -> bool:
        return last_heartbeat is not None and last_heartbeat + self.lost_after <= now

    async def wait(self, deadline: datetime | None, more: Callable[[], bool], summary: str) -> None:
        """Until ``deadline`` (none: no timer), a heartbeat, ``wake`` or ``more()``; at once if it passed."""
        now = workflow.now()
        if deadline is not None and deadline <= now:
            return
        self.wake = False
        try:
            await workflow.wait_condition(lambda: self.wake or bool(self.pending) or more(),
                                          timeout=None if deadline is None else deadline - now,
                                          timeout_summary=summary)
        except TimeoutError:
            pass


class Joins:
    """Members (re)joining with the ``join`` signal: a registration (with its ``request_id``)
    waits here for the run loop's check, and the answer waits for the member's ``joined`` query.

    A join is a signal, not an update, because a signal is an event in history: a restarted
    worker replays it where it happened. An update's acceptance that came in the same workflow
    task as a timer, after a task the killed worker never took, was replayed before the timer's
    commands when it had come after them (a non-determinism error that stops the registry)."""

    def __init__(self, joining: list[Any], answers: dict[str, JoinAnswer]) -> None:
        self.pending: list[Any] = list(joining)
        self.answers: dict[str, JoinAnswer] = dict(answers)

    def offer(self, reg: Any) -> bool:
        """Keep ``reg`` for the check, unless it has no handle, was seen, or too many wait."""
        rid = reg.request_id
        if not rid or rid in self.answers or len(self.pending) >= MAX_PENDING_JOINS:
            return False
        if any(p.request_id == rid for p in self.pending):
            return False
        self.pending.append(reg)
        return True

    def take(self) -> list[Any]:
        batch, self.pending = self.pending, []
        return batch

    def answer(self, request_id: str, answer: JoinAnswer) -> None:
        """The first answer stands (a join sent twice is refused as replayed the second time)."""
        self.answers.setdefault(request_id, answer)
        while len(self.answers) > MAX_ANSWERS:
            self.answers.pop(next(iter(self.answers)))


def own_input(inp: In, *carried: str) -> tuple[In, bool]:
    """The part of its input a registry believes, and whether it must still ask the control
    worker for its settings (``control_settings``). Anyone who reaches Temporal can start a
    registry, with any input: its activities go to the queue it runs on (the control queue),
    what a run hands to the next (``carried``: members, pending work; joins, answers,
    heartbeats) is believed only from its own continue-as-new, and a first run's seed and grace
    come from the control worker."""
    info = workflow.info()
    update: dict[str, Any] = {"control_task_queue": info.task_queue}
    continued = own_continuation()
    if not continued:
        update |= {name: type(inp).model_fields[name].get_default(call_default_factory=True)
                   for name in (*carried, "joining", "answers", "heartbeats")}
    return inp.model_copy(update=update), not continued and workflow.patched(OWN_SETTINGS)


async def control_settings(control_task_queue: str) -> RegistrySettings:
    return await workflow.execute_activity_method(
        NodeTrustActivities.registry_settings, task_queue=control_task_queue,
        start_to_close_timeout=CHECK_TIMEOUT, summary="this control plane's seed nodes and grace")


def continue_as_new_due(history_threshold: int | None) -> bool:
    info = workflow.info()
    return info.is_continue_as_new_suggested() or (
        history_threshold is not None and info.get_current_history_length() >= history_threshold)


class SignedCheck(Generic[R]):
    """The control worker's verdict on each signed registration or heartbeat (``activity`` with
    an ``input_type`` of ``registrations`` and ``kind``), in their order."""

    def __init__(self, activity: Callable[..., Any], input_type: Callable[..., Any], control_task_queue: str,
                 what: str) -> None:
        self.activity, self.input_type, self.queue, self.what = activity, input_type, control_task_queue, what

    async def __call__(self, regs: list[R], kind: str) -> list[NodeVerdict]:
        out = await workflow.execute_activity_method(
            self.activity, self.input_type(registrations=regs, kind=kind), task_queue=self.queue,
            start_to_close_timeout=CHECK_TIMEOUT, summary=f"check {len(regs)} {self.what} {kind}(s)")
        return out.verdicts


async def enrol(inp: EnrolInput, control_task_queue: str, role: str) -> EnrolOutput:
    """``hms node join`` / ``hms router join``: the control worker checks the join token and signs
    the certificate (the registry only carries the message)."""
    return await workflow.execute_activity_method(
        NodeTrustActivities.enrol_node, inp, task_queue=control_task_queue,
        start_to_close_timeout=CHECK_TIMEOUT, summary=f"enrol a joining {role}")
