"""Access, governance approval and the signed-image gate, against the real dev server.

Every refusal is checked for what a user sees (a precise error), what it leaves (no pod, no
running workflow) and its event."""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import (
    as_user,
    eventually,
    make_settings,
    node_pods,
    seed_spec,
    sign_images,
    sweep_pods,
    temporal_binary,
    terminate_running,
    wait_phase,
)
from temporalio.client import WorkflowExecutionStatus

from hms_mgmt import auth
from hms_mgmt.errors import (
    AccessDenied,
    ApprovalRejected,
    ApprovalTimedOut,
    FailureKind,
    ImageUntrusted,
    RequestRefused,
)
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.trust import TrustStore
from worker.main import HmsWorker

BIG = {"max_replicas": 12}  # over the default policy limit of 10: needs approval


def events(settings, type_: str):
    return [e for e in read_events(settings.state_dir) if e.type == type_]


@pytest.fixture
async def gov(temporal_env, tmp_path):
    """A process-runtime stack with alice (ops_admin), bob (gov_approver), vic (viewer)."""
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    try:
        async with HmsWorker(temporal_env.client, settings):
            yield settings, {
                "alice": Orchestrator(temporal_env.client, settings),
                "bob": Orchestrator(temporal_env.client, as_user(settings, "bob", "gov_approver")),
                "vic": Orchestrator(temporal_env.client, as_user(settings, "vic", "viewer")),
                "anon": Orchestrator(temporal_env.client, settings.model_copy(update={"token": None})),
            }
    finally:
        await terminate_running(temporal_env, settings)
        assert sweep_pods(settings) == [], "a test left pods running"


async def assert_nothing_running(client, settings, name="hms-ach"):
    """The refused service's workflow ends (right after its refusal has been answered) with no pod."""
    final = await client.get_workflow_handle(f"svc-{name}").result(rpc_timeout=timedelta(seconds=10))
    assert final["phase"] in ("Rejected", "Failed") if isinstance(final, dict) else final.phase in ("Rejected", "Failed")
    desc = await client.get_workflow_handle(f"svc-{name}").describe()
    assert desc.status == WorkflowExecutionStatus.COMPLETED
    assert node_pods(settings) == []


@pytest.mark.parametrize(
    ("who", "match"),
    [("anon", "no identity: set HMS_TOKEN"), ("vic", r"vic \(viewer\) may not deploy"), ("bob", "may not deploy")],
)
async def test_deploy_without_ops_admin_is_refused(gov, who, match):
    settings, as_ = gov
    with pytest.raises(AccessDenied, match=match):
        await as_[who].deploy(seed_spec())
    await assert_nothing_running(as_["alice"].client, settings)
    denied = events(settings, "access.denied")
    assert len(denied) == 1 and denied[0].data["action"] == "deploy"


async def test_expired_and_forged_tokens_are_refused(gov, tmp_path):
    settings, as_ = gov
    old = datetime.now(UTC) - timedelta(hours=10)
    expired = auth.issue_token(settings.state_dir, user="alice", role="ops_admin", ttl_s=60, now=old)
    with pytest.raises(AccessDenied, match="expired"):
        await Orchestrator(as_["alice"].client, settings.model_copy(update={"token": expired})).deploy(seed_spec())
    other = tmp_path / "other-keys"
    auth.init_keys(other)
    forged = auth.issue_token(other, user="alice", role="ops_admin")
    with pytest.raises(AccessDenied, match="signature is invalid"):
        await Orchestrator(as_["alice"].client, settings.model_copy(update={"token": forged})).deploy(seed_spec())
    await assert_nothing_running(as_["alice"].client, settings)


