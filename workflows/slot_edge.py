"""SlotEdgeWorkflow: what a time slot's Temporal Schedule starts at each edge. It hands the edge
(with the standing grant the schedule carries, and its own ids, so the service can ask the
server who started it) to the ServiceWorkflow as the ``slot_edge`` signal; the service checks
it before anything changes."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from hms_mgmt.models import SlotEdge
    from hms_mgmt.names import SLOT_EDGE_WORKFLOW, S, service_workflow_id


@workflow.defn(name=SLOT_EDGE_WORKFLOW)
class SlotEdgeWorkflow:
    @workflow.run
    async def run(self, edge: SlotEdge) -> str:
        info = workflow.info()
        edge = edge.model_copy(update={"workflow_id": info.workflow_id, "run_id": info.run_id})
        target = service_workflow_id(edge.service)
        await workflow.get_external_workflow_handle(target).signal(S.SLOT_EDGE, edge)
        return f"time slot {edge.slot} {edge.edge}: handed to {target}, which checks it"
