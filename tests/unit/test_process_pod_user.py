"""A process pod's user: a failed probe of the pod user's Python (a pod of that user may kill or
stop the probe) refuses the pod; it never makes the pod run as the worker's user, and it is not
remembered. With a uid per pod (``pod_user: auto``, root) the probe runs as the pod's own uid,
and a refused pod gives its uid back. The probe and the spawn are stubbed: no process runs."""

from __future__ import annotations

import pwd
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from hms_mgmt.errors import ActivityErrorType
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch, PodRuntimeError
from hms_mgmt.runtimes import process as process_mod
from hms_mgmt.runtimes.base import PodLimits
from hms_mgmt.runtimes.process import ProcessRuntime, RunAs
from hms_mgmt.runtimes.uids import UidPool

POD_USER = pwd.struct_passwd(("hms-pod", "x", 64999, 64999, "", "/nonexistent", "/usr/sbin/nologin"))


def launch(rt: ProcessRuntime) -> PodLaunch:
    spec = ServiceSpec(name="victim", image="registry.gov/hms-ach:1.5", min_replicas=1, max_replicas=1, cpu_target=50)
    return PodLaunch(pod_id=str(uuid.uuid4()), service=spec.name, revision=1, node=rt.node, spec=spec)


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProcessRuntime:
    runtime = ProcessRuntime("pu", tmp_path / "state", limits=PodLimits(pod_user="hms-pod"))
    runtime._user = POD_USER  # as a root worker with pod_user: hms-pod (a named, shared user)

    def no_spawn(*a: Any, **kw: Any) -> None:
        raise AssertionError("the pod was spawned")

    monkeypatch.setattr(runtime, "_spawn", no_spawn)
    return runtime


def test_a_killed_probe_refuses_the_pod_and_is_tried_again(rt: ProcessRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[dict[str, Any]] = []

    def killed(args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        probes.append(kw)
        return subprocess.CompletedProcess(args, -9, b"", b"")  # SIGKILLed by a process of the pod user

    monkeypatch.setattr(process_mod.subprocess, "run", killed)
    for attempt in (1, 2):
        with pytest.raises(PodRuntimeError, match=r"pod user hms-pod cannot run Python in .*exit code -9") as e:
            rt.start(launch(rt))
        assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE
        assert "never run as the worker's user" in str(e.value)
        assert len(probes) >= attempt  # not remembered: probed again
    assert rt._python_for == {} and rt.list() == []
    assert all(kw["start_new_session"] and kw["stdin"] == subprocess.DEVNULL and kw["user"] == POD_USER.pw_uid
               for kw in probes)


def test_a_successful_probe_is_remembered(rt: ProcessRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def ok(args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, b"", b"")

    monkeypatch.setattr(process_mod.subprocess, "run", ok)
    assert rt._python_for_user(RunAs.user(POD_USER), "/") == (process_mod.sys.executable, "")
    assert rt._python_for_user(RunAs(1_900_000_005, 1_900_000_005, "uid 1900000005", own=True), "/") == \
        (process_mod.sys.executable, "")  # per cwd: any uid of the range may do what another may
    assert len(calls) == 1


@pytest.mark.skipif(process_mod.os.geteuid() != 0, reason="a uid per pod is for a root worker")
def test_a_pod_of_its_own_uid_is_probed_as_that_uid_and_a_refusal_gives_it_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = ProcessRuntime("pu", tmp_path / "state", limits=PodLimits(pod_user="auto"))
    assert runtime.per_pod_uids() and runtime.pod_user() is None
    runtime.uids = UidPool(1_900_000_000, 2, tmp_path / "leases")
    assert runtime.firewall_owner() == "1900000000-1900000001"  # the firewall matches the whole range
    probes: list[dict[str, Any]] = []

    def killed(args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        probes.append(kw)
        assert (tmp_path / "leases" / str(kw["user"])).exists()  # leased while it is probed
        return subprocess.CompletedProcess(args, 1, b"", b"PermissionError")

    monkeypatch.setattr(process_mod.subprocess, "run", killed)
    for _ in range(3):  # more than the range holds: each refusal gave its uid back
        with pytest.raises(PodRuntimeError, match=r"pod user uid 19000000\d\d cannot run Python") as e:
            runtime.start(launch(runtime))
        assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE
    assert {kw["user"] for kw in probes} <= {1_900_000_000, 1_900_000_001}
    assert all(kw["group"] == kw["user"] and kw["extra_groups"] == [] for kw in probes)
    assert [p.name for p in (tmp_path / "leases").iterdir() if p.name.isdigit()] == []
