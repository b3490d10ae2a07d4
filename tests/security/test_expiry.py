"""Issue 19, item 6: tickets and grants expire within minutes, and a log grant is bound to the
one request (workflow run) it was issued to. A pod starts only with a ticket for that very pod,
issued by the control worker just before the start, to the service's own workflow."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import node_pods, seed_spec
from outsider import outsider
from temporalio.exceptions import ApplicationError

from hms_mgmt import tickets
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import read_events
from hms_mgmt.models import ServiceSpec
from hms_mgmt.orchestrator import Orchestrator

SPEC = ServiceSpec.model_validate(seed_spec())
IMG = "sha256:" + "a" * 64


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    now = time.time()
    monkeypatch.setattr(tickets.time, "time", lambda: now + seconds)


def test_grants_start_tickets_and_stop_grants_expire_within_minutes(tmp_path, monkeypatch):
    assert max(tickets.GRANT_TTL_S, tickets.START_TICKET_TTL_S, tickets.STOP_GRANT_TTL_S) <= 600
    pod = str(uuid.uuid4())
    grant = tickets.grant(tmp_path, action="logs", service="hms-ach", user="vic", role="viewer",
                          bind={"pod": pod, "run": "r1"})
    start = tickets.start_ticket(tmp_path, service="hms-ach", revision=1, spec=SPEC, image_id=IMG, pod_id=pod, node="n1")
    stop = tickets.stop_grant(tmp_path, service="hms-ach", pod_id=pod, node="n1")

    def check_all() -> None:
        tickets.check_grant(tmp_path, grant, service="hms-ach", actions={"logs"}, bind={"pod": pod, "run": "r1"})
        tickets.verify_start(tmp_path, start, service="hms-ach", revision=1, spec=SPEC, image_id=IMG, pod_id=pod,
                             node="n1")
        assert tickets.verify_stop(tmp_path, stop, pod_id=pod, node="n1") == "hms-ach"

    check_all()
    later(monkeypatch, 601)
    for check in (
        lambda: tickets.check_grant(tmp_path, grant, service="hms-ach", actions={"logs"}, bind={"pod": pod}),
        lambda: tickets.verify_start(tmp_path, start, service="hms-ach", revision=1, spec=SPEC, image_id=IMG,
                                     pod_id=pod, node="n1"),
        lambda: tickets.verify_stop(tmp_path, stop, pod_id=pod, node="n1"),
    ):
        with pytest.raises(AccessDenied, match="expired"):
            check()


def test_a_log_grant_is_for_one_request_and_a_stop_for_one_pod_on_one_node(tmp_path):
    pod = str(uuid.uuid4())
    grant = tickets.grant(tmp_path, action="logs", service="hms-ach", user="vic", role="viewer",
                          bind={"pod": pod, "run": "r1"})
    with pytest.raises(AccessDenied, match="another run"):
        tickets.check_grant(tmp_path, grant, service="hms-ach", actions={"logs"}, bind={"pod": pod, "run": "r2"})
    stop = tickets.stop_grant(tmp_path, service="hms-ach", pod_id=pod, node="n1")
    for kw, what in (({"pod_id": str(uuid.uuid4()), "node": "n1"}, "pod"), ({"pod_id": pod, "node": "n2"}, "node")):
        with pytest.raises(AccessDenied, match=f"another {what}"):
            tickets.verify_stop(tmp_path, stop, **kw)


def test_a_deploy_grant_outlives_its_own_waits_only(tmp_path, monkeypatch):
    """What ``issue_ticket`` allows a deployer's grant kept through the image check and an approval."""
    g = tickets.grant(tmp_path, action="deploy", service="hms-ach", user="alice", role="ops_admin", bind={})
    later(monkeypatch, 3600)
    with pytest.raises(AccessDenied, match="expired"):
        tickets.check_grant(tmp_path, g, service="hms-ach", actions={"deploy"})
    tickets.check_grant(tmp_path, g, service="hms-ach", actions={"deploy"}, max_age_s=7200)
    with pytest.raises(AccessDenied, match="older than"):
        tickets.check_grant(tmp_path, g, service="hms-ach", actions={"deploy"}, max_age_s=1800)


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_copied_tickets_and_grants_start_and_read_nothing(temporal_env, hms: Orchestrator, settings):
    """An outsider copies from history what our workflows carry (the revision's admission ticket,
    a log grant) and runs our activities with it from their own workflow."""
    await hms.deploy(seed_spec(min_replicas=1, max_replicas=1), wait=True, timeout=120)
    st = await hms.status("hms-ach")
    (pod,) = st.pods
    # The path through Temporal (a node with no log stream): its grant is in history for anyone to copy.
    assert await hms._logs_through_temporal("hms-ach", pod, 5) is not None
    # What the node was asked in the logs request, as the Web UI shows it to anyone.
    logs_wf = [wf async for wf in temporal_env.client.list_workflows(
        f'WorkflowType = "PodLogsWorkflow" AND TaskQueue = "{settings.task_queue}"')]
    logs_in = None
    async for ev in temporal_env.client.get_workflow_handle(logs_wf[0].id).fetch_history_events():
        attrs = ev.activity_task_scheduled_event_attributes
        if ev.HasField("activity_task_scheduled_event_attributes") and attrs.activity_type.name == "pod_logs":
            logs_in = json.loads(attrs.input.payloads[0].data)
    assert logs_in and logs_in["grant"]
    # The revision's admission ticket, from the input of its rollout (DeployWorkflow).
    async for ev in temporal_env.client.get_workflow_handle(f"svc-hms-ach-deploy-{st.revision}").fetch_history_events():
        deploy_in = json.loads(ev.workflow_execution_started_event_attributes.input.payloads[0].data)
        break
    revision_ticket, image_id = deploy_in["ticket"], deploy_in["image_id"]
    assert revision_ticket
    wf_id = f"svc-hms-ach-heal-{uuid.uuid4()}"
    new_pod = str(uuid.uuid4())
    async with outsider(temporal_env.client) as them:
        with pytest.raises(ApplicationError, match="another run") as refused:
            await them.run("pod_logs", logs_in, settings.node_task_queue(), wf_id=wf_id)
        assert refused.value.type == "AccessDenied"
        ask = {"service": "hms-ach", "revision": st.revision, "spec": st.spec.model_dump(mode="json"),
               "image_id": image_id, "ticket": revision_ticket, "pod_id": new_pod, "node": settings.node}
        with pytest.raises(ApplicationError, match="not a workflow of service hms-ach") as refused:
            await them.run("start_ticket", ask, settings.task_queue, wf_id=wf_id)
        start = {k: ask[k] for k in ("service", "revision", "spec", "image_id", "ticket", "pod_id", "node")}
        with pytest.raises(ApplicationError, match="not a start ticket"):
            await them.run("start_pod", start, settings.node_task_queue(), wf_id=wf_id)
    refusals = [e for e in read_events(settings.state_dir) if e.type == "access.denied"]
    assert {e.data.get("action") for e in refusals} >= {"logs", "start_ticket", "start_pod"}
    assert all(e.data.get("workflow") == wf_id for e in refusals)
    assert [p.id for p in (await hms.status("hms-ach")).pods] == [pod.id]


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_a_stop_taken_after_its_grant_expired_is_asked_again(temporal_env, hms: Orchestrator, settings,
                                                                   monkeypatch):
    """A node whose worker takes a stop only after the grant's minutes (restarting, say) refuses
    it as expired; the workflow asks the control worker for a fresh grant and the stop happens."""
    await hms.deploy(seed_spec(min_replicas=1, max_replicas=1), wait=True, timeout=120)
    real = tickets.verify_stop
    expired: list[str] = []

    def first_one_expired(*args, **kw):
        if not expired:
            expired.append(kw["pod_id"])
            raise tickets.GrantExpired("the stop grant has expired")
        return real(*args, **kw)

    monkeypatch.setattr(tickets, "verify_stop", first_one_expired)
    await hms.undeploy("hms-ach")
    assert expired and not [h for h in node_pods(settings, "hms-ach") if h.running]
