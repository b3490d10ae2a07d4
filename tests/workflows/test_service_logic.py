"""ServiceWorkflow's decisions against the real dev server with stand-in activities.

The activities here are registered under the real names (``@activity.defn(name=...)``, as the
Temporal samples do) and keep pods in memory, so admission, approval, crash-loop backoff,
scale decisions and continue-as-new are covered in seconds; the end-to-end tests with real
pods live beside this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import eventually, seed_spec, terminate_running, wait_phase
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.control import ControlActivities
from hms_mgmt import auth
from hms_mgmt.config import Settings
from hms_mgmt.errors import (
    AccessDenied,
    ApprovalRejected,
    CrashLooping,
    FailureKind,
    ImageUntrusted,
    RequestRefused,
    RolloutFailed,
    ScaleRefused,
)
from hms_mgmt.events import EventSink, read_events
from hms_mgmt.models import EndpointSet, NodeSpec, PodStatus
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.policy.autoscale import AutoscaleDecision, CpuSample
from hms_mgmt.wire import (
    AuthorizeInput,
    AuthorizeOutput,
    DrainClaim,
    EventInput,
    GovernanceInput,
    GovernanceOutput,
    HealAttempt,
    ListPodsInput,
    ListPodsOutput,
    LogsOutput,
    PickNodeInput,
    PickNodeOutput,
    PodLogsInput,
    PodReportCheck,
    PodReportVerdict,
    RoundGrantsInput,
    RoundGrantsOutput,
    StampInput,
    StampOutput,
    StartPodInput,
    StartTicketInput,
    StopGrantInput,
    StopPodInput,
    TicketInput,
    TicketOutput,
    VerifyImageInput,
    VerifyImageOutput,
    WatchCpuInput,
    WatchInput,
    WatchResult,
)
from workflows import ALL_WORKFLOWS

TOKENS = {"t-alice": ("alice", "ops_admin"), "t-bob": ("bob", "gov_approver"), "t-vic": ("vic", "viewer")}


def real_token(state_dir: Path, name: str | None) -> str | None:
    """The real token behind a test's short name ("t-bob"); "forged" is signed by another key."""
    if name is None:
        return None
    if name not in TOKENS:
        other = state_dir.parent / "other-keys"
        auth.init_keys(other)
        return auth.issue_token(other, user="mallory", role="ops_admin")
    user, role = TOKENS[name]
    return auth.issue_token(state_dir, user=user, role=role)
MAY = {"ops_admin": {"deploy", "scale", "undeploy"}, "gov_approver": {"approve", "reject"}}


def content_id(image: str) -> str:
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


