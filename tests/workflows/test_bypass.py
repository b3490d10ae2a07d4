"""The ways around governance, tried as an attacker who can reach Temporal but holds no token:
each starts no pod and leaves an ``access.denied`` event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid

import pytest
from conftest import eventually, node_pods, seed_spec, temporal_binary
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from activities.pods import PodActivities
from hms_mgmt import tickets
from hms_mgmt.errors import RequestRefused
from hms_mgmt.events import EventSink, read_events
from hms_mgmt.models import PodStatus, ServiceSpec
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes import make_runtime
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import (
    DeployInput,
    HealInput,
    LogsOutput,
    PodFailure,
    PodLogsInput,
    ScaleInput,
    ServiceInput,
    ServiceState,
    StartPodInput,
    StopPodInput,
)


def denied(settings) -> list[str]:
    return [e.reason for e in read_events(settings.state_dir) if e.type == "access.denied"]


def cli_start(settings, workflow_type: str, payload: str, wf_id: str) -> None:
    out = subprocess.run(
        [temporal_binary(), "workflow", "start", "--address", settings.temporal_address, "--type", workflow_type,
         "--task-queue", settings.task_queue, "--workflow-id", wf_id, "--input", payload],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


async def test_children_started_on_their_own_start_no_pod(temporal_env, hms: Orchestrator, settings):
    spec = ServiceSpec.model_validate(seed_spec())
    placement = hms._placement()
    pod = str(uuid.uuid4())
    attempts = {
        "DeployWorkflow": DeployInput(spec=spec, revision=1, pod_ids=[pod], placement=placement),
        "ScaleWorkflow": ScaleInput(spec=spec, revision=1, from_replicas=0, to_replicas=1, reason="x",
                                    placement=placement, new_pod_ids=[pod]),
        "HealWorkflow": HealInput(spec=spec, revision=1, failed=PodStatus(id=pod, node=settings.node),
                                  failure=PodFailure(pod_id=pod, kind="exited", detail="x"), placement=placement),
    }
    for kind, inp in attempts.items():
        wf_id = f"attack-{kind}-{uuid.uuid4().hex[:6]}"
        await asyncio.to_thread(cli_start, settings, kind, inp.model_dump_json(), wf_id)
        with pytest.raises(WorkflowFailureError) as failed:
            await temporal_env.client.get_workflow_handle(wf_id).result()
        assert isinstance(failed.value.cause, ApplicationError) and failed.value.cause.type == "AccessDenied"
        assert "started on its own" in failed.value.cause.message
    assert node_pods(settings) == []
    assert len([r for r in denied(settings) if "started on its own" in r]) == 3


async def test_a_service_started_with_state_of_its_own_is_refused(temporal_env, hms: Orchestrator, settings):
    spec = ServiceSpec.model_validate(seed_spec())
    forged = ServiceState(phase="Running", desired_replicas=3, revision=1)
    inp = ServiceInput(spec=spec, placement=hms._placement(), state=forged)
    await asyncio.to_thread(cli_start, settings, "ServiceWorkflow", inp.model_dump_json(), "svc-hms-ach")
    final = await temporal_env.client.get_workflow_handle("svc-hms-ach").result()
    assert final["phase"] == "Rejected"
    await asyncio.sleep(1.0)
    assert node_pods(settings) == []
    assert any("state of its own" in r for r in denied(settings))


async def test_a_cron_run_of_a_service_started_with_state_of_its_own_is_refused(temporal_env, hms: Orchestrator,
                                                                                   settings):
    """A cron run names the run before it as a continue-as-new does, and gets the first run's
    input again. The forged state (a Running service whose one ready pod is the attacker's
    address) is refused in every run: no pod starts and no router is told of that address."""
    spec = ServiceSpec.model_validate(seed_spec())
    evil = PodStatus(id=str(uuid.uuid4()), node=settings.node, endpoint="127.0.0.1:9", ready=True, health="healthy")
    forged = ServiceState(phase="Running", desired_replicas=1, revision=1, pods=[evil])
    inp = ServiceInput(spec=spec, placement=hms._placement(), state=forged)
    out = await asyncio.to_thread(
        subprocess.run,
        [temporal_binary(), "workflow", "start", "--address", settings.temporal_address, "--type", "ServiceWorkflow",
         "--task-queue", settings.task_queue, "--workflow-id", "svc-hms-ach", "--input", inp.model_dump_json(),
         "--cron", "@every 2s"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    try:
        await eventually(lambda: _refused_runs(settings, at_least=2), timeout=30,
                         what="the first run and a cron run both refused")
        # This test's runs only: other tests deploy an hms-ach of their own on the same server.
        query = f'WorkflowId = "svc-hms-ach" AND TaskQueue = "{settings.task_queue}"'
        histories = [h async for h in temporal_env.client.list_workflows(query)]
        assert len(histories) >= 2
        for run in histories:
            history = await temporal_env.client.get_workflow_handle("svc-hms-ach", run_id=run.run_id).fetch_history()
            scheduled = {e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
                         if e.HasField("activity_task_scheduled_event_attributes")}
            assert "publish_endpoints" not in scheduled and "start_pod" not in scheduled, scheduled
    finally:
        await handle.terminate("test done")
    assert node_pods(settings) == []


async def _refused_runs(settings, *, at_least: int) -> bool:
    return len([r for r in denied(settings) if "state of its own" in r]) >= at_least


async def test_a_service_whose_placement_names_another_control_queue_is_refused(temporal_env, hms: Orchestrator,
                                                                                   settings):
    """The placement is the starter's word: pointing its control queue at the attacker's own
    worker would have them answer authorize and issue tickets. The run refuses at once."""
    spec = ServiceSpec.model_validate(seed_spec())
    evil_queue = f"evil-{uuid.uuid4().hex[:6]}"
    placement = hms._placement().model_copy(update={"control_task_queue": evil_queue})
    inp = ServiceInput(spec=spec, placement=placement)
    await asyncio.to_thread(cli_start, settings, "ServiceWorkflow", inp.model_dump_json(), "svc-hms-ach")
    final = await temporal_env.client.get_workflow_handle("svc-hms-ach").result()
    assert final["phase"] == "Rejected" and final["failure"]["kind"] == "access_denied"
    assert any(evil_queue in r for r in denied(settings))
    history = await temporal_env.client.get_workflow_handle("svc-hms-ach").fetch_history()
    assert evil_queue not in {e.activity_task_scheduled_event_attributes.task_queue.name for e in history.events
                              if e.HasField("activity_task_scheduled_event_attributes")}
    assert node_pods(settings) == []


async def test_forged_internal_signals_change_nothing(temporal_env, hms: Orchestrator, settings):
    await hms.deploy(seed_spec(), wait=True, timeout=120)
    st = await hms.status("hms-ach")
    live = st.pods[0]
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    # Unbook a live pod (the orphan sweep would then kill it), and inject a pod for the routers.
    await handle.signal("heal_attempt_failed", {"failed_pod": live.id, "replacement": live.id, "attempt": 1,
                                                "reason": "forged", "next_delay_s": 1})
    await handle.signal("pod_reported", {"id": str(uuid.uuid4()), "node": settings.node,
                                         "endpoint": "127.0.0.1:1", "ready": True, "health": "healthy"})
    # Tell it the node its pods run on is lost (the registry holds it as Ready): it would replace them all.
    await handle.signal("node_lost", {"node": settings.node, "reason": "forged"})
    await eventually(lambda: len([r for r in denied(settings) if "ignored" in r]) >= 3, timeout=30,
                     what="the forged signals refused")
    after = await hms.status("hms-ach")
    assert sorted(p.id for p in after.pods) == sorted(p.id for p in st.pods) and after.crash_count == 0
    assert after.heal_count == 0

    # A live pod's logs, asked for with no token: through our PodLogsWorkflow ...
    logs_in = PodLogsInput(pod_id=live.id, service="hms-ach", node_task_queue=settings.node_task_queue())
    wf_id = f"attack-logs-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(cli_start, settings, "PodLogsWorkflow", logs_in.model_dump_json(), wf_id)
    with pytest.raises(WorkflowFailureError) as failed:
        await temporal_env.client.get_workflow_handle(wf_id).result()
    assert isinstance(failed.value.cause, ApplicationError) and "no identity" in failed.value.cause.message
    # ... with a pod id that walks out of the state directory: the run fails at once, naming the field
    # (it does not sit retrying a workflow task that cannot decode its input).
    bad_in = logs_in.model_dump(mode="json") | {"pod_id": "../../keys/control"}
    wf_id = f"attack-logs-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(cli_start, settings, "PodLogsWorkflow", json.dumps(bad_in), wf_id)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(temporal_env.client.get_workflow_handle(wf_id).result(), 30)
    assert "pod_id" in str(failed.value.cause) and "not a UUID" in str(failed.value.cause)
    # ... and straight at the node's activity (an attacker's own workflow), with a grant for another pod.
    runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    acts = PodActivities(runtime, TrustStore(settings.state_dir), EventSink(settings.state_dir))
    other_pod = tickets.grant(settings.state_dir, action="logs", service="hms-ach", user="vic", role="viewer",
                              bind={"pod": str(uuid.uuid4())})
    try:
        for grant, why in (("", "no grant"), (other_pod, "another pod")):
            with pytest.raises(ApplicationError, match=why):
                await ActivityEnvironment().run(acts.pod_logs, logs_in.model_copy(update={"grant": grant}))
    finally:
        await acts.close()
    assert len([r for r in denied(settings) if "logs" in r and "refused" in r]) >= 3
    assert await hms.logs("hms-ach", live.id, 5) is not None  # the operator's own token still reads them
    (await hms.undeploy("hms-ach"))


async def test_a_request_proof_read_from_a_history_is_good_for_no_other_run(temporal_env, hms: Orchestrator, settings):
    """A proof is in the history of the run it was sent to, where anyone who reaches Temporal can
    read it. Handed to a run of their own (a PodLogsWorkflow they start, while the proof still
    lives), it is refused: a proof is good for the one run that first presented it."""
    await hms.deploy(seed_spec(), wait=True, timeout=120)
    live = (await hms.status("hms-ach")).pods[0]
    inp = PodLogsInput(pod_id=live.id, service="hms-ach", node_task_queue=settings.node_task_queue(), tail=5,
                       proof=hms._prove("logs", "hms-ach", pod=live.id))
    owner = await temporal_env.client.execute_workflow(
        "PodLogsWorkflow", inp, id=f"svc-hms-ach-logs-{uuid.uuid4().hex[:8]}", task_queue=settings.task_queue,
        result_type=LogsOutput)
    assert owner.lines is not None
    wf_id = f"attack-logs-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(cli_start, settings, "PodLogsWorkflow", inp.model_dump_json(), wf_id)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(temporal_env.client.get_workflow_handle(wf_id).result(), 60)
    assert "already used" in str(failed.value.cause), failed.value.cause
    assert any("already used" in r for r in denied(settings))
    await hms.undeploy("hms-ach")


async def test_start_pod_without_a_valid_ticket_is_refused(settings, tmp_path):
    """An attacker's own worker on our node queue could schedule start_pod directly."""
    spec = ServiceSpec.model_validate(seed_spec())
    store = TrustStore(settings.state_dir)
    runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    image_id = runtime.content_id(spec.image)
    acts = PodActivities(runtime, store, EventSink(settings.state_dir))
    pod = str(uuid.uuid4())
    admitted = dict(service="hms-ach", revision=1, spec=spec, image_id=image_id)
    revision_ticket = tickets.issue(settings.state_dir, **admitted)
    good = tickets.start_ticket(settings.state_dir, **admitted, pod_id=pod, node=settings.node)
    other = tmp_path / "other"
    other.mkdir()
    forged = tickets.start_ticket(other, **admitted, pod_id=pod, node=settings.node)
    bigger = spec.model_copy(update={"cpu_limit": 4.0})
    cases = [
        ("", spec, pod, "no admission ticket"),
        (forged, spec, pod, "forged"),
        (good, bigger, pod, "another spec"),  # a ticket for revision 1's spec, asked to start a different one
        (good, spec, str(uuid.uuid4()), "another pod"),  # a ticket copied from history, for another pod
        (revision_ticket, spec, pod, "not a start ticket"),  # the revision's record alone starts nothing
    ]
    try:
        for ticket, pod_spec, pod_id, why in cases:
            inp = StartPodInput(pod_id=pod_id, service="hms-ach", revision=1, node=settings.node,
                                spec=pod_spec, image_id=image_id, ticket=ticket)
            with pytest.raises(ApplicationError, match=why):
                await ActivityEnvironment().run(acts.start_pod, inp)
        assert node_pods(settings) == []
        assert len([r for r in denied(settings) if "not started" in r]) == len(cases)
        # A pod its service stopped on this node does not start again on its own (valid) ticket,
        # read from a history: a pod id starts once.
        stop = tickets.stop_grant(settings.state_dir, service="hms-ach", pod_id=pod, node=settings.node)
        await ActivityEnvironment().run(acts.stop_pod, StopPodInput(pod_id=pod, grace_s=0, service="hms-ach",
                                                                    node=settings.node, grant=stop))
        inp = StartPodInput(pod_id=pod, service="hms-ach", revision=1, node=settings.node, spec=spec,
                            image_id=image_id, ticket=good)
        with pytest.raises(ApplicationError, match="this node stopped it"):
            await ActivityEnvironment().run(acts.start_pod, inp)
        # Nor after the node worker restarts (a new process remembers what the last one stopped).
        restarted = PodActivities(runtime, TrustStore(settings.state_dir), EventSink(settings.state_dir))
        with pytest.raises(ApplicationError, match="this node stopped it"):
            await ActivityEnvironment().run(restarted.start_pod, inp)
        assert node_pods(settings) == []
        # A damaged record starts nothing (believed empty, it would start every stopped pod again).
        restarted.stopped.path.write_text("")
        with pytest.raises(ApplicationError, match="is damaged"):
            await ActivityEnvironment().run(restarted.start_pod, inp.model_copy(update={"pod_id": str(uuid.uuid4())}))
        assert node_pods(settings) == []
    finally:
        await acts.close()


