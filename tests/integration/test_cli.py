"""The `hms` command line as an operator runs it: a real subprocess per command, against the
real dev server, with a real worker process and process-runtime pods."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from conftest import (
    REPO,
    WorkerProcess,
    eventually,
    make_settings,
    node_pods,
    sweep_pods,
    terminate_running,
    worker_process,
)
from temporalio.testing import WorkflowEnvironment

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import free_port
from hms_mgmt.trust import TrustStore


def hms_command() -> list[str]:
    script = Path(sys.executable).parent / "hms"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hms_mgmt.cli"]


def run_hms(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*hms_command(), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


async def hms(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # A thread, so the session's event loop (and the dev server fixture on it) keeps running.
    return await asyncio.to_thread(run_hms, *args, env=env, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    env.update(COLUMNS="200", PYTHONPATH=str(REPO), **values)
    return env


@pytest_asyncio.fixture(loop_scope="session")
async def cli(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[tuple[Settings, dict[str, str]]]:
    """Settings and the environment an operator's shell would have, with a worker process running."""
    s = make_settings(temporal_env, tmp_path / "state", "process")
    async with worker_process(temporal_env, s, tmp_path / "worker.log") as worker:
        yield s, {**worker.env(), "COLUMNS": "200"}


async def test_deploy_status_logs_events_undeploy(temporal_env: WorkflowEnvironment, cli):
    s, env = cli
    out = ok(await hms("deploy", "examples/hms-ach.yaml", "--wait", env=env))
    assert "hms-ach is Running: 2/2 pods ready" in out
    assert "/namespaces/default/workflows/svc-hms-ach" in out

    out = ok(await hms("status", env=env))
    assert re.search(r"hms-ach\s*\W\s*Running\s*\W\s*2/2\s*\W\s*registry\.gov/hms-ach:1\.4", out), out

    pods = (await Orchestrator(temporal_env.client, s).status("hms-ach")).pods
    assert len(pods) == 2
    out = ok(await hms("status", "hms-ach", env=env))
    rows = [line for line in out.splitlines() if "hms-ach" in line and "healthy" in line]
    assert len(rows) == 2, out
    for pod in pods:
        assert pod.id[:8] in out and pod.endpoint in out

    prefix = pods[0].id[:8]

    async def log_lines() -> list[str]:
        result = await hms("logs", "hms-ach", prefix, "--tail", "3", env=env)
        return ok(result).splitlines()

    lines = await eventually(log_lines, timeout=30, what="log lines")
    assert 0 < len(lines) <= 3

    out = ok(await hms("events", env=env))
    assert re.search(r"service\.deployed\s+hms-ach\s+2/2 pods ready", out), out

    out = ok(await hms("undeploy", "hms-ach", env=env))
    assert "undeployed hms-ach: Stopped" in out
    assert node_pods(s) == []

    out = ok(await hms("events", "--service", "hms-ach", env=env))
    assert "service.undeployed" in out
    result = await hms("status", "hms-ach", env=env)
    assert result.returncode in (0, 4)  # a finished workflow may still answer its last status


async def test_hms_worker_serves_the_node_it_is_given(temporal_env: WorkflowEnvironment, tmp_path: Path):
    s = make_settings(temporal_env, tmp_path / "state", "process")
    env = {**WorkerProcess(s, tmp_path / "unused.log").env(), "COLUMNS": "200"}
    node = f"w{uuid.uuid4().hex[:6]}"
    worker_env = {k: v for k, v in env.items() if k not in ("HMS_NODE", "HMS_RUNTIME")}
    with open(tmp_path / "worker.log", "ab") as log:
        worker = subprocess.Popen(
            [*hms_command(), "worker", "--node", node, "--runtime", "process"],
            env=worker_env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    name = f"cli-w-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: {name}\nimage: registry.gov/hms-ach:1.4\nmin_replicas: 1\nmax_replicas: 2\ncpu_target: 60\n"
    )
    try:
        # Signed as an operator would, with `hms image sign`.
        ok(await hms("image", "sign", "registry.gov/hms-ach:1.4", "--runtime", "process", env=env))
        ok(await hms("deploy", str(spec), "--timeout", "60", env={**env, "HMS_NODE": node}))
        status = await Orchestrator(temporal_env.client, s).status(name)
        assert [p.node for p in status.pods] == [node]
        ok(await hms("undeploy", name, env=env))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise
        await terminate_running(temporal_env, s)
        assert sweep_pods(s.model_copy(update={"node": node})) == [], "the test left pods running"
    assert code == 0, (tmp_path / "worker.log").read_text()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("cpu_target: 150", "cpu_target"),
        ("cpu_target: 60\nreplicas: 3", "replicas"),
        ("cpu_target: 60\nimage: Not An Image", "image"),
    ],
)
async def test_bad_spec_file_exits_2_naming_the_field(temporal_env: WorkflowEnvironment, tmp_path: Path, body, field):
    s = make_settings(temporal_env, tmp_path / "state", "process")
    name = f"cli-bad-{uuid.uuid4().hex[:6]}"
    lines = {"name": name, "image": "registry.gov/hms-ach:1.4", "min_replicas": "1", "max_replicas": "2"}
    for line in body.splitlines():
        key, value = line.split(": ", 1)
        lines[key] = value
    spec = tmp_path / "bad.yaml"
    spec.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    env = clean_env(
        HMS_TEMPORAL_ADDRESS=s.temporal_address, HMS_STATE_DIR=str(tmp_path / "state"), HMS_TASK_QUEUE=s.task_queue
    )
    result = await hms("deploy", str(spec), env=env)
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and field in result.stderr
    assert "Traceback" not in result.stderr
    started = [wf async for wf in temporal_env.client.list_workflows(
        f'TaskQueue = "{s.task_queue}" AND WorkflowType != "NodeRegistry"')]
    assert started == []


