"""The control plane and a node as two processes on one host: ``python -m worker --no-node``
runs the workflows and control activities, ``python -m worker --no-control`` the node's pods and
their health watch. A service deploys, its pods are the node worker's, each task queue is polled
by its own process only, and a killed pod is replaced. Real dev server, real process pods."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import REPO, eventually, make_settings, node_pods, seed_spec, sweep_pods, terminate_running
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from typer.testing import CliRunner

from hms_mgmt import nodeid
from hms_mgmt.cli.commands import app
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import WorkerProcess, kill_process_pod


async def pollers(client: Client, queue: str) -> set[str]:
    """Identities (``pid@host``) of the workers that polled ``queue`` for workflow or activity tasks."""
    found: set[str] = set()
    for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind))
        found |= {p.identity for p in resp.pollers}
    return found


async def test_control_only_and_node_only_workers_run_a_service_between_them(temporal_env, tmp_path: Path):
    s = make_settings(temporal_env, tmp_path / "state", "process")
    control = WorkerProcess(s, tmp_path / "control.log", args=["--no-node"])
    node = WorkerProcess(s, tmp_path / "node.log", args=["--no-control"])
    control.start()
    try:
        # The node enrols itself with the control plane's key, which the control worker makes.
        await eventually(lambda: nodeid.has_control_key(s.state_dir), timeout=30, what="the control key")
        node.start()
        orch = Orchestrator(temporal_env.client, s)
        await orch.deploy(seed_spec(health_interval_s=1.0), wait=True, timeout=120)

        assert control.proc is not None and node.proc is not None
        pod_pids = {int(h.extra["pid"]) for h in node_pods(s, "hms-ach")}
        assert len(pod_pids) == 2
        assert pod_pids <= {p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)}
        assert not psutil.Process(control.proc.pid).children(recursive=True), "the control worker started a pod"
        host = socket.gethostname()
        assert await pollers(temporal_env.client, s.task_queue) == {f"{control.proc.pid}@{host}"}
        assert await pollers(temporal_env.client, s.node_task_queue()) == {f"{node.proc.pid}@{host}"}

        # The node worker's health watch sees the crash; the control worker heals the service.
        victim = (await orch.status("hms-ach")).pods[0]
        kill_process_pod(s, victim.id)

        async def healed() -> bool:
            st = await orch.status("hms-ach", live=False)
            return st.ready_replicas == 2 and all(p.id != victim.id for p in st.pods)

        await eventually(healed, timeout=60, what="the killed pod replaced")
        assert node.proc.poll() is None and control.proc.poll() is None
    finally:
        node.stop()
        control.stop()
        await terminate_running(temporal_env, s)
        sweep_pods(s)


def test_a_worker_with_neither_role_is_refused(tmp_path: Path):
    py = subprocess.run([sys.executable, "-m", "worker", "--no-control", "--no-node"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert py.returncode == 2 and "not allowed with argument" in py.stderr
    cli = CliRunner().invoke(app, ["worker", "--no-control", "--no-node"], env={"HMS_STATE_DIR": str(tmp_path)})
    assert cli.exit_code != 0
    assert "--no-control and --no-node" in cli.output
