"""Pod reports (``pod_reported``): believed only as the node's own signed word about its own pod.

Anyone who reaches Temporal can signal a ServiceWorkflow, so a report is checked by the control
worker (``check_pod_report``: the node's enrolled key signed exactly this report, recently, and
the pod is not on record on another node) before it changes the pods or the routers' table. Two
kinds need no signature because they cannot redirect anything: an ``exited`` report about a pod
this workflow does not know (ignored anyway), and one about a pod a rolling update is already
draining (the routers send it nothing new). Histories from before ``SIGNED_REPORTS`` replay as
they ran.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.enrolment import NodeTrustActivities
    from hms_mgmt.models import PodStatus
    from hms_mgmt.wire import PodReportCheck

from workflows.service.state import CONTROL_TIMEOUT, ServiceRun

SIGNED_REPORTS = "signed-pod-reports"  # patch: a pod report counts only once its node's signature is checked


class PodReports:
    def __init__(self, run: ServiceRun) -> None:
        self.run = run
        self.checking = 0  # reports whose check is in flight

    async def settled(self) -> None:
        """Until every report that arrived before now is checked (and applied, or refused)."""
        if self.checking:
            await workflow.wait_condition(lambda: self.checking == 0)

    async def believe(self, pod: PodStatus) -> bool:
        """Whether ``pod`` may change the service; a refusal leaves an ``access.denied`` event."""
        run = self.run
        if not workflow.patched(SIGNED_REPORTS):
            return True
        recorded = next((p for p in run.state.pods if p.id == pod.id), None)
        if pod.health == "exited" and not pod.ready and pod.id in run.stopping:
            return True
        self.checking += 1
        try:
            verdict = await workflow.execute_activity_method(
                NodeTrustActivities.check_pod_report,
                PodReportCheck(service=run.spec.name, pod=pod, recorded_node=recorded.node if recorded else ""),
                task_queue=run.placement.control_task_queue,
                start_to_close_timeout=CONTROL_TIMEOUT,
                schedule_to_close_timeout=timedelta(minutes=2),
                summary=f"check report on {pod.id[:8]} from {pod.node}"[:200],
            )
        except ActivityError as e:  # not checked is not believed: the child's result still comes
            workflow.logger.warning("pod report on %s not checked: %s", pod.id, e)
            return False
        finally:
            self.checking -= 1
        if not verdict.ok:
            run.post("access.denied", f"ignored a pod_reported signal for pod {pod.id[:8]}: {verdict.reason}",
                     pod=pod.id, node=pod.node)
        return verdict.ok
