"""`hms logs -f` and `orchestrator.logs(..., follow=True)` as an operator runs them: a worker
process, the CLI in another process; the stream shows a line written after it started and
exits 0 with a last line once the pod is gone."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from conftest import REPO, eventually, make_settings, worker_process
from temporalio.testing import WorkflowEnvironment
from test_cli import hms, hms_command, ok

from hms_mgmt import orchestrator
from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator


@pytest_asyncio.fixture(loop_scope="session")
async def cli(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[tuple[Settings, dict[str, str]]]:
    s = make_settings(temporal_env, tmp_path / "state", "process")
    async with worker_process(temporal_env, s, tmp_path / "worker.log") as worker:
        yield s, {**worker.env(), "COLUMNS": "200"}


def poke(endpoint: str, marker: str) -> None:
    urllib.request.urlopen(f"http://{endpoint}/?marker={marker}", timeout=5).read()


class Follower:
    """``hms logs ... -f`` in its own process, its stdout lines collected by a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*hms_command(), "logs", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def has(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


async def test_hms_logs_follow_exits_0_when_the_pod_is_gone(temporal_env: WorkflowEnvironment, cli):
    s, env = cli
    ok(await hms("deploy", "examples/hms-ach.yaml", "--wait", env=env))
    pods = (await Orchestrator(temporal_env.client, s).status("hms-ach")).pods
    first, second = pods[0], pods[1]
    follower = Follower("hms-ach", first.id[:8], "-f", "--tail", "5", env=env)
    every = Follower("hms-ach", "--follow", "--tail", "0", env=env)
    followers = [follower, every]
    try:
        await eventually(lambda: follower.lines or follower.proc.poll() is not None, timeout=30, what="the tail")
        assert follower.proc.poll() is None, follower.proc.stderr.read() if follower.proc.stderr else ""
        marker = f"cli-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(poke, first.endpoint, marker)
        await asyncio.to_thread(poke, second.endpoint, marker)
        await eventually(lambda: follower.has(marker), timeout=10, what="the new line in hms logs -f")
        assert len(follower.has(marker)) == 1  # only the pod asked for
        both = await eventually(lambda: len(every.has(marker)) == 2 and every.has(marker), timeout=10,
                                what="both pods' lines in hms logs -f without a pod")
        assert {line.split(" | ")[0] for line in both} == {f"{p.id[:8]}@{p.node}" for p in (first, second)}

        # Ctrl-C is the other way to end it, and no error either.
        stopped = Follower("hms-ach", second.id, "-f", env=env)
        followers.append(stopped)
        await eventually(lambda: stopped.lines, timeout=30, what="the tail of the pod to interrupt")
        stopped.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(stopped.proc.wait, 30) == 0

        snapshot = ok(await hms("logs", "hms-ach", "--tail", "50", env=env)).splitlines()
        assert {line.split(" | ")[0] for line in snapshot if marker in line} == {
            f"{p.id[:8]}@{p.node}" for p in (first, second)}

        ok(await hms("undeploy", "hms-ach", env=env))
        assert await asyncio.to_thread(follower.proc.wait, 60) == 0
        assert await asyncio.to_thread(every.proc.wait, 60) == 0
        await eventually(lambda: follower.lines[-1].startswith(f"--- pod {first.id} is gone"), timeout=5,
                         what="the end line")
        ends = [line for line in every.lines if " | --- pod " in line]
        assert len(ends) == 2 and every.lines[-1] in ends, every.lines[-5:]
    finally:
        for f in followers:
            if f.proc.poll() is None:
                f.proc.kill()


async def test_sync_logs_follow_is_an_iterator(temporal_env: WorkflowEnvironment, cli):
    """``orchestrator.logs(name, pod, follow=True)``: the seed's synchronous style, as a script
    would call it (on a thread here, so the test's own loop keeps running)."""
    s, env = cli
    await Orchestrator(temporal_env.client, s).deploy({"name": "hms-ach", "image": "registry.gov/hms-ach:1.4",
                                                       "min_replicas": 1, "max_replicas": 2, "cpu_target": 60},
                                                      wait=True)
    (pod,) = (await Orchestrator(temporal_env.client, s).status("hms-ach")).pods
    marker = f"sync-{uuid.uuid4().hex[:8]}"
    seen = threading.Event()

    def follow() -> list[str]:
        lines = []
        for line in orchestrator.logs("hms-ach", pod.id, tail=1, follow=True, settings=s):
            lines.append(line)
            if marker in line:
                seen.set()
        return lines

    async_lines: list[str] = []

    async def follow_async() -> list[str]:
        async for line in orchestrator.logs_follow_async("hms-ach", pod.id, tail=1, settings=s):
            async_lines.append(line)
        return async_lines

    reading = asyncio.create_task(asyncio.to_thread(follow))
    reading_async = asyncio.create_task(follow_async())

    async def poked() -> bool:
        await asyncio.to_thread(poke, pod.endpoint, marker)
        return await asyncio.to_thread(seen.wait, 1) and any(marker in line for line in async_lines)

    await eventually(poked, timeout=30, what="the marker through the sync iterator")
    await Orchestrator(temporal_env.client, s).undeploy("hms-ach")
    for lines in (await asyncio.wait_for(reading, 60), await asyncio.wait_for(reading_async, 60)):
        assert any(marker in line for line in lines)
        assert lines[-1].startswith(f"--- pod {pod.id} is gone"), lines[-3:]