async def test_only_ops_admin_scales_and_undeploys(gov):
    settings, as_ = gov
    await as_["alice"].deploy(seed_spec(min_replicas=1), wait=True, timeout=60)
    with pytest.raises(AccessDenied, match="may not scale"):
        await as_["vic"].scale("hms-ach", 2)
    with pytest.raises(AccessDenied, match="may not undeploy"):
        await as_["bob"].undeploy("hms-ach")
    st = await as_["vic"].status("hms-ach")
    assert st.phase == "Running" and st.desired_replicas == 1 and len(node_pods(settings)) == 1
    assert {r.action for r in st.refusals} == {"scale", "undeploy"}
    assert len(events(settings, "access.denied")) == 2
    await as_["alice"].undeploy("hms-ach")
    assert node_pods(settings) == []


async def test_large_deploy_waits_for_a_four_eyes_approval(gov, tmp_path):
    settings, as_ = gov
    await as_["alice"].deploy(seed_spec(**BIG))  # returns once admission has answered
    st = await as_["alice"].status("hms-ach")
    assert st.phase == "AwaitingApproval"
    assert st.pending_approval.requested_by == "alice"
    assert "max_replicas 12 exceeds the limit of 10" in st.pending_approval.reason
    assert node_pods(settings) == []
    # The phase is set as the event is written: the answer may come first.
    requested = await eventually(lambda: events(settings, "approval.requested"), timeout=30,
                                 what="the approval.requested event")
    assert len(requested) == 1

    # The Web UI's filter finds it by search attribute.
    found = [wf.id async for wf in as_["alice"].client.list_workflows(
        f'HmsPhase = "AwaitingApproval" AND TaskQueue = "{settings.task_queue}"')]
    assert found == ["svc-hms-ach"]

    other = tmp_path / "k"
    auth.init_keys(other)
    attempts = [
        ("self-approval", as_user(settings, "alice", "gov_approver"), "may not approve their own request"),
        ("wrong role", settings, "may not approve"),
        ("forged", settings.model_copy(update={"token": auth.issue_token(other, user="eve", role="gov_approver")}),
         "signature is invalid"),
        ("expired", settings.model_copy(update={"token": auth.issue_token(
            settings.state_dir, user="bob", role="gov_approver", ttl_s=60,
            now=datetime.now(UTC) - timedelta(hours=2))}), "expired"),
    ]
    for label, who, match in attempts:
        with pytest.raises(AccessDenied, match=match):
            await Orchestrator(as_["alice"].client, who).approve("hms-ach", reason=label)
    st = await as_["alice"].status("hms-ach")
    assert st.phase == "AwaitingApproval" and node_pods(settings) == []
    assert len(st.pending_approval.invalid_attempts) == 4
    assert len(events(settings, "approval.invalid")) == 4

    approved = await as_["bob"].approve("hms-ach", reason="disaster relief surge")
    assert approved.phase in ("VerifyingImage", "Deploying", "Running")
    st = await as_["alice"].wait_for("hms-ach", timeout=60)
    assert st.approved_by == "bob" and st.ready_replicas == 2
    granted = events(settings, "approval.granted")
    assert len(granted) == 1 and "bob" in granted[0].reason and "disaster relief surge" in granted[0].reason
    # Decided once: a second approval is refused at once by the update's validator.
    with pytest.raises(RequestRefused, match="not awaiting approval"):
        await as_["bob"].approve("hms-ach")
    await as_["alice"].undeploy("hms-ach")


async def test_rejected_deploy_starts_no_pod(gov):
    settings, as_ = gov
    await as_["alice"].deploy(seed_spec(**BIG))
    await wait_phase(as_["alice"], "hms-ach", {"AwaitingApproval"}, timeout=30)
    st = await as_["bob"].reject("hms-ach", reason="too large for this quarter")
    assert st.phase == "Rejected"
    with pytest.raises(ApprovalRejected, match="rejected by bob"):
        await as_["alice"].wait_for("hms-ach", timeout=10)
    await assert_nothing_running(as_["alice"].client, settings)
    assert "too large" in events(settings, "approval.rejected")[0].reason


