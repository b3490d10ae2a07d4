"""The first vertical slice, against the real dev server and real pods (process and docker)."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from conftest import eventually, make_settings, node_pods, seed_spec, sweep_pods, terminate_running, worker_process
from temporalio.client import WorkflowExecutionStatus

from hms_mgmt.errors import SpecError
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator
from worker.main import HmsWorker


def get(url: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


async def test_seed_dict_deploys_two_healthy_pods_and_redeploy_is_a_noop(hms: Orchestrator, settings):
    result = await hms.deploy(seed_spec(), wait=True, timeout=120)
    assert result.workflow_id == "svc-hms-ach"
    assert result.web_ui_url.endswith("/namespaces/default/workflows/svc-hms-ach")
    assert not result.already_running

    status = await hms.status("hms-ach")
    assert status.phase == "Running"
    assert len(status.pods) == 2 and status.ready_replicas == 2
    for pod in status.pods:
        assert pod.health == "healthy" and pod.ready
        assert pod.node == settings.node and pod.endpoint.startswith("127.0.0.1:")
        assert pod.started_at is not None
        code, headers, _ = await asyncio.to_thread(get, f"http://{pod.endpoint}/health")
        assert code == 200 and headers["X-HMS-Pod"] == pod.id
    running = node_pods(settings, "hms-ach")
    assert sorted(h.pod_id for h in running) == sorted(p.id for p in status.pods)

    again = await hms.deploy(seed_spec(), wait=True)
    assert again.already_running and again.run_id == result.run_id
    assert len(node_pods(settings, "hms-ach")) == 2
    assert [s.name for s in await hms.list()] == ["hms-ach"]

    final = await hms.undeploy("hms-ach")
    assert final is not None and final.phase == "Stopped" and final.pods == []
    assert node_pods(settings) == []
    for pod in status.pods:
        with pytest.raises(OSError):
            await asyncio.to_thread(get, f"http://{pod.endpoint}/health", 1.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"min_replicas": 5, "max_replicas": 2}, "max_replicas"),
        ({"cpu_target": 0}, "cpu_target"),
        ({"cpu_target": 150}, "cpu_target"),
        ({"name": "HMS_ACH!"}, "name"),
        ({"replicas": 3}, "replicas"),
        ({"image": None}, "image"),
        ({"image": "Not An Image"}, "image"),
    ],
)
async def test_invalid_spec_names_the_field_and_starts_nothing(hms: Orchestrator, settings, overrides, field):
    spec = seed_spec(**overrides)
    if spec.get("image") is None:
        del spec["image"]
    with pytest.raises(SpecError, match=field):
        await hms.deploy(spec)
    started = [wf async for wf in hms.client.list_workflows(
        f'TaskQueue = "{settings.task_queue}" AND WorkflowType != "NodeRegistry"')]
    assert started == []
    assert node_pods(settings) == []


async def test_logs_returns_the_pods_last_lines(hms: Orchestrator, settings):
    await hms.deploy(seed_spec(min_replicas=1), wait=True, timeout=120)
    pod = (await hms.status("hms-ach")).pods[0]
    await asyncio.to_thread(get, f"http://{pod.endpoint}/health")
    lines = await eventually(lambda: hms.logs("hms-ach", pod.id, tail=5), what="log lines")
    assert 0 < len(lines) <= 5
    assert any("/health" in line for line in lines)
    await hms.undeploy("hms-ach")


async def test_worker_killed_mid_deploy_finishes_with_exact_pods_and_no_orphan(temporal_env, tmp_path, runtime_name):
    """SIGKILL the worker while pods are coming up; a new worker finishes the same rollout."""
    settings = make_settings(temporal_env, tmp_path / "state", runtime_name)
    hms = Orchestrator(temporal_env.client, settings)
    async with worker_process(temporal_env, settings, tmp_path / "worker.log") as worker:
        # Pods that take 3 s to answer /health keep the rollout in flight long enough to kill it.
        spec = seed_spec(min_replicas=3, env={"HMS_STARTUP_DELAY_S": "3"})
        await hms.deploy(spec)
        await eventually(lambda: len(node_pods(settings, "hms-ach")) >= 1, timeout=60, what="a pod started")
        worker.kill()
        # No worker now: the deploy stays durable in Temporal, half done.
        desc = await hms.client.get_workflow_handle("svc-hms-ach").describe()
        assert desc.status == WorkflowExecutionStatus.RUNNING
        worker.start()
        status = await hms.wait_for("hms-ach", timeout=120)
        assert len(status.pods) == 3 and all(p.ready for p in status.pods)
        actual = sorted(h.pod_id for h in node_pods(settings, "hms-ach"))
        assert actual == sorted(p.id for p in status.pods), "a pod exists that the workflow does not know"
        final = await hms.undeploy("hms-ach")
        assert final is not None and final.phase == "Stopped"
        assert node_pods(settings) == []
        desc = await hms.client.get_workflow_handle("svc-hms-ach").describe()
        assert desc.status == WorkflowExecutionStatus.COMPLETED


async def test_no_capacity_raises_an_alert_and_resumes_when_a_node_grows(temporal_env, tmp_path):
    """The Scheduler finds room for one pod of two: the other waits (capacity.alert) and
    starts once the operator gives the node more room — no restart, no lost pod."""
    settings = make_settings(temporal_env, tmp_path / "state", "process", node_max_pods=1)
    current = [settings]
    try:
        async with HmsWorker(temporal_env.client, settings, settings_loader=lambda: current[0]):
            hms = Orchestrator(temporal_env.client, settings)
            await hms.deploy(seed_spec())
            alert = await eventually(
                lambda: [e for e in read_events(settings.state_dir) if e.type == "capacity.alert"],
                timeout=60, what="capacity.alert",
            )
            assert "no node has room for 1 more pod(s) of hms-ach" in alert[0].reason
            st = await eventually(lambda: _phase_with_pods(hms, "Deploying", 1), timeout=30, what="1 pod, waiting")
            assert st.ready_replicas <= 1 and len(node_pods(settings, "hms-ach")) == 1

            current[0] = settings.model_copy(update={"node_max_pods": 4})
            st = await hms.wait_for("hms-ach", timeout=60)
            assert st.ready_replicas == 2 and len(node_pods(settings, "hms-ach")) == 2
            await hms.undeploy("hms-ach")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


async def _phase_with_pods(hms: Orchestrator, phase: str, n: int):
    st = await hms.status("hms-ach")
    return st if st.phase == phase and len(node_pods(hms.settings, "hms-ach")) == n else None
