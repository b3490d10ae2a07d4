"""PodLogsWorkflow: read a pod's last lines on the node where it runs (any machine)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.pods import PodActivities
    from hms_mgmt.models import LogsOutput, PodLogsInput

from workflows.common import POD_HEARTBEAT, POD_RETRY


@workflow.defn
class PodLogsWorkflow:
    @workflow.run
    async def run(self, inp: PodLogsInput) -> LogsOutput:
        return await workflow.execute_activity_method(
            PodActivities.pod_logs,
            inp,
            task_queue=inp.node_task_queue,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_start_timeout=timedelta(seconds=30),
            heartbeat_timeout=POD_HEARTBEAT,
            retry_policy=POD_RETRY,
        )