async def test_approval_times_out_as_a_rejection(gov):
    settings, as_ = gov
    (settings.state_dir / "governance.yaml").write_text("approval_timeout_s: 2\n")
    await as_["alice"].deploy(seed_spec(**BIG))
    with pytest.raises(ApprovalTimedOut, match="approval timed out after 2s"):
        await as_["alice"].wait_for("hms-ach", timeout=30)
    st = await as_["alice"].status("hms-ach")
    assert st.failure is not None and st.failure.kind == FailureKind.APPROVAL_TIMED_OUT
    await assert_nothing_running(as_["alice"].client, settings)
    assert len(events(settings, "approval.rejected")) == 1


async def test_cpu_budget_needs_approval(gov):
    settings, as_ = gov
    (settings.state_dir / "governance.yaml").write_text("cpu_budget: 1.0\n")
    await as_["alice"].deploy(seed_spec(max_replicas=4, cpu_limit=0.5))
    st = await wait_phase(as_["alice"], "hms-ach", {"AwaitingApproval"}, timeout=30)
    assert "CPU budget" in st.pending_approval.reason


def hms_env(settings, token: str) -> dict[str, str]:
    return {
        "HMS_TEMPORAL_ADDRESS": settings.temporal_address, "HMS_STATE_DIR": str(settings.state_dir),
        "HMS_TASK_QUEUE": settings.task_queue, "HMS_NODE": settings.node, "HMS_RUNTIME": "process",
        "HMS_TOKEN": token, "PATH": "/usr/bin:/bin",
    }


