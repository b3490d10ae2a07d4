"""The approval gate: a deployment (or an update) over the governance limits waits for a
gov_approver, by update or by signal. An approval names what it approves and is used once."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import Approval, AuthorizeOutput, PendingApproval, ServiceSpec, SignalledApproval

from workflows.common import proof_jti
from workflows.service.access import Access
from workflows.service.state import ServiceRun, refuse

APPROVAL_FOR_ITS_REQUEST = "approval-for-its-request"  # patch: a decision counts for its own request only


class ApprovalGate:
    def __init__(self, run: ServiceRun, access: Access) -> None:
        self.run = run
        self.access = access

    def signalled(self, kind: str, approval: Approval) -> None:
        """An approve/reject signal: kept for the run loop to check, unless plainly stale."""
        run = self.run
        jti = proof_jti(approval.proof)
        if jti and jti in run.state.used_proofs:
            run.post("access.denied", f"ignored a {kind} signal: its proof was already used (jti {jti[:12]})",
                     action=kind)
            return
        if run.state.pending_approval is None or run.approval_decision is not None:
            run.post("access.denied", f"ignored a {kind} signal: {run.spec.name} is {run.state.phase}, "
                                      "not awaiting approval", action=kind)
            return
        run.state.approvals.append(SignalledApproval(kind=kind, approval=approval))  # type: ignore[arg-type]

    def require_pending(self, kind: str) -> None:
        run = self.run
        if run.state.pending_approval is None or run.approval_decision is not None:
            raise refuse(FailureKind.REFUSED, f"cannot {kind} {run.spec.name}: it is {run.state.phase}, "
                                              "not awaiting approval")

    async def decide_by_update(self, kind: str, approval: Approval) -> None:
        run = self.run
        verdict, counted = await self.judge(kind, approval)
        if not verdict.allowed:
            raise refuse(FailureKind.ACCESS_DENIED, f"{kind} {run.spec.name} refused: {verdict.reason}")
        if not counted:
            raise refuse(FailureKind.REFUSED, f"cannot {kind} {run.spec.name}: it was decided meanwhile")
        await workflow.wait_condition(lambda: run.state.pending_approval is None
                                      and run.state.phase != "AwaitingApproval")

    async def judge(self, kind: str, approval: Approval) -> tuple[AuthorizeOutput, bool]:
        """Check one approve/reject (from a signal or an update); the first valid one decides."""
        run = self.run
        pending = run.state.pending_approval
        asked = pending.id if pending is not None else None
        bind = ({"revision": pending.revision, "spec": pending.spec_hash, "request": pending.id}
                if pending is not None else {"request": "none pending"})
        result = await self.access.authorize(kind, approval.proof, request_id=approval.request_id,
                                             requester=run.state.requested_by if kind == "approve" else None,
                                             bind=bind)
        pending = run.state.pending_approval
        if not result.allowed:
            if pending is not None:
                pending.invalid_attempts.append(f"{kind}: {result.reason}")
            return result, False
        if run.approval_decision is not None or run.state.pending_approval is None:
            return result, False
        # The request may have timed out or been decided while the proof was checked, and the
        # next one be waiting now: an approval counts only for the request it was made for.
        if pending is not None and pending.id != asked and workflow.patched(APPROVAL_FOR_ITS_REQUEST):
            return result, False
        run.approval_decision = (kind, result.user or "", approval.reason)
        run.approval_grant = result.grant  # the admission ticket checks it again
        return result, True

    async def wait(self, reason: str, timeout_s: float, *, revision: int, spec: ServiceSpec,
                   running: bool = False) -> bool:
        """Wait for a gov_approver. A running service (an update that needs approval) keeps its
        phase and its pods meanwhile; only a first deploy sits in AwaitingApproval. An approval
        must name this request: the service, ``revision``, the spec's hash and the request id."""
        run = self.run
        run.approval_decision = None
        now = workflow.now()
        run.state.pending_approval = PendingApproval(
            requested_by=run.state.requested_by, requested_at=now, reason=reason, revision=revision,
            spec_hash=spec.digest(), id=f"{revision}-{int(now.timestamp() * 1000)}",
        )
        if not running:
            run.set_phase("AwaitingApproval")
        await run.emit("approval.requested", reason, requested_by=run.state.requested_by, timeout_s=timeout_s)
        name = run.spec.name
        with run.waiting("approval", f"a gov_approver to decide: {reason}", until=now + timedelta(seconds=timeout_s),
                         command=f"hms approve {name}"):
            decided = await self._decided(reason, timeout_s)
        if not decided:
            return False
        run.state.approvals.clear()
        run.state.pending_approval = None
        if run.approval_decision is None:  # undeployed while waiting
            run.fail(FailureKind.UNDEPLOYED, "withdrawn by undeploy while awaiting approval")
            return False
        kind, user, why = run.approval_decision
        why = f" ({why})" if why else ""
        if kind == "approve":
            run.state.approved_by = user
            await run.emit("approval.granted", f"approved by {user}{why}", approver=user)
            return True
        run.fail(FailureKind.APPROVAL_REJECTED, f"rejected by {user}{why}")
        await run.emit("approval.rejected", run.state.message or "", approver=user)
        return False

    async def _decided(self, reason: str, timeout_s: float) -> bool:
        """Check signalled approvals as they come until one decides, or an undeploy; False
        (the request dropped, the failure recorded) when ``timeout_s`` passes first."""
        run = self.run
        deadline = workflow.now() + timedelta(seconds=timeout_s)
        while run.approval_decision is None and not run.undeploy_requested:
            remaining = (deadline - workflow.now()).total_seconds()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await workflow.wait_condition(
                    lambda: bool(run.state.approvals) or run.approval_decision is not None or run.undeploy_requested,
                    timeout=timedelta(seconds=remaining),
                )
            except TimeoutError:
                run.state.pending_approval = None
                run.fail(FailureKind.APPROVAL_TIMED_OUT, f"approval timed out after {timeout_s:g}s: {reason}")
                await run.emit("approval.rejected", run.state.message or "")
                return False
            while run.state.approvals and run.approval_decision is None:
                signalled = run.state.approvals.pop(0)
                await self.judge(signalled.kind, signalled.approval)  # an invalid one changes nothing: keep waiting
        return True
