"""Issue 19, attacks 1, 3 and 4, run as an outsider would: their own worker and workflow on their
own task queue, running our activities by name against the real dev server and a real worker of
ours. Each must act on nothing and leave an ``access.denied`` event that names their workflow."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import eventually, make_settings, node_pods, seed_spec, sweep_pods, terminate_running
from outsider import outsider
from temporalio.exceptions import ApplicationError

from hms_mgmt import auth, tickets
from hms_mgmt.events import read_events
from hms_mgmt.models import EndpointSet
from hms_mgmt.orchestrator import Orchestrator, load_spec
from hms_mgmt.testing import cancel_and_wait, free_port
from router import serve
from worker.main import HmsWorker


def denied(settings) -> list:
    return [e for e in read_events(settings.state_dir) if e.type == "access.denied"]


def one_pod(**kw: object) -> dict[str, object]:
    return seed_spec(min_replicas=1, max_replicas=1, **kw)


async def _theirs(_request: web.Request) -> web.Response:
    return web.Response(text="outsider")


@contextlib.asynccontextmanager
async def listener() -> AsyncIterator[str]:
    """The outsider's own HTTP server: whatever reaches it was redirected."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _theirs)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def routed(temporal_env, tmp_path: Path) -> AsyncIterator[tuple[Orchestrator, object, str]]:
    """Our worker and a builtin router (in this process); the feed pushes to that router only."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    s = make_settings(temporal_env, tmp_path / "state", "process", routers=[url])
    try:
        async with HmsWorker(temporal_env.client, s):
            ready = asyncio.Event()
            task = asyncio.create_task(serve(s, port=port, ready=ready, resync_interval_s=1.0,
                                             client=temporal_env.client))
            await asyncio.wait_for(ready.wait(), 20)
            try:
                yield Orchestrator(temporal_env.client, s), s, url
            finally:
                await cancel_and_wait(task)
    finally:
        await terminate_running(temporal_env, s)
        sweep_pods(s)


async def router_table(url: str, service: str) -> dict | None:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/-/table") as r:
        return (await r.json())["services"].get(service)


async def test_publish_endpoints_from_an_outsider_redirects_no_traffic(temporal_env, routed):
    """Attack 1: a table naming their listener, with a version far in the future, sent through
    our control worker's ``publish_endpoints`` (which signs the push to every router)."""
    orch, settings, url = routed
    await orch.deploy(seed_spec(min_replicas=1, max_replicas=2), wait=True, timeout=120)
    ours = await eventually(lambda: _ready_table(url, 1), what="the router's table for hms-ach with its pod")
    wf_id = f"svc-hms-ach-heal-{uuid.uuid4()}"  # their choice of id, like one of our children's
    async with listener() as theirs, outsider(temporal_env.client) as them:
        forged = EndpointSet.model_validate({
            "service": "hms-ach", "version": int(time.time() * 1000) + 10 ** 12,
            "endpoints": [{"pod": str(uuid.uuid4()), "address": theirs, "state": "ready"}]})
        with contextlib.suppress(ApplicationError):
            await them.run("publish_endpoints", forged.model_dump(mode="json"), settings.task_queue, wf_id=wf_id)
        await asyncio.sleep(0.5)
        held = await router_table(url, "hms-ach")
        assert held is not None and theirs not in {e["address"] for e in held["endpoints"]}, held
        assert held["version"] < forged.version
        async with aiohttp.ClientSession() as http:
            for _ in range(10):
                async with http.get(f"{url}/hms-ach/health") as r:
                    assert r.status == 200 and await r.text() != "outsider"
    assert held["endpoints"] == ours["endpoints"]
    refusals = [e for e in denied(settings) if e.data.get("action") == "publish_endpoints"]
    assert refusals and refusals[-1].data.get("workflow") == wf_id, refusals
    # The service's own next change still reaches the router: nothing was pinned.
    await orch.scale("hms-ach", 2)
    await eventually(lambda: _ready_table(url, 2), timeout=60, what="the router's table with both pods")


