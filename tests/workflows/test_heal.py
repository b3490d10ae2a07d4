"""Self-healing against the real dev server and real pods: crashes, hung pods, crash loops,
a worker killed in the middle of a heal, and the history budget of a steady service."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import (
    eventually,
    make_settings,
    node_pods,
    require_docker,
    seed_spec,
    sign_images,
    sweep_pods,
    terminate_running,
    wait_phase,
    worker_process,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes import make_runtime
from worker.main import HmsWorker

FAST = {"health_interval_s": 1.0, "health_failures": 2}  # 1 s: the spec's floor


def events(settings, type_: str | None = None):
    return [e for e in read_events(settings.state_dir) if type_ is None or e.type == type_]


def health(endpoint: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=timeout) as resp:
            return resp.status
    except Exception:  # noqa: BLE001
        return 0


def admin(endpoint: str, path: str, body: dict) -> None:
    req = urllib.request.Request(f"http://{endpoint}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=2).read()


def kill_main_process(settings, pod_id: str, how: str = "sigkill") -> None:
    """Crash a pod as a bug would: SIGKILL of its main process (or `docker kill`)."""
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        handle = rt.find(pod_id)
        assert handle is not None and handle.running
        if settings.runtime == "process":
            os.kill(int(handle.extra["pid"]), signal.SIGKILL)
        elif how == "docker-kill":
            rt.client.containers.get(handle.extra["container_id"]).kill()
        else:
            pid = rt.client.containers.get(handle.extra["container_id"]).attrs["State"]["Pid"]
            os.kill(pid, signal.SIGKILL)
    finally:
        rt.close()


async def ready_pods(hms: Orchestrator, name: str, n: int, exclude: set[str] = frozenset()):
    async def check():
        st = await hms.status(name)
        ok = [p for p in st.pods if p.ready and p.id not in exclude]
        return st if st.phase == "Running" and len(ok) == n and len(st.pods) == n else None

    return await eventually(check, timeout=90, what=f"{n} ready pods of {name}")


async def test_crashed_pod_is_replaced_and_serving(hms: Orchestrator, settings):
    await _crash_and_heal(hms, settings, "sigkill")


async def test_docker_kill_is_replaced_and_serving(temporal_env, tmp_path):
    """`docker kill` is a manual stop to Docker (its restart policy ignores it); to us the pod
    is gone all the same."""
    require_docker()
    settings = make_settings(temporal_env, tmp_path / "state", "docker")
    try:
        async with HmsWorker(temporal_env.client, settings):
            await _crash_and_heal(Orchestrator(temporal_env.client, settings), settings, "docker-kill")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


async def _crash_and_heal(hms: Orchestrator, settings, how: str) -> None:
    await hms.deploy(seed_spec(**FAST), wait=True, timeout=120)
    before = await hms.status("hms-ach")
    victim = before.pods[0]
    started = time.monotonic()
    kill_main_process(settings, victim.id, how)

    after = await ready_pods(hms, "hms-ach", 2, exclude={victim.id})
    healed_in = time.monotonic() - started
    assert victim.id not in {p.id for p in after.pods}
    for pod in after.pods:
        assert await asyncio.to_thread(health, pod.endpoint) == 200
    assert sorted(h.pod_id for h in node_pods(settings, "hms-ach")) == sorted(p.id for p in after.pods)
    exited = events(settings, "pod.exited")
    assert [e.data["pod"] for e in exited] == [victim.id]
    if settings.runtime == "docker":  # the code Docker's die event gave (128 + SIGKILL), not an inspect's
        assert exited[0].data["exit_code"] == 137
    replaced = events(settings, "pod.replaced")
    assert len(replaced) == 1 and replaced[0].data["old_pod"] == victim.id
    assert after.heal_count == 1
    assert after.last_decisions[-1].kind == "heal" and victim.id in after.last_decisions[-1].reason
    heal = hms.client.get_workflow_handle(f"svc-hms-ach-heal-{victim.id}")
    assert (await heal.describe()).status == WorkflowExecutionStatus.COMPLETED
    # A crash is seen from the runtime's own event, not after two missed pings.
    assert healed_in < 30
    await hms.undeploy("hms-ach")


async def test_failing_health_is_replaced_after_exactly_health_failures_pings(hms: Orchestrator, settings):
    interval, failures = 1.0, 3
    await hms.deploy(seed_spec(health_interval_s=interval, health_failures=failures), wait=True, timeout=120)
    victim = (await hms.status("hms-ach")).pods[0]
    switched = time.monotonic()
    await asyncio.to_thread(admin, victim.endpoint, "/admin/health", {"failing": True})

    live = await eventually(
        lambda: _failures_of(hms, victim.id), timeout=30, what="the monitor's live count of failed pings"
    )
    assert 1 <= live < failures  # status() shows the count while the monitor keeps pinging

    after = await ready_pods(hms, "hms-ach", 2, exclude={victim.id})
    unhealthy = events(settings, "pod.unhealthy")
    assert len(unhealthy) == 1 and unhealthy[0].data["pod"] == victim.id
    assert f"failed {failures} times in a row" in unhealthy[0].reason
    noticed = unhealthy[0].time.timestamp() - (time.time() - (time.monotonic() - switched))
    assert noticed >= (failures - 1) * interval - 0.5, "replaced before health_failures pings failed"
    assert victim.id not in {p.id for p in after.pods}
    assert all(h.pod_id != victim.id for h in node_pods(settings, "hms-ach")), "the hung pod was not removed"


async def _failures_of(hms: Orchestrator, pod_id: str) -> int:
    st = await hms.status("hms-ach")
    return next((p.consecutive_failures for p in st.pods if p.id == pod_id), 0)


async def test_crash_looping_image_degrades_with_growing_backoff(hms: Orchestrator, settings):
    image = "registry.gov/hms-crashloop:1.0"
    spec = seed_spec(name="hms-loop", image=image, min_replicas=1, backoff_initial_s=0.5, backoff_max_s=4, **FAST)
    await hms.deploy(spec)
    st = await wait_phase(hms, "hms-loop", {"Degraded"}, timeout=90)
    assert st.ready_replicas == 0 and "exit" in (st.message or "")
    degraded = await eventually(lambda: events(settings, "service.degraded"), what="service.degraded")
    assert "failed" in degraded[0].reason

    heal_id = await eventually(
        lambda: next((f"svc-hms-loop-heal-{p.id}" for p in st.pods), None), what="the heal workflow"
    )

    async def timers():
        delays = []
        async for ev in hms.client.get_workflow_handle(heal_id).fetch_history_events():
            if ev.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
                delays.append(ev.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds())
        return delays if len(delays) >= 4 else None

    delays = await eventually(timers, timeout=60, what="four backoff timers")
    assert delays == sorted(delays) and delays[-1] <= 4.0 and delays[0] < delays[-1], delays
    assert len(node_pods(settings, "hms-loop")) <= 1, "failed replacements must not pile up"
    await hms.undeploy("hms-loop")
    assert node_pods(settings) == []


async def test_recovers_once_replacements_stay_ready(temporal_env, tmp_path):
    """A service whose pods crash until an outside fix lands: Degraded, then Running and
    service.recovered once the replacement stays ready."""
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    # Pods run as an unprivileged user that cannot enter pytest's private tmp_path.
    flag_dir = Path(tempfile.mkdtemp(prefix="hms-flag-"))
    flag_dir.chmod(0o755)
    flag = flag_dir / "fixed"
    (settings.state_dir / "images.yaml").write_text(
        f"registry.gov/hms-flaky:1.0:\n  command: [sh, -c, 'test -f {flag} && exec {{python}} -m services.hms_ach || exit 3']\n"
    )
    sign_images(settings, "registry.gov/hms-flaky:1.0")
    spec = seed_spec(name="hms-flaky", image="registry.gov/hms-flaky:1.0", min_replicas=1,
                     backoff_initial_s=0.5, backoff_max_s=2, **FAST)
    try:
        async with HmsWorker(temporal_env.client, settings):
            hms = Orchestrator(temporal_env.client, settings)
            await hms.deploy(spec)
            await wait_phase(hms, "hms-flaky", {"Degraded"}, timeout=60)
            flag.touch()
            st = await wait_phase(hms, "hms-flaky", {"Running"}, timeout=90)
            await eventually(lambda: events(settings, "service.recovered"), timeout=60, what="service.recovered")
            st = await hms.status("hms-flaky")
            assert st.phase == "Running" and st.ready_replicas == 1 and st.crash_count == 0
            assert [d.kind for d in st.last_decisions][-1] == "recovered"
            await hms.undeploy("hms-flaky")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
        shutil.rmtree(flag_dir, ignore_errors=True)


async def test_worker_killed_during_heal_makes_exactly_one_replacement(temporal_env, tmp_path, runtime_name):
    settings = make_settings(temporal_env, tmp_path / "state", runtime_name)
    hms = Orchestrator(temporal_env.client, settings)
    async with worker_process(temporal_env, settings, tmp_path / "worker.log") as worker:
        # Replacements take 3 s to answer, so the heal is in flight when the worker dies.
        await hms.deploy(seed_spec(env={"HMS_STARTUP_DELAY_S": "3"}, **FAST), wait=True, timeout=120)
        victim = (await hms.status("hms-ach")).pods[0]
        kill_main_process(settings, victim.id)
        await eventually(lambda: len([h for h in node_pods(settings, "hms-ach") if h.running]) >= 2
                         and any(h.pod_id not in {victim.id} for h in node_pods(settings, "hms-ach")),
                         timeout=60, what="the replacement started")
        await eventually(lambda: len(node_pods(settings, "hms-ach")) == 3 or None, timeout=30, what="three pods")
        worker.kill()
        worker.start()
        after = await ready_pods(hms, "hms-ach", 2, exclude={victim.id})
        actual = sorted(h.pod_id for h in node_pods(settings, "hms-ach"))
        assert actual == sorted(p.id for p in after.pods), "orphan or missing pod after the restart"
        # The heal records its event as it finishes, which may be just after status() shows the pod.
        await eventually(lambda: events(settings, "pod.replaced"), timeout=30, what="pod.replaced recorded")
        await asyncio.sleep(2.0)
        assert len(events(settings, "pod.replaced")) == 1
        assert (await hms.status("hms-ach")).heal_count == 1


async def test_steady_service_history_stays_within_budget(temporal_env, tmp_path):
    """The monitor's return period 100x shorter than the default: 36 s here is one hour there.

    Pings and CPU samples never reach history (that is the point of the long-running watch),
    so the spec's intervals stay at their 1 s floor; only ``watch_max_s`` sets the cost."""
    speedup = 100
    settings = make_settings(temporal_env, tmp_path / "state", "process", watch_max_s=1800 / speedup)
    spec = seed_spec(health_interval_s=1.0, scale_interval_s=1.0, cpu_target=90)
    try:
        async with HmsWorker(temporal_env.client, settings):
            hms = Orchestrator(temporal_env.client, settings)
            await hms.deploy(spec, wait=True, timeout=120)
            handle = hms.client.get_workflow_handle("svc-hms-ach")
            await asyncio.sleep(2)
            start = (await handle.describe()).raw_description.workflow_extended_info
            before = (await handle.describe()).history_length
            await asyncio.sleep(3600 / speedup)
            desc = await handle.describe()
            added = desc.history_length - before
            assert desc.status == WorkflowExecutionStatus.RUNNING and start is not None
            assert 0 < added <= 60, f"{added} history events in a (scaled) hour"
            assert (await hms.status("hms-ach")).ready_replicas == 2
            await hms.undeploy("hms-ach")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


