"""Pods in their box, on real processes and real containers: what a pod can see of the worker
(its keys, its environment), what it may take from its spec, and the limits it runs under."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import EXAMPLE_IMAGE, make_settings, node_pods, require_docker, seed_spec, terminate_running, wait_healthy
from temporalio.api.enums.v1 import RetryState

from hms_mgmt import auth
from hms_mgmt.errors import ActivityErrorType, FailureKind, SpecUnrunnable
from hms_mgmt.events import read_events
from hms_mgmt.models import ServiceSpec
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes import PodLaunch, PodRuntimeError
from hms_mgmt.runtimes.process import ProcessRuntime
from worker.main import HmsWorker

PROBE_IMAGE = "registry.gov/hms-probe:1.0"
HOG_IMAGE = "registry.gov/hms-hog:1.0"


@pytest.fixture
def open_state_dir() -> Iterator[Path]:
    """A state directory every user may enter (unlike pytest's private tmp_path), so only the
    modes of the keys themselves stand between a pod and them."""
    base = Path(tempfile.mkdtemp(prefix="hms-sandbox-"))
    base.chmod(0o755)
    state = base / "state"
    state.mkdir()
    state.chmod(0o755)
    auth.init_keys(state)
    key = auth.keys_dir(state) / auth.PRIVATE_KEY_FILE
    (state / "images.yaml").write_text(
        f"{PROBE_IMAGE}:\n"
        "  command: [sh, -c, 'if cat " + str(key) + " >/dev/null 2>&1; then echo KEY=read; else echo KEY=denied; fi;"
        " echo UID=$(id -u); echo SECRET=${HMS_SECRET_TEST:-unset}; touch \"$HOME/w\" && echo HOME=writable;"
        " exec {python} -m services.hms_ach']\n"
        f"{HOG_IMAGE}:\n"
        "  command: ['{python}', '-c', 'import time; b = bytearray(400 * 1024 * 1024); time.sleep(60)']\n"
    )
    yield state
    shutil.rmtree(base, ignore_errors=True)


def spec(image: str = EXAMPLE_IMAGE, **kw: object) -> ServiceSpec:
    return ServiceSpec(**seed_spec(image=image, min_replicas=1, max_replicas=1, **kw))


def launch(rt: ProcessRuntime | object, s: ServiceSpec) -> PodLaunch:
    return PodLaunch(pod_id=str(uuid.uuid4()), service=s.name, revision=1, node=rt.node, spec=s)  # type: ignore[attr-defined]


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root worker can run pods as another user")
def test_process_pod_cannot_read_keys_or_see_the_worker_env(open_state_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HMS_SECRET_TEST", "1")
    rt = ProcessRuntime("sbx", open_state_dir)
    req = launch(rt, spec(PROBE_IMAGE))
    try:
        handle = rt.start(req)
        wait_healthy(handle.endpoint)
        lines = rt.logs(req.pod_id)
        assert "KEY=denied" in lines, lines
        assert "SECRET=unset" in lines and "HOME=writable" in lines, lines
        uid = int(next(line for line in lines if line.startswith("UID=")).removeprefix("UID="))
        assert uid != os.geteuid()
        assert psutil.Process(int(handle.extra["pid"])).uids().real == uid
        keys = auth.keys_dir(open_state_dir)
        key = keys / auth.PRIVATE_KEY_FILE
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700 and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes()  # the worker itself still can
        env = psutil.Process(int(handle.extra["pid"])).environ()
        assert "HMS_SECRET_TEST" not in env and env["HMS_POD_ID"] == req.pod_id
        assert set(env) <= {"PATH", "LANG", "HOME", "PORT", "HOST", "HMS_POD_ID", "HMS_SERVICE", "HMS_REVISION",
                            "PYTHONPATH", "PYTHONUNBUFFERED", "PWD"}  # PWD: set by the probe's sh
    finally:
        rt.stop(req.pod_id, 1)
    assert rt.list() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root worker can run pods as another user")
def test_pod_user_that_cannot_enter_the_cwd_refuses_the_pod(tmp_path: Path) -> None:
    """pytest's tmp_path is private (0700): the pod user cannot work there, so the pod is refused,
    naming why; it never runs as the worker's user instead, and nothing is left behind."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "images.yaml").write_text(
        f"registry.gov/private:1.0:\n  command: ['{{python}}', -m, services.hms_ach]\n  cwd: {tmp_path}\n"
        f"  env: {{PYTHONPATH: {Path(__file__).resolve().parents[2]}}}\n")
    rt = ProcessRuntime("sbx", state)
    try:
        for _ in range(2):  # a failed probe is not remembered: tried again, refused again
            with pytest.raises(PodRuntimeError, match=r"cannot run Python in " + str(tmp_path)) as e:
                rt.start(launch(rt, spec("registry.gov/private:1.0")))
            assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE
            assert "worker's user" in str(e.value)
        assert rt.list() == [] and rt._python_for == {}
        assert not [e for e in read_events(state) if e.type == "pod.sandbox_degraded"]
    finally:
        for handle in rt.list():
            rt.stop(handle.pod_id, 0)


