"""Time slots: the service's clock. Each edge of a slot is a Temporal Schedule (made, changed and
removed with the spec by ``sync_slot_schedules``); an edge arrives as the ``slot_edge`` signal,
is checked against the deployer's standing grant (``check_slot_edge``), and then moves the
bounds: land (0/0: every pod stops), take off, or keep the count within the slot's bounds.

A spec without time slots never gets here: every entry point returns before any command.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.slots import SlotActivities
    from hms_mgmt.errors import ActivityErrorType
    from hms_mgmt.models import ActiveSlot, Refusal, ServiceSpec, SlotEdge, SlotEdgeCheck, SlotSchedules
    from hms_mgmt.policy import slots as clock
    from hms_mgmt.policy.autoscale import Recommendation

from workflows.common import error_message
from workflows.service.state import CONTROL_TIMEOUT, ServiceRun
from workflows.service.supervision import Supervision

TIME_SLOTS = "time-slots"  # patch: the first commands a spec with time slots issues
EDGE_ON_TIME = "slot-edge-on-time"  # patch: an edge moves the bounds only when the clock agrees
MAX_WAITING_EDGES = 32  # slot_edge signals waiting for their check; more are refused at once
MAX_REFUSALS = 20
SYNC_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=10), maximum_attempts=10,
                         non_retryable_error_types=[ActivityErrorType.ACCESS_DENIED])


class Slots:
    def __init__(self, run: ServiceRun, supervision: Supervision) -> None:
        self.run = run
        self.supervision = supervision

    def _involved(self) -> bool:
        return bool(self.run.spec.time_slots or self.run.state.slot_schedules)

    # --- the signal ------------------------------------------------------------------------------

    def signalled(self, edge: SlotEdge) -> None:
        """Keep an edge for the run loop to check (a handler cannot run activities)."""
        run = self.run
        if len(run.state.slot_edges) >= MAX_WAITING_EDGES or edge.service != run.spec.name:
            run.post("access.denied", f"ignored a slot_edge signal for {edge.service[:63]} slot "
                                      f"{edge.slot[:30]}: not this service's, or too many waiting")
            return
        run.state.slot_edges.append(edge)

    async def on_edges(self) -> None:
        """Check each waiting edge, then move the slot it names on or off and settle the bounds."""
        run = self.run
        while run.state.slot_edges:
            edge = run.state.slot_edges.pop(0)
            verdict = await workflow.execute_activity_method(
                SlotActivities.check_slot_edge,
                SlotEdgeCheck(edge=edge, revision=run.state.revision, spec_digest=run.spec.digest()),
                task_queue=run.placement.control_task_queue,
                start_to_close_timeout=CONTROL_TIMEOUT,
                summary=f"check time slot {edge.slot} {edge.edge}",
            )
            if not verdict.allowed:
                refusal = Refusal(at=workflow.now(), action="slot", reason=verdict.reason)
                run.state.refusals = (run.state.refusals + [refusal])[-MAX_REFUSALS:]
                continue
            on = set(run.state.slots_on)
            if (edge.edge == "start") == (edge.slot in on):
                continue  # already so (a trigger by hand, twice): nothing moves
            slot = next(s for s in run.spec.time_slots if s.name == edge.slot)
            if workflow.patched(EDGE_ON_TIME) and not clock.edge_on_time(slot, edge.edge, workflow.now()):
                # Its schedule triggered out of its time (``temporal schedule trigger``): the grant is
                # genuine, the time is not.
                reason = (f"time slot {slot.name} {edge.edge} refused: not its time (the slot is "
                          f"{'off' if edge.edge == 'start' else 'on'} by its own clock)")
                run.post("access.denied", reason, action="slot", schedule=edge.schedule_id[:200])
                refusal = Refusal(at=workflow.now(), action="slot", reason=reason)
                run.state.refusals = (run.state.refusals + [refusal])[-MAX_REFUSALS:]
                continue
            on.symmetric_difference_update({edge.slot})
            run.state.slots_on = sorted(on)
            low, high = clock.slot_bounds(slot, run.spec.max_replicas)
            await run.emit(f"slot.{'started' if edge.edge == 'start' else 'ended'}",
                           f"time slot {slot.name} {edge.edge}ed (schedule {edge.schedule_id}, for {verdict.user})",
                           slot=slot.name, min_replicas=low, max_replicas=high, schedule=edge.schedule_id)
            await self._settle(f"time slot {slot.name} {edge.edge}ed")

    # --- with the spec ---------------------------------------------------------------------------

    async def take_the_clock(self) -> None:
        """At the first deploy: make the schedules, and start inside any slot that is on now
        (its bounds give the first replica count; 0/0 deploys no pod)."""
        run = self.run
        if not self._involved() or not workflow.patched(TIME_SLOTS):
            return
        await self._sync(run.deploy_grant)
        now = workflow.now()
        run.state.slots_on = clock.on_now(run.spec.time_slots, now)
        run.state.desired_replicas = clock.clamp(run.state.desired_replicas, run.bounds())
        for name in run.state.slots_on:
            await run.emit("slot.started", f"time slot {name} is on at deploy", slot=name)
        self._view(now)
        landed = run.state.active_slot
        if landed is not None and landed.landed:
            await run.emit("service.landed", f"time slot {landed.name} is 0/0: no pod until {landed.ends_at}",
                           slot=landed.name, until=_iso(landed.ends_at))

    async def spec_changed(self, before: ServiceSpec, grant: str) -> None:
        """After an update or rollback: schedules for the new spec and revision (none left for a
        slot that is gone), a changed or new slot on or off by the clock, then the bounds."""
        run = self.run
        if before == run.spec or not (self._involved() or before.time_slots) or not workflow.patched(TIME_SLOTS):
            return
        await self._sync(grant)
        kept = {s.name for s in run.spec.time_slots if s in before.time_slots}
        on_now = set(clock.on_now(run.spec.time_slots, workflow.now()))
        run.state.slots_on = sorted({n for n in run.state.slots_on if n in kept}
                                    | {n for n in on_now if n not in kept})
        await self._settle("the spec's time slots changed")

    async def release(self) -> None:
        """At undeploy: no schedule of the service is left."""
        run = self.run
        if run.state.slot_schedules:
            await self._sync("", remove=True)

    async def _sync(self, grant: str, *, remove: bool = False) -> None:
        run = self.run
        try:
            out = await workflow.execute_activity_method(
                SlotActivities.sync_slot_schedules,
                SlotSchedules(service=run.spec.name, workflow_id=workflow.info().workflow_id,
                              revision=run.state.revision, spec=None if remove else run.spec, grant=grant,
                              known=run.state.slot_schedules, task_queue=run.placement.control_task_queue),
                task_queue=run.placement.control_task_queue,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=SYNC_RETRY,
                summary="remove the time slots' schedules" if remove else
                f"schedules for {len(run.spec.time_slots)} time slot(s), revision {run.state.revision}",
            )
        except ActivityError as e:
            await run.emit("slot.schedules_failed", f"time slot schedules not synced: {error_message(e)}")
            return
        run.state.slot_schedules = out.schedules

    # --- the bounds ------------------------------------------------------------------------------

    def _view(self, now: datetime) -> ActiveSlot | None:
        """Record (and return) the slot whose bounds apply now, for status() and the feed."""
        run = self.run
        slot = run.slot()
        was = run.state.active_slot
        if slot is None:
            run.state.active_slot = None
            return None
        low, high = run.bounds()
        started = was.started_at if was is not None and was.name == slot.name else now
        run.state.active_slot = ActiveSlot(name=slot.name, min_replicas=low, max_replicas=high, started_at=started,
                                           ends_at=_ends(slot.end, slot.timezone, now),
                                           landed=clock.is_landing((low, high)))
        return run.state.active_slot

    async def _settle(self, why: str) -> None:
        """Land (0/0), take off (the first slot edge after a landing), or keep the count within
        the bounds. A lower ceiling applies at once; a lower floor lets the autoscaler scale
        down after the usual stabilisation window (the count now enters its window)."""
        run = self.run
        was = run.state.active_slot
        now_view = self._view(workflow.now())
        bounds = run.bounds()
        run.pods_changed = True  # the watch restarts with the new bounds
        if now_view is not None and now_view.landed:
            if was is None or not was.landed:
                await run.emit("service.landed", f"{why}: 0/0, every pod stops until {now_view.ends_at}",
                               slot=now_view.name, until=_iso(now_view.ends_at))
            await self._scale(0, f"{why}: landed")
            return
        if was is not None and was.landed:
            target = clock.clamp(max(bounds[0], 1), bounds)
            await self._scale(target, f"{why}: taking off")
            await run.emit("service.took_off", f"{why}: {target} pod(s)", replicas=target)
            return
        current = run.state.desired_replicas
        run.state.history = run.state.history + [Recommendation(at=workflow.now(), replicas=current)]
        await self._scale(clock.clamp(current, bounds), f"{why}: replicas within [{bounds[0]}, {bounds[1]}]")

    async def _scale(self, replicas: int, reason: str) -> None:
        if replicas != self.run.state.desired_replicas or replicas != self.run.effective():
            await self.supervision.scale(replicas, reason)


def _ends(end: str, tz: str, now: datetime) -> datetime | None:
    """The slot's next end; a one-off's own end even when its edges arrive late."""
    return clock.next_edge(end, tz, now) or clock.instant(end, tz)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()
