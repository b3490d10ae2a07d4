"""A uid of its own per process pod (``pod_user: auto`` under a root worker; systemd's DynamicUser):
pods of a node no longer share one user, so one cannot read another's secrets or home or signal
it, and a stop kills every process of the pod's uid, even one that re-exec'd itself with an empty
environment in a session of its own. The uid is leased machine-wide, kept across a worker restart
(the record names it), given back at stop and taken again; a full range refuses the pod, naming
the setting. Real processes, run as root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import wait_healthy

from hms_mgmt import secrets as pod_secrets
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch, PodRuntimeError
from hms_mgmt.runtimes.base import PodLimits, SecretFile
from hms_mgmt.runtimes.cgroups import PodCgroups
from hms_mgmt.runtimes.process import ProcessRuntime
from hms_mgmt.runtimes.uids import LEASE_DIR, processes_of, signal_uid

SYSTEM_PYTHON = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                                reason="only a root worker runs pods as uids of their own")

ESCAPE_IMAGE = "registry.gov/hms-escape:1.0"
HOP_IMAGE = "registry.gov/hms-hop:1.0"  # a process that forks on and on: a new pid every millisecond
LEAVE_IMAGE = "registry.gov/hms-leave:1.0"  # leaves a deep tree in its home, IPC and a file in /run/lock
HOP = """import os, sys, time
if os.fork():
    raise SystemExit
os.setsid()
beat = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
while True:
    time.sleep(0.001)
    os.write(beat, b".")
    if os.fork():
        os._exit(0)