def test_process_spec_command_or_unlisted_env_is_refused_naming_the_field(tmp_path: Path) -> None:
    rt = ProcessRuntime("sbx", tmp_path / "state")
    with pytest.raises(PodRuntimeError, match=r"^command: ") as e:
        rt.start(launch(rt, spec(command=["sh", "-c", "cat /etc/shadow"])))
    assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE
    with pytest.raises(PodRuntimeError, match=r"env\.PYTHONWARNINGS: not allowed") as e:
        rt.start(launch(rt, spec(env={"PYTHONWARNINGS": "ignore::x.y", "HMS_STARTUP_DELAY_S": "0"})))
    assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE
    assert rt.list() == [] and rt.check_spec(spec(env={"BROWSER": "sh"}))[0].startswith("env.BROWSER:")
    assert rt.check_spec(spec(env={"HMS_STARTUP_DELAY_S": "0"})) == []


def test_pod_ids_that_are_not_uuids_never_reach_a_path(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rt = ProcessRuntime("sbx", state)
    (tmp_path / "secret.log").write_text("outside the state directory\n")
    for call in (lambda: rt.logs("../../../secret"), lambda: rt.find("../x"), lambda: rt.stop("../x", 0),
                 lambda: rt.start(PodLaunch(pod_id="../../x", service="s", revision=1, node="sbx", spec=spec()))):
        with pytest.raises(PodRuntimeError, match="not a UUID"):
            call()


def test_process_pod_limits_are_set_and_memory_is_enforced(tmp_path: Path, open_state_dir: Path) -> None:
    rt = ProcessRuntime("sbx", open_state_dir)
    if not rt.cgroups().available():
        pytest.skip(f"no writable cgroup v1 here: {rt.cgroups().reason}")
    ok = launch(rt, spec(memory_mb=128, cpu_limit=0.5))
    hog = launch(rt, spec(HOG_IMAGE, memory_mb=64))
    try:
        handle = rt.start(ok)
        wait_healthy(handle.endpoint)
        assert rt.cgroups().limits(ok.pod_id) == {"memory": str(128 << 20), "pids": "256", "cpu_quota_us": "50000"}
        limits = Path(f"/proc/{handle.extra['pid']}/limits").read_text()
        assert "Max open files            4096" in limits
        rt.start(hog)  # asks for 400 MB under a 64 MB limit: killed, not let through
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and rt.exited([hog.pod_id]) == []:
            time.sleep(0.1)
        assert rt.exited([hog.pod_id]) == [hog.pod_id]
        assert rt.find(ok.pod_id).running  # type: ignore[union-attr]
    finally:
        rt.stop(ok.pod_id, 1)
        rt.stop(hog.pod_id, 0)
    assert not (rt.cgroups().bases["memory"] / ok.pod_id).exists()


async def test_deploy_the_runtime_refuses_fails_at_admission_naming_the_field(temporal_env, tmp_path: Path) -> None:
    """Through the workflow: admission asks each node's runtime (``check_spec``), so a spec the
    process runtime will not run is refused before any pod, naming the field, and the service
    ends Failed with a typed failure — one check, not a crash loop of pod starts and heals."""
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    async with HmsWorker(temporal_env.client, settings):
        hms = Orchestrator(temporal_env.client, settings)
        try:
            with pytest.raises(SpecUnrunnable, match=r"env\.LD_PRELOAD: not allowed") as e:
                await hms.deploy(seed_spec(min_replicas=1, env={"LD_PRELOAD": "/tmp/x.so"}))
            assert e.value.kind == FailureKind.SPEC_UNRUNNABLE
            st = await hms.status("hms-ach")
            assert st.phase == "Failed" and st.failure is not None and st.failure.kind == FailureKind.SPEC_UNRUNNABLE
            assert st.crash_count == 0 and st.heal_count == 0 and node_pods(settings) == []
            history = await temporal_env.client.get_workflow_handle("svc-hms-ach").fetch_history()
            scheduled = [ev.activity_task_scheduled_event_attributes.activity_type.name for ev in history.events
                         if ev.HasField("activity_task_scheduled_event_attributes")]
            children = [ev for ev in history.events
                        if ev.HasField("start_child_workflow_execution_initiated_event_attributes")]
            assert scheduled.count("verify_image") == 1 and children == []  # no rollout, no pod tried
            failed = [ev.activity_task_failed_event_attributes for ev in history.events
                      if ev.HasField("activity_task_failed_event_attributes")]
            assert len(failed) == 1 and "env.LD_PRELOAD" in failed[0].failure.message
            assert failed[0].retry_state == RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE  # refused once, for good
            assert [e for e in read_events(settings.state_dir) if e.type == "spec.refused"]
            # The same spec without the unlisted variable deploys.
            await hms.deploy(seed_spec(min_replicas=1, env={"TZ": "UTC"}), wait=True, timeout=60)
            await hms.undeploy("hms-ach")
        finally:
            await terminate_running(temporal_env, settings)


@pytest.mark.docker
def test_docker_pod_is_boxed_and_still_serves() -> None:
    require_docker()
    from hms_mgmt.runtimes.docker import DockerRuntime

    rt = DockerRuntime(f"sbx{uuid.uuid4().hex[:6]}")
    plain, caps = launch(rt, spec()), launch(rt, spec(cap_add=["NET_BIND_SERVICE"]))
    try:
        for req in (plain, caps):
            handle = rt.start(req)
            wait_healthy(handle.endpoint)
        host = rt.client.containers.get(rt.find(plain.pod_id).extra["container_id"])  # type: ignore[union-attr]
        hc = host.attrs["HostConfig"]
        assert hc["Memory"] == 512 << 20 and hc["PidsLimit"] == 256
        assert hc["SecurityOpt"] == ["no-new-privileges"] and hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
        assert hc["ReadonlyRootfs"] is True
        out = host.exec_run(["sh", "-c", "grep CapEff /proc/1/status; touch /x 2>&1; touch /tmp/y && echo tmp-ok"])
        text = out.output.decode()
        assert "CapEff:\t0000000000000000" in text and "Read-only file system" in text and "tmp-ok" in text
        with_caps = rt.client.containers.get(rt.find(caps.pod_id).extra["container_id"])  # type: ignore[union-attr]
        assert with_caps.attrs["HostConfig"]["CapAdd"] == ["CAP_NET_BIND_SERVICE"] or \
            with_caps.attrs["HostConfig"]["CapAdd"] == ["NET_BIND_SERVICE"]
        with pytest.raises(PodRuntimeError, match="not a UUID"):
            rt.logs("../../x")
    finally:
        for req in (plain, caps):
            rt.stop(req.pod_id, 1)
        rt.close()
