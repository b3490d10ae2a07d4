"""`hms deploy FILE --dry-run` and `deploy(spec, dry_run=True)`: the admission verdict from the
control plane's own checks, and nothing started — no workflow (as `temporal workflow list`
shows), no pod, no event but a refusal's. Real dev server, real worker process, process pods."""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest_asyncio
import yaml
from conftest import EXAMPLE_IMAGE, V2_IMAGE, eventually, node_pods, temporal_address
from temporalio.testing import WorkflowEnvironment
from test_cli import cli, hms, ok  # noqa: F401 - cli is a fixture
from test_cli_scripting import spec_file

from hms_mgmt import auth, testing
from hms_mgmt.config import Settings
from hms_mgmt.events import Event
from hms_mgmt.models import DryRunVerdict, NodeRecord, NodeSpec
from hms_mgmt.nodes import registry_nodes
from hms_mgmt.orchestrator import Orchestrator, deploy_async
from hms_mgmt.trust import TrustStore


def events(s: Settings, service: str) -> list[Event]:
    path = s.state_dir / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in (Event.model_validate_json(x) for x in lines) if e.service == service]


def workflows_of(env: WorkflowEnvironment, s: Settings, name: str) -> list[str]:
    """Every workflow of the service, as `temporal workflow list` shows it."""
    out = subprocess.run(
        [testing.temporal_binary(), "workflow", "list", "--address", temporal_address(env), "--output", "json",
         "--query", f'TaskQueue = "{s.task_queue}"'],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return [w["execution"]["workflowId"] for w in json.loads(out or "[]") if name in w["execution"]["workflowId"]]


@pytest_asyncio.fixture(loop_scope="session")
async def control(temporal_env: WorkflowEnvironment, cli) -> tuple[Settings, dict[str, str], NodeSpec]:  # noqa: F811
    """The worker process's control plane once its node has registered (the registry runs), and that node."""
    s, env = cli

    async def registered() -> list[NodeRecord] | None:
        return await registry_nodes(temporal_env.client, s)

    [node] = await eventually(registered, timeout=60, what="the node's registration")
    return s, env, node.spec


async def dry_run(env: dict[str, str], spec: Path, code: int = 0) -> DryRunVerdict:
    result = await hms("deploy", str(spec), "--dry-run", "-o", "json", env=env)
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return DryRunVerdict.model_validate_json(result.stdout)


async def test_a_valid_spec_shows_placement_and_starts_nothing(temporal_env: WorkflowEnvironment, control,
                                                               tmp_path: Path):
    s, env, node = control
    name = f"dry-{uuid.uuid4().hex[:6]}"
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    spec = spec_file(tmp_path, name, min_replicas=2, cpu_limit=0.25, time_slots=[
        {"name": "payday", "start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat(),
         "min_replicas": 3, "max_replicas": 3}])
    verdict = await dry_run(env, spec)
    assert verdict.admitted and verdict.failure is None and not verdict.needs_approval
    assert (verdict.user, verdict.role) == ("alice", "ops_admin")
    assert verdict.image == EXAMPLE_IMAGE and verdict.image_id.startswith("sha256:")
    [plan] = verdict.placement
    assert (plan.node, plan.pods, verdict.replicas, verdict.unplaced) == (s.node, 2, 2, 0)
    assert verdict.pod_nodes == [s.node, s.node]
    assert plan.pods_left == node.max_pods - 2 and plan.cpu_left == round(node.cpu - 0.5, 6)
    [slot] = verdict.time_slots
    assert (slot.name, slot.on, slot.next_start, slot.next_end) == ("payday", False, start, start + timedelta(hours=2))
    assert [c.name for c in verdict.checks] == ["access", "approval", "secrets", "image", "placement"]

    as_yaml = yaml.safe_load(ok(await hms("deploy", str(spec), "--dry-run", "-o", "yaml", env=env)))
    assert DryRunVerdict.model_validate(as_yaml).placement == verdict.placement
    table = ok(await hms("deploy", str(spec), "--dry-run", env=env))
    assert f"{name} would be admitted" in table and s.node in table and "payday" in table, table
    py = await deploy_async(spec, settings=s, dry_run=True)
    assert isinstance(py, DryRunVerdict) and py.admitted and py.placement == verdict.placement

    assert workflows_of(temporal_env, s, name) == []  # no service workflow, no child: nothing started
    assert events(s, name) == []  # no pod event, no event at all
    assert node_pods(s, name) == []


async def test_a_spec_over_the_governance_limit_needs_approval_and_exits_0(control, tmp_path: Path):
    s, env, node = control
    verdict = await dry_run(env, spec_file(tmp_path, f"dry-{uuid.uuid4().hex[:6]}", max_replicas=12))
    assert verdict.admitted and verdict.needs_approval
    assert any("max_replicas" in r for r in verdict.approval_reasons), verdict.approval_reasons
    [approval] = [c for c in verdict.checks if c.name == "approval"]
    assert "gov_approver" in approval.detail

    # Deployed, it waits for that approval: a changed spec cannot update it before it runs.
    name = f"dry-{uuid.uuid4().hex[:6]}"
    ok(await hms("deploy", str(spec_file(tmp_path, name, max_replicas=12)), "--no-wait", env=env))
    waiting = await dry_run(env, spec_file(tmp_path, name, max_replicas=12, min_replicas=2), code=3)
    assert waiting.failure is not None and waiting.failure.kind == "refused"
    assert "AwaitingApproval; it can be updated once it runs" in waiting.failure.message
    same = await dry_run(env, spec_file(tmp_path, name, max_replicas=12))
    assert same.change is not None and same.change.no_op and not same.needs_approval


async def test_refusals_exit_with_their_code_and_name_the_reason(control, tmp_path: Path):
    s, env, node = control
    name = f"dry-{uuid.uuid4().hex[:6]}"
    bad = await hms("deploy", str(spec_file(tmp_path, name, cpu_target=0)), "--dry-run", env=env)
    assert bad.returncode == 2 and "cpu_target" in bad.stderr, bad.stderr  # a bad spec: nothing is even sent
    viewer = {**env, "HMS_TOKEN": auth.issue_token(s.state_dir, user="vic", role="viewer")}
    denied = await dry_run(viewer, spec_file(tmp_path, name), code=3)
    assert denied.failure is not None and denied.failure.kind == "access_denied"
    assert "viewer" in denied.failure.message and not denied.placement  # nothing else is told to a refused caller
    assert [e.type for e in events(s, name)] == ["access.denied"]  # a refusal is an event

    assert TrustStore(s.state_dir).revoke(V2_IMAGE)
    untrusted = await dry_run(env, spec_file(tmp_path, name, image=V2_IMAGE), code=3)
    assert untrusted.failure is not None and untrusted.failure.kind == "image_untrusted"
    assert V2_IMAGE in untrusted.failure.message and not untrusted.image_id

    missing = await dry_run(env, spec_file(tmp_path, name, secrets=["no-such-secret"]), code=2)
    assert missing.failure is not None and "no secret no-such-secret" in missing.failure.message

    big = spec_file(tmp_path, name, min_replicas=3, cpu_limit=round(node.cpu * 0.6, 3))  # one fits
    full = await dry_run(env, big, code=1)
    assert full.failure is not None and full.failure.kind == "capacity"
    assert "no node has room for 2 more pod(s)" in full.failure.message and full.unplaced == 2
    assert [(p.node, p.pods) for p in full.placement] == [(s.node, 1)] and full.pod_nodes == [s.node, None, None]
    text = await hms("deploy", str(big), "--dry-run", env=env)
    assert text.returncode == 1 and "would be refused" in text.stdout and "no node has room" in text.stdout
    assert [e.type for e in events(s, name)] == ["access.denied"]


async def test_a_changed_running_service_shows_the_diff_and_the_rollout_plan(temporal_env: WorkflowEnvironment,
                                                                             control, tmp_path: Path):
    s, env, node = control
    name = f"dry-{uuid.uuid4().hex[:6]}"
    ok(await hms("deploy", str(spec_file(tmp_path, name, min_replicas=3, max_replicas=4)), env=env))
    before = {e.type for e in events(s, name)}
    wanted = spec_file(tmp_path, name, min_replicas=3, max_replicas=4, image=V2_IMAGE, max_surge=1,
                       max_unavailable=1)
    verdict = await dry_run(env, wanted)
    assert verdict.admitted and verdict.change is not None
    change = verdict.change
    assert change.from_revision == 1 and change.phase == "Running" and not change.in_place
    assert {c.field: (c.old, c.new) for c in change.changes}["image"] == (EXAMPLE_IMAGE, V2_IMAGE)
    assert {c.field for c in change.changes} == {"image", "max_surge", "max_unavailable"}
    rollout = change.rollout
    # max_unavailable 1, but min_replicas 3 of 3 must stay ready: one pod of surge at a time.
    assert rollout is not None and (rollout.replicas, rollout.surge, rollout.unavailable) == (3, 1, 0)
    assert [(r.start, r.retire) for r in rollout.rounds] == [(1, 0), (1, 1), (1, 1), (0, 1)]
    assert verdict.replicas == rollout.rounds[0].start

    table = ok(await hms("deploy", str(wanted), "--dry-run", env=env))
    assert "changes to revision 1" in table and V2_IMAGE in table and "rollout: 3 pod(s), surge 1" in table

    same = await dry_run(env, spec_file(tmp_path, name, min_replicas=3, max_replicas=4))
    assert same.change is not None and same.change.no_op and same.replicas == 0
    bounds = await dry_run(env, spec_file(tmp_path, name, min_replicas=3, max_replicas=5))
    assert bounds.change is not None and bounds.change.in_place and bounds.change.rollout is None

    st = await Orchestrator(temporal_env.client, s).status(name)
    assert st.revision == 1 and st.spec.image == EXAMPLE_IMAGE and {p.revision for p in st.pods} == {1}
    assert not [w for w in workflows_of(temporal_env, s, name) if "deploy-2" in w or "rollout" in w]
    assert {e.type for e in events(s, name)} == before  # no pod event, nothing new
