"""A service workflow terminated from outside leaves no pod running (issue 19, item 5).

The attack (or the accident): `temporal workflow terminate --workflow-id svc-X` with the
Temporal CLI. The workflow never gets to undeploy, so its pods used to run on for ever, out of
every router's table and every status. The node's sweep now removes them within the orphan
grace (plus a sweep or two) and says why with a `pod.orphaned` event. Real dev server, real
worker, real process pods; about 15 s."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

from conftest import eventually, make_settings, seed_spec, sweep_pods, temporal_address, terminate_running

from activities.pods import StoppedPods
from hms_mgmt import constants
from hms_mgmt.devserver import temporal_binary
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes import make_runtime
from worker.main import HmsWorker

GRACE_S = 3.0


def pods_of(settings, service: str) -> list[str]:
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        return [h.pod_id for h in rt.list(service)]
    finally:
        rt.close()


async def test_terminated_service_leaves_no_pod(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process", orphan_grace_s=GRACE_S,
                             node_heartbeat_s=0.5)
    name = "hms-orphan"
    try:
        async with HmsWorker(temporal_env.client, settings):
            orch = Orchestrator(temporal_env.client, settings)
            await orch.deploy(seed_spec(name=name, min_replicas=2, max_replicas=2), wait=True, timeout=90)
            before = pods_of(settings, name)
            assert len(before) == 2

            # A young workflow's pods stay: nothing is swept while the service runs.
            await asyncio.sleep(GRACE_S * 2)
            assert sorted(pods_of(settings, name)) == sorted(before)

            terminated = await asyncio.to_thread(subprocess.run, [
                temporal_binary(), "workflow", "terminate", "--address", temporal_address(temporal_env),
                "--workflow-id", constants.service_workflow_id(name), "--reason", "by an outsider"],
                capture_output=True, text=True, timeout=30)
            assert terminated.returncode == 0, terminated.stderr
            at = time.monotonic()
            await eventually(lambda: pods_of(settings, name) == [], timeout=GRACE_S * 2 + 10,
                             what="the terminated service's pods removed")
            took = time.monotonic() - at
            assert took >= GRACE_S * 0.9, f"removed after {took:.1f} s, before the grace"

        events = [json.loads(line) for line in (settings.state_dir / "events.jsonl").read_text().splitlines()]
        orphaned = [e for e in events if e["type"] == "pod.orphaned" and e["service"] == name]
        assert sorted(e["data"]["pod"] for e in orphaned) == sorted(before)
        assert all("no running workflow" in e["reason"] and "terminated" in e["reason"] for e in orphaned), orphaned
        # A swept pod's start ticket (still good for minutes, readable in the history) starts it no more.
        stopped = StoppedPods(settings.state_dir)
        assert all(stopped.why_not_start(p) == "this node stopped it: a pod id starts once" for p in before)
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
