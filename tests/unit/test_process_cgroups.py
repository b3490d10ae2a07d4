"""A process pod's cgroups: a CPU limit below what a cgroup can hold (0.01 CPU, as Docker's) is
refused by the spec and by the runtime, and where cgroups exist a pod whose own cannot be made is
refused rather than run without them. The cgroup tree and the spawn are stubbed: no process runs."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pydantic
import pytest

from hms_mgmt.errors import ActivityErrorType
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch, PodRuntimeError
from hms_mgmt.runtimes.cgroups import PodCgroups
from hms_mgmt.runtimes.process import ProcessRuntime


def spec(**kw: Any) -> ServiceSpec:
    return ServiceSpec(name="cg", image="registry.gov/hms-ach:1.5", min_replicas=1, max_replicas=1, cpu_target=50, **kw)


def launch(s: ServiceSpec) -> PodLaunch:
    return PodLaunch(pod_id=str(uuid.uuid4()), service=s.name, revision=1, node="cg", spec=s)


class FailingCgroups:
    reason = ""

    def available(self) -> bool:
        return True

    def create(self, pod_id: str, **kw: Any) -> None:
        raise OSError(22, "Invalid argument")

    def members(self, pod_id: str) -> set[int]:
        return set()

    def remove(self, pod_id: str) -> None:
        pass

    def release(self) -> None:
        pass


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProcessRuntime:
    runtime = ProcessRuntime("cg", tmp_path / "state")
    runtime._user = None  # the worker's own user: no probe

    def no_spawn(*a: Any, **kw: Any) -> None:
        raise AssertionError("the pod was spawned")

    monkeypatch.setattr(runtime, "_spawn", no_spawn)
    return runtime


def test_a_cpu_limit_below_a_hundredth_is_refused_by_the_spec() -> None:
    with pytest.raises(pydantic.ValidationError, match="cpu_limit"):
        spec(cpu_limit=0.005)
    assert spec(cpu_limit=0.01).cpu_limit == 0.01


def test_the_runtime_refuses_a_cpu_limit_no_cgroup_can_hold(rt: ProcessRuntime) -> None:
    tiny = spec().model_copy(update={"cpu_limit": 0.005})  # a spec from before the bound
    with pytest.raises(PodRuntimeError, match=r"^cpu_limit: 0\.005 is below") as e:
        rt.start(launch(tiny))
    assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE
    assert rt.list() == []


def test_cgroups_that_cannot_be_made_refuse_the_pod(rt: ProcessRuntime) -> None:
    rt._cgroups = FailingCgroups()  # type: ignore[assignment]
    with pytest.raises(PodRuntimeError, match="cannot make its cgroups.*Invalid argument") as e:
        rt.start(launch(spec(cpu_limit=0.5)))
    assert e.value.error_type == ActivityErrorType.RUNTIME_FAILURE
    assert rt.list() == []


def test_create_refuses_a_quota_below_the_kernels_least_before_making_anything(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    for ctrl in ("memory", "cpu", "pids"):
        (root / ctrl).mkdir(parents=True)
        (root / ctrl / "cgroup.procs").write_text("")
    cgroups = PodCgroups("n", root=root)
    assert cgroups.available()
    with pytest.raises(ValueError, match="cpu_limit 0.005"):
        cgroups.create("p", memory_mb=64, cpus=0.005, pids=10)
    assert not any((base / "p").exists() for base in cgroups.bases.values())