async def print_signal(settings, token: str, name: str, reason: str) -> tuple[str, list[str]]:
    """`hms approve NAME --print-signal`: the signal input, and the Temporal CLI command to send it."""
    hms = str(Path(__import__("sys").executable).parent / "hms")
    out = await asyncio.to_thread(subprocess.run, [hms, "approve", name, "--reason", reason, "--print-signal"],
                                  env=hms_env(settings, token), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    payload, command = out.stdout.strip().splitlines()
    return payload, shlex.split(command)


async def temporal_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    assert args[0] == "temporal"
    out = await asyncio.to_thread(subprocess.run, [temporal_binary(), *args[1:]],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def signal_to(command: list[str], workflow_id: str, payload: str) -> list[str]:
    """The printed command, sent to another workflow or with another input (a copied approval)."""
    args = list(command)
    args[args.index("--workflow-id") + 1] = workflow_id
    args[args.index("--input") + 1] = payload
    return args


async def test_approve_from_the_temporal_cli(gov):
    """`hms approve --print-signal` prints the input to paste and the command; the real Temporal CLI sends it."""
    settings, as_ = gov
    await as_["alice"].deploy(seed_spec(**BIG))
    await wait_phase(as_["alice"], "hms-ach", {"AwaitingApproval"}, timeout=30)
    bob = auth.issue_token(settings.state_dir, user="bob", role="gov_approver")
    payload, command = await print_signal(settings, bob, "hms-ach", "approved from the CLI")
    assert set(json.loads(payload)) == {"proof", "reason"} and bob not in payload
    assert command[command.index("--workflow-id") + 1] == "svc-hms-ach" and command[command.index("--name") + 1] == "approve"
    await temporal_cli(command)
    st = await as_["alice"].wait_for("hms-ach", timeout=60)
    assert st.approved_by == "bob"
    assert "approved from the CLI" in events(settings, "approval.granted")[0].reason
    await as_["alice"].undeploy("hms-ach")


async def test_a_copied_approval_does_nothing_elsewhere(gov):
    """An approval names the service, the revision, the spec hash and the request, and is used once:
    sent to another service, for another revision, or a second time, it changes nothing and leaves
    an access.denied event. Sent with the real Temporal CLI, as anyone who can reach Temporal could."""
    settings, as_ = gov
    await as_["alice"].deploy(seed_spec(**BIG))
    await as_["alice"].deploy(seed_spec(name="hms-frm", **BIG))
    await wait_phase(as_["alice"], "hms-frm", {"AwaitingApproval"}, timeout=30)
    bob = auth.issue_token(settings.state_dir, user="bob", role="gov_approver")
    payload, command = await print_signal(settings, bob, "hms-ach", "for hms-ach only")

    def denied(text: str, service: str) -> list[str]:
        return [e.reason for e in events(settings, "access.denied") if e.service == service and text in e.reason]

    # Another service: refused, and hms-frm keeps waiting.
    await temporal_cli(signal_to(command, "svc-hms-frm", payload))
    await eventually(lambda: denied("for service 'hms-ach', not 'hms-frm'", "hms-frm"), timeout=30,
                     what="the copied approval refused by hms-frm")
    # Another revision (same service, spec and request, made by bob): refused too.
    frm = (await as_["alice"].status("hms-frm")).pending_approval
    other_rev = auth.prove(bob, action="approve", service="hms-frm",
                           bind={"revision": frm.revision + 1, "spec": frm.spec_hash, "request": frm.id})
    await temporal_cli(signal_to(command, "svc-hms-frm", json.dumps({"proof": other_rev})))
    await eventually(lambda: denied(f"another revision ({frm.revision + 1}, not {frm.revision})", "hms-frm"),
                     timeout=30, what="the approval for another revision refused")
    st = await as_["alice"].status("hms-frm")
    assert st.phase == "AwaitingApproval" and st.approved_by is None and len(st.pending_approval.invalid_attempts) == 2

    # Its own service: approved, once.
    await temporal_cli(command)
    ach = await as_["alice"].wait_for("hms-ach", timeout=60)
    assert ach.approved_by == "bob" and len(events(settings, "approval.granted")) == 1
    # A second time: ignored, said so.
    await temporal_cli(command)
    await eventually(lambda: denied("its proof was already used", "hms-ach"), timeout=30,
                     what="the replayed approval refused")
    assert len(events(settings, "approval.granted")) == 1
    assert len(node_pods(settings, "hms-frm")) == 0 and len(node_pods(settings, "hms-ach")) == 2
    await as_["bob"].reject("hms-frm", reason="not needed")
    await as_["alice"].undeploy("hms-ach")


def history_text(history_json: str) -> str:
    """A history as JSON with every payload decoded too (payload data is base64 there)."""
    parts = [history_json]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and len(node) >= 8:
            try:
                parts.append(base64.b64decode(node, validate=True).decode())
            except ValueError:
                pass

    walk(json.loads(history_json))
    return "\n".join(parts)


async def test_no_token_is_stored_in_workflow_history(gov):
    """Deploy, approve, scale, logs, undeploy — with tokens — and every workflow's history holds
    proofs (bound, one-time) but no token, nor the half of it that makes proofs."""
    settings, as_ = gov
    tokens = {name: orch.settings.token for name, orch in as_.items() if orch.settings.token}
    await as_["alice"].deploy(seed_spec(**BIG))
    await wait_phase(as_["alice"], "hms-ach", {"AwaitingApproval"}, timeout=30)
    await as_["bob"].approve("hms-ach", reason="ok")
    await as_["alice"].wait_for("hms-ach", timeout=60)
    st = await as_["alice"].scale("hms-ach", 3)
    assert st.desired_replicas == 3
    pod = st.pods[0].id
    assert isinstance(await as_["vic"].logs("hms-ach", pod, 5), list)
    await as_["alice"].undeploy("hms-ach")

    client = as_["alice"].client
    ids = [wf.id async for wf in client.list_workflows(f'TaskQueue = "{settings.task_queue}"')]
    assert "svc-hms-ach" in ids and any("-logs-" in i for i in ids) and any("-scale-" in i for i in ids)
    texts = []
    for wf_id in ids:
        history = await client.get_workflow_handle(wf_id).fetch_history()
        texts.append(history_text(history.to_json()))
    shown = await temporal_cli(["temporal", "workflow", "show", "--address", settings.temporal_address,
                                "--workflow-id", "svc-hms-ach", "--output", "json"])
    texts.append(history_text(shown.stdout))
    corpus = "\n".join(texts)
    assert '"proof":"ey' in corpus  # the requests are there, decoded: the search looks where tokens would be
    for name, token in tokens.items():
        cert, holder = token.split("~")
        assert token not in corpus, f"{name}'s token is in workflow history"
        assert holder not in corpus, f"{name}'s holder key is in workflow history"


async def test_approve_from_hms_cli(gov):
    settings, as_ = gov
    await as_["alice"].deploy(seed_spec(**BIG))
    await wait_phase(as_["alice"], "hms-ach", {"AwaitingApproval"}, timeout=30)
    env = hms_env(settings, auth.issue_token(settings.state_dir, user="bob", role="gov_approver"))
    hms = str(Path(__import__("sys").executable).parent / "hms")
    out = await asyncio.to_thread(subprocess.run, [hms, "approve", "hms-ach", "--reason", "ok from hms"],
                                  env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    st = await as_["alice"].wait_for("hms-ach", timeout=60)
    assert st.approved_by == "bob"
    await as_["alice"].undeploy("hms-ach")


async def test_unsigned_image_never_starts_a_pod(temporal_env, tmp_path, runtime_name):
    settings = make_settings(temporal_env, tmp_path / "state", runtime_name, trusted=False)
    try:
        async with HmsWorker(temporal_env.client, settings):
            hms = Orchestrator(temporal_env.client, settings)
            with pytest.raises(ImageUntrusted, match="not signed"):
                await hms.deploy(seed_spec(image_verify_timeout_s=3))  # admission answers: untrusted
            await assert_nothing_running(hms.client, settings)
            assert "not signed" in events(settings, "image.untrusted")[0].reason

            # Signed for other content than what the node has: "changed since it was signed".
            TrustStore(settings.state_dir).sign(seed_spec()["image"], "sha256:" + "0" * 64, signer="release")
            with pytest.raises(ImageUntrusted, match="changed since it was signed"):
                await hms.deploy(seed_spec(image_verify_timeout_s=3))
            assert node_pods(settings) == []

            # Signed while the deployment waits in VerifyingImage: it goes on.
            deploying = asyncio.ensure_future(hms.deploy(seed_spec(image_verify_timeout_s=60)))
            await wait_phase(hms, "hms-ach", {"VerifyingImage"}, timeout=30)
            await asyncio.sleep(1.5)
            assert node_pods(settings) == []
            sign_images(settings, seed_spec()["image"])
            assert not (await deploying).already_running
            st = await hms.wait_for("hms-ach", timeout=60)
            assert st.ready_replicas == 2
            assert len(events(settings, "image.verified")) == 1
            await hms.undeploy("hms-ach")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


async def test_status_and_logs_need_a_viewer_where_a_token_is_configured(gov):
    """A configured token must allow `status`/`logs` (access.yaml may take them away); no token
    configured reads as before (Temporal serves it to anyone who reaches it anyway)."""
    settings, as_ = gov
    (settings.state_dir / "access.yaml").write_text(
        "ops_admin: [deploy, scale, undeploy, update, status, logs]\ngov_approver: [approve, reject]\nviewer: [status]\n")
    with pytest.raises(AccessDenied, match=r"bob \(gov_approver\) may not status"):
        await as_["bob"].status("hms-ach")
    with pytest.raises(AccessDenied, match="may not status"):
        await as_["bob"].list()
    with pytest.raises(AccessDenied, match=r"vic \(viewer\) may not logs"):
        await as_["vic"].logs("hms-ach", "0")
    expired = auth.issue_token(settings.state_dir, user="vic", role="viewer", ttl_s=60,
                               now=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(AccessDenied, match="expired"):
        await Orchestrator(as_["alice"].client, settings.model_copy(update={"token": expired})).list()
    assert await as_["vic"].list() == [] and await as_["anon"].list() == []
