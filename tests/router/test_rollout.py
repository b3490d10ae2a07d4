"""Rolling updates with real pods and traffic through the router: no failed request from v1 to
v2, a broken v2 rolled back without dropping below min_replicas, a worker killed mid-rollout,
and a re-pointed tag that changes nothing that runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request

import aiohttp
import pytest
import pytest_asyncio
from conftest import (
    CRASHLOOP_IMAGE,
    V2_IMAGE,
    eventually,
    make_settings,
    node_pods,
    require_docker,
    seed_spec,
    sign_images,
    sweep_pods,
    terminate_running,
    worker_process,
)
from router_helpers import Routed, engine, free_port, routed, run_load  # noqa: F401 - fixtures

from hms_mgmt.errors import RolloutFailed
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator

FAST = {"health_interval_s": 1.0, "drain_s": 1.0, "min_ready_s": 0.5}


class ReadyWatcher:
    """The lowest count of ready pods the router's table showed while it watched."""

    def __init__(self, r: Routed) -> None:
        self.r = r
        self.lowest: int | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TypeError, KeyError):
                t = await self.r.table("hms-ach")
                ready = sum(e["state"] == "ready" for e in t["endpoints"])
                self.lowest = ready if self.lowest is None else min(self.lowest, ready)
            await asyncio.sleep(0.1)

    def stop(self) -> int | None:
        self.task.cancel()
        return self.lowest


def versions(load) -> set[str]:  # noqa: ANN001
    return set(load.pods)


@pytest.mark.parametrize("engine", ["builtin"], indirect=True)
async def test_v1_to_v2_under_load_fails_no_request(routed):
    orch = routed.orch
    await orch.deploy(seed_spec(min_replicas=3, max_replicas=3, **FAST), wait=True, timeout=120)
    await routed.wait_pods("hms-ach", 3)
    watcher = ReadyWatcher(routed)
    stop = asyncio.Event()
    load = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/", concurrency=6, seconds=90, max_requests=50000,
                                          stop=stop))
    await asyncio.sleep(1.0)
    result = await orch.deploy(seed_spec(image=V2_IMAGE, min_replicas=3, max_replicas=3, **FAST), wait=True,
                               timeout=120)
    await routed.wait_pods("hms-ach", 3)
    await asyncio.sleep(0.5)
    stop.set()
    g = await load
    lowest = watcher.stop()
    assert result.revision == 2
    assert g.total > 100 and g.statuses[200] == g.total, f"failed requests during the rollout: {g.failures[:5]}"
    st = await orch.status("hms-ach")
    assert {p.revision for p in st.pods} == {2} and st.ready_replicas == 3 and st.spec.image == V2_IMAGE
    assert lowest is not None and lowest >= 3, f"the router saw only {lowest} ready pods during the rollout"
    async with aiohttp.ClientSession() as http, http.get(f"{routed.url}/hms-ach/") as r:
        assert (await r.json())["version"] == "1.5"  # the router runs on this loop: no blocking call
    assert len(node_pods(routed.settings, "hms-ach")) == 3  # the old ones are gone
    types = [e.type for e in read_events(routed.settings.state_dir)]
    assert "rollout.started" in types and "rollout.completed" in types


@pytest.mark.parametrize("engine", ["builtin"], indirect=True)
async def test_broken_v2_rolls_back_to_v1_never_below_min(routed):
    orch = routed.orch
    v1 = seed_spec(min_replicas=2, max_replicas=2, progress_deadline_s=20, **FAST)
    await orch.deploy(v1, wait=True, timeout=120)
    await routed.wait_pods("hms-ach", 2)
    before = {p.id for p in (await orch.status("hms-ach")).pods}
    watcher = ReadyWatcher(routed)
    stop = asyncio.Event()
    load = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/", concurrency=4, seconds=120, max_requests=50000,
                                          stop=stop))
    # Exits at start (a crash loop) ...
    with pytest.raises(RolloutFailed, match="revision 2 rolled back"):
        await orch.update_spec({**v1, "image": CRASHLOOP_IMAGE}, wait=True, timeout=120)
    # ... and a health endpoint that never answers (the progress deadline).
    with pytest.raises(RolloutFailed, match="revision 3 rolled back"):
        await orch.update_spec({**v1, "health_path": "/never", "ready_timeout_s": 5}, wait=True, timeout=120)
    stop.set()
    g = await load
    lowest = watcher.stop()
    st = await orch.status("hms-ach")
    assert st.revision == 1 and st.spec.image == v1["image"] and {p.id for p in st.pods} == before
    assert lowest is not None and lowest >= 2, f"the router saw only {lowest} ready pods"
    assert g.statuses[200] == g.total, g.failures[:5]
    assert [(r.revision, r.outcome) for r in st.revisions] == [(1, "active"), (2, "failed"), (3, "failed")]
    assert sorted(p.pod_id for p in node_pods(routed.settings, "hms-ach")) == sorted(before)  # no leftover


