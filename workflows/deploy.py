"""DeployWorkflow: one rollout — place pods, start them in parallel, wait until ready."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from hms_mgmt.models import DeployInput, DeployOutput, FailedPod, PodStatus

from workflows.common import start_pods

POD_REPORTED = "pod_reported"


async def report_to_parent(pod: PodStatus) -> None:
    """Tell the ServiceWorkflow (the one writer of service state) as each pod comes up, so
    ``status()`` shows progress live rather than when the whole rollout ends."""
    parent = workflow.info().parent
    if parent is not None:
        await workflow.get_external_workflow_handle(parent.workflow_id).signal(POD_REPORTED, pod)


@workflow.defn
class DeployWorkflow:
    @workflow.run
    async def run(self, inp: DeployInput) -> DeployOutput:
        ready, failed = await start_pods(
            inp.placement, inp.spec, inp.revision, inp.pod_ids, inp.existing, report_to_parent
        )
        return DeployOutput(pods=ready, failed=[FailedPod(pod_id=p, reason=r) for p, r in failed])