async def _ready_table(url: str, ready: int) -> dict | None:
    """The router's table for hms-ach once it holds ``ready`` ready pods (the deploy answers
    before its table reaches the router)."""
    t = await router_table(url, "hms-ach")
    return t if t is not None and sum(e["state"] == "ready" for e in t["endpoints"]) == ready else None


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_stop_pod_from_an_outsider_stops_nothing(temporal_env, hms: Orchestrator, settings):
    """Attack 3: our node worker's ``stop_pod``, run from their workflow on ``hms-node-<name>``."""
    await hms.deploy(one_pod(), wait=True, timeout=120)
    (pod,) = (await hms.status("hms-ach")).pods
    wf_id = f"svc-hms-ach-scale-{uuid.uuid4().hex[:6]}"
    async with outsider(temporal_env.client) as them:
        with pytest.raises(ApplicationError) as refused:
            await them.run("stop_pod", {"pod_id": pod.id, "grace_s": 0}, settings.node_task_queue(), wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
        # Nor will the control worker sign them a stop.
        with pytest.raises(ApplicationError) as refused:
            await them.run("stop_grant", {"service": "hms-ach", "pod_id": pod.id, "node": settings.node},
                           settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
    assert [h.pod_id for h in node_pods(settings, "hms-ach") if h.running] == [pod.id]
    assert any(e.data.get("action") == "stop_pod" and e.data.get("pod") == pod.id for e in denied(settings))
    assert any(e.data.get("action") == "stop_grant" and e.data.get("workflow") == wf_id for e in denied(settings))
    await hms.undeploy("hms-ach")  # our own stop still works
    await eventually(lambda: not [h for h in node_pods(settings, "hms-ach") if h.running], timeout=60,
                     what="the pod stopped by undeploy")


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_a_forged_event_from_an_outsider_is_not_written(temporal_env, hms: Orchestrator, settings):
    """Attack 4: ``approval.granted`` through our control worker's ``emit_event``."""
    wf_id = f"svc-hms-ach-deploy-{uuid.uuid4().hex[:6]}"
    async with outsider(temporal_env.client) as them:
        with pytest.raises(ApplicationError) as refused:
            await them.run("emit_event", {"type": "approval.granted", "service": "hms-ach",
                                          "reason": "approved by carol", "data": {"approver": "carol"}},
                           settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
    events = list(read_events(settings.state_dir))
    assert not [e for e in events if e.type == "approval.granted"]
    refusal = [e for e in denied(settings) if e.data.get("action") == "emit_event"]
    assert refusal and refusal[-1].data.get("workflow") == wf_id and refusal[-1].data.get("event") == "approval.granted"
    assert "outsider" in refusal[-1].reason or refusal[-1].data.get("task_queue", "").startswith("outsider-")


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_a_dry_runs_reads_are_not_an_outsiders(temporal_env, hms: Orchestrator, settings):
    """``plan_deploy`` (a dry run's read: secrets named, placement, the running service) answers
    only a ``dry_run`` grant of the control plane's; ``capacity_waits`` only the service's own
    workflow. An outsider gets a refusal, recorded; a grant for another act does not pass."""
    spec = one_pod(secrets=["db-password"])
    wf_id = f"svc-hms-ach-deploy-{uuid.uuid4().hex[:6]}"
    bind = {"spec": load_spec(spec).digest()}
    # A real grant of ours, but for a deploy (as one in a service's history): not a dry run's.
    deploy_grant = tickets.grant(settings.state_dir, action="deploy", service="hms-ach", user="alice",
                                 role="ops_admin", bind=bind)
    # A dry run's grant held by a viewer (a role that may not deploy): refused where it is used.
    viewer_grant = tickets.grant(settings.state_dir, action="dry_run", service="hms-ach", user="vic",
                                 role="viewer", bind=bind)
    viewer = auth.issue_token(settings.state_dir, user="vic", role="viewer")
    async with outsider(temporal_env.client) as them:
        for grant in ("", "forged.grant", deploy_grant, viewer_grant):
            with pytest.raises(ApplicationError) as refused:
                await them.run("plan_deploy", {"spec": spec, "grant": grant}, settings.task_queue, wf_id=wf_id)
            assert refused.value.type == "AccessDenied"
        with pytest.raises(ApplicationError) as refused:
            await them.run("capacity_waits", {"service": "hms-ach"}, settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
        # A viewer's proof made for dry_run gets no grant, whatever action the caller names.
        for action in ("status", "logs", "deploy"):
            proof = auth.prove(viewer, action="dry_run", service="hms-ach", bind=bind)
            out = await them.run("authorize", {"proof": proof, "action": action, "claim": "dry_run",
                                               "service": "hms-ach", "bind": bind}, settings.task_queue)
            assert out["allowed"] is False and not out.get("grant"), (action, out)
    assert sum(e.data.get("action") == "plan_deploy" for e in denied(settings)) == 4
    assert sum("dry_run" in e.reason or "may not deploy" in e.reason for e in denied(settings)
               if e.data.get("action") in ("status", "logs", "deploy")) >= 3
    assert any(e.data.get("action") == "capacity_waits" and e.data.get("workflow") == wf_id for e in denied(settings))
    verdict = await hms.dry_run(spec)  # ours, with a proof made from our token, still answers
    assert verdict.failure is not None and "no secret db-password" in verdict.failure.message
