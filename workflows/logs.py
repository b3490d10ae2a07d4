"""Pod logs: the caller's viewer check in the control worker, then either the lines themselves
(``PodLogsWorkflow``, the snapshot read through a node activity, kept for nodes without a log
stream and for histories of that time) or only a grant and where each pod's node streams
(``PodLogGrantWorkflow``: the lines go from node to caller, never through history)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from activities.control import ControlActivities
    from activities.logs import LogActivities
    from activities.pods import PodActivities
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.logstream import grant_bind
    from hms_mgmt.models import AuthorizeInput, LogsOutput, PodLogsInput
    from hms_mgmt.names import LOG_GRANT_WORKFLOW, POD_LOGS_WORKFLOW
    from hms_mgmt.wire import LogGrantInput, LogGrantOutput

from workflows.common import POD_HEARTBEAT, POD_RETRY


async def authorize_logs(service: str, proof: str, bind: dict[str, str]) -> str:
    """The control plane's grant to read ``service``'s logs as bound, or the typed refusal."""
    allowed = await workflow.execute_activity_method(
        ControlActivities.authorize,
        AuthorizeInput(proof=proof, action="logs", service=service, bind=bind),
        task_queue=workflow.info().task_queue,
        start_to_close_timeout=timedelta(seconds=30),
        summary="authorize logs",
    )
    if not allowed.allowed:
        raise ApplicationError(f"logs of {service} refused: {allowed.reason}",
                               type=FailureKind.ACCESS_DENIED.value, non_retryable=True)
    return allowed.grant


# Input that does not validate (a pod id like ``../../x`` from `temporal workflow start`) fails
# the run at once with the field's error, rather than a workflow task retried forever.
@workflow.defn(name=POD_LOGS_WORKFLOW, failure_exception_types=[ValidationError])
class PodLogsWorkflow:
    @workflow.run
    async def run(self, inp: PodLogsInput) -> LogsOutput:
        # The caller's proof is checked by the control worker; the node reads only for the grant
        # it answers with (bound to this service and pod), so skipping this step gets nothing.
        # (Runs started before this check replay without it; their node refuses them a grant-less read.)
        grant = ""
        if workflow.patched("logs-authorize"):
            grant = await authorize_logs(inp.service, inp.proof, {"pod": inp.pod_id})
        return await workflow.execute_activity_method(
            PodActivities.pod_logs,
            inp.model_copy(update={"proof": "", "grant": grant}),
            task_queue=inp.node_task_queue,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_start_timeout=timedelta(seconds=30),
            heartbeat_timeout=POD_HEARTBEAT,
            retry_policy=POD_RETRY,
        )


@workflow.defn(name=LOG_GRANT_WORKFLOW, failure_exception_types=[ValidationError])
class PodLogGrantWorkflow:
    """A grant to stream pods' logs from their nodes (``hms logs``, ``-f``): the viewer check,
    then each pod's node endpoint. Its history holds the grant, bound to a secret only the caller
    has, and addresses; never a log line."""

    @workflow.run
    async def run(self, inp: LogGrantInput) -> LogGrantOutput:
        grant = await authorize_logs(inp.service, inp.proof, grant_bind(inp.pods, inp.key_hash))
        located = await workflow.execute_activity_method(
            LogActivities.locate_log_endpoints,
            inp.model_copy(update={"proof": ""}),
            start_to_close_timeout=timedelta(seconds=30),
            summary="locate pods",
        )
        return LogGrantOutput(grant=grant, endpoints=located.endpoints)
