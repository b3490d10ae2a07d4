"""Time-slot activities (task queue ``hms-control``): each edge of a slot is a real Temporal
Schedule, made, changed and removed here with the spec; and the check that an edge a schedule
delivered is the act of the deployer's standing grant.

A schedule's action starts a ``SlotEdgeWorkflow`` whose input carries a grant the control plane
signed for exactly that schedule, revision, spec and edge, on behalf of the ops_admin who
deployed the revision. Anyone who reaches Temporal can edit a schedule or start that workflow,
so ``check_slot_edge`` believes an edge only if the grant is bound to what the service runs now
and the run that delivered it was started by that very schedule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from temporalio import activity
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleRange,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
)
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.callers import Callers, deny
from activities.control import _grant_identity
from hms_mgmt import auth, names, tickets
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied, ActivityErrorType, HmsError
from hms_mgmt.events import Event, EventSink
from hms_mgmt.governance_config import load_governance_policy
from hms_mgmt.models import ServiceSpec, TimeSlot
from hms_mgmt.policy import slots as clock
from hms_mgmt.policy.governance import GovernancePolicy, evaluate
from hms_mgmt.wire import SlotEdge, SlotEdgeCheck, SlotEdgeVerdict, SlotSchedules, SlotSchedulesOutput

log = logging.getLogger(__name__)

SCHEDULED_BY = SearchAttributeKey.for_keyword("TemporalScheduledById")
STANDING_GRANT_TTL_S = 400 * 86400.0  # re-signed with every deploy, update and rollback
DEPLOYER_ACTIONS = {"deploy", "update", "rollback"}


def edge_spec(slot: TimeSlot, edge: str) -> tuple[ScheduleSpec, bool]:
    """When one edge fires, as a Temporal ScheduleSpec: cron in the slot's zone, or a one-off
    calendar at the instant (UTC). The bool: a one-off (one action, then the schedule idles)."""
    text = slot.start if edge == "start" else slot.end
    at = clock.instant(text, slot.timezone)
    if at is None:
        return ScheduleSpec(cron_expressions=[text], time_zone_name=slot.timezone), False
    at = at.astimezone(UTC)
    calendar = ScheduleCalendarSpec(second=[ScheduleRange(at.second)], minute=[ScheduleRange(at.minute)],
                                    hour=[ScheduleRange(at.hour)], day_of_month=[ScheduleRange(at.day)],
                                    month=[ScheduleRange(at.month)], year=[ScheduleRange(at.year)])
    return ScheduleSpec(calendars=[calendar], time_zone_name="UTC"), True


class SlotActivities:
    def __init__(self, client: Client, settings: Callable[[], Settings], sink: EventSink) -> None:
        self.client = client
        self.settings = settings
        self.sink = sink
        self.callers = Callers(client)

    def all(self) -> list[Callable[..., object]]:
        """The activities, as the control worker registers them."""
        return [self.sync_slot_schedules, self.check_slot_edge]

    # --- schedules, with the spec ----------------------------------------------------------------

    @activity.defn(name="sync_slot_schedules")
    async def sync_slot_schedules(self, inp: SlotSchedules) -> SlotSchedulesOutput:
        """Make the service's schedules exactly one per edge of ``inp.spec.time_slots`` (one-offs
        already past need none), each acting for the deployer of ``inp.revision``; remove every
        other schedule of the service. ``spec=None`` (undeploy) removes them all."""
        try:
            control_queue = (await asyncio.to_thread(self.settings)).task_queue
            caller = await self.callers.current()
            if not await self.callers.serves(caller, inp.service, control_queue) \
                    or caller.workflow_id != inp.workflow_id:
                await deny(self.sink, inp.service, "sync_slot_schedules",
                           f"{caller} may not change {inp.service}'s time slot schedules", **caller.data())
            return await self._sync(inp)
        except (AccessDenied, HmsError) as e:
            raise ApplicationError(f"time slot schedules refused: {e}", type=ActivityErrorType.ACCESS_DENIED,
                                   non_retryable=True) from None

    async def _sync(self, inp: SlotSchedules) -> SlotSchedulesOutput:
        settings = await asyncio.to_thread(self.settings)
        wanted: dict[str, Schedule] = {}
        if inp.spec is not None:
            if await self._ending(inp.workflow_id):  # a late attempt must not outlive the service
                raise AccessDenied(f"{inp.service} is ending or gone: no schedule is made for it")
            deployer = await asyncio.to_thread(self._deployer, settings, inp)
            wanted = await asyncio.to_thread(self._schedules, settings, inp, inp.spec, deployer)
        elif not await self._ending(inp.workflow_id):
            raise AccessDenied(f"{inp.service} is not being undeployed: its schedules stay")
        for sid, schedule in wanted.items():
            await self._put(sid, schedule)
        prefix = names.slot_schedule_prefix(inp.workflow_id)
        listed = [s.id async for s in await self.client.list_schedules() if s.id.startswith(prefix)]
        removed = []
        for sid in sorted((set(listed) | set(inp.known)) - set(wanted)):
            try:
                await self.client.get_schedule_handle(sid).delete()
                removed.append(sid)
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:
                    raise
        return SlotSchedulesOutput(schedules=sorted(wanted), removed=removed)

    @staticmethod
    def _deployer(settings: Settings, inp: SlotSchedules) -> dict[str, object]:
        """The grant of whoever deployed (updated, rolled back to) this spec; still an ops_admin.

        A deploy's or an update's grant waited in the service's own workflow (the only caller
        believed here) for the image check and, over the limit, the approval: it is good for as
        long as this spec lets those take, as ``issue_ticket`` accepts it. A rollback waits for
        neither: its grant is good until its own expiry."""
        assert inp.spec is not None
        state_dir = settings.state_dir
        waited = deployer_wait_s(inp.spec, load_governance_policy(state_dir))
        claims = tickets.check_grant(state_dir, inp.grant, service=inp.service, actions=DEPLOYER_ACTIONS,
                                     max_age_s=waited)
        if claims.get("act") == "rollback":
            tickets.check_grant(state_dir, inp.grant, service=inp.service, actions={"rollback"})
        else:
            tickets.check_grant(state_dir, inp.grant, service=inp.service, actions=DEPLOYER_ACTIONS,
                                bind={"spec": inp.spec.digest()}, max_age_s=waited)
        auth.authorize(_grant_identity(claims), "deploy", auth.load_access_matrix(state_dir))
        return claims

    def _schedules(self, settings: Settings, inp: SlotSchedules, spec: ServiceSpec,
                   deployer: dict[str, object]) -> dict[str, Schedule]:
        now = datetime.now(UTC)
        out = {}
        for slot in spec.time_slots:
            for edge in clock.EDGES:
                when, one_off = edge_spec(slot, edge)
                if one_off and clock.next_edge(slot.start if edge == "start" else slot.end, slot.timezone,
                                               now) is None:
                    continue  # a one-off edge already past: nothing left to fire
                sid = names.slot_schedule_id(inp.workflow_id, slot.name, edge)
                grant = tickets.grant(settings.state_dir, action="slot", service=inp.service,
                                      user=str(deployer["sub"]), role=str(deployer["role"]),
                                      bind=_grant_bind(sid, inp.revision, spec.digest(), slot.name, edge),
                                      ttl_s=STANDING_GRANT_TTL_S)
                edge_input = SlotEdge(service=inp.service, slot=slot.name, edge=edge, schedule_id=sid,
                                      revision=inp.revision, grant=grant)
                out[sid] = Schedule(
                    action=ScheduleActionStartWorkflow(names.SLOT_EDGE_WORKFLOW, edge_input, id=f"{sid}-run",
                                                       task_queue=inp.task_queue),
                    spec=when,
                    state=ScheduleState(note=f"{inp.service}: time slot {slot.name} {edge}s (revision "
                                             f"{inp.revision}, for {deployer['sub']})",
                                        limited_actions=one_off, remaining_actions=1 if one_off else 0),
                )
        return out

    async def _put(self, sid: str, schedule: Schedule) -> None:
        try:
            await self.client.create_schedule(sid, schedule)
        except ScheduleAlreadyRunningError:
            await self.client.get_schedule_handle(sid).update(lambda _: ScheduleUpdate(schedule=schedule))

    async def _ending(self, workflow_id: str) -> bool:
        """The truth, read here: the service's workflow is undeploying, or gone."""
        try:
            status = await self.client.get_workflow_handle(workflow_id).query(names.Q.STATUS)
        except RPCError as e:
            return e.status == RPCStatusCode.NOT_FOUND
        return isinstance(status, dict) and status.get("phase") in ("Undeploying", *names.ENDED)

    # --- an edge, checked ------------------------------------------------------------------------

    @activity.defn(name="check_slot_edge")
    async def check_slot_edge(self, inp: SlotEdgeCheck) -> SlotEdgeVerdict:
        """Allowed only for the standing grant of this schedule, this revision and spec and this
        edge, held by a deployer still allowed to scale, delivered by a run its schedule started.
        A refusal is an answer and an ``access.denied`` event."""
        settings = await asyncio.to_thread(self.settings)
        edge = inp.edge
        try:
            want = names.slot_schedule_id(names.service_workflow_id(edge.service), edge.slot, edge.edge)
            claims = await asyncio.to_thread(
                tickets.check_grant, settings.state_dir, edge.grant, service=edge.service, actions={"slot"},
                bind=_grant_bind(want, inp.revision, inp.spec_digest, edge.slot, edge.edge))
            matrix = await asyncio.to_thread(auth.load_access_matrix, settings.state_dir)
            auth.authorize(_grant_identity(claims), "scale", matrix)
            await self._started_by(edge, want)
        except (AccessDenied, HmsError) as e:
            reason = f"time slot {edge.slot[:30]} {edge.edge} refused: {e}"
            await self.sink.publish(Event(type="access.denied", service=edge.service, reason=reason,
                                          data={"action": "slot", "schedule": edge.schedule_id[:200],
                                                "workflow_id": edge.workflow_id[:300]}))
            return SlotEdgeVerdict(allowed=False, reason=reason)
        return SlotEdgeVerdict(allowed=True, user=str(claims.get("sub")))

    async def _started_by(self, edge: SlotEdge, schedule_id: str) -> None:
        """The run that delivered the edge was started by ``schedule_id`` (a search attribute only
        the server sets), and is a SlotEdgeWorkflow."""
        try:
            desc = await self.client.get_workflow_handle(edge.workflow_id, run_id=edge.run_id or None).describe()
        except RPCError as e:
            raise AccessDenied(f"no run {edge.workflow_id[:80]} delivered it ({e.message})") from None
        by = desc.typed_search_attributes.get(SCHEDULED_BY)
        if desc.workflow_type != names.SLOT_EDGE_WORKFLOW or by != schedule_id:
            raise AccessDenied(f"it was not started by schedule {schedule_id} (started by {by or 'a person'})")


def deployer_wait_s(spec: ServiceSpec, policy: GovernancePolicy) -> float:
    """How old a deployer's grant for ``spec`` may be once its waits are over: the image check
    (``image_verify_timeout_s``) and, over the governance limit, the approval, plus the grant's
    own life (as ``issue_ticket`` counts it)."""
    waited = spec.image_verify_timeout_s + tickets.GRANT_TTL_S
    if evaluate(spec, policy).needs_approval:
        waited += min(policy.approval_timeout_s, spec.approval_timeout_s)
    return waited


def _grant_bind(schedule_id: str, revision: int, spec_digest: str, slot: str, edge: str) -> dict[str, object]:
    return {"schedule": schedule_id, "revision": revision, "spec": spec_digest, "slot": slot, "edge": edge}
