"""docker-compose.yml end to end, as a user runs it: build, `up -d`, the seed's example deploys
from the host through it, the router serves the service, `down` leaves no container of ours.

Runs in CI (CI=true); elsewhere it skips, since it builds an image and binds five ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import REPO, require_docker

from hms_mgmt.testing import free_port

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def containers(*filters: str) -> list[str]:
    args = ["docker", "ps", "-aq"] + [f"--filter={f}" for f in filters]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status
    except OSError:
        return 0


def test_compose_up_deploy_route_down(tmp_path: Path) -> None:
    if os.environ.get("CI") != "true":
        pytest.skip("the compose test runs in CI (CI=true): it builds an image and binds five ports")
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: apt-get install -y docker-compose")
    require_docker()
    project = f"hmsci{uuid.uuid4().hex[:6]}"
    node = f"compose-{project}"
    state = tmp_path / "state"
    ports = {k: str(free_port()) for k in ("HMS_TEMPORAL_PORT", "HMS_UI_PORT", "HMS_ROUTER_PORT", "HMS_DASHBOARD_PORT",
                                           "HMS_METRICS_PORT")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    env.update(ports, COMPOSE_PROJECT_NAME=project, HMS_NODE=node, HMS_COMPOSE_STATE=str(state),
               HMS_IMAGE_TAG=os.environ.get("HMS_IMAGE_TAG", "ci"))
    base = os.environ.get("HMS_BASE_IMAGE", "hms-base:bookworm")
    if base == "hms-base:bookworm":  # no pip in it: the offline wheels
        run(["bash", "scripts/compose_wheels.sh"], env, 600)
    run(["docker-compose", "build"], env, 600)
    try:
        run(["docker-compose", "up", "-d"], env, 180)
        client_env = {**env, "HMS_STATE_DIR": str(state), "PYTHONPATH": str(REPO)}
        run([sys.executable, "examples/deploy_ach.py"], client_env, 180)
        deadline = time.monotonic() + 120  # the seed's deploy() returns once admitted: wait for Running
        while True:
            status = run([sys.executable, "-m", "hms_mgmt.cli", "status", "hms-ach"], client_env, 60).stdout
            if ("Running" in status and "2/2 ready" in status) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "Running" in status and "2/2 ready" in status, status
        assert len(containers(f"label=hms.node={node}", "status=running")) == 2
        router = f"http://127.0.0.1:{ports['HMS_ROUTER_PORT']}/hms-ach/health"
        dashboard = f"http://127.0.0.1:{ports['HMS_DASHBOARD_PORT']}/healthz"
        deadline = time.monotonic() + 90
        while (get(router), get(dashboard)) != (200, 200) and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = subprocess.run(["docker-compose", "logs", "--tail", "40", "router", "dashboard"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60).stdout
        assert get(router) == 200, f"the router does not serve hms-ach:\n{logs}"
        assert get(dashboard) == 200, f"the dashboard does not answer:\n{logs}"
    finally:
        down = subprocess.run(["docker-compose", "down"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=180)
    assert down.returncode == 0, down.stderr
    assert containers(f"label=hms.node={node}") == [], "a pod outlived docker-compose down"
    assert containers(f"label=com.docker.compose.project={project}") == []