async def test_user_errors_are_one_line_and_exit_1(temporal_env: WorkflowEnvironment, tmp_path: Path):
    s = make_settings(temporal_env, tmp_path / "state", "process")
    env = clean_env(
        HMS_TEMPORAL_ADDRESS=s.temporal_address, HMS_STATE_DIR=str(tmp_path / "state"), HMS_TASK_QUEUE=s.task_queue
    )
    result = await hms("status", f"cli-none-{uuid.uuid4().hex[:6]}", env=env)
    assert result.returncode == 4 and result.stderr.startswith("error: no service named"), result  # not found
    result = await hms("status", env={**env, "HMS_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert result.returncode == 1 and "cannot reach Temporal" in result.stderr and "Traceback" not in result.stderr


async def test_auth_and_image_commands(tmp_path: Path):
    env = clean_env(HMS_STATE_DIR=str(tmp_path / "state"), HMS_RUNTIME="process")
    ok(await hms("auth", "init", env=env))
    token = ok(await hms("auth", "issue", "--user", "alice", "--role", "ops_admin", "--ttl", "2h", "--save", env=env))
    assert token.count(".") == 2 and "\n" == token[-1] and len(token.splitlines()) == 1
    out = ok(await hms("auth", "whoami", env=env))
    assert re.search(r"user\s+alice", out) and re.search(r"role\s+ops_admin", out) and "(in 1h 59m)" in out
    result = await hms("auth", "issue", "--user", "bob", "--role", "king", env=env)
    assert result.returncode == 2 and "unknown role 'king'" in result.stderr

    out = ok(await hms("image", "sign", "registry.gov/hms-frm:1.0", env=env))
    assert "signed registry.gov/hms-frm:1.0" in out and "by alice" in out
    record = TrustStore(tmp_path / "state").get("registry.gov/hms-frm:1.0")
    assert record is not None and record.content_id in out
    assert "registry.gov/hms-frm:1.0" in ok(await hms("image", "list", env=env))
    ok(await hms("image", "revoke", "registry.gov/hms-frm:1.0", env=env))
    result = await hms("image", "revoke", "registry.gov/hms-frm:1.0", env=env)
    assert result.returncode == 1 and "no trust record" in result.stderr
    result = await hms("image", "sign", "registry.gov/unknown:1", env=env)
    assert result.returncode == 1 and "not in the process runtime's image catalog" in result.stderr


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


MINE = """name: hms-mine
image: registry.gov/hms-notify:1.0
min_replicas: 1
max_replicas: 1
cpu_target: 60
"""


@pytest.mark.slow
def test_demo_runs_everything_and_leaves_nothing_of_its_own_behind(tmp_path: Path):
    """The demo undeploys its three services and stops everything it started; a service a user
    deployed into its stack meanwhile stays deployed, and the demo says so."""
    state = tmp_path / "state"
    port, ui_port = free_port(), free_port()
    env = clean_env(HMS_STATE_DIR=str(state), HMS_RUNTIME="process", HMS_NODE=f"demo{uuid.uuid4().hex[:6]}")
    (tmp_path / "mine.yaml").write_text(MINE)
    proc = subprocess.Popen(
        [*hms_command(), "demo", "--port", str(port), "--ui-port", str(ui_port), "--exit-after", "20"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Every pod record the demo writes while it runs, so we can check their processes afterwards.
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 240
    mine: subprocess.Popen[str] | None = None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for path in state.glob("pods/*/*.json"):
                try:
                    seen[path.stem] = json.loads(path.read_text())
                except (OSError, ValueError):
                    pass
            if mine is None and len(seen) == 4:  # the demo's pods are up: a user deploys their own
                mine = subprocess.Popen([*hms_command(), "deploy", str(tmp_path / "mine.yaml")], cwd=REPO,
                                        env={**env, "HMS_TEMPORAL_ADDRESS": f"127.0.0.1:{port}"},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        mine_out = mine.communicate(timeout=60)[0] if mine is not None else ""
        ours = [rec for rec in seen.values() if rec.get("service") == "hms-mine"]
        for rec in ours:  # the user's pod, left running by design: this test's to stop
            if alive(rec["pid"], rec["create_time"]):
                psutil.Process(rec["pid"]).kill()
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    for name, replicas in (("hms-ach", "2/2"), ("hms-frm", "1/1"), ("hms-notify", "1/1")):
        # Piped: one plain line per change (issue 24), not progress bars.
        assert re.search(rf"{name}\s+Running\s+{replicas} ready", stdout), stdout
        assert f"http://localhost:{ui_port}/namespaces/default/workflows/svc-{name}" in stdout
        assert f"undeployed {name} (Stopped)" in stdout
        assert TrustStore(state).get(f"registry.gov/{name}:{'1.4' if name == 'hms-ach' else '1.0'}") is not None
    assert "still there after the undeploy" not in stderr
    assert "Ctrl-C undeploys the example services" in stdout or "--exit-after" in stdout

    assert mine is not None and mine.returncode == 0, mine_out
    assert "undeployed hms-mine" not in stdout
    assert re.search(r"left deployed: hms-mine \(1 pod\(s\)\).*hms undeploy hms-mine", " ".join(stderr.split())), stderr
    assert len(ours) == 1 and len(seen) == 5, seen  # 2 + 1 + 1 pods of the demo's, and the user's
    assert [p.stem for p in state.glob("pods/*/*.json")] == [p for p, rec in seen.items() if rec in ours]
    assert [pod for pod, rec in seen.items() if rec not in ours and alive(rec["pid"], rec["create_time"])] == []
    assert not port_open(port) and not port_open(ui_port)  # the dev server it started is gone
