"""Who may do what: every request proof is verified in the control worker, and used once."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from hms_mgmt.models import AuthorizeInput, AuthorizeOutput, Refusal

from workflows.common import control_activity, proof_jti
from workflows.service.state import CONTROL_TIMEOUT, ServiceRun

MAX_REFUSALS = 20


class Access:
    def __init__(self, run: ServiceRun) -> None:
        self.run = run

    async def authorize(self, action: str, proof: str, *, request_id: str, requester: str | None = None,
                        claim: str = "", bind: dict[str, object] | None = None, local: bool = False) -> AuthorizeOutput:
        """Verify a request proof in the control worker; each proof is used once (its jti is
        remembered, across continue-as-new, until it expires)."""
        run = self.run
        jti = proof_jti(proof)
        if jti and jti in run.state.used_proofs:
            reason = f"its proof was already used (jti {jti[:12]}): a proof is good for one request"
            await run.emit("access.denied", f"{action} refused: {reason}", action=action, request_id=request_id)
            result = AuthorizeOutput(allowed=False, reason=reason)
        else:
            if jti:
                self._remember_proof(jti)
            result = await self._verify_proof(action, proof, request_id=request_id, requester=requester,
                                              claim=claim, bind=bind or {}, local=local)
        if not result.allowed:
            refusal = Refusal(at=workflow.now(), action=action, reason=result.reason, request_id=request_id)
            run.state.refusals = (run.state.refusals + [refusal])[-MAX_REFUSALS:]
        return result

    def _remember_proof(self, jti: str) -> None:
        now = workflow.now().timestamp()
        kept = {k: exp for k, exp in self.run.state.used_proofs.items() if exp > now}
        # A proof lives at most an hour (plus clock skew): remembered that long, it cannot come back.
        kept[jti] = now + 3600 + 120
        self.run.state.used_proofs = kept

    async def _verify_proof(self, action: str, proof: str, *, request_id: str, requester: str | None,
                            claim: str, bind: dict[str, object], local: bool) -> AuthorizeOutput:
        run = self.run
        return await control_activity(
            ControlActivities.authorize,
            AuthorizeInput(proof=proof, action=action, service=run.spec.name, requester=requester,
                           request_id=request_id, claim=claim, bind=bind),
            task_queue=run.placement.control_task_queue, local=local, timeout=CONTROL_TIMEOUT,
            summary=f"authorize {action}",
        )