@dataclass
class FakeCluster:
    """Pods in memory and a script for the watch: what each activity saw and did."""

    trusted: set[str] = field(default_factory=lambda: {"registry.gov/hms-ach:1.4", "registry.gov/hms-ach:1.5"})
    starts: list[StartPodInput] = field(default_factory=list)
    pods: dict[str, PodStatus] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    events: list[EventInput] = field(default_factory=list)
    fail_starts: int = 0  # the next N starts fail as if the pod exited at once
    start_delay_s: float = 0.0
    watch_results: asyncio.Queue[WatchResult] = field(default_factory=asyncio.Queue)
    node: NodeSpec | None = None
    tables: list[EndpointSet] = field(default_factory=list)  # what the routers were sent
    state_dir: Path | None = None  # its keys verify the request proofs
    slow_events: dict[str, float] = field(default_factory=dict)  # event type -> seconds its write takes
    control: ControlActivities | None = None  # the real control activities some checks use
    approve_gate: asyncio.Event | None = None  # set: an approve's check waits for it

    def event_types(self) -> list[str]:
        return [e.type for e in self.events]

    @activity.defn(name="authorize")
    async def authorize(self, inp: AuthorizeInput) -> AuthorizeOutput:
        if inp.action == "approve" and self.approve_gate is not None:
            await self.approve_gate.wait()
        try:
            proven = auth.verify_proof(inp.proof, action=inp.claim or inp.action, service=inp.service,
                                       bind=inp.bind, state_dir=self.state_dir)
        except AccessDenied:
            self.events.append(EventInput(type="access.denied", service=inp.service, reason="bad token"))
            return AuthorizeOutput(allowed=False, reason="token is not valid")
        user, role = proven.identity.user, proven.identity.role
        if inp.action not in MAY.get(role, set()):
            return AuthorizeOutput(allowed=False, reason=f"{user} ({role}) may not {inp.action}")
        if inp.action == "approve" and inp.requester == user:
            return AuthorizeOutput(allowed=False, reason=f"{user} may not approve their own request")
        return AuthorizeOutput(allowed=True, user=user, role=role, grant=f"grant:{role}")

    @activity.defn(name="check_governance")
    async def check_governance(self, inp: GovernanceInput) -> GovernanceOutput:
        big = inp.spec.max_replicas > 10
        return GovernanceOutput(needs_approval=big, reasons=["max_replicas over 10"] if big else [],
                                approval_timeout_s=inp.spec.approval_timeout_s)

    @activity.defn(name="verify_image")
    async def verify_image(self, inp: VerifyImageInput) -> VerifyImageOutput:
        if inp.image not in self.trusted:
            raise ApplicationError(f"image {inp.image} is not trusted: not signed", type="ImageUntrusted",
                                   non_retryable=True)
        return VerifyImageOutput(content_id=content_id(inp.image), detail="signed by test")

    @activity.defn(name="trust_now")
    async def trust_now(self, inp: VerifyImageInput) -> VerifyImageOutput:
        return await self.verify_image(inp)

    @activity.defn(name="stamp_start")
    async def stamp_start(self, inp: StampInput) -> StampOutput:
        await self.verify_image(VerifyImageInput(service=inp.service, image=inp.spec.image))
        return StampOutput(stamp=f"stamp-{inp.pod_id}")

    @activity.defn(name="stamp_round")
    async def stamp_round(self, inp: RoundGrantsInput) -> RoundGrantsOutput:
        await self.verify_image(VerifyImageInput(service=inp.service, image=inp.spec.image))
        return RoundGrantsOutput(grants=[f"stamp-{p.pod_id}" for p in inp.pods])

    @activity.defn(name="check_pod_report")
    async def check_pod_report(self, inp: PodReportCheck) -> PodReportVerdict:
        """The stand-in nodes sign nothing: every report of theirs is believed."""
        return PodReportVerdict(ok=True)

    @activity.defn(name="confirm_heal_attempt")
    async def confirm_heal_attempt(self, attempt: HealAttempt) -> bool:
        """The control worker's own check: it asks the real HealWorkflow."""
        assert self.control is not None
        return await self.control.confirm_heal_attempt(attempt)

    @activity.defn(name="confirm_draining")
    async def confirm_draining(self, claim: DrainClaim) -> list[str]:
        """The control worker's own check: it asks the real rolling DeployWorkflow."""
        assert self.control is not None
        return await self.control.confirm_draining(claim)

    @activity.defn(name="check_started_pod")
    async def check_started_pod(self, inp: PodReportCheck) -> None:
        """The stand-in nodes sign nothing: every start of theirs is believed."""

    @activity.defn(name="pick_node")
    async def pick_node(self, inp: PickNodeInput) -> PickNodeOutput:
        return PickNodeOutput(nodes=[self.node] * inp.count)

    @activity.defn(name="start_pod")
    async def start_pod(self, inp: StartPodInput) -> PodStatus:
        self.started.append(inp.pod_id)
        self.starts.append(inp)
        if self.start_delay_s:
            await asyncio.sleep(self.start_delay_s)
        if self.fail_starts > 0:
            self.fail_starts -= 1
            raise ApplicationError("pod exited with code 3 at start", type="PodExited", non_retryable=True)
        await asyncio.sleep(inp.min_ready_s)  # up and answering this long before it counts as ready
        pod = PodStatus(id=inp.pod_id, node=inp.node, endpoint=f"127.0.0.1:{20000 + len(self.started)}",
                        revision=inp.revision, image=inp.spec.image, ready=True, health="healthy",
                        started_at=datetime.now(UTC))
        self.pods[inp.pod_id] = pod
        return pod

    @activity.defn(name="stop_pod")
    async def stop_pod(self, inp: StopPodInput) -> bool:
        return self.pods.pop(inp.pod_id, None) is not None

    @activity.defn(name="list_pods")
    async def list_pods(self, inp: ListPodsInput) -> ListPodsOutput:
        return ListPodsOutput(pods=list(self.pods.values()))

    @activity.defn(name="pod_logs")
    async def pod_logs(self, inp: PodLogsInput) -> LogsOutput:
        return LogsOutput(lines=[])

    @activity.defn(name="watch_pods")
    async def watch_pods(self, inp: WatchInput) -> WatchResult:
        """Returns what the test scripts next; until then heartbeats (so a cancel reaches it)."""
        while True:
            activity.heartbeat()
            try:
                return await asyncio.wait_for(self.watch_results.get(), 0.2)
            except TimeoutError:
                continue

    @activity.defn(name="issue_ticket")
    async def issue_ticket(self, inp: TicketInput) -> TicketOutput:
        if inp.grant != "grant:ops_admin":
            raise ApplicationError("admission refused: bad token", type="AccessDenied", non_retryable=True)
        return TicketOutput(ticket=f"ticket-{inp.service}-{inp.revision}-{inp.image_id[-8:]}")

    @activity.defn(name="start_ticket")
    async def start_ticket(self, inp: StartTicketInput) -> TicketOutput:
        if not inp.ticket.startswith(f"ticket-{inp.service}-{inp.revision}-"):
            raise ApplicationError("not admitted", type="AccessDenied", non_retryable=True)
        return TicketOutput(ticket=f"{inp.ticket}/start/{inp.pod_id}")

    @activity.defn(name="start_tickets")
    async def start_tickets(self, inp: RoundGrantsInput) -> RoundGrantsOutput:
        if not inp.ticket.startswith(f"ticket-{inp.service}-{inp.revision}-"):
            raise ApplicationError("not admitted", type="AccessDenied", non_retryable=True)
        return RoundGrantsOutput(grants=[f"{inp.ticket}/start/{p.pod_id}" for p in inp.pods])

    @activity.defn(name="stop_grant")
    async def stop_grant(self, inp: StopGrantInput) -> TicketOutput:
        return TicketOutput(ticket=f"stop/{inp.pod_id}")

    @activity.defn(name="publish_endpoints")
    async def publish_endpoints(self, table: EndpointSet) -> None:
        self.tables.append(table)

    @activity.defn(name="watch_cpu")
    async def watch_cpu(self, inp: WatchCpuInput) -> WatchResult:
        """The service's autoscaler: the tests script scale results through ``watch_pods``."""
        while True:
            activity.heartbeat()
            await asyncio.sleep(0.2)

    @activity.defn(name="emit_event")
    async def emit_event(self, inp: EventInput) -> None:
        if inp.type in self.slow_events:
            await asyncio.sleep(self.slow_events[inp.type])
        self.events.append(inp)

    def activities(self) -> list[object]:
        return [self.authorize, self.check_governance, self.verify_image, self.pick_node, self.start_pod,
                self.stop_pod, self.list_pods, self.pod_logs, self.watch_pods, self.emit_event,
                self.publish_endpoints, self.issue_ticket, self.watch_cpu, self.start_ticket, self.stop_grant,
                self.trust_now, self.stamp_start, self.check_pod_report, self.check_started_pod, self.confirm_heal_attempt, self.confirm_draining,
                self.stamp_round,
                self.start_tickets]