async def test_continue_as_new_keeps_pods_counters_and_backoff(temporal_env, tmp_path):
    """A tiny history threshold forces continue-as-new after every step; the state carried
    across runs must keep the pods, the heal counter, the decisions and the crash-loop count."""
    settings = make_settings(temporal_env, tmp_path / "state", "process", history_threshold=10)
    try:
        async with HmsWorker(temporal_env.client, settings):
            hms = Orchestrator(temporal_env.client, settings)
            first = await hms.deploy(seed_spec(**FAST), wait=True, timeout=120)
            handle = hms.client.get_workflow_handle("svc-hms-ach")
            second_run = await eventually(lambda: _run_changed(handle, first.run_id), what="a continue-as-new")
            victim = (await hms.status("hms-ach")).pods[0]
            kill_main_process(settings, victim.id)  # a young pod: its crash counts toward a crash loop

            async def healed_in_a_later_run():
                st = await hms.status("hms-ach")
                later = await _run_changed(handle, second_run)
                done = later and st.heal_count == 1 and st.ready_replicas == 2 and st.phase == "Running"
                return st if done else None

            after = await eventually(healed_in_a_later_run, timeout=90, what="heal carried into a new run")
            assert after.phase == "Running" and after.crash_count == 1
            assert victim.id not in {p.id for p in after.pods}
            assert any(d.kind == "heal" and victim.id in d.reason for d in after.last_decisions)
            assert sorted(h.pod_id for h in node_pods(settings, "hms-ach")) == sorted(p.id for p in after.pods)
            await hms.undeploy("hms-ach")
            assert node_pods(settings) == []
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


async def _run_changed(handle, previous_run_id: str | None) -> str | None:
    desc = await handle.describe()
    changed = desc.run_id != previous_run_id and desc.status == WorkflowExecutionStatus.RUNNING
    return desc.run_id if changed else None
