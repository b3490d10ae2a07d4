"""A dry run of admission (``deploy(spec, dry_run=True)``): the NodeRegistry's ``dry_run``
update runs it, so no workflow starts. The checks are the ones a deploy makes, by the same
activities in the control worker: the caller's proof and role (``authorize``), governance,
secrets and placement (``plan_deploy``: pure policy shared with the real paths), and the image
resolved on every Ready node and judged by the control plane's trust store. Nothing acts: no
pod starts, no ticket is issued, no event but a refusal's is written."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from activities.enrolment import NodeTrustActivities
    from activities.pods import PodActivities
    from hms_mgmt.errors import ActivityErrorType, FailureKind
    from hms_mgmt.models import DryRunCheck, DryRunVerdict, Failure, NodeSpec, ServiceSpec, SpecChange
    from hms_mgmt.names import SUPERVISED
    from hms_mgmt.wire import AuthorizeInput, DryRunInput, PlanInput, PlanOutput, VerifyImageInput

from workflows.common import error_message, error_type

TIMEOUT = timedelta(seconds=30)
ONE_TRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=2),
                      non_retryable_error_types=[ActivityErrorType.ACCESS_DENIED, ActivityErrorType.IMAGE_UNTRUSTED,
                                                 ActivityErrorType.SPEC_UNRUNNABLE])


async def dry_run(inp: DryRunInput, control_queue: str, nodes: list[NodeSpec]) -> DryRunVerdict:
    """The verdict for ``inp.spec`` on ``nodes``: a refused caller learns only that it was refused;
    otherwise every check runs (the plan and the image at once) and the first failing one, in
    admission's order, is the verdict's failure."""
    spec = inp.spec
    verdict = DryRunVerdict(service=spec.name, image=spec.image)
    allowed = await workflow.execute_activity_method(
        ControlActivities.authorize,
        AuthorizeInput(proof=inp.proof, action="deploy", claim="dry_run", service=spec.name,
                       request_id=inp.request_id, bind={"spec": spec.digest()}),
        task_queue=control_queue, start_to_close_timeout=TIMEOUT, summary=f"dry run: authorize {spec.name}")
    verdict.user, verdict.role = allowed.user, allowed.role
    _check(verdict, "access", allowed.allowed,
           f"{allowed.user} ({allowed.role}) may deploy" if allowed.allowed else allowed.reason,
           FailureKind.ACCESS_DENIED)
    if not allowed.allowed:
        return _settle(verdict)
    plan, image = await asyncio.gather(
        workflow.execute_activity_method(
            ControlActivities.plan_deploy, PlanInput(spec=spec, grant=allowed.grant), task_queue=control_queue,
            start_to_close_timeout=TIMEOUT, retry_policy=ONE_TRY, summary=f"dry run: plan {spec.name}"),
        _image(spec, control_queue, nodes),
    )
    _apply_plan(verdict, spec, plan)
    content_id, detail, kind = image
    verdict.image_id = content_id
    _check(verdict, "image", kind is None, f"{spec.image} -> {content_id}: {detail}" if kind is None else detail,
           kind or FailureKind.IMAGE_UNTRUSTED)
    return _settle(verdict)


def _apply_plan(verdict: DryRunVerdict, spec: ServiceSpec, plan: PlanOutput) -> None:
    verdict.needs_approval, verdict.approval_reasons = plan.needs_approval, plan.approval_reasons
    verdict.replicas, verdict.unplaced, verdict.placement = plan.replicas, plan.unplaced, plan.placement
    verdict.pod_nodes = plan.pod_nodes
    verdict.change, verdict.time_slots = plan.change, plan.time_slots
    no_op = plan.change is not None and plan.change.no_op
    _check(verdict, "approval", True, "needs a gov_approver's approval: " + "; ".join(plan.approval_reasons)
           if plan.needs_approval else "no change: nothing to approve" if no_op
           else "within the governance policy: no approval needed")
    named = ", ".join(ref.name for ref in spec.secrets)
    _check(verdict, "secrets", not plan.secrets_problem,
           plan.secrets_problem or (f"stored: {named}" if named else "none named"),
           plan.secrets_kind or FailureKind.SPEC_MALFORMED)
    on = ", ".join(f"{n.node} ({n.pods})" for n in plan.placement if n.pods) or "no node"
    _check(verdict, "placement", not plan.unplaced,
           plan.capacity if plan.unplaced else f"{plan.replicas} new pod(s) placed on {on}", FailureKind.CAPACITY)
    if plan.change is not None:
        c = plan.change
        # A changed spec is an update, which the service takes only while it runs (not while it
        # waits for approval or its image, or is being undeployed).
        updatable = c.no_op or c.phase in (*SUPERVISED, "Updating")
        _check(verdict, "change", updatable, _change_text(c) if updatable else
               f"{verdict.service} is {c.phase}; it can be updated once it runs", FailureKind.REFUSED)


def _change_text(c: SpecChange) -> str:
    fields = ", ".join(x.field for x in c.changes)
    if c.no_op:
        what = "no change: this spec already runs"
    elif c.in_place:
        what = f"{fields} changed in place (no new pods)"
    else:
        r = c.rollout
        what = f"{fields} changed: a rolling update" + (
            f" of {r.replicas} pod(s) in {len(r.rounds)} round(s), surge {r.surge}, unavailable {r.unavailable}"
            if r is not None else "")
    return f"revision {c.from_revision} ({c.phase}): {what}"


_ORDER = ["access", "approval", "secrets", "image", "placement", "change"]


def _check(verdict: DryRunVerdict, name: str, ok: bool, detail: str, kind: FailureKind | None = None) -> None:
    """Record one check, in admission's order (a failing one with the kind it would fail with)."""
    verdict.checks.append(DryRunCheck(name=name, ok=ok, detail=detail, kind=None if ok else kind))  # type: ignore[arg-type]
    verdict.checks.sort(key=lambda c: _ORDER.index(c.name))