@contextlib.asynccontextmanager
async def fake_cluster(env: WorkflowEnvironment, tmp_path, cls: type[FakeCluster] = None,  # type: ignore[assignment]
                       prefix: str = "hms-logic") -> AsyncIterator[tuple[FakeCluster, Settings]]:
    """A control worker (our workflows) and a node worker, both with ``cls``'s stand-in activities."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(temporal_address="unused", task_queue=f"{prefix}-{tag}", node=f"n{tag}",
                        history_threshold=None, state_dir=tmp_path / "state")
    auth.init_keys(settings.state_dir)
    settings.token = real_token(settings.state_dir, "t-alice")
    cluster = (cls or FakeCluster)(node=settings.node_specs()[0], state_dir=settings.state_dir)
    cluster.control = ControlActivities(env.client, lambda: settings, EventSink(settings.state_dir))
    # One worker serves both queues: workflows + control activities, and the node's pod activities.
    control = Worker(env.client, task_queue=settings.task_queue, workflows=ALL_WORKFLOWS,
                     activities=cluster.activities())
    node = Worker(env.client, task_queue=settings.node_task_queue(), activities=cluster.activities())
    async with control, node:
        try:
            yield cluster, settings
        finally:
            release = getattr(cluster, "release", None)
            if release is not None:
                release.set()
            await terminate_running(env, settings)


@pytest_asyncio.fixture(loop_scope="session")
async def fake(temporal_env: WorkflowEnvironment, tmp_path) -> AsyncIterator[tuple[FakeCluster, Settings]]:
    async with fake_cluster(temporal_env, tmp_path) as running:
        yield running


def as_user(env: WorkflowEnvironment, settings: Settings, token: str | None, **kw: object) -> Orchestrator:
    return Orchestrator(env.client, settings.model_copy(update={"token": real_token(settings.state_dir, token), **kw}))


async def test_refused_identity_starts_nothing(temporal_env, fake):
    cluster, settings = fake
    with pytest.raises(AccessDenied, match=r"vic \(viewer\) may not deploy"):
        await as_user(temporal_env, settings, "t-vic").deploy(seed_spec())
    with pytest.raises(AccessDenied, match="token is not valid"):
        await as_user(temporal_env, settings, "forged").deploy(seed_spec())
    st = await as_user(temporal_env, settings, "t-alice").status("hms-ach")
    assert st.phase == "Rejected" and st.failure is not None and st.failure.kind == FailureKind.ACCESS_DENIED
    assert cluster.started == []


async def test_untrusted_image_is_refused_by_deploy(temporal_env, fake):
    cluster, settings = fake
    with pytest.raises(ImageUntrusted, match="not signed"):
        await as_user(temporal_env, settings, "t-alice").deploy(seed_spec(image="registry.gov/evil:1.0"))
    assert cluster.started == []


async def test_approval_by_update_is_checked_and_used_once(temporal_env, fake):
    cluster, settings = fake
    alice, bob = as_user(temporal_env, settings, "t-alice"), as_user(temporal_env, settings, "t-bob")
    result = await alice.deploy(seed_spec(max_replicas=12))
    assert not result.already_running
    st = await alice.status("hms-ach")
    assert st.phase == "AwaitingApproval" and cluster.started == []

    with pytest.raises(AccessDenied, match="may not approve"):
        await alice.approve("hms-ach")  # ops_admin, and the requester
    with pytest.raises(AccessDenied, match="token is not valid"):
        await as_user(temporal_env, settings, "forged").reject("hms-ach")
    assert len((await alice.status("hms-ach")).pending_approval.invalid_attempts) == 2

    approved = await bob.approve("hms-ach", reason="surge")
    assert approved.phase != "AwaitingApproval" and approved.approved_by == "bob"
    with pytest.raises(RequestRefused, match="not awaiting approval"):
        await bob.reject("hms-ach")
    st = await alice.wait_for("hms-ach", timeout=30)
    assert st.ready_replicas == 2 and len(cluster.started) == 2
    assert "approval.granted" in cluster.event_types()
    final = await alice.undeploy("hms-ach")
    assert final is not None and final.phase == "Stopped" and cluster.pods == {}


async def test_reject_by_signal_ends_the_service(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(max_replicas=12))
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    bob = await as_user(temporal_env, settings, "t-bob").approval("reject", "hms-ach", reason="not this quarter")
    await handle.signal("reject", {"proof": bob.proof, "reason": bob.reason})
    with pytest.raises(ApprovalRejected, match="rejected by bob"):
        await alice.wait_for("hms-ach", timeout=30)
    assert cluster.started == []


async def test_undeploy_is_an_update_refused_for_a_viewer(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(), wait=True, timeout=30)
    with pytest.raises(AccessDenied, match="may not undeploy"):
        await as_user(temporal_env, settings, "t-vic").undeploy("hms-ach")
    with pytest.raises(ScaleRefused, match="outside"):
        await alice.scale("hms-ach", 11)
    assert (await alice.undeploy("hms-ach", wait=True)).phase == "Stopped"
    with pytest.raises(Exception, match="no running service"):
        await alice.undeploy("hms-ach")


async def test_an_approval_checked_while_its_request_timed_out_does_not_approve_the_next(temporal_env, fake):
    """bob approves request 1; while his proof is checked, request 1 times out and alice's request
    2 (a bigger one) starts waiting. bob's approval was made for request 1: it decides nothing."""
    cluster, settings = fake
    alice, bob = as_user(temporal_env, settings, "t-alice"), as_user(temporal_env, settings, "t-bob")
    await alice.deploy(seed_spec(), wait=True, timeout=30)
    cluster.approve_gate = asyncio.Event()
    first = asyncio.ensure_future(alice.update_spec(seed_spec(max_replicas=12, approval_timeout_s=2)))
    await eventually(lambda: _pending(alice), timeout=15, what="request 1 waiting for approval")
    approving = asyncio.ensure_future(bob.approve("hms-ach"))
    with pytest.raises(Exception, match="(?i)approval|timed out"):
        await asyncio.wait_for(first, 30)  # request 1 times out while bob's check waits
    second = asyncio.ensure_future(alice.update_spec(seed_spec(max_replicas=40)))
    pending = await eventually(lambda: _pending(alice), timeout=15, what="request 2 waiting for approval")
    cluster.approve_gate.set()
    with pytest.raises(Exception, match="decided meanwhile|not awaiting"):
        await asyncio.wait_for(approving, 30)
    st = await alice.status("hms-ach")
    assert st.spec.max_replicas == 10 and st.pending_approval is not None and st.pending_approval.id == pending
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


