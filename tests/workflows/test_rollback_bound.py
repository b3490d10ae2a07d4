"""A broken revision rolls back every time, within the bound README states (issue 25): at most
``progress_deadline_s`` from the rollout's start to ``rollout.failed`` (sooner once three new pods
have failed), then the rollback, which starts nothing when no old pod was given up. The service
never has fewer ready pods than its replica count on the way.

First a start that never ends (a hung engine, a start retried for ever): the deadline must end
the round it is in, not wait for it. Then real process pods, one of each broken kind: exits at
once, never answers its health path (503), answers and crashes 3 s later inside ``min_ready_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import pytest
from conftest import CRASHLOOP_IMAGE, V2_IMAGE, eventually, node_pods, seed_spec, sign_images, wait_phase
from temporalio import activity
from temporalio.testing import WorkflowEnvironment
from test_service_logic import FakeCluster, as_user, fake_cluster, ready_counts

from hms_mgmt.config import Settings
from hms_mgmt.errors import HmsError, RolloutFailed
from hms_mgmt.models import PodStatus
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.wire import StartPodInput, WatchResult

SLACK_S = 10.0  # admission, stopping the pods in flight, the rollback child, a busy 2-core machine


@dataclass
class HungCluster(FakeCluster):
    """Pods of revision 2 or later never come up and never fail: their start heartbeats until
    cancelled (Temporal would retry it after any timeout)."""

    cancelled: list[str] = field(default_factory=list)

    @activity.defn(name="start_pod")
    async def start_pod(self, inp: StartPodInput) -> PodStatus:
        if inp.revision < 2:
            return await super().start_pod(inp)
        self.started.append(inp.pod_id)
        try:
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            self.cancelled.append(inp.pod_id)
            raise


async def test_a_start_that_never_ends_is_cut_at_the_progress_deadline(temporal_env, tmp_path):
    async with fake_cluster(temporal_env, tmp_path, HungCluster, "hms-hung") as (cluster, settings):
        await _cut_at_the_deadline(temporal_env, cluster, settings)


async def _cut_at_the_deadline(temporal_env: WorkflowEnvironment, cluster: HungCluster, settings: Settings) -> None:
    alice = as_user(temporal_env, settings, "t-alice")
    spec = seed_spec(min_replicas=2, max_replicas=2, drain_s=0.1, min_ready_s=0.1, progress_deadline_s=3,
                     ready_timeout_s=600)
    await alice.deploy(spec, wait=True, timeout=30)
    v1 = {p.id for p in (await alice.status("hms-ach")).pods}
    t = time.monotonic()
    with pytest.raises(RolloutFailed, match="no progress within progress_deadline_s 3s"):
        await alice.update_spec({**spec, "image": V2_IMAGE}, wait=True, timeout=60)
    took = time.monotonic() - t
    st = await alice.status("hms-ach")
    assert took < 3 + SLACK_S, f"rolled back {took:.1f}s after the update (deadline 3s)"
    assert st.revision == 1 and {p.id for p in st.pods} == v1 and st.rollout.state == "rolled_back"
    assert min(ready_counts(cluster)) >= 2
    hung_pods = [p for p in cluster.started if p not in v1]
    assert hung_pods and set(cluster.pods) == v1  # nothing of revision 2 is left
    # The cancel reaches each start in flight with its next heartbeat's answer.
    await eventually(lambda: set(hung_pods) <= set(cluster.cancelled), timeout=20, what="the hung starts cancelled")


async def test_an_update_held_by_a_heal_says_so_then_rolls(temporal_env, tmp_path):
    """The bound counts from the rollout's start: an update first waits for a heal in flight,
    and ``status().rollout`` says so meanwhile (state ``waiting``), so no hold is silent."""
    async with fake_cluster(temporal_env, tmp_path) as (cluster, settings):
        alice = as_user(temporal_env, settings, "t-alice")
        spec = seed_spec(backoff_initial_s=2, backoff_max_s=2, drain_s=0.1, min_ready_s=0.1)
        await alice.deploy(spec, wait=True, timeout=30)
        victim = (await alice.status("hms-ach")).pods[0].id
        cluster.fail_starts = 1  # the first replacement dies: the heal backs off 2 s, twice
        await cluster.watch_results.put(WatchResult(reason="failed", failed=[
            {"pod_id": victim, "kind": "exited", "detail": "exit code 137", "exit_code": 137}]))
        await wait_phase(alice, "hms-ach", {"Healing", "Degraded"}, timeout=10)
        outcome = await alice.update_spec({**spec, "image": V2_IMAGE})
        st = await alice.status("hms-ach", live=False)
        assert st.rollout is not None and st.rollout.state == "waiting" and st.rollout.to_revision == 2
        assert st.waiting_for is not None and st.waiting_for.kind == "heal"
        st = await eventually(lambda: _rolled(alice, outcome.revision), timeout=60, what="the held rollout done")
        assert {p.revision for p in st.pods} == {2}


async def _rolled(orch: Orchestrator, revision: int):
    st = await orch.status("hms-ach", live=False)
    return st if st.rollout is not None and st.rollout.to_revision == revision and st.rollout.state == "completed" \
        else None


# --- real pods, one of each broken kind -----------------------------------------------------

CRASHES_IMAGE = "registry.gov/hms-ach-crashes:3.0"  # answers, then exits 3 s later
REPLICAS = 3
BASE = seed_spec(min_replicas=REPLICAS, max_replicas=REPLICAS, health_interval_s=1.0, drain_s=0.5, min_ready_s=0.5,
                 progress_deadline_s=8, ready_timeout_s=60)
KINDS = {
    "exits at once": {"image": CRASHLOOP_IMAGE},
    "never answers (503)": {"env": {"HMS_FAIL_HEALTH": "1"}},
    "crashes 3 s after answering, inside min_ready_s": {"image": CRASHES_IMAGE, "min_ready_s": 5.0},
}


async def lowest_ready(orch: Orchestrator, name: str, stop: asyncio.Event) -> int:
    """The lowest count of ready pods ``status()`` showed, sampled every 0.1 s until ``stop``."""
    lowest = REPLICAS
    while not stop.is_set():
        with contextlib.suppress(HmsError):
            st = await orch.status(name, live=False)
            lowest = min(lowest, sum(1 for p in st.pods if p.ready))
        await asyncio.sleep(0.1)
    return lowest


@pytest.fixture
def runtime_name() -> str:
    return "process"


@pytest.mark.serial  # it asserts a time bound: run alone, after the parallel part
@pytest.mark.parametrize("kind", list(KINDS))
async def test_each_broken_kind_rolls_back_within_the_bound(hms, settings, kind):
    (settings.state_dir / "images.yaml").write_text(
        f"{CRASHES_IMAGE}:\n  command: ['{{python}}', -m, services.hms_ach]\n  env: {{HMS_EXIT_AFTER_S: '3'}}\n")
    sign_images(settings, CRASHES_IMAGE)
    await hms.deploy(BASE, wait=True, timeout=60)
    v1 = {p.id for p in (await hms.status("hms-ach")).pods}
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(lowest_ready(hms, "hms-ach", stop))
    t = time.monotonic()
    try:
        with pytest.raises(RolloutFailed, match="revision 2 rolled back"):
            await hms.update_spec(BASE | KINDS[kind], wait=True, timeout=60)
        took = time.monotonic() - t
    finally:
        stop.set()
        lowest = await sampler
    st = await hms.status("hms-ach")
    assert took < BASE["progress_deadline_s"] + SLACK_S, f"{kind}: rolled back after {took:.1f}s"
    assert st.revision == 1 and {p.id for p in st.pods} == v1 and st.rollout.state == "rolled_back"
    assert lowest >= REPLICAS, f"{kind}: only {lowest} ready pods during the rollout and rollback"
    assert sorted(h.pod_id for h in node_pods(settings, "hms-ach") if h.running) == sorted(v1)  # nothing left
    await hms.undeploy("hms-ach")
