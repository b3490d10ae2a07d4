"""Time slots against the real dev server, real Temporal Schedules and real process pods: a
slot's bounds hold manual scaling, a schedule edited or a SlotEdgeWorkflow started by anyone else
does nothing but leave access.denied, and an update that drops the slot leaves no schedule."""

from __future__ import annotations

import asyncio

import pytest
from conftest import eventually, node_pods, seed_spec
from slot_helpers import events, no_schedules, one_off, schedules
from temporalio.client import ScheduleActionStartWorkflow, ScheduleUpdate

from hms_mgmt import names
from hms_mgmt.errors import ScaleRefused
from hms_mgmt.models import SlotEdge


async def _edge_of(hms, sid: str) -> SlotEdge:
    desc = await hms.client.get_schedule_handle(sid).describe()
    action = desc.schedule.action
    assert isinstance(action, ScheduleActionStartWorkflow) and action.workflow == names.SLOT_EDGE_WORKFLOW
    (edge,) = await hms.client.data_converter.decode(action.args, [SlotEdge])
    return edge


async def test_slot_bounds_hold_and_only_its_schedule_may_move_them(hms, settings):
    if settings.runtime != "process":
        pytest.skip("one runtime is enough: the slot logic does not depend on it")
    spec = seed_spec(min_replicas=1, max_replicas=4, time_slots=[one_off("rush", 4, 900, 3, 4)])
    await hms.deploy(spec, wait=True, timeout=60)
    await eventually(lambda: events(settings, "slot.started"), timeout=30, what="slot.started")
    st = await eventually(lambda: _ready(hms, 3), timeout=60, what="3 pods in the rush slot")
    assert st.active_slot.name == "rush" and (st.active_slot.min_replicas, st.active_slot.max_replicas) == (3, 4)
    with pytest.raises(ScaleRefused, match=r"outside \[min_replicas 3, max_replicas 4\] of time slot rush"):
        await hms.scale("hms-ach", 1)
    clocks = await hms.time_slots("hms-ach")
    assert clocks[0].active and clocks[0].next_start is None and clocks[0].next_end is not None

    # The genuine end schedule triggered by hand while the slot is on: its grant is genuine, its
    # time is not, so nothing moves.
    start_id, end_id = (names.slot_schedule_id("svc-hms-ach", "rush", e) for e in ("start", "end"))
    await hms.client.get_schedule_handle(end_id).trigger()
    early = await eventually(lambda: _slot_denials(settings, 1), timeout=30, what="the early end refused")
    assert "not its time" in early[0].reason, early[0].reason
    st = await hms.status("hms-ach")
    assert st.active_slot.name == "rush" and not events(settings, "slot.ended")

    # The end schedule edited to carry the start schedule's grant (anyone who reaches Temporal
    # can read it), then triggered; and the real end edge started by hand, not by its schedule.
    genuine_end = await _edge_of(hms, end_id)
    stolen = (await _edge_of(hms, start_id)).grant
    forged = genuine_end.model_copy(update={"grant": stolen})
    handle = hms.client.get_schedule_handle(end_id)

    def edit(inp):
        sched = inp.description.schedule
        sched.action = ScheduleActionStartWorkflow(names.SLOT_EDGE_WORKFLOW, forged, id=f"{end_id}-run",
                                                   task_queue=settings.task_queue)
        return ScheduleUpdate(schedule=sched)
    await handle.update(edit)
    await handle.trigger()
    await hms.client.start_workflow(names.SLOT_EDGE_WORKFLOW, genuine_end, id="forged-edge",
                                    task_queue=settings.task_queue)
    denied = await eventually(lambda: _slot_denials(settings, 3), timeout=30, what="two more access.denied")
    assert any("grant is for another edge" in e.reason for e in denied), [e.reason for e in denied]
    assert any("not started by schedule" in e.reason for e in denied), [e.reason for e in denied]
    await asyncio.sleep(1)
    st = await hms.status("hms-ach")
    assert st.active_slot.name == "rush" and st.desired_replicas == 3 and not events(settings, "slot.ended")
    assert len(st.refusals) >= 2 and len(node_pods(settings, "hms-ach")) == 3

    # An update without the slot: its schedules go, its bounds with it (3 pods stay, in [1, 4]).
    await hms.update_spec(seed_spec(min_replicas=1, max_replicas=4), wait=True, timeout=60)
    await no_schedules(hms.client, "hms-ach")
    st = await hms.status("hms-ach")
    assert st.active_slot is None and st.desired_replicas == 3
    await hms.undeploy("hms-ach")


async def test_undeploy_removes_every_schedule(hms, settings):
    if settings.runtime != "process":
        pytest.skip("one runtime is enough")
    spec = seed_spec(min_replicas=1, max_replicas=2,
                     time_slots=[one_off("quiet", 600, 900, 0, 0),
                                 {"name": "rush", "start": "0 8 * * 1-5", "end": "0 10 * * 1-5",
                                  "timezone": "Europe/Paris", "min_replicas": 2}])
    await hms.deploy(spec, wait=True, timeout=60)
    assert len(await schedules(hms.client, "hms-ach")) == 4
    clocks = {c.name: c for c in await hms.time_slots("hms-ach")}
    assert clocks["rush"].next_start.astimezone().hour >= 0 and clocks["rush"].timezone == "Europe/Paris"
    assert set(clocks["quiet"].schedules) == {"start", "end"}
    await hms.undeploy("hms-ach")
    await no_schedules(hms.client, "hms-ach")


def _slot_denials(settings, n: int):
    found = [e for e in events(settings, "access.denied") if e.data.get("action") == "slot"]
    return found if len(found) >= n else None


async def _ready(hms, n):
    st = await hms.status("hms-ach")
    return st if st.ready_replicas == n and len(st.pods) == n else None