async def _pending(orch: Orchestrator) -> str | None:
    st = await orch.status("hms-ach")
    return st.pending_approval.id if st.pending_approval is not None else None


async def test_crash_loop_is_degraded_with_a_typed_failure(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(backoff_initial_s=0.2, backoff_max_s=0.5), wait=True, timeout=30)
    victim = (await alice.status("hms-ach")).pods[0].id
    cluster.fail_starts = 100  # every replacement dies at once
    await cluster.watch_results.put(WatchResult(reason="failed", failed=[
        {"pod_id": victim, "kind": "exited", "detail": "exit code 137", "exit_code": 137}]))
    st = await wait_phase(alice, "hms-ach", {"Degraded"}, timeout=30)
    assert st.failure is not None and st.failure.kind == FailureKind.CRASH_LOOP
    assert st.crash_count >= 2
    # The phase is set in the signal handler; the event is written by the run loop's next step.
    await eventually(lambda: "service.degraded" in cluster.event_types(), timeout=10,
                     what="a service.degraded event")
    with pytest.raises(CrashLooping):
        await alice.wait_for("hms-ach", timeout=10)
    # Replacements start again: it recovers, and the failure clears.
    cluster.fail_starts = 0
    st = await eventually(lambda: _ready_again(alice), timeout=30, what="a replacement that stays up")
    assert st.ready_replicas == 2


