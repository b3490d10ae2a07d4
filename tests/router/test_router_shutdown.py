"""A router stopped the way a service manager stops it: SIGTERM to every process of its group
(systemd's default, or ``timeout``). Its worker processes leave with it; none is started again
on the way down, and none is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import REPO, make_settings, terminate_running

from hms_mgmt.testing import free_port
from router.server import RouterProcess
from worker.main import HmsWorker


async def test_sigterm_to_the_group_stops_every_router_process_without_restarting_one(temporal_env, tmp_path):
    port = free_port()
    s = make_settings(temporal_env, tmp_path / "state", "process", routers=[f"http://127.0.0.1:{port}"],
                      router_port=port)
    log = tmp_path / "router.log"
    env = {**os.environ, "HMS_TEMPORAL_ADDRESS": s.temporal_address, "HMS_NAMESPACE": s.namespace,
           "HMS_STATE_DIR": str(s.state_dir), "HMS_TASK_QUEUE": s.task_queue, "HMS_ROUTER_PROCS": "2"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "router", "--port", str(s.router_port)], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    watcher = RouterProcess(s, port=s.router_port, log_path=log)
    watcher.proc = proc
    try:
        async with HmsWorker(temporal_env.client, s):  # the control host: its own router needs no join
            await watcher.wait_ready(30)
            family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
            assert len(family) >= 2, "a primary and a worker process"
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) is not None
            _, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=10)
            assert not alive, f"left running: {alive}"
        text = Path(log).read_text()
        assert "starting it again" not in text, text[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        await terminate_running(temporal_env, s)
