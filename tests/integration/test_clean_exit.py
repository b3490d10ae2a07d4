"""A user's script that calls the synchronous API exits 0, every time.

Short-lived Temporal clients used to abort at interpreter exit about 1 run in 5 here
(``Fatal Python error: PyGILState_Release`` / SIGABRT / segfault, after the work was done).
This runs the seed's snippet and a status script as separate processes many times against a
real dev server and a real worker, and checks every exit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import REPO, WorkerProcess, make_settings, sweep_pods, terminate_running

RUNS_EACH = 30  # 60 processes in all
PARALLEL = 4
PER_RUN_TIMEOUT_S = 60

STATUS_SCRIPT = textwrap.dedent(
    """
    from hms_mgmt import orchestrator

    st = orchestrator.status("hms-ach")
    names = [s.name for s in orchestrator.list()]
    assert "hms-ach" in names, names
    lines = orchestrator.logs("hms-ach", st.pods[0].id, tail=5)
    print(st.phase, st.ready_replicas, len(lines))
    """
)


@pytest_asyncio.fixture(loop_scope="session")
async def stack(temporal_env, tmp_path: Path):
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        yield settings, {**worker.env(), "PYTHONPATH": str(REPO)}
    finally:
        worker.stop()
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


def run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=PER_RUN_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_scripts_using_the_sync_api_always_exit_cleanly(stack, tmp_path: Path):
    settings, env = stack
    status_script = tmp_path / "status_ach.py"
    status_script.write_text(STATUS_SCRIPT)
    seed = str(REPO / "examples" / "deploy_ach.py")

    first = await asyncio.to_thread(run_script, [seed], env)  # deploys; every later run is a no-op
    assert first.returncode == 0, first.stderr

    sem = asyncio.Semaphore(PARALLEL)

    async def one(args: list[str]) -> subprocess.CompletedProcess[str]:
        async with sem:
            return await asyncio.to_thread(run_script, args, env)

    runs = [[seed]] * RUNS_EACH + [[str(status_script)]] * RUNS_EACH
    results = await asyncio.gather(*(one(a) for a in runs))
    bad = [(r.args[1], r.returncode, r.stderr[-400:]) for r in results
           if r.returncode != 0 or "Fatal Python error" in r.stderr]
    assert bad == [], f"{len(bad)} of {len(results)} runs did not exit cleanly: {bad[:3]}"
    assert all(r.stdout.startswith("Running 2") for r in results if r.args[1] == str(status_script))

    # The mutating calls too: scale, then undeploy, each from its own short script.
    for code in ('orchestrator.scale("hms-ach", 3)', 'orchestrator.undeploy("hms-ach")'):
        script = tmp_path / "mutate.py"
        script.write_text(f"from hms_mgmt import orchestrator\n{code}\n")
        r = await asyncio.to_thread(run_script, [str(script)], env)
        assert r.returncode == 0 and "Fatal Python error" not in r.stderr, r.stderr
