"""The Temporal dev server SIGKILLed and started again mid-rollout, on the same sqlite file.

This test runs its own dev server (the test kit's ``DevServer``, on a sqlite file of its own), not the
shared one, and a real worker process against it. The worker and the client ride out the
outage; the rollout resumes from the server's persisted history and every pod ends on the new
revision, with the books matching the process table."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from chaos_helpers import chaos_rng, chaos_spec, converge, describe, report  # noqa: F401 - chaos_rng is a fixture
from conftest import V2_IMAGE, WorkerProcess, make_settings, node_pods, sweep_pods
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import DevServer, free_port


async def connect(server: DevServer) -> Client:
    return await Client.connect(server.address, data_converter=pydantic_data_converter)


@pytest.mark.timeout(420)
async def test_dev_server_killed_mid_rollout_and_restarted_on_its_sqlite_file_converges(tmp_path, chaos_rng,
                                                                                        capsys):
    rng = chaos_rng
    server = DevServer(port=free_port(), state_dir=tmp_path, ready_timeout_s=60.0)
    await server.start()
    worker: WorkerProcess | None = None
    settings = None
    try:
        client = await connect(server)
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
        await server.start()
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
