"""Input bounds and the pure sandbox check: every refusal names its field."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from hms_mgmt.errors import ActivityErrorType
from hms_mgmt.files import inside
from hms_mgmt.models import ServiceSpec
from hms_mgmt.policy.sandbox import SAFE_ENV, allowed_env, check_process_spec
from hms_mgmt.runtimes.base import PodRuntimeError, check_pod_id

BASE = {"name": "hms-ach", "image": "registry.gov/hms-ach:1.4", "min_replicas": 1, "max_replicas": 3, "cpu_target": 60}


def spec(**kw: object) -> ServiceSpec:
    return ServiceSpec(**{**BASE, **kw})


def refused_field(**kw: object) -> tuple[str, str]:
    with pytest.raises(ValidationError) as e:
        spec(**kw)
    err = e.value.errors()[0]
    return ".".join(str(p) for p in err["loc"]), err["msg"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"health_interval_s": 0.01}, "health_interval_s"),
        ({"health_interval_s": 0.5}, "health_interval_s"),
        ({"scale_interval_s": 0.2}, "scale_interval_s"),
        ({"backoff_initial_s": 0.01}, "backoff_initial_s"),
        ({"ready_timeout_s": 0.1}, "ready_timeout_s"),
        ({"image_verify_timeout_s": 0.1}, "image_verify_timeout_s"),
        ({"approval_timeout_s": 0.5}, "approval_timeout_s"),
        ({"approval_timeout_s": 365 * 86400}, "approval_timeout_s"),
        ({"progress_deadline_s": 0.5}, "progress_deadline_s"),
        ({"max_replicas": 1001}, "max_replicas"),
        ({"min_replicas": 1001, "max_replicas": 1001}, "min_replicas"),
        ({"env": {f"V{i}": "x" for i in range(65)}}, "env"),
        ({"env": {"BIG": "x" * (32 * 1024)}}, "env"),
        ({"env": {"BAD-NAME": "x"}}, "env"),
        ({"env": {"A": "nul\0byte"}}, "env"),
        ({"command": ["x"] * 65}, "command"),
        ({"command": ["x" * 9000]}, "command"),
        ({"command": []}, "command"),
        ({"health_path": "/" + "h" * 2000}, "health_path"),
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add"),
    ],
)
def test_out_of_bounds_spec_is_refused_naming_the_field(override: dict[str, object], field: str) -> None:
    loc, _ = refused_field(**override)
    assert loc == field


def test_bounds_accept_the_floors_and_caps_themselves() -> None:
    s = spec(health_interval_s=1.0, scale_interval_s=1.0, backoff_initial_s=0.1, backoff_max_s=0.5,
             max_replicas=1000, env={f"V{i}": "x" for i in range(64)}, command=["x"] * 64,
             cap_add=["net_bind_service", "CAP_CHOWN"], drain_s=0, min_ready_s=0)
    assert s.cap_add == ["CHOWN", "NET_BIND_SERVICE"]  # normalised, so equal specs hash alike
    assert s.read_only_root is True


def test_cap_add_refusal_names_the_capability_and_the_allowlist() -> None:
    _, msg = refused_field(cap_add=["NET_ADMIN", "CHOWN"])
    assert "NET_ADMIN" in msg and "NET_BIND_SERVICE" in msg and "CHOWN may" not in msg


ENTRY = {"command": ["{python}", "-m", "services.hms_ach"], "allow_env": ["HMS_STARTUP_DELAY_S"]}


def test_process_spec_may_set_only_allowed_env_names() -> None:
    assert check_process_spec(spec(env={"HMS_STARTUP_DELAY_S": "1", "TZ": "UTC"}), ENTRY) == []
    problems = check_process_spec(spec(env={"PYTHONWARNINGS": "x", "LD_PRELOAD": "/x.so", "TZ": "UTC"}), ENTRY)
    assert [p.split(":")[0] for p in problems] == ["env.LD_PRELOAD", "env.PYTHONWARNINGS"]
    assert "allow_env" in problems[0] and "HMS_STARTUP_DELAY_S" in problems[0]


def test_runtime_set_names_cannot_be_allowed_from_a_spec() -> None:
    entry = {"command": ["x"], "allow_env": ["PATH", "PYTHONPATH", "HMS_POD_ID", "EXTRA"]}
    assert allowed_env(entry) == SAFE_ENV | {"EXTRA"}
    assert check_process_spec(spec(env={"PATH": "/evil"}), entry)[0].startswith("env.PATH:")


def test_process_spec_command_needs_allow_command() -> None:
    problems = check_process_spec(spec(command=["sh", "-c", "id"]), ENTRY)
    assert len(problems) == 1 and problems[0].startswith("command:") and "allow_command" in problems[0]
    assert check_process_spec(spec(command=["sh", "-c", "id"]), {**ENTRY, "allow_command": True}) == []


_SOME_POD = "1924729b-1c3f-42cc-8651-66cd86d896f3"


@pytest.mark.parametrize("bad", ["../../x", "", "x", "/etc/passwd", _SOME_POD.upper(),
                                 _SOME_POD + "/../x", "{" + _SOME_POD + "}"])
def test_pod_id_must_be_a_canonical_uuid(bad: str) -> None:
    with pytest.raises(PodRuntimeError) as e:
        check_pod_id(bad)
    assert e.value.error_type == ActivityErrorType.SPEC_UNRUNNABLE and "not a UUID" in str(e.value)


def test_pod_id_uuid_passes() -> None:
    pod = str(uuid.uuid4())
    assert check_pod_id(pod) == pod


def test_inside_refuses_escapes(tmp_path: Path) -> None:
    base = tmp_path / "state"
    base.mkdir()
    assert inside(base, "logs", "a.log") == (base / "logs" / "a.log").resolve()
    for parts in (("..", "x"), ("/etc/passwd",), ("logs", "..", "..", "x")):
        with pytest.raises(ValueError, match="outside"):
            inside(base, *parts)
    (base / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        inside(base, "link", "x")


@pytest.mark.parametrize("bad", ["../../x", "../" + _SOME_POD, _SOME_POD.upper(), ""])
def test_logs_input_pod_id_must_be_a_uuid(bad: str) -> None:
    from hms_mgmt.wire import PodLogsInput

    with pytest.raises(ValidationError) as e:
        PodLogsInput(pod_id=bad, service="hms-ach")
    assert e.value.errors()[0]["loc"] == ("pod_id",) and "not a UUID" in str(e.value)
    good = str(uuid.uuid4())
    assert PodLogsInput(pod_id=good, service="hms-ach").pod_id == good
    with pytest.raises(ValidationError, match="tail"):
        PodLogsInput(pod_id=good, tail=1_000_000)