@pytest_asyncio.fixture(loop_scope="session")
async def worker_proc(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    async with worker_process(temporal_env, settings, tmp_path / "worker.log") as worker:
        yield settings, worker


async def test_worker_killed_mid_rollout_completes_once_with_no_extra_pod(temporal_env, worker_proc):
    settings, worker = worker_proc
    orch = Orchestrator(temporal_env.client, settings)
    spec = seed_spec(min_replicas=4, max_replicas=4, max_surge=1, **FAST)
    await orch.deploy(spec, wait=True, timeout=120)
    outcome = await orch.update_spec({**spec, "image": V2_IMAGE})
    # Kill the worker in the middle: once the first v2 pod is up, before the last one.
    await eventually(lambda: _some_updated(orch), timeout=60, what="a v2 pod")
    worker.kill()
    await asyncio.sleep(1.0)
    worker.start()
    st = await orch.wait_for_revision("hms-ach", outcome.revision, timeout=180)
    assert {p.revision for p in st.pods} == {2} and st.ready_replicas == 4
    on_node = node_pods(settings, "hms-ach")
    assert sorted(p.pod_id for p in on_node) == sorted(p.id for p in st.pods), "an extra or missing pod"
    rollouts = [e for e in read_events(settings.state_dir) if e.type.startswith("rollout.")]
    assert [e.type for e in rollouts] == ["rollout.started", "rollout.completed"]


async def _some_updated(orch: Orchestrator):
    st = await orch.status("hms-ach", live=False)
    return st.phase == "Updating" and 1 <= sum(1 for p in st.pods if p.revision == 2 and p.ready) < 4


@pytest.mark.docker
async def test_a_tag_re_pointed_after_admission_changes_nothing_that_runs(temporal_env, tmp_path):
    require_docker()
    import docker

    from worker.main import HmsWorker

    client = docker.from_env()
    tag = f"registry.gov/hms-pin-{int(time.time() * 1000) % 100000}:1.0"
    repo, version = tag.rsplit(":", 1)
    client.images.get("registry.gov/hms-ach:1.4").tag(repo, version)
    settings = make_settings(temporal_env, tmp_path / "state", "docker")
    try:
        sign_images(settings, tag)
        admitted = client.images.get(tag).id
        async with HmsWorker(temporal_env.client, settings):
            orch = Orchestrator(temporal_env.client, settings)
            await orch.deploy(seed_spec(image=tag, min_replicas=1, max_replicas=3, **FAST), wait=True, timeout=120)
            assert (await orch.status("hms-ach")).image_id == admitted
            # Re-point the tag at other content: new pods (a scale-up) still run the admitted id.
            client.images.get("registry.gov/hms-ach:1.5").tag(repo, version)
            assert client.images.get(tag).id != admitted
            st = await orch.scale("hms-ach", 3)
            assert st.ready_replicas == 3
            # This test's node only: another test's hms-ach container may go between the listing
            # and its inspect (the SDK inspects each one it lists).
            ours = client.containers.list(filters={"label": ["hms.service=hms-ach", f"hms.node={settings.node}"]})
            assert len(ours) == 3 and {c.image.id for c in ours} == {admitted}
            for pod in st.pods:
                with urllib.request.urlopen(f"http://{pod.endpoint}/", timeout=5) as r:
                    assert json.loads(r.read())["version"] == "1.4"
            await orch.undeploy("hms-ach")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
        with contextlib.suppress(Exception):
            client.images.remove(tag)
        client.close()
