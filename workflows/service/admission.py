"""Admission and image trust: access, governance (through the approval gate), the image
resolved to its content and pinned, and the control plane's ticket for the revision."""

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
    from hms_mgmt.models import GovernanceInput, RevisionRecord, ServiceSpec, TicketInput, VerifyImageInput

from workflows.common import control_activity, error_message, error_type
from workflows.service.access import Access
from workflows.service.approvals import ApprovalGate
from workflows.service.state import CONTROL_TIMEOUT, ServiceRun

TRUST_ON_CONTROL = "trust-on-control"  # patch: an image_revoked hint is re-checked by the control worker
ADMISSION_LOCAL = "admission-local"  # patch: a deploy's authorize, governance and ticket as local activities
VERIFIED_BESIDE = "image-verified-beside"  # patch: the image.verified event no longer holds the ticket up


class Admission:
    def __init__(self, run: ServiceRun, access: Access, approvals: ApprovalGate) -> None:
        self.run = run
        self.access = access
        self.approvals = approvals

    async def admit(self, proof: str) -> bool:
        """Validating -> (AwaitingApproval) -> VerifyingImage. False: refused, no pod started."""
        run = self.run
        # The control worker runs this workflow and answers these three itself: no round trips.
        local = workflow.patched(ADMISSION_LOCAL)
        allowed = await self.access.authorize("deploy", proof, request_id="deploy", bind={"spec": run.spec.digest()},
                                              local=local)
        run.deploy_grant = allowed.grant
        if not allowed.allowed:
            run.fail(FailureKind.ACCESS_DENIED, f"deploy {run.spec.name} refused: {allowed.reason}")
            run.set_phase("Rejected")
            return False
        run.state.requested_by = allowed.user or ""
        verdict = await control_activity(ControlActivities.check_governance, GovernanceInput(spec=run.spec),
                                         task_queue=run.placement.control_task_queue, local=local,
                                         timeout=CONTROL_TIMEOUT, summary="governance policy")
        if verdict.needs_approval and not await self.approvals.wait("; ".join(verdict.reasons),
                                                                    verdict.approval_timeout_s,
                                                                    revision=run.state.revision, spec=run.spec):
            run.set_phase("Rejected")
            return False
        if run.undeploy_requested:
            return False
        if not await self._verify_image():
            return False
        ticket, problem = await self.ticket(run.spec, run.state.revision, run.state.image_id,
                                            grant=run.deploy_grant, approval_grant=run.approval_grant, local=local)
        if ticket is None:
            run.fail(FailureKind.ACCESS_DENIED, problem)
            run.set_phase("Rejected")
            return False
        self._use_ticket(run.state.revision, ticket)
        return True

    async def ticket(self, spec: ServiceSpec, revision: int, image_id: str, *, grant: str, approval_grant: str = "",
                     prior: RevisionRecord | None = None, local: bool = False) -> tuple[str | None, str]:
        """The control plane's admission ticket for this revision, or (None, why not)."""
        try:
            out = await control_activity(
                ControlActivities.issue_ticket,
                TicketInput(service=spec.name, revision=revision, spec=spec, image_id=image_id, grant=grant,
                            approval_grant=approval_grant, prior_ticket=prior.ticket if prior else "",
                            prior_revision=prior.revision if prior else None),
                task_queue=self.run.placement.control_task_queue, local=local, timeout=CONTROL_TIMEOUT,
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10), non_retryable_error_types=[ActivityErrorType.ACCESS_DENIED]),
                summary=f"admission ticket for revision {revision}",
            )
        except ActivityError as e:
            return None, error_message(e)
        return out.ticket, ""

    def _use_ticket(self, revision: int, ticket: str) -> None:
        state = self.run.state
        state.ticket = ticket
        state.revisions = [r.model_copy(update={"ticket": ticket}) if r.revision == revision else r
                           for r in state.revisions]

    async def _verify_image(self) -> bool:
        """No pod of an image starts until it is marked signed and safe on every node; the
        content it resolves to now is pinned for every pod of this revision."""
        run = self.run
        run.set_phase("VerifyingImage")
        image = run.spec.image
        until = workflow.now() + timedelta(seconds=run.spec.image_verify_timeout_s)
        with run.waiting("image_signature", f"image {image} to be signed and safe on every node", until=until,
                         command=f"hms image sign {image}"):
            content_id, problem, kind = await self.resolve_image(run.spec)
        if content_id is None:
            run.fail(kind, problem)
            run.set_phase("Failed")
            await run.emit("image.untrusted" if kind == FailureKind.IMAGE_UNTRUSTED else "spec.refused",
                           problem, image=run.spec.image)
            return False
        run.state.image_id = content_id
        run.state.revisions = [RevisionRecord(revision=run.state.revision, spec=run.spec, image_id=content_id,
                                              deployed_by=run.state.requested_by, deployed_at=workflow.now())]
        return True

    async def resolve_image(self, spec: ServiceSpec) -> tuple[str | None, str, FailureKind]:
        """(content id, detail, _) once every node vouches for the image and would run the spec,
        or (None, why not, the failure's kind): a spec a node's runtime refuses is refused here,
        naming the field, rather than crash-looping pod after pod."""
        queues = sorted({n.task_queue for n in self.run.placement.nodes})
        try:
            results = await asyncio.gather(*(
                workflow.execute_activity_method(
                    PodActivities.verify_image,
                    VerifyImageInput(service=spec.name, image=spec.image, spec=spec),
                    task_queue=q,
                    schedule_to_close_timeout=timedelta(seconds=spec.image_verify_timeout_s),
                    start_to_close_timeout=CONTROL_TIMEOUT,
                    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                             maximum_interval=timedelta(seconds=10)),
                    summary=f"verify {spec.image}",
                )
                for q in queues
            ))
        except ActivityError as e:
            if error_type(e) == ActivityErrorType.SPEC_UNRUNNABLE:
                return None, error_message(e), FailureKind.SPEC_UNRUNNABLE
            return None, f"{error_message(e)} (gave up after {spec.image_verify_timeout_s:g}s)", \
                FailureKind.IMAGE_UNTRUSTED
        ids = {r.content_id for r in results}
        if len(ids) != 1:
            return (None, f"image {spec.image} resolves to different content on different nodes: {sorted(ids)}",
                    FailureKind.IMAGE_UNTRUSTED)
        verified = {"image": spec.image, "content_id": results[0].content_id}
        if workflow.patched(VERIFIED_BESIDE):
            self.run.emit_beside("image.verified", results[0].detail, **verified)
        else:
            await self.run.emit("image.verified", results[0].detail, **verified)
        return results[0].content_id, results[0].detail, FailureKind.IMAGE_UNTRUSTED

    async def check_revoked(self) -> None:
        """After an ``image_revoked`` hint: is the pinned content still trusted? If not, the
        service is Degraded with the reason; running pods stay (no new pod of it may start)."""
        run = self.run
        run.state.revoke_check = False
        node = run.placement.nodes[0].task_queue if run.placement.nodes else run.node_queue("local")
        # The control plane judges trust (a joined node keeps no trust store): ask it, not a node.
        on_control = workflow.patched(TRUST_ON_CONTROL)
        try:
            await workflow.execute_activity_method(
                NodeTrustActivities.trust_now if on_control else PodActivities.verify_image,
                VerifyImageInput(service=run.spec.name, image=run.spec.image, content_id=run.state.image_id,
                                 one_try=True),
                task_queue=run.placement.control_task_queue if on_control else node,
                start_to_close_timeout=CONTROL_TIMEOUT,
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=[ActivityErrorType.IMAGE_UNTRUSTED]),
                summary=f"still trusted? {run.spec.image}",
            )
        except ActivityError as e:
            reason = f"image {run.spec.image} lost its trust ({error_message(e)}): running pods stay, no new pod starts"
            run.fail(FailureKind.IMAGE_UNTRUSTED, reason)
            run.set_phase("Degraded")
            run.decide("revoked", reason)
            await run.emit("image.revoked", reason, image=run.spec.image)
