"""Grants kept through a deploy's waits: the deployer's (through the image check and, over the
governance limit, the approval) and the approver's (through the image check) are good for as
long as that spec lets those waits take, at admission (``issue_ticket``'s ``_admit``) and when the
time slots' schedules are made (``sync_slot_schedules``); never longer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from activities.control import ControlActivities
from activities.slots import SlotActivities, deployer_wait_s
from hms_mgmt import tickets
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.models import ServiceSpec
from hms_mgmt.policy.governance import GovernancePolicy
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import SlotSchedules, TicketInput

IMAGE_ID = "sha256:" + "cd" * 32
SLOTS = [{"name": "day", "start": "0 8 * * *", "end": "0 18 * * *", "min_replicas": 12}]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    tickets.ensure_control_key(tmp_path)
    return Settings.from_env({}, state_dir=tmp_path)


def _spec(**over: object) -> ServiceSpec:
    # 20 replicas: over the default limit of 10, so it waits for an approval.
    return ServiceSpec(**{"name": "pay", "image": "x/pay:1", "min_replicas": 1, "max_replicas": 20,
                          "cpu_target": 50, "time_slots": SLOTS, "image_verify_timeout_s": 600.0, **over})


def _grant_from(monkeypatch: pytest.MonkeyPatch, ago_s: float, state: Path, **kw: object) -> str:
    """A grant issued ``ago_s`` seconds ago."""
    real = time.time
    monkeypatch.setattr(tickets.time, "time", lambda: real() - ago_s)
    try:
        return tickets.grant(state, **kw)  # type: ignore[arg-type]
    finally:
        monkeypatch.setattr(tickets.time, "time", real)


def _slots(settings: Settings, spec: ServiceSpec, grant: str) -> dict[str, object]:
    return SlotActivities._deployer(settings, SlotSchedules(service="pay", workflow_id="svc-pay", revision=1,
                                                            spec=spec, grant=grant, known=[],
                                                            task_queue=settings.task_queue))


def test_the_wait_allowance_is_the_specs_image_check_and_approval() -> None:
    policy = GovernancePolicy()
    assert deployer_wait_s(_spec(), policy) == 600 + tickets.GRANT_TTL_S + 86400
    assert deployer_wait_s(_spec(approval_timeout_s=3600), policy) == 600 + tickets.GRANT_TTL_S + 3600
    small = _spec(max_replicas=2, time_slots=[])  # under the limit: no approval to wait for
    assert deployer_wait_s(small, policy) == 600 + tickets.GRANT_TTL_S


def test_slot_schedules_take_a_deployers_grant_kept_through_a_long_approval(settings, monkeypatch) -> None:
    spec = _spec()
    bind = {"spec": spec.digest()}
    kept = _grant_from(monkeypatch, 3 * 3600, settings.state_dir, action="deploy", service="pay", user="alice",
                       role="ops_admin", bind=bind)  # approved three hours later
    assert _slots(settings, spec, kept)["sub"] == "alice"
    update = _grant_from(monkeypatch, 900, settings.state_dir, action="update", service="pay", user="alice",
                         role="ops_admin", bind=bind)
    assert _slots(settings, spec, update)["act"] == "update"
    too_old = _grant_from(monkeypatch, deployer_wait_s(spec, GovernancePolicy()) + 60, settings.state_dir,
                          action="deploy", service="pay", user="alice", role="ops_admin", bind=bind)
    with pytest.raises(AccessDenied, match="expired"):
        _slots(settings, spec, too_old)


def test_slot_schedules_keep_the_short_life_where_there_is_no_wait(settings, monkeypatch) -> None:
    small = _spec(max_replicas=4, time_slots=[{"name": "day", "start": "0 8 * * *", "end": "0 18 * * *",
                                               "min_replicas": 3}], image_verify_timeout_s=60.0)
    old = _grant_from(monkeypatch, 60 + tickets.GRANT_TTL_S + 30, settings.state_dir, action="deploy",
                      service="pay", user="alice", role="ops_admin", bind={"spec": small.digest()})
    with pytest.raises(AccessDenied, match="expired"):
        _slots(settings, small, old)
    rollback = _grant_from(monkeypatch, tickets.GRANT_TTL_S + 30, settings.state_dir, action="rollback",
                           service="pay", user="alice", role="ops_admin", bind={"to_revision": 1})
    with pytest.raises(AccessDenied, match="expired"):  # a rollback waits for nothing: its own expiry
        _slots(settings, _spec(), rollback)


def _admit(settings: Settings, spec: ServiceSpec, deployer: str, approval: str) -> None:
    ControlActivities._admit(settings, TicketInput(service="pay", revision=1, spec=spec, image_id=IMAGE_ID,
                                                   grant=deployer, approval_grant=approval))


def test_admission_takes_an_approval_kept_through_a_long_image_check(settings, monkeypatch) -> None:
    spec = _spec()
    TrustStore(settings.state_dir).sign(spec.image, IMAGE_ID, signer="alice")
    bind = {"spec": spec.digest()}
    deployer = _grant_from(monkeypatch, 3600, settings.state_dir, action="deploy", service="pay", user="alice",
                           role="ops_admin", bind=bind)
    # Approved, then the image check took 8 minutes (the spec allows 10).
    approval = _grant_from(monkeypatch, 480, settings.state_dir, action="approve", service="pay", user="bob",
                           role="gov_approver", bind={**bind, "revision": 1})
    _admit(settings, spec, deployer, approval)
    stale = _grant_from(monkeypatch, 600 + tickets.GRANT_TTL_S + 60, settings.state_dir, action="approve",
                        service="pay", user="bob", role="gov_approver", bind={**bind, "revision": 1})
    with pytest.raises(AccessDenied, match="expired"):
        _admit(settings, spec, deployer, stale)
