"""A service landed by a time slot (0/0), through a real router: every pod stops, the router
answers 503 with Retry-After at the slot's end, and the service takes off again when the slot's
Temporal Schedule fires its end. Real schedules, real process pods, a one-off slot seconds ahead."""

from __future__ import annotations

from datetime import datetime
from email.utils import parsedate_to_datetime

import aiohttp
from conftest import eventually, node_pods, seed_spec
from router_helpers import engine, routed  # noqa: F401 - fixtures
from slot_helpers import events, no_schedules, one_off, schedules


async def test_a_landed_service_answers_503_until_its_slot_ends(routed):  # noqa: F811
    hms, s = routed.orch, routed.settings
    # After the deploy, and long enough to see it landed, even on a loaded machine.
    slot = one_off("quiet", 15, 50, 0, 0)
    await hms.deploy(seed_spec(min_replicas=1, max_replicas=2, time_slots=[slot]), wait=True, timeout=60)
    assert await schedules(hms.client, "hms-ach") == ["svc-hms-ach-slot-quiet-end", "svc-hms-ach-slot-quiet-start"]
    await routed.wait_pods("hms-ach", 1)

    landed = await eventually(lambda: events(s, "service.landed"), timeout=40, what="service.landed")
    st = await eventually(lambda: _landed(hms), timeout=30, what="every pod stopped")
    assert st.active_slot.name == "quiet" and st.active_slot.landed
    assert node_pods(s, "hms-ach") == []
    assert events(s, "slot.started")[0].data["schedule"] == "svc-hms-ach-slot-quiet-start"
    end = datetime.fromisoformat(slot["end"])
    assert datetime.fromisoformat(landed[0].data["until"]) == end

    async def answer():
        async with aiohttp.ClientSession() as http, http.get(f"{routed.url}/hms-ach/") as r:
            return (r.status, r.headers.get("Retry-After"), await r.json()) if r.status == 503 else None
    status, retry_after, body = await eventually(answer, timeout=20, what="a 503 from the router")
    assert parsedate_to_datetime(retry_after) == end and body["error"] == "landed"

    await eventually(lambda: events(s, "service.took_off"), timeout=40, what="service.took_off")
    st = await eventually(lambda: _ready(hms, 1), timeout=60, what="one pod again")
    assert st.active_slot is None and events(s, "slot.ended")
    await routed.wait_pods("hms-ach", 1)
    async with aiohttp.ClientSession() as http, http.get(f"{routed.url}/hms-ach/health") as r:
        assert r.status == 200

    await hms.undeploy("hms-ach")
    await no_schedules(hms.client, "hms-ach")


async def _landed(hms):
    st = await hms.status("hms-ach")
    return st if st.desired_replicas == 0 and not st.pods else None


async def _ready(hms, n):
    st = await hms.status("hms-ach")
    return st if st.ready_replicas == n and len(st.pods) == n else None
