"""A rollout's round of pod starts gets its grants at once: the control worker checks the
revision's ticket, the caller and the image's trust once and signs a trust stamp and a start
ticket per pod, in two local activities for the whole round. Each grant is still bound to its
own pod and node, and the round is refused whole where one start would be."""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import seed_spec
from outsider import outsider
from temporalio.exceptions import ApplicationError

from hms_mgmt import tickets
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.trust import TrustStore


async def _deploy_history(client, wf_id: str) -> tuple[list[str], list[str], list[dict], dict]:
    """(local activities' types, activities' types, start_pod inputs, the workflow's input)."""
    local, scheduled, starts, started = [], [], [], {}
    async for ev in client.get_workflow_handle(wf_id).fetch_history_events():
        if ev.HasField("workflow_execution_started_event_attributes"):
            started = json.loads(ev.workflow_execution_started_event_attributes.input.payloads[0].data)
        marker = ev.marker_recorded_event_attributes
        if ev.HasField("marker_recorded_event_attributes") and marker.marker_name == "core_local_activity":
            local.append(json.loads(marker.details["data"].payloads[0].data)["activity_type"])
        if ev.HasField("activity_task_scheduled_event_attributes"):
            a = ev.activity_task_scheduled_event_attributes
            scheduled.append(a.activity_type.name)
            if a.activity_type.name == "start_pod":
                starts.append(json.loads(a.input.payloads[0].data))
    return local, scheduled, starts, started


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_a_rollout_asks_its_rounds_grants_at_once_each_bound_to_its_pod(temporal_env, hms: Orchestrator,
                                                                               settings):
    await hms.deploy(seed_spec(min_replicas=3, max_replicas=3), wait=True, timeout=120)
    st = await hms.status("hms-ach")
    assert st.phase == "Running" and st.ready_replicas == 3
    local, scheduled, starts, _ = await _deploy_history(temporal_env.client, f"svc-hms-ach-deploy-{st.revision}")
    # Placement and the round's grants: three local activities, not two per pod; then each
    # start's result checked as its node's signed word.
    assert sorted(local) == ["check_started_pod"] * 3 + ["pick_node", "stamp_round", "start_tickets"]
    assert scheduled == ["start_pod"] * 3
    assert sorted(s["pod_id"] for s in starts) == sorted(p.id for p in st.pods)
    for start in starts:  # each pod's own ticket and stamp: the node checked them before it started the pod
        ticket = tickets.open_claims(settings.state_dir, start["ticket"], "start ticket")
        stamp = tickets.open_claims(settings.state_dir, start["stamp"], "trust stamp")
        for claims in (ticket, stamp):
            assert (claims["pod"], claims["node"], claims["rev"]) == (start["pod_id"], settings.node, st.revision)


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_a_copied_revision_ticket_gets_no_round_of_grants(temporal_env, hms: Orchestrator, settings):
    """An outsider with the revision's ticket (copied from history) asks for a round: the start
    tickets and the trust stamps are refused to their workflow (the caller check), with or without
    a trusted image or a good ticket."""
    await hms.deploy(seed_spec(min_replicas=1, max_replicas=1), wait=True, timeout=120)
    st = await hms.status("hms-ach")
    _, _, _, deploy_in = await _deploy_history(temporal_env.client, f"svc-hms-ach-deploy-{st.revision}")
    assert deploy_in["ticket"]
    ask = {"service": "hms-ach", "revision": st.revision, "spec": st.spec.model_dump(mode="json"),
           "image_id": deploy_in["image_id"], "ticket": deploy_in["ticket"],
           "pods": [{"pod_id": str(uuid.uuid4()), "node": settings.node} for _ in range(2)]}
    wf_id = f"svc-hms-ach-deploy-{uuid.uuid4()}"
    async with outsider(temporal_env.client) as them:
        with pytest.raises(ApplicationError, match="not a workflow of service hms-ach") as refused:
            await them.run("start_tickets", ask, settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
        with pytest.raises(ApplicationError, match="not a workflow of service hms-ach") as refused:
            await them.run("stamp_round", ask, settings.task_queue, wf_id=wf_id)  # the image is trusted
        assert refused.value.type == "AccessDenied"
        single = {k: v for k, v in ask.items() if k != "pods"} | ask["pods"][0]
        with pytest.raises(ApplicationError, match="not a workflow of service hms-ach") as refused:
            await them.run("stamp_start", single, settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
        assert TrustStore(settings.state_dir).revoke(st.spec.image)
        forged = {**ask, "ticket": deploy_in["ticket"][:-4] + "AAAA"}
        with pytest.raises(ApplicationError, match="not a workflow of service hms-ach") as refused:
            await them.run("stamp_round", forged, settings.task_queue, wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
    refusals = [e for e in read_events(settings.state_dir) if e.type == "access.denied"]
    assert any(e.data.get("action") == "start_ticket" and e.data.get("workflow") == wf_id for e in refusals)
    assert any(e.data.get("action") == "start_pod" and "trust stamp" in e.reason and e.data.get("workflow") == wf_id
               for e in refusals)
    assert [p.id for p in (await hms.status("hms-ach")).pods] == [p.id for p in st.pods]
