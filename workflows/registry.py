"""What the NodeRegistry and the RouterRegistry share: signed messages checked by the control
worker, heartbeats kept for that check a batch at a time, the one durable timer for the earliest
member that would have been silent too long, and when to continue-as-new.

A helper object inside a workflow (like samples-python's ``updatable_timer``): it issues the
same commands each registry issued on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.enrolment import NodeTrustActivities
    from hms_mgmt.wire import EnrolInput, EnrolOutput, NodeVerdict

CHECK_TIMEOUT = timedelta(seconds=30)
MAX_PENDING_BEATS = 1000  # heartbeats waiting for their check (one per member is kept)

R = TypeVar("R")


class Heartbeats(Generic[R]):
    """The heartbeats waiting for their check (the latest per member) and the wait for the next
    one due; ``wake`` cuts the wait short (a member (re)joined, a hint arrived)."""

    def __init__(self, lost_after_s: float) -> None:
        self.lost_after = timedelta(seconds=lost_after_s)
        self.pending: dict[str, R] = {}
        self.wake = False

    def offer(self, name: str, reg: R) -> None:
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
