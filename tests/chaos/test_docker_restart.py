"""The Docker daemon restarted under running services: pods reconciled, none lost from the books.

The engine restarted is a second dockerd of the test's own (``dockerd.py``), never the machine's.
Without live-restore a daemon that stops takes its containers with it: every pod dies, and the
services must see it (the event stream breaks and comes back), replace every pod once the engine
answers again, and end with books equal to the containers carrying the test's labels. Every pod
booked before the restart either still runs or was replaced by a recorded heal. The daemon is
stopped gracefully (SIGTERM) and, in the full run, also SIGKILLed. Full run only: importing the
images into the second engine alone takes ~10 s."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from chaos_helpers import COUNTS, FULL, chaos_rng, chaos_spec, converge, describe, report  # noqa: F401
from conftest import EXAMPLE_IMAGE, V2_IMAGE, WorkerProcess, make_settings, require_docker, terminate_running

from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator

pytestmark = [pytest.mark.docker, pytest.mark.chaos_full]


class DockerHostWorker(WorkerProcess):
    def env(self) -> dict[str, str]:
        return {**super().env(), "HMS_DOCKER_HOST": self.settings.docker_host or ""}


@pytest.mark.timeout(600)
async def test_docker_daemon_restarted_under_running_services_reconciles_every_pod(temporal_env, tmp_path,
                                                                                   chaos_rng, capsys):
    require_docker()
    if os.geteuid() != 0:
        pytest.skip("a second dockerd needs root")
    from dockerd import SecondDockerd

    rng = chaos_rng
    engine = SecondDockerd()
    worker = None
    settings = None
    try:
        engine.setup()
        engine.start()
        engine.load_images(EXAMPLE_IMAGE, V2_IMAGE)
        settings = make_settings(temporal_env, tmp_path / "state", "docker", docker_host=engine.host)
        orch = Orchestrator(temporal_env.client, settings)
        worker = DockerHostWorker(settings, tmp_path / "worker.log")
        worker.start()
        names = [f"chaos-{settings.node[1:7]}-{i}" for i in range(2)]
        await asyncio.gather(*(orch.deploy(chaos_spec(n), wait=True, timeout=180) for n in names))
        want = {n: (2, EXAMPLE_IMAGE) for n in names}
        figures = []
        for i in range(COUNTS.docker_restarts):
            sts, bk = await converge(orch, settings, want, timeout=180)
            assert all(b.clean() for b in bk), [str(b) for b in bk]
            booked = {p.id for s in sts.values() for p in s.pods}
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            kill = i % 2 == 1
            t0 = time.monotonic()
            await asyncio.to_thread(engine.stop, kill=kill)
            down = rng.uniform(1.0, 5.0)
            await asyncio.sleep(down)
            await asyncio.to_thread(engine.start)
            sts, bk = await converge(orch, settings, want, timeout=240)
            took = time.monotonic() - t0
            assert sts and all(s.phase == "Running" and len(s.pods) == 2 and all(p.ready for p in s.pods)
                               for s in sts.values()), describe(sts)
            for b in bk:
                assert b.clean(), f"after the daemon restart: {b}"
            now = {p.id for s in sts.values() for p in s.pods}
            replaced = {e.data.get("old_pod") for e in read_events(settings.state_dir) if e.type == "pod.replaced"}
            lost = booked - now - replaced
            assert not lost, f"pods that left the books without a heal: {sorted(lost)}"
            figures.append(f"{'SIGKILL' if kill else 'SIGTERM'}, down {down:.1f}s: {len(booked & now)} pods kept, "
                           f"{len(booked - now)} replaced, converged {took:.0f}s after the stop")
        report(f"docker daemon restarts: {'; '.join(figures)}; books clean, none lost", capsys)
        await asyncio.gather(*(orch.undeploy(n, timeout=120) for n in names))
    finally:
        if worker is not None:
            worker.stop()
        if settings is not None:
            await terminate_running(temporal_env, settings)
        await asyncio.to_thread(engine.teardown)
