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


class RolloutProgress:
    """Pods of a rollout as they come up, answered by the ``progress`` query: ``status()``
    merges them in, so a many-pod rollout shows live progress without a signal per pod."""

    def __init__(self) -> None:
        self.pods: dict[str, PodStatus] = {}

    async def report(self, pod: PodStatus) -> None:
        self.pods[pod.id] = pod


@workflow.defn
class DeployWorkflow:
    def __init__(self) -> None:
        self.rollout = RolloutProgress()

    @workflow.query
    def progress(self) -> list[PodStatus]:
        return list(self.rollout.pods.values())

    @workflow.run
    async def run(self, inp: DeployInput) -> DeployOutput:
        ready, failed = await start_pods(
            inp.placement, inp.spec, inp.revision, inp.pod_ids, inp.existing, self.rollout.report
        )
        return DeployOutput(pods=ready, failed=[FailedPod(pod_id=p, reason=r) for p, r in failed])