def _settle(verdict: DryRunVerdict) -> DryRunVerdict:
    """The verdict's failure is the first failing check's, as a deploy would meet it."""
    failing = next((c for c in verdict.checks if not c.ok and c.kind is not None), None)
    verdict.failure = Failure(kind=failing.kind, message=f"{verdict.service}: {failing.detail}") if failing else None
    verdict.admitted = failing is None
    return verdict


async def _image(spec: ServiceSpec, control_queue: str, nodes: list[NodeSpec]) -> tuple[str, str, FailureKind | None]:
    """(content id, detail, None) when every Ready node resolves the image to one content that the
    control plane's trust store vouches for now and would run the spec; else (_, why, kind)."""
    queues = sorted({n.task_queue for n in nodes})
    if not queues:
        return "", f"image {spec.image}: no Ready node to resolve it on", FailureKind.CAPACITY
    try:
        results = await asyncio.gather(*(
            workflow.execute_activity_method(
                PodActivities.verify_image,
                VerifyImageInput(service=spec.name, image=spec.image, spec=spec, one_try=True),
                task_queue=q, schedule_to_close_timeout=TIMEOUT, retry_policy=ONE_TRY,
                summary=f"dry run: resolve {spec.image}")
            for q in queues))
        ids = sorted({r.content_id for r in results})
        if len(ids) != 1:
            return "", f"image {spec.image} resolves to different content on different nodes: {ids}", \
                FailureKind.IMAGE_UNTRUSTED
        trusted = await workflow.execute_activity_method(
            NodeTrustActivities.trust_now,
            VerifyImageInput(service=spec.name, image=spec.image, content_id=ids[0], one_try=True),
            task_queue=control_queue, start_to_close_timeout=TIMEOUT, retry_policy=ONE_TRY,
            summary=f"dry run: is {spec.image} trusted?")
    except ActivityError as e:
        kind = FailureKind.SPEC_UNRUNNABLE if error_type(e) == ActivityErrorType.SPEC_UNRUNNABLE \
            else FailureKind.IMAGE_UNTRUSTED
        return "", error_message(e), kind
    return ids[0], trusted.detail, None