def test_tickets_bind_service_revision_spec_and_image(tmp_path):
    spec = ServiceSpec.model_validate(seed_spec())
    t = tickets.issue(tmp_path, service="hms-ach", revision=2, spec=spec, image_id="sha256:" + "a" * 64)
    tickets.verify(tmp_path, t, service="hms-ach", revision=2, spec=spec, image_id="sha256:" + "a" * 64)
    # An in-place change keeps it; anything a pod runs does not.
    tickets.verify(tmp_path, t, service="hms-ach", revision=2, spec=spec.model_copy(update={"max_replicas": 5}),
                   image_id="sha256:" + "a" * 64)
    from hms_mgmt.errors import AccessDenied

    for kw, field in [({"revision": 3}, "revision"), ({"service": "hms-frm"}, "service"),
                      ({"image_id": "sha256:" + "b" * 64}, "image id"),
                      ({"spec": spec.model_copy(update={"env": {"X": "1"}})}, "spec")]:
        args = {"service": "hms-ach", "revision": 2, "spec": spec, "image_id": "sha256:" + "a" * 64, **kw}
        with pytest.raises(AccessDenied, match=field):
            tickets.verify(tmp_path, t, **args)
    head, sig = t.split(".")
    with pytest.raises(AccessDenied, match="forged"):
        tickets.verify(tmp_path, head + "." + sig[::-1], service="hms-ach", revision=2, spec=spec,
                       image_id="sha256:" + "a" * 64)
    assert json.loads(__import__("base64").urlsafe_b64decode(head + "==")).get("svc") == "hms-ach"


