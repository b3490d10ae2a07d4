"""The Temporal dev server SIGKILLed and started again mid-rollout, on the same sqlite file.

This test runs its own dev server (``temporal server start-dev --db-filename ...``), not the
shared one, and a real worker process against it. The worker and the client ride out the
outage; the rollout resumes from the server's persisted history and every pod ends on the new
revision, with the books matching the process table."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import types
from pathlib import Path

import pytest
from chaos_helpers import chaos_rng, chaos_spec, converge, describe, report  # noqa: F401 - chaos_rng is a fixture
from conftest import V2_IMAGE, WorkerProcess, make_settings, node_pods, sweep_pods, temporal_binary
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from hms_mgmt import constants
from hms_mgmt.orchestrator import Orchestrator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevServer:
    """``temporal server start-dev`` on a port and sqlite file of its own, to kill and restart."""

    def __init__(self, db: Path, log: Path) -> None:
        self.db = db
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(self.port), "--headless",
             "--db-filename", str(self.db), "--log-level", "error",
             "--search-attribute", f"{constants.SEARCH_ATTR_SERVICE}=Keyword",
             "--search-attribute", f"{constants.SEARCH_ATTR_PHASE}=Keyword"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, timeout: float = 60.0) -> Client:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, \
                f"the dev server exited: {self.log.read_text(errors='replace')[-2000:]}"
            try:
                client = await Client.connect(self.address, data_converter=pydantic_data_converter)
                await client.workflow_service.get_system_info(GetSystemInfoRequest())
                return client
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.mark.timeout(420)
async def test_dev_server_killed_mid_rollout_and_restarted_on_its_sqlite_file_converges(tmp_path, chaos_rng,
                                                                                        capsys):
    rng = chaos_rng
    server = DevServer(tmp_path / "temporal.db", tmp_path / "temporal.log")
    server.start()
    worker: WorkerProcess | None = None
    settings = None
    try:
        client = await server.ready()
        settings = make_settings(types.SimpleNamespace(client=client), tmp_path / "state", "process")
        orch = Orchestrator(client, settings)
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        worker.start()
        name = f"chaos-{settings.node[1:7]}"
        spec = chaos_spec(name) | {"min_replicas": 3}
        await orch.deploy(spec, wait=True, timeout=180)
        outcome = await orch.update_spec(chaos_spec(name, V2_IMAGE) | {"min_replicas": 3})
        assert outcome.revision == 2

        async def rolling() -> bool:
            st = await orch.status(name, live=False)
            return st.phase == "Updating" and any(p.revision == 2 for p in st.pods)

        deadline = time.monotonic() + 60
        while not await rolling():
            assert time.monotonic() < deadline, "the rollout never got going"
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.uniform(0.0, 2.0))
        before = await orch.status(name, live=False)
        server.kill()
        down = rng.uniform(1.0, 5.0)
        killed_at = time.monotonic()
        await asyncio.sleep(down)
        server.start()
        await server.ready()
        # The client reconnects on its own: the same Orchestrator keeps working.
        sts, bk = await converge(orch, settings, {name: (3, V2_IMAGE)}, timeout=240)
        took = time.monotonic() - killed_at
        st = sts.get(name)
        assert st is not None and st.phase == "Running" and st.revision == 2, describe(sts)
        assert len(st.pods) == 3 and all(p.ready and p.revision == 2 for p in st.pods), describe(sts)
        assert bk and bk[0].clean(), f"books after the restart: {bk[0] if bk else None}"
        assert [r.outcome for r in st.revisions] == ["replaced", "active"], st.revisions
        assert worker.proc is not None and worker.proc.poll() is None, "the worker died with the server"
        report(f"dev server SIGKILL mid-rollout ({sum(p.revision == 2 for p in before.pods)}/3 pods on revision 2), "
               f"down {down:.1f}s: converged {took:.0f}s after the kill; 3 pods on revision 2, books clean", capsys)
        await orch.undeploy(name, timeout=120)
        assert await asyncio.to_thread(node_pods, settings, name) == []
    finally:
        if worker is not None:
            worker.stop()
        if settings is not None:
            sweep_pods(settings)
        server.stop()