async def test_a_forged_heal_attempt_counts_no_crash(temporal_env, fake):
    """``heal_attempt_failed`` is a heal's word that a replacement failed; anyone can send it.
    Sent for the pod a heal is replacing, naming a replacement that never was, it counts no crash
    and puts none of its text in an event: the control worker asks the heal itself."""
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(backoff_initial_s=5, backoff_max_s=5), wait=True, timeout=30)
    victim = (await alice.status("hms-ach")).pods[0].id
    cluster.fail_starts = 1  # the first replacement dies: the heal then waits its 5 s backoff
    await cluster.watch_results.put(WatchResult(reason="failed", failed=[
        {"pod_id": victim, "kind": "exited", "detail": "exit code 137", "exit_code": 137}]))
    st = await eventually(lambda: _crashed(alice, 1), timeout=30, what="the heal's own failed attempt counted")
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    for n in range(3):
        await handle.signal("heal_attempt_failed", {"failed_pod": victim, "replacement": str(uuid.uuid4()),
                                                    "attempt": 2 + n, "reason": "forged: card data leaked",
                                                    "next_delay_s": 3600})
    await eventually(lambda: len([e for e in read_events(settings.state_dir) if e.type == "access.denied"
                                  and "its heal did not say so" in e.reason]) >= 3 or
                     len([e for e in cluster.events if "its heal did not say so" in e.reason]) >= 3,
                     timeout=30, what="three forged attempts refused")
    st = await alice.status("hms-ach")
    assert st.crash_count == 1 and st.phase != "Degraded", (st.crash_count, st.phase)
    assert not [e for e in cluster.events if "card data" in e.reason]
    st = await eventually(lambda: _ready_again(alice), timeout=30, what="the heal's next replacement up")
    assert st.ready_replicas == 2