"""
# A range of its own per test (the lease directory is the machine's): nothing else takes from it.
_ranges = iter(range(1_900_200_000 + (os.getpid() % 1000) * 100, 2_000_000_000, 10))


@pytest.fixture
def state() -> Iterator[Path]:
    """A state directory any user may enter (pytest's tmp_path is private), as a real one under /var/lib."""
    base = Path(tempfile.mkdtemp(prefix="hms-uids-"))
    base.chmod(0o755)
    st = base / "state"
    st.mkdir()
    (base / "hop.py").write_text(HOP)
    (base / "beat").touch(mode=0o666)
    (base / "beat").chmod(0o666)
    (st / "images.yaml").write_text(
        f"{ESCAPE_IMAGE}:\n"
        "  command: [sh, -c, 'setsid env -i /bin/sleep 300 </dev/null >/dev/null 2>&1 & exec {python} -m services.hms_ach']\n"
        f"{HOP_IMAGE}:\n"
        f"  command: [sh, -c, '{{python}} {base / 'hop.py'} {base / 'beat'} </dev/null >/dev/null 2>&1 & "
        "exec {python} -m services.hms_ach']\n"
        f"{LEAVE_IMAGE}:\n"
        "  command: [sh, -c, 'ipcmk -M 4096 >/dev/null; : > /run/lock/hms-left-$(id -u); "
        "mkdir -p \"$HOME/$(printf d/%.0s $(seq 1200))\"; exec {python} -m services.hms_ach']\n")
    yield st
    shutil.rmtree(base, ignore_errors=True)


def runtime(state: Path, count: int = 4, node: str = "uids", limits: PodLimits | None = None) -> ProcessRuntime:
    """A node runtime as on a host without usable cgroups (pods log pod.sandbox_degraded): its stop
    finds a pod's processes without them."""
    rt = ProcessRuntime(node, state, limits=limits or PodLimits(uid_base=next(_ranges), uid_count=count))
    rt._cgroups = PodCgroups(node, root=state / "no-cgroups")
    assert not rt.cgroups().available()
    return rt


def launch(rt: ProcessRuntime, service: str, image: str = "registry.gov/hms-ach:1.5",
           secrets: list[SecretFile] | None = None) -> PodLaunch:
    spec = ServiceSpec(name=service, image=image, min_replicas=1, max_replicas=1, cpu_target=50)
    return PodLaunch(pod_id=str(uuid.uuid4()), service=service, revision=1, node=rt.node, spec=spec,
                     secrets=secrets or [])


def record(rt: ProcessRuntime, req: PodLaunch) -> dict:
    return json.loads(rt._record_path(req.pod_id).read_text())


def as_uid(uid: int, code: str) -> str:
    """What code running in a pod of ``uid`` gets (its user, no supplementary groups)."""
    done = subprocess.run([SYSTEM_PYTHON, "-c", code], user=uid, group=uid, extra_groups=[], cwd="/",
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, check=False)
    return (done.stdout + done.stderr).strip()


def stop_all(rt: ProcessRuntime) -> None:
    for handle in rt.list():
        rt.stop(handle.pod_id, 0)


def test_pods_get_uids_of_their_own_and_cannot_touch_each_other(state: Path) -> None:
    rt = runtime(state)
    secret = [SecretFile(name="ach-key", file="ach-key", version=1, value=b"s3cret-of-a")]
    a, b = launch(rt, "svc-a"), launch(rt, "svc-b", secrets=secret)
    try:
        ha, hb = rt.start(a), rt.start(b)
        wait_healthy(ha.endpoint)
        wait_healthy(hb.endpoint)
        ua, ub = record(rt, a)["uid"], record(rt, b)["uid"]
        assert ua != ub and rt.uids.base <= ua <= rt.uids.last and rt.uids.base <= ub <= rt.uids.last
        assert psutil.Process(int(ha.extra["pid"])).uids().real == ua
        assert psutil.Process(int(hb.extra["pid"])).uids().real == ub
        assert psutil.Process(int(hb.extra["pid"])).gids().real == ub
        assert rt.uids.holds(ua, a.pod_id, rt._record_path(a.pod_id))
        secret_file = pod_secrets.pod_dir(b.pod_id) / "ach-key"
        assert as_uid(ub, f"print(open({str(secret_file)!r}).read())") == "s3cret-of-a"  # its own pod reads it
        # Pod A against pod B: its secret, its home, its processes.
        assert "PermissionError" in as_uid(ua, f"print(open({str(secret_file)!r}).read())")
        assert "PermissionError" in as_uid(ua, f"import os; print(os.listdir({record(rt, b)['home']!r}))")
        assert "PermissionError" in as_uid(ua, f"import os; os.kill({hb.extra['pid']}, 15)")
        assert rt.find(b.pod_id).running  # type: ignore[union-attr]
    finally:
        stop_all(rt)
    assert not [n for n in os.listdir(LEASE_DIR) if n in (str(ua), str(ub))], "given back at stop"


def test_stop_kills_a_process_that_left_the_pods_session_and_environment(state: Path) -> None:
    """Without cgroups a stop found a pod's processes by HMS_POD_ID in their environment: a process
    that re-exec'd with another in a session of its own escaped. Every process of the uid is the pod's."""
    rt = runtime(state)
    req = launch(rt, "escape", ESCAPE_IMAGE)
    escaped: list[psutil.Process] = []
    try:
        handle = rt.start(req)
        wait_healthy(handle.endpoint)
        uid = record(rt, req)["uid"]
        escaped = [p for p in psutil.process_iter(["uids", "cmdline"])
                   if p.info["uids"].real == uid and p.info["cmdline"] == ["/bin/sleep", "300"]]
        assert len(escaped) == 1
        assert "HMS_POD_ID" not in escaped[0].environ() and os.getsid(escaped[0].pid) != int(handle.extra["pid"])
        rt.stop(req.pod_id, 1)
        assert not escaped[0].is_running() or escaped[0].status() == psutil.STATUS_ZOMBIE
        assert processes_of(uid) == []
    finally:
        for p in escaped:  # on a runtime that let it escape: do not leave it behind
            if p.is_running():
                p.send_signal(signal.SIGKILL)
        stop_all(rt)


def test_a_restarted_worker_stops_a_pod_started_before(state: Path) -> None:
    first = runtime(state)
    req = launch(first, "restart", ESCAPE_IMAGE)
    try:
        wait_healthy(first.start(req).endpoint)
        uid = record(first, req)["uid"]
        assert len(processes_of(uid)) >= 2  # the service and the escaped sleep
        first.close()
        second = runtime(state, node=first.node, limits=first.limits)  # a new worker, same state dir
        assert [h.pod_id for h in second.list()] == [req.pod_id]
        assert second.stop(req.pod_id, 1)
        assert processes_of(uid) == [] and not (LEASE_DIR / str(uid)).exists()
    finally:
        for pid in processes_of(record(first, req)["uid"]) if first._read(req.pod_id) else []:
            os.kill(pid, signal.SIGKILL)
        stop_all(first)


def test_the_uid_is_given_back_and_a_full_range_refuses_the_pod_naming_the_setting(state: Path) -> None:
    rt = runtime(state, count=1)
    a, b = launch(rt, "one"), launch(rt, "two")
    try:
        rt.start(a)
        uid = record(rt, a)["uid"]
        assert uid == rt.uids.base
        with pytest.raises(PodRuntimeError, match=r"no free pod uid.*pod_uid_count") as e:
            rt.start(b)
        assert "never as root or a shared user" in str(e.value)
        assert rt._read(b.pod_id) is None and [h.pod_id for h in rt.list()] == [a.pod_id]
        # Another node (another state dir) of this host draws from the same leases.
        other = runtime(state.parent / "state-2", node="uids-2", limits=rt.limits)
        with pytest.raises(PodRuntimeError, match="pod_uid_count"):
            other.start(launch(other, "three"))
        rt.stop(a.pod_id, 1)
        assert not (LEASE_DIR / str(uid)).exists()
        rt.start(b)
        assert record(rt, b)["uid"] == uid  # taken again
    finally:
        stop_all(rt)


def test_a_record_whose_lease_is_another_pods_kills_none_of_that_pod(state: Path) -> None:
    """A record that outlived its lease (/run is emptied at boot): its uid may be another pod's now.
    A stop of it must not take every process of that uid for its own."""
    rt = runtime(state)
    live = launch(rt, "live")
    try:
        handle = rt.start(live)
        wait_healthy(handle.endpoint)
        stale = dict(record(rt, live), pod_id=str(uuid.uuid4()), pid=0, create_time=0.0, home="")
        rt._write(stale)
        assert rt.stop(stale["pod_id"], 0)
        assert rt.find(live.pod_id).running  # type: ignore[union-attr]
        assert rt.uids.holds(stale["uid"], live.pod_id, rt._record_path(live.pod_id))  # its lease stays
    finally:
        stop_all(rt)


def test_a_record_of_a_named_user_from_before_per_pod_uids_is_still_stopped(state: Path) -> None:
    """Records written before per-pod uids name a user ("hms-pod") and no uid: a stop finds their
    processes as it did, by the user and the pod id in their environment."""
    rt = runtime(state)
    pod_id = str(uuid.uuid4())
    old = subprocess.Popen(["/bin/sleep", "300"], user="nobody", group="nogroup" if _has_group("nogroup") else None,
                           extra_groups=[], env={"HMS_POD_ID": pod_id}, start_new_session=True)
    try:
        rt._write({"pod_id": pod_id, "service": "old", "revision": 1, "node": rt.node, "image": "x", "pid": 0,
                   "create_time": 0.0, "port": 1, "address": "127.0.0.1", "cpu_limit": None,
                   "started_at": "2026-01-01T00:00:00+00:00", "log": "", "command": ["sleep"], "user": "nobody",
                   "home": ""})
        assert rt.stop(pod_id, 0)
        old.wait(timeout=10)
    finally:
        old.kill()
        old.wait()


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_a_process_that_forks_on_and_on_does_not_outlive_its_pods_stop(state: Path) -> None:
    """Its pid changes faster than a scan of /proc: the kernel signals every process of the uid at
    once (kill(-1) as that uid), so it neither survives the stop nor keeps the uid for the next pod."""
    rt = runtime(state, count=1)
    req = launch(rt, "hop", HOP_IMAGE)
    try:
        handle = rt.start(req)
        wait_healthy(handle.endpoint)
        uid = record(rt, req)["uid"]
        beat = state.parent / "beat"
        time.sleep(0.3)
        assert beat.stat().st_size > 10  # it hops
        rt.stop(req.pod_id, 0)
        time.sleep(0.3)
        size = beat.stat().st_size
        time.sleep(0.5)
        assert beat.stat().st_size == size, "a process of the pod's uid outlived its stop"
        assert processes_of(uid) == []
        assert not (LEASE_DIR / str(uid)).exists()
    finally:
        uid = rt.uids.base
        if processes_of(uid):  # on a runtime that let it live: do not leave it behind
            signal_uid(uid, "KILL")
        stop_all(rt)


def test_what_a_pod_leaves_goes_with_it_and_a_deep_tree_stops_nothing(state: Path) -> None:
    """A home 1,200 directories deep made every stop raise (a recursion of ours), keeping the
    record, the uid and the home; SysV shared memory and /run/lock files reached the next pod."""
    rt = runtime(state, count=1)
    req = launch(rt, "leave", LEAVE_IMAGE)
    try:
        handle = rt.start(req)
        wait_healthy(handle.endpoint)
        rec = record(rt, req)
        uid, home = rec["uid"], Path(rec["home"])
        deadline = time.monotonic() + 10
        while not (_shm_of(uid) and Path(f"/run/lock/hms-left-{uid}").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _shm_of(uid) and Path(f"/run/lock/hms-left-{uid}").exists()
        rt.stop(req.pod_id, 0)
        assert rt._read(req.pod_id) is None and not home.exists()
        assert not (LEASE_DIR / str(uid)).exists()
        assert _shm_of(uid) == [] and not Path(f"/run/lock/hms-left-{uid}").exists()
    finally:
        stop_all(rt)
        for shmid in _shm_of(rt.uids.base):
            subprocess.run(["ipcrm", "-m", shmid], check=False)
        Path(f"/run/lock/hms-left-{rt.uids.base}").unlink(missing_ok=True)


def _shm_of(uid: int) -> list[str]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    head = lines[0].split()
    return [row["shmid"] for row in (dict(zip(head, line.split(), strict=False)) for line in lines[1:])
            if row.get("uid") == str(uid)]
