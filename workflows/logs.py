"""PodLogsWorkflow: read a pod's last lines on the node where it runs (any machine)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities.control import ControlActivities
    from activities.pods import PodActivities
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import AuthorizeInput, LogsOutput, PodLogsInput

from workflows.common import POD_HEARTBEAT, POD_RETRY


# Input that does not validate (a pod id like ``../../x`` from `temporal workflow start`) fails
# the run at once with the field's error, rather than a workflow task retried forever.
@workflow.defn(failure_exception_types=[ValidationError])
class PodLogsWorkflow:
    @workflow.run
    async def run(self, inp: PodLogsInput) -> LogsOutput:
        # The caller's proof is checked by the control worker; the node reads only for the grant
        # it answers with (bound to this service and pod), so skipping this step gets nothing.
        # (Runs started before this check replay without it; their node refuses them a grant-less read.)
        grant = ""
        if workflow.patched("logs-authorize"):
            allowed = await workflow.execute_activity_method(
                ControlActivities.authorize,
                AuthorizeInput(proof=inp.proof, action="logs", service=inp.service, bind={"pod": inp.pod_id}),
                task_queue=workflow.info().task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                summary="authorize logs",
            )
            if not allowed.allowed:
                raise ApplicationError(f"logs of {inp.service} refused: {allowed.reason}",
                                       type=FailureKind.ACCESS_DENIED.value, non_retryable=True)
            grant = allowed.grant
        return await workflow.execute_activity_method(
            PodActivities.pod_logs,
            inp.model_copy(update={"proof": "", "grant": grant}),
            task_queue=inp.node_task_queue,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_start_timeout=timedelta(seconds=30),
            heartbeat_timeout=POD_HEARTBEAT,
            retry_policy=POD_RETRY,
        )
