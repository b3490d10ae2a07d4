"""What reaches a router's engine from outside: a pod id, an address or a service name that would
be a Runtime API command to HAProxy (``x;shutdown sessions server ...``, a newline and ``show
info``) or a file name (``../../keys/control``), tried as an outsider would — their own worker
and workflow running our ``publish_endpoints``, and an unsigned push straight to the router's
feed port. Nothing reaches the table, the engine keeps routing to the service's own pod, no file
is written outside ``feed/``, and each refusal (the control worker's, the router's) is an
``access.denied`` event. Both engines (HAProxy's Runtime API is the one an injection would reach); a real dev
server, worker, router and process pod. The engine's own name checks are unit-tested
(``tests/unit/test_router_haproxy_plan.py``, ``test_router_feed_names.py``)."""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
from conftest import seed_spec
from outsider import outsider
from temporalio.exceptions import ApplicationError

from hms_mgmt import feed, tickets
from hms_mgmt.events import read_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))  # the router tests' fixtures
from router_helpers import engine, routed  # noqa: E402, F401 - fixtures

INJECTED = {"service": "hms-ach", "version": 2 ** 62, "endpoints": [
    {"pod": "x;shutdown sessions server be_hms-ach/x", "address": "127.0.0.1:1\nshow info"},
    {"pod": "y\ndisable server be_hms-ach/y", "address": "127.0.0.1:2;shutdown frontend fe"}]}
WALKING = {"service": "../../keys/control", "version": 1, "endpoints": []}


async def _answers(url: str, times: int = 5) -> list[int]:
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(times):
            async with http.get(f"{url}/hms-ach/health") as r:
                statuses.append(r.status)
        return statuses


@pytest.mark.timeout(240)
async def test_no_outsider_table_reaches_the_engine(temporal_env, routed, tmp_path):  # noqa: F811
    r = routed
    await r.orch.deploy(seed_spec(min_replicas=1, max_replicas=1), wait=True, timeout=120)
    held = await r.wait_pods("hms-ach", 1)
    wf_id = f"svc-hms-ach-heal-{uuid.uuid4()}"
    async with outsider(temporal_env.client) as them:
        with pytest.raises(ApplicationError) as refused:
            await them.run("publish_endpoints", INJECTED, r.settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
        # A name that walks out of feed/ does not even decode as a table.
        with contextlib.suppress(ApplicationError):
            await them.run("publish_endpoints", WALKING, r.settings.task_queue, wf_id=wf_id)
    other = tmp_path / "their-state"  # a control key of their own: signed, but not by ours
    other.mkdir()
    tickets.ensure_control_key(other)
    async with aiohttp.ClientSession() as http:
        for body in (INJECTED, WALKING):
            raw = json.dumps(body).encode()
            for sig in ("", "forged.signature", feed.sign(other, raw)):
                headers = {feed.SIGNATURE_HEADER: sig} if sig else {}
                async with http.post(f"{r.url}{feed.FEED_PATH}", data=raw, headers=headers) as resp:
                    assert resp.status == 401, (sig, resp.status, await resp.text())
        # Nor may they ask whether pods are drained (which would end a drain early).
        async with http.get(f"{r.url}{feed.DRAINED_PATH}", params={"service": "hms-ach", "pods": "x"}) as resp:
            assert resp.status == 401

    assert await r.table("hms-ach") == held
    assert await _answers(r.url) == [200] * 5, "the engine no longer routes to the service's own pod"
    state = r.settings.state_dir
    assert not list(state.rglob("control.json"))
    assert [p.name for p in feed.feed_dir(state).glob("*.json")] == ["hms-ach.json"]
    refusals = [e for e in read_events(state) if e.type == "access.denied" and e.data.get("workflow") == wf_id]
    assert [e.data.get("action") for e in refusals] == ["publish_endpoints"], refusals
    at_router = [e.data["action"] for e in read_events(state) if e.type == "access.denied"
                 and e.data.get("action", "").startswith("router_")]
    assert at_router == ["router_feed"] * 6 + ["router_drained"], at_router
    await r.orch.undeploy("hms-ach")