async def _rolling(orch: Orchestrator):
    st = await orch.status("hms-ach")
    return st if st.phase == "Updating" and st.rollout is not None and st.rollout.workflow_id else None


async def _crashed(orch: Orchestrator, n: int):
    st = await orch.status("hms-ach")
    return st if st.crash_count >= n else None


async def _ready_again(orch: Orchestrator):
    st = await orch.status("hms-ach", live=False)
    return st if st.ready_replicas == 2 and not st.heal_count - 1 < 0 and st.phase != "Healing" else None


async def test_scale_recommendation_is_rechecked_and_applied_once(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(), wait=True, timeout=30)
    pods = (await alice.status("hms-ach")).pods
    samples = [CpuSample(pod_id=p.id, cpu_percent=180.0) for p in pods]  # 3x the 60 % target
    # The watch recommends far too much; the workflow re-checks with the policy: ceil(2 x 180/60) = 6.
    recommendation = AutoscaleDecision(desired=10, recommended=10, mean_cpu=180.0, reason="cpu", at_max=False,
                                       history=[])
    await cluster.watch_results.put(WatchResult(reason="scale", samples=samples, decision=recommendation))
    st = await eventually(lambda: _ready(alice, 6), timeout=30, what="6 ready pods")
    assert st.scale_count == 1 and st.last_decisions[-1].to_replicas == 6
    assert len(cluster.started) == 6


async def _ready(orch: Orchestrator, n: int):
    st = await orch.status("hms-ach", live=False)
    return st if st.ready_replicas == n and st.phase == "Running" else None


async def test_manual_scale_while_continue_as_new_is_due(temporal_env, fake):
    """Continue-as-new waits for a manual scale in flight and hands over its result whole."""
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice", history_threshold=40)
    await alice.deploy(seed_spec(), wait=True, timeout=30)
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    first_run = (await handle.describe()).run_id
    cluster.start_delay_s = 1.0  # the scale is in flight while the history passes the threshold
    st = await alice.scale("hms-ach", 5)
    assert st.desired_replicas == 5 and st.ready_replicas == 5
    st = await eventually(lambda: _ready(alice, 5), timeout=30, what="5 ready pods after continue-as-new")
    desc = await handle.describe()
    assert desc.run_id != first_run and desc.status == WorkflowExecutionStatus.RUNNING
    assert sorted(p.id for p in st.pods) == sorted(cluster.pods)  # nothing lost, nothing extra


