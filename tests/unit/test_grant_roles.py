"""A grant says what its proof was made for (its claim), so the role is checked for that claim
(update, rollback and dry_run are a deployer's), whatever action the caller names; and each
consumer of a grant checks its holder's role once more: ``plan_deploy`` (deploy), the node's
``pod_logs`` and its log stream's ``check_log_grant`` (logs)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.control import ControlActivities
from activities.pods import PodActivities
from hms_mgmt import auth, logstream, tickets
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import EventSink
from hms_mgmt.models import ServiceSpec
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import AuthorizeInput, PlanInput, PodLogsInput

POD = "3f1b2a10-0000-4000-8000-000000000001"
NO_VIEWER_LOGS = ("ops_admin: [deploy, scale, undeploy, update, status, logs, secrets]\n"
                  "gov_approver: [approve, reject, status]\nviewer: [status]\n")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    auth.init_keys(tmp_path)
    tickets.ensure_control_key(tmp_path)
    return tmp_path


def _control(state: Path) -> ControlActivities:
    settings = Settings.from_env({}, state_dir=state)
    acts = ControlActivities(client=None, settings=lambda: settings, sink=EventSink(state))  # type: ignore[arg-type]

    async def usage(*_a: object, **_k: object) -> object:  # no Temporal here: the reads are stubbed
        return [], {}, (acts._fleet("q"), Counter())

    async def not_running(*_a: object, **_k: object) -> None:
        return None

    acts._usage = usage  # type: ignore[method-assign]
    acts._running_status = not_running  # type: ignore[method-assign]
    return acts


def _denied(state: Path) -> list[dict[str, object]]:
    path = state / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if e["type"] == "access.denied"]


def _spec() -> ServiceSpec:
    return ServiceSpec(name="pay", image="x/pay:1", min_replicas=1, max_replicas=1, cpu_target=50)


@pytest.mark.parametrize("action", ["status", "logs", "deploy"])
def test_a_viewer_gets_no_dry_run_grant_whatever_action_is_named(state: Path, action: str) -> None:
    viewer = auth.issue_token(state, user="vic", role="viewer")
    spec = _spec()
    bind = {"spec": spec.digest()}
    proof = auth.prove(viewer, action="dry_run", service="pay", bind=bind)
    out = asyncio.run(ActivityEnvironment().run(_control(state).authorize, AuthorizeInput(
        proof=proof, action=action, claim="dry_run", service="pay", bind=bind)))
    assert not out.allowed and not out.grant
    assert _denied(state), "a refusal is an access.denied event"


def test_an_ops_admin_still_gets_a_dry_run_grant(state: Path) -> None:
    admin = auth.issue_token(state, user="alice", role="ops_admin")
    spec = _spec()
    bind = {"spec": spec.digest()}
    proof = auth.prove(admin, action="dry_run", service="pay", bind=bind)
    out = asyncio.run(ActivityEnvironment().run(_control(state).authorize, AuthorizeInput(
        proof=proof, action="deploy", claim="dry_run", service="pay", bind=bind)))
    assert out.allowed
    assert tickets.open_claims(state, out.grant, "grant")["act"] == "dry_run"


@pytest.mark.parametrize("claim", ["update", "rollback"])
def test_a_viewer_gets_no_update_or_rollback_grant_named_as_status(state: Path, claim: str) -> None:
    viewer = auth.issue_token(state, user="vic", role="viewer")
    bind = {"to_revision": 1}
    proof = auth.prove(viewer, action=claim, service="pay", bind=bind)
    out = asyncio.run(ActivityEnvironment().run(_control(state).authorize, AuthorizeInput(
        proof=proof, action="status", claim=claim, service="pay", bind=bind)))
    assert not out.allowed and not out.grant


@pytest.mark.parametrize("action", ["status", "logs"])
def test_a_role_without_logs_gets_no_log_grant_through_another_action(state: Path, action: str) -> None:
    (state / "access.yaml").write_text(NO_VIEWER_LOGS)
    viewer = auth.issue_token(state, user="vic", role="viewer")
    _, key_hash = logstream.new_key()
    bind = logstream.grant_bind([POD], key_hash)
    proof = auth.prove(viewer, action="logs", service="pay", bind=bind)
    out = asyncio.run(ActivityEnvironment().run(_control(state).authorize, AuthorizeInput(
        proof=proof, action=action, claim="logs", service="pay", bind=bind)))
    assert not out.allowed and not out.grant
    assert _denied(state)


def test_plan_deploy_refuses_a_dry_run_grant_held_by_a_viewer(state: Path) -> None:
    spec = _spec()
    grant = tickets.grant(state, action="dry_run", service="pay", user="vic", role="viewer",
                          bind={"spec": spec.digest()})
    with pytest.raises(ApplicationError, match="may not deploy") as refused:
        asyncio.run(ActivityEnvironment().run(_control(state).plan_deploy, PlanInput(spec=spec, grant=grant)))
    assert refused.value.type == "AccessDenied"
    assert _denied(state)
    ok = tickets.grant(state, action="dry_run", service="pay", user="alice", role="ops_admin",
                       bind={"spec": spec.digest()})
    out = asyncio.run(ActivityEnvironment().run(_control(state).plan_deploy, PlanInput(spec=spec, grant=ok)))
    assert out.replicas == 1


def test_the_log_stream_refuses_a_grant_held_by_a_role_that_may_not_read_logs(state: Path) -> None:
    key, key_hash = logstream.new_key()
    grant = tickets.grant(state, action="logs", service="pay", user="vic", role="viewer",
                          bind=logstream.grant_bind([POD], key_hash))
    assert logstream.check_log_grant(state, grant, key, service="pay", pod=POD)["role"] == "viewer"  # defaults
    (state / "access.yaml").write_text(NO_VIEWER_LOGS)
    with pytest.raises(AccessDenied, match="may not read logs"):
        logstream.check_log_grant(state, grant, key, service="pay", pod=POD)
    odd = tickets.grant(state, action="logs", service="pay", user="x", role="root",
                        bind=logstream.grant_bind([POD], key_hash))
    with pytest.raises(AccessDenied, match="may not read logs"):
        logstream.check_log_grant(state, odd, key, service="pay", pod=POD)


class _NoPods:
    node = "n1"

    def find(self, _pod: str) -> None:
        return None

    def logs(self, _pod: str, _tail: int) -> list[str]:
        return ["a line"]


def test_pod_logs_refuses_a_grant_held_by_a_role_that_may_not_read_logs(state: Path) -> None:
    pods = PodActivities(_NoPods(), TrustStore(state), EventSink(state))  # type: ignore[arg-type]
    env = ActivityEnvironment()
    run = env.info.workflow_run_id
    grant = tickets.grant(state, action="logs", service="pay", user="vic", role="viewer",
                          bind={"pod": POD, "run": run})
    inp = PodLogsInput(service="pay", pod_id=POD, node_task_queue="q", grant=grant)
    assert asyncio.run(env.run(pods.pod_logs, inp)).lines == ["a line"]  # the defaults let a viewer read
    (state / "access.yaml").write_text(NO_VIEWER_LOGS)
    with pytest.raises(ApplicationError, match="may not read logs") as refused:
        asyncio.run(env.run(pods.pod_logs, inp))
    assert refused.value.type == "AccessDenied"
    assert _denied(state)
