"""ScaleWorkflow (id ``svc-<name>-scale-<n>``): one scaling action, from N to M pods.

Its input holds the decision's samples and reason, so the Web UI answers "why did it scale?".
"""

from __future__ import annotations

import asyncio

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from hms_mgmt.models import FailedPod, PodStatus, ScaleInput, ScaleOutput
    from hms_mgmt.names import SCALE_WORKFLOW

from workflows.common import node_queue, require_parent, start_pods, stop_pod
from workflows.deploy import RolloutProgress


@workflow.defn(name=SCALE_WORKFLOW)
class ScaleWorkflow:
    def __init__(self) -> None:
        self.rollout = RolloutProgress()

    @workflow.query
    def progress(self) -> list[PodStatus]:
        return list(self.rollout.pods.values())

    @workflow.run
    async def run(self, inp: ScaleInput) -> ScaleOutput:
        await require_parent(SCALE_WORKFLOW, inp.spec.name)
        out = ScaleOutput()
        if inp.new_pod_ids:
            ready, failed = await start_pods(
                inp.placement, inp.spec, inp.revision, inp.new_pod_ids, inp.existing, self.rollout.report,
                image_id=inp.image_id, ticket=inp.ticket,
            )
            out.started = ready
            out.failed = [FailedPod(pod_id=p, reason=r) for p, r in failed]
        if inp.victims:
            # Graceful: SIGTERM, then SIGKILL after the spec's stop_grace_s.
            await asyncio.gather(*(stop_pod(inp.spec, v, node_queue(inp.placement, v.node)) for v in inp.victims))
            out.stopped = [v.id for v in inp.victims]
        return out