def ready_counts(cluster: FakeCluster) -> list[int]:
    """Ready pods in every table the routers were sent, in order."""
    return [sum(1 for e in t.endpoints if e.state == "ready") for t in cluster.tables if not t.stopped]


async def test_in_place_change_starts_no_pod(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(), wait=True, timeout=30)
    outcome = await alice.update_spec(seed_spec(cpu_target=75, max_replicas=8))
    assert outcome.in_place and outcome.revision is None
    st = await alice.status("hms-ach")
    assert st.spec.cpu_target == 75 and st.revision == 1 and len(cluster.started) == 2
    assert st.last_decisions[-1].kind == "update" and "cpu_target" in st.last_decisions[-1].reason


async def test_rolling_update_keeps_min_ready_and_pins_the_image(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    spec = seed_spec(min_replicas=3, drain_s=0.2, min_ready_s=0.2)
    await alice.deploy(spec, wait=True, timeout=30)
    result = await alice.deploy({**spec, "image": "registry.gov/hms-ach:1.5"}, wait=True, timeout=60)
    assert result.already_running and result.revision == 2
    st = await alice.status("hms-ach")
    assert st.revision == 2 and st.image_id == content_id("registry.gov/hms-ach:1.5")
    assert {p.revision for p in st.pods} == {2} and st.ready_replicas == 3 and len(cluster.pods) == 3
    assert [s.image_id for s in cluster.starts[3:]] == [st.image_id] * 3  # every new pod from the pinned id
    assert {s.min_ready_s for s in cluster.starts[3:]} == {0.2}  # each must stay up min_ready_s to count
    # and a ticket for that very pod, from its revision's
    assert all(s.ticket == f"{st.revisions[-1].ticket}/start/{s.pod_id}" for s in cluster.starts[3:])
    assert min(ready_counts(cluster)[1:]) >= 3, ready_counts(cluster)  # never below min_replicas ready
    assert [(r.revision, r.outcome) for r in st.revisions] == [(1, "replaced"), (2, "active")]
    assert st.rollout.state == "completed"
    assert {"rollout.started", "rollout.completed"} <= set(cluster.event_types())
    history = await alice.rollout_history("hms-ach")
    assert history[1].deployed_by == "alice" and history[1].spec.image.endswith(":1.5")

    # Back to revision 1: its spec and its pinned image, as a new revision.
    back = await alice.rollback("hms-ach", wait=True, timeout=60)
    st = await alice.status("hms-ach")
    assert back.revision == 3 and st.spec.image.endswith(":1.4")
    assert st.image_id == content_id("registry.gov/hms-ach:1.4") and {p.revision for p in st.pods} == {3}


async def test_a_forged_pods_draining_during_a_rollout_drains_no_pod_it_rolls_to(temporal_env, fake):
    """``pods_draining`` is the rolling child's word that it is about to stop old pods; anyone
    can send it. Sent for every pod while a rollout runs, it drains none of the new revision's,
    and after the rollout every pod of the service is routable again."""
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    spec = seed_spec(min_replicas=2, drain_s=0.2, min_ready_s=1.0)
    await alice.deploy(spec, wait=True, timeout=30)
    handle = temporal_env.client.get_workflow_handle("svc-hms-ach")
    rolling = asyncio.ensure_future(alice.deploy({**spec, "image": "registry.gov/hms-ach:1.5"}, wait=True, timeout=60))
    try:
        async def new_pods() -> list[str]:
            st = await alice.status("hms-ach")
            return [p.id for p in st.pods if p.revision == 2]

        # At the rollout's start, before a new pod serves: the old pods, every one of them.
        st = await eventually(lambda: _rolling(alice), timeout=30, what="the rollout under way")
        await handle.signal("pods_draining", [p.id for p in st.pods if p.revision == 1])
        await eventually(new_pods, timeout=30, what="a pod of revision 2 booked")
        while not rolling.done():
            st = await alice.status("hms-ach")
            await handle.signal("pods_draining", [p.id for p in st.pods])
            await asyncio.sleep(0.2)
        await rolling
    finally:
        rolling.cancel()
    st = await alice.status("hms-ach")
    assert {p.revision for p in st.pods} == {2} and st.ready_replicas == 2
    for table in cluster.tables:
        assert not [e for e in table.endpoints if e.revision == 2 and e.state == "draining"], table
        assert not table.endpoints or any(e.state == "ready" for e in table.endpoints), table  # never none to route to
    last = cluster.tables[-1]
    assert sorted((e.revision, e.state) for e in last.endpoints) == [(2, "ready"), (2, "ready")], last
    assert any(e.type == "access.denied" and "pods_draining" in e.reason for e in cluster.events)


async def test_broken_revision_rolls_back(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    spec = seed_spec(drain_s=0.1, min_ready_s=0.1, backoff_initial_s=0.2)
    await alice.deploy(spec, wait=True, timeout=30)
    v1 = {p.id for p in (await alice.status("hms-ach")).pods}
    cluster.fail_starts = 100  # every pod of the new revision exits at start
    with pytest.raises(RolloutFailed, match="revision 2 rolled back"):
        await alice.update_spec({**spec, "image": "registry.gov/hms-ach:1.5"}, wait=True, timeout=60)
    st = await alice.status("hms-ach")
    assert st.revision == 1 and st.phase == "Running" and {p.id for p in st.pods} == v1  # never touched
    assert min(ready_counts(cluster)) >= 2
    assert [(r.revision, r.outcome) for r in st.revisions] == [(1, "active"), (2, "failed")]
    assert {"rollout.failed", "rollout.rolled_back"} <= set(cluster.event_types())


async def test_untrusted_update_is_refused_and_changes_nothing(temporal_env, fake):
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    await alice.deploy(seed_spec(), wait=True, timeout=30)
    with pytest.raises(ImageUntrusted):
        await alice.update_spec(seed_spec(image="registry.gov/evil:6.6", image_verify_timeout_s=2))
    with pytest.raises(AccessDenied):
        await as_user(temporal_env, settings, "t-vic").update_spec(seed_spec(image="registry.gov/hms-ach:1.5"))
    st = await alice.status("hms-ach")
    assert st.revision == 1 and len(cluster.started) == 2 and st.phase == "Running"


async def test_a_heal_that_lands_during_a_rollout_leaves_no_pod_running_unbooked(temporal_env, fake):
    """A pod dies and a rollout starts at once: the heal's replacement (old revision) is booked
    while the rollout runs. The rollout's pods are the whole service at its end, so that
    replacement must be stopped, not dropped from the books while it keeps running."""
    cluster, settings = fake
    alice = as_user(temporal_env, settings, "t-alice")
    spec = seed_spec(drain_s=0.1, min_ready_s=0.1)
    await alice.deploy(spec, wait=True, timeout=30)
    victim = (await alice.status("hms-ach")).pods[0].id
    cluster.pods.pop(victim)  # it died
    cluster.start_delay_s = 1.0  # the heal's replacement, and each new pod of the rollout, take a second
    cluster.slow_events["pod.exited"] = 1.0  # the update arrives while the exit is being recorded
    await cluster.watch_results.put(WatchResult(reason="failed", failed=[
        {"pod_id": victim, "kind": "exited", "detail": "exit code 137", "exit_code": 137}]))
    await asyncio.sleep(0.3)
    await alice.update_spec({**spec, "image": "registry.gov/hms-ach:1.5"}, wait=True, timeout=60)

    async def settled():
        st = await alice.status("hms-ach", live=False)
        return st if st.phase == "Running" and not st.heal_count - 1 < 0 and st.revision == 2 else None
    st = await eventually(settled, timeout=30, what="the rollout and the heal done")
    await asyncio.sleep(1.0)
    st = await alice.status("hms-ach", live=False)
    assert {p.revision for p in st.pods} == {2} and len(st.pods) == 2
    assert set(cluster.pods) == {p.id for p in st.pods}, "a pod runs that the service does not book"
