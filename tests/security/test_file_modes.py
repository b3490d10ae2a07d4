"""State files are private to their owner (issue: a 0755 state dir and 0644 event log and pod
logs let any local user read who deployed what, and the pods' output). Real files, a real
process pod. About 2 s."""

from __future__ import annotations

import logging
import os
import stat
import uuid
from pathlib import Path

import pytest
from conftest import EXAMPLE_IMAGE, seed_spec

from hms_mgmt.events import Event, EventSink
from hms_mgmt.files import secure_state_dir
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch
from hms_mgmt.runtimes.process import ProcessRuntime


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_a_state_dir_made_readable_by_an_earlier_version_is_tightened(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    (state / "logs" / "n1").mkdir(parents=True)
    (state / "cache" / "rootfs" / "bin").mkdir(parents=True)
    for d in (state, state / "logs", state / "logs" / "n1", state / "cache" / "rootfs" / "bin"):
        os.chmod(d, 0o755)
    files = {"events.jsonl": 0o644, "temporal.db": 0o644, "logs/n1/p.log": 0o644, "keys/control.pub": 0o644,
             "cache/rootfs/bin/su": 0o4755}
    for name, m in files.items():
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / name).write_text("x")
        os.chmod(state / name, m)
    with caplog.at_level(logging.WARNING):
        assert secure_state_dir(state) >= 5
    assert mode(state) == 0o700 and mode(state / "logs") == 0o700 and mode(state / "logs" / "n1") == 0o700
    assert mode(state / "events.jsonl") == 0o600
    assert mode(state / "temporal.db") == 0o600
    assert mode(state / "logs/n1/p.log") == 0o600
    assert mode(state / "keys/control.pub") == 0o644, "public keys stay readable"
    assert mode(state / "cache/rootfs/bin/su") == 0o4755, "a base image's rootfs keeps its own modes"
    assert "readable by others" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert secure_state_dir(state) == 0, "a second start finds nothing to tighten and says nothing"
    assert "readable by others" not in caplog.text


def test_the_event_log_and_its_lock_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        sink = EventSink(tmp_path / "state")
        sink.write(Event(type="access.denied", service="hms-ach", reason="deploy refused: no token"))
    finally:
        os.umask(old)
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / "events.jsonl") == 0o600
    assert mode(tmp_path / "state" / ".events.lock") == 0o600


def test_a_process_pods_log_and_records_are_private(tmp_path: Path) -> None:
    node = f"m{uuid.uuid4().hex[:6]}"
    old = os.umask(0o022)
    try:
        rt = ProcessRuntime(node, tmp_path / "state")
        spec = ServiceSpec(**seed_spec(name="modes", image=EXAMPLE_IMAGE, min_replicas=1, max_replicas=1))
        pod = rt.start(PodLaunch(pod_id=str(uuid.uuid4()), service=spec.name, revision=1, node=node, spec=spec))
    finally:
        os.umask(old)
    try:
        logs = tmp_path / "state" / "logs" / node
        assert mode(logs) == 0o700 and mode(tmp_path / "state" / "pods" / node) == 0o700
        log_files = list(logs.iterdir())
        assert log_files and all(mode(f) == 0o600 for f in log_files), [oct(mode(f)) for f in log_files]
    finally:
        rt.stop(pod.pod_id, 2)


@pytest.mark.parametrize("service", ["../../keys/control", "a/b", "UPPER", "x" * 64, "", "-lead", "a\nb"])
def test_an_endpoint_table_never_names_a_file_outside_the_feed(tmp_path: Path, service: str) -> None:
    """``EndpointSet.service`` becomes ``feed/<service>.json``: anyone who reaches Temporal can send
    a table to the publish activity, so a name that is not a service name is refused as data."""
    from pydantic import ValidationError

    from hms_mgmt.feed import write_table
    from hms_mgmt.models import EndpointSet

    with pytest.raises(ValidationError, match="service"):
        EndpointSet.model_validate({"service": service, "version": 1})
    forged = EndpointSet.model_construct(service=service, version=1, endpoints=[], stopped=False)
    with pytest.raises(ValueError):
        write_table(tmp_path / "state", forged)
    assert not list(tmp_path.rglob("control.json"))


def test_hms_up_tightens_an_old_state_dir_at_start_with_a_warning(tmp_path: Path) -> None:
    """The start itself, not the helper alone: a real `hms up --no-worker` on a 0755 state dir
    with a 0644 event log and pod log says so and leaves them private."""
    from test_startup import hms_up

    from hms_mgmt.devserver import free_port

    state = tmp_path / "state"
    (state / "logs" / "n1").mkdir(parents=True)
    for d in (state, state / "logs", state / "logs" / "n1"):
        os.chmod(d, 0o755)
    for name in ("events.jsonl", "logs/n1/p.log"):
        (state / name).write_text("x")
        os.chmod(state / name, 0o644)
    code, output = hms_up(state, free_port())
    assert code == 0, output
    assert "readable by others" in output, output
    assert mode(state) == 0o700 and mode(state / "logs" / "n1") == 0o700
    assert mode(state / "events.jsonl") == 0o600 and mode(state / "logs/n1/p.log") == 0o600