async def test_a_reset_to_before_the_undeploy_starts_no_pod(temporal_env, hms: Orchestrator, settings):
    """``temporal workflow reset`` makes a new run from a closed one's history up to an event of
    the attacker's choosing: one taken just before the undeploy holds the deployer's grant and the
    revision's admission ticket as results, and would heal its (gone) pods back with no token."""
    await hms.deploy(seed_spec(), wait=True, timeout=120)
    await hms.undeploy("hms-ach", wait=True, timeout=60)
    assert node_pods(settings, "hms-ach") == []
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    closed = (await handle.describe()).run_id
    history = await temporal_env.client.get_workflow_handle("svc-hms-ach", run_id=closed).fetch_history()
    undeploy_at = next(e.event_id for e in history.events
                       if e.HasField("workflow_execution_update_accepted_event_attributes")
                       and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
                       == "undeploy")
    point = max(e.event_id for e in history.events
                if e.event_id < undeploy_at and e.HasField("workflow_task_completed_event_attributes"))
    reset = await asyncio.to_thread(subprocess.run, [
        temporal_binary(), "workflow", "reset", "--address", settings.temporal_address, "-w", "svc-hms-ach",
        "-r", closed, "-e", str(point), "--reason", "by an outsider", "--reapply-exclude", "Signal",
        "--reapply-exclude", "Update", "-y"], capture_output=True, text=True, timeout=60)
    assert reset.returncode == 0, reset.stderr
    await eventually(lambda: any("workflow reset" in r for r in denied(settings)), timeout=60,
                     what="the reset run refused")
    await asyncio.sleep(3)  # a heal or a scale-up would have started its pods by now
    assert node_pods(settings, "hms-ach") == []
    with contextlib.suppress(RPCError):  # the reset run may have ended on its refusals already
        await handle.terminate("test over")


async def test_an_approver_signs_nothing_for_a_run_that_is_not_our_service(temporal_env, hms: Orchestrator, settings):
    """A run started as ``svc-hms-ach`` on the attacker's own queue answers status as they like (a
    small spec, a big request's hash): the approver's client looks at the run before it signs."""
    evil_queue = f"evil-{uuid.uuid4().hex[:6]}"
    out = await asyncio.to_thread(subprocess.run, [
        temporal_binary(), "workflow", "start", "--address", settings.temporal_address, "--type", "ServiceWorkflow",
        "--task-queue", evil_queue, "--workflow-id", "svc-hms-ach", "--input", "{}"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        with pytest.raises(RequestRefused, match="not signing for hms-ach: .*not our ServiceWorkflow"):
            await hms.approval("approve", "hms-ach")
    finally:
        await temporal_env.client.get_workflow_handle("svc-hms-ach").terminate("test over")
