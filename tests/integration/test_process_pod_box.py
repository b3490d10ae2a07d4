"""A process pod's box on real processes: it runs its first instruction inside its cgroups (it
waits at a gate until the worker has put it there), a stop leaves none of its processes however
they hid (a child that ignores SIGTERM, one left after the main process exited, one in a session
of its own), with cgroups or without, and a pod whose cgroups cannot be made or joined does not
run at all. About 10 s."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import seed_spec

from hms_mgmt.errors import ActivityErrorType
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch, PodRuntimeError
from hms_mgmt.runtimes.cgroups import PodCgroups
from hms_mgmt.runtimes.process import ProcessRuntime

FIRST_IMAGE = "registry.gov/hms-first:1.0"
HIDING_IMAGE = "registry.gov/hms-hiding:1.0"
# The main process forks a child that ignores SIGTERM (same process group) and a grandchild in a
# session of its own (setsid, then a double fork), writes their pids, then exits first.
HIDING = (
    "import os, signal, sys, time\n"
    "pids = []\n"
    "r, w = os.pipe()\n"
    "if os.fork() == 0:\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_IGN); os.write(w, b'%d ' % os.getpid()); time.sleep(120); os._exit(0)\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.write(w, b'%d ' % os.getpid()); time.sleep(120); os._exit(0)\n"
    "    os._exit(0)\n"
    "time.sleep(0.5)\n"
    "print('HIDDEN', os.read(r, 100).decode(), flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    (state / "images.yaml").write_text(
        f"{FIRST_IMAGE}:\n"
        "  command: [sh, -c, 'cat /proc/self/cgroup; echo PID=$$; exec sleep 30']\n"
        f"{HIDING_IMAGE}:\n"
        f"  command: ['{{python}}', -c, {HIDING!r}, '0']\n"
        f"  allow_command: true\n")
    return state


def launch(rt: ProcessRuntime, image: str, **kw: object) -> PodLaunch:
    spec = ServiceSpec(**seed_spec(name=f"box-{uuid.uuid4().hex[:6]}", image=image, min_replicas=1, max_replicas=1,
                                   **kw))
    return PodLaunch(pod_id=str(uuid.uuid4()), service=spec.name, revision=1, node=rt.node, spec=spec)


def wait_for_line(rt: ProcessRuntime, pod_id: str, prefix: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in rt.logs(pod_id, 0):
            if line.startswith(prefix):
                return line.removeprefix(prefix)
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line in {rt.logs(pod_id, 0)}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pod_processes(pod_id: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("HMS_POD_ID") == pod_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def cgroups_or_skip(rt: ProcessRuntime) -> None:
    if not rt.cgroups().available():
        pytest.skip(f"no writable cgroup v1 here: {rt.cgroups().reason}")


def test_a_pod_runs_its_first_instruction_in_its_cgroups(state: Path) -> None:
    rt = ProcessRuntime(f"box{uuid.uuid4().hex[:6]}", state)
    cgroups_or_skip(rt)
    try:
        for _ in range(5):
            req = launch(rt, FIRST_IMAGE, cpu_limit=0.5)
            handle = rt.start(req)
            assert wait_for_line(rt, req.pod_id, "PID=") == handle.extra["pid"]  # the gate exec'd: same pid
            groups = [line for line in rt.logs(req.pod_id, 0) if ":pids:" in line or ":memory:" in line]
            assert len(groups) == 2 and all(line.endswith(f"/hms/{rt.node}/{req.pod_id}") for line in groups), groups
            proc = psutil.Process(int(handle.extra["pid"]))
            assert os.getsid(proc.pid) == proc.pid and proc.name() == "sleep"
            rt.stop(req.pod_id, 1)
    finally:
        for h in rt.list():
            rt.stop(h.pod_id, 0)
        rt.close()


def stop_leaves_nothing(rt: ProcessRuntime, exit_first: bool) -> None:
    req = launch(rt, HIDING_IMAGE, command=None)
    if not exit_first:  # the main process lives on: a stop signals it and its hidden children
        req.spec.command = [*rt.catalog.resolve(HIDING_IMAGE)["command"][:-1], "60"]
    handle = rt.start(req)
    hidden = [int(p) for p in wait_for_line(rt, req.pod_id, "HIDDEN ").split()]
    main = int(handle.extra["pid"])
    assert len(hidden) == 2 and all(alive(p) for p in hidden)
    if not exit_first:  # the gate's sh leaves nothing of its own in the pod's environment
        assert "PWD" not in psutil.Process(main).environ() and psutil.Process(main).name().startswith("python")
    if exit_first:
        deadline = time.monotonic() + 10
        while rt.find(req.pod_id).running and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert rt.find(req.pod_id).state == "exited"  # type: ignore[union-attr]
    started = time.monotonic()
    assert rt.stop(req.pod_id, 1)
    assert time.monotonic() - started < 8
    assert not [p for p in [main, *hidden] if alive(p)], "processes of the pod survived its stop"
    assert pod_processes(req.pod_id) == [] and rt.list() == []


@pytest.mark.parametrize("exit_first", [False, True], ids=["main-lives", "main-exited"])
@pytest.mark.parametrize("boxed", [True, False], ids=["in-its-cgroups", "no-cgroups-by-its-pod-id"])
def test_a_stop_kills_every_process_of_the_pod(state: Path, tmp_path: Path, exit_first: bool, boxed: bool) -> None:
    rt = ProcessRuntime(f"box{uuid.uuid4().hex[:6]}", state)
    if boxed:
        cgroups_or_skip(rt)
    else:
        rt._cgroups = PodCgroups(rt.node, root=tmp_path / "no-cgroups")
        assert not rt.cgroups().available()
    try:
        stop_leaves_nothing(rt, exit_first)
    finally:
        for h in rt.list():
            rt.stop(h.pod_id, 0)
        rt.close()


def test_a_pod_that_cannot_join_its_cgroups_never_runs(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = ProcessRuntime(f"box{uuid.uuid4().hex[:6]}", state)
    cgroups_or_skip(rt)

    def refuse(pod_id: str, pid: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rt.cgroups(), "join", refuse)
    req = launch(rt, FIRST_IMAGE)
    try:
        with pytest.raises(PodRuntimeError, match="cannot put it in its box") as e:
            rt.start(req)
        assert e.value.error_type == ActivityErrorType.RUNTIME_FAILURE
        assert pod_processes(req.pod_id) == [] and rt.list() == []
        assert not any(line.startswith(("PID=", "0::", "1:")) for line in rt.logs(req.pod_id, 0))  # never ran
        assert not (rt.cgroups().bases["pids"] / req.pod_id).exists()
    finally:
        for h in rt.list():
            rt.stop(h.pod_id, 0)
        rt.close()
