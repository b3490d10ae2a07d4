"""A recorded feed push stays valid for its signature's minutes (MAX_SKEW_S). A router refuses it
once it holds a newer version; these are the two moments it held none: just after it started,
and just after it forgot a stopped service. In both a replay would route a service's traffic to
the pods it had minutes ago (drained, stopped, or by now another service's ports)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hms_mgmt import feed as wire
from hms_mgmt.config import Settings
from hms_mgmt.models import Endpoint, EndpointSet
from hms_mgmt.tickets import ensure_control_key
from router.feed import EndpointTable, FeedSync


@pytest.fixture
def state(tmp_path: Path) -> Path:
    ensure_control_key(tmp_path)
    return tmp_path


def signed(state: Path, table: EndpointSet, *, at: float | None = None) -> tuple[bytes, str]:
    body = table.model_dump_json().encode()
    return body, wire.sign(state, body, now=at)


def table(version: int, address: str = "127.0.0.1:9001", *, stopped: bool = False) -> EndpointSet:
    return EndpointSet(service="hms-ach", version=version, stopped=stopped,
                       endpoints=[] if stopped else [Endpoint(pod="p1", address=address)])


def test_a_push_signed_before_the_router_started_is_refused(state):
    old = signed(state, table(1, "127.0.0.1:6666"), at=time.time() - 60)  # recorded a minute ago
    restarted = FeedSync(Settings(state_dir=state), EndpointTable())
    status, answer = restarted.accept_push(*old)
    assert status == 401 and "before this process started" in answer["error"]
    assert restarted.table.services == {}
    # what the control plane pushes from now on is taken
    assert restarted.accept_push(*signed(state, table(2)))[0] == 200
    assert restarted.table.services["hms-ach"].endpoints[0].address == "127.0.0.1:9001"


def test_a_stopped_service_s_old_push_replayed_after_its_tombstone_is_refused(state):
    sync = FeedSync(Settings(state_dir=state), EndpointTable())
    live = signed(state, table(5))
    assert sync.accept_push(*live)[1]["applied"] is True
    assert sync.accept_push(*signed(state, table(6, stopped=True)))[1]["applied"] is True
    assert sync.table.services == {}
    assert sync.accept_push(*live) == (200, {"service": "hms-ach", "version": 5, "applied": False})
    assert sync.table.services == {}
    # deployed again: its versions are newer (milliseconds since the epoch), so it is routed
    assert sync.accept_push(*signed(state, table(7)))[1]["applied"] is True


def test_a_service_the_resync_forgot_does_not_come_back_on_an_old_push(state):
    sync = FeedSync(Settings(state_dir=state), EndpointTable())
    live = signed(state, table(5))
    sync.accept_push(*live)
    sync.table.forget("hms-ach")  # what the resync does once the service is no longer listed
    assert sync.accept_push(*live)[1]["applied"] is False and sync.table.services == {}
