"""The first deployment of the admitted revision, and the undeploy that ends the service."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.pods import PodActivities
    from hms_mgmt.errors import FailureKind
    from hms_mgmt.models import DeployInput, ListPodsInput, PodFailure, PodStatus
    from hms_mgmt.names import deploy_id

from workflows.common import NODE_PICKUP, POD_HEARTBEAT, POD_RETRY, error_message, stop_pod
from workflows.deploy import DeployWorkflow
from workflows.service.feed import EndpointFeed
from workflows.service.state import ServiceRun
from workflows.service.supervision import Supervision


class Lifecycle:
    def __init__(self, run: ServiceRun, feed: EndpointFeed, supervision: Supervision) -> None:
        self.run = run
        self.feed = feed
        self.supervision = supervision

    async def deploy(self) -> None:
        run = self.run
        run.set_phase("Deploying")
        count = run.state.desired_replicas
        pod_ids = [str(workflow.uuid4()) for _ in range(count)]
        child = asyncio.ensure_future(
            workflow.execute_child_workflow(
                DeployWorkflow.run,
                DeployInput(spec=run.spec, revision=run.state.revision, pod_ids=pod_ids, placement=run.placement,
                            image_id=run.state.image_id, ticket=run.state.ticket),
                id=deploy_id(workflow.info().workflow_id, run.state.revision),
                task_queue=run.placement.control_task_queue,
                static_summary=f"deploy {count} pod(s) of {run.spec.image}",
            )
        )
        await workflow.wait_condition(lambda: child.done() or run.undeploy_requested)
        await run.settle_records()  # admission's, written while the rollout started
        if not child.done():
            child.cancel()
        try:
            result = await child
        except (ChildWorkflowError, asyncio.CancelledError) as e:
            if run.undeploy_requested:
                return
            run.fail(FailureKind.DEPLOY_FAILED, f"deployment failed: {error_message(e)}")
            run.set_phase("Failed")
            await run.emit("service.failed", run.state.message)
            return
        ready = {p.id for p in result.pods}
        run.state.pods = [p for p in run.state.pods if p.id in ready]
        for pod in result.pods:
            run.upsert_pod(pod)
        run.set_phase("Running")
        await asyncio.gather(
            *(run.emit("pod.started", f"pod {pod.id} ready on {pod.node} at {pod.endpoint}",
                       pod=pod.id, node=pod.node, endpoint=pod.endpoint) for pod in result.pods),
            run.emit("service.deployed", f"{len(result.pods)}/{count} pods ready", revision=run.state.revision),
        )
        for failed in result.failed:
            # A pod that could not start at all is healed like any other: replaced, with backoff.
            node = run.placement.nodes[0].name if run.placement.nodes else ""
            pod = PodStatus(id=failed.pod_id, node=node, revision=run.state.revision, image=run.spec.image,
                            health="exited")
            run.upsert_pod(pod)
            run.state.crash_count += 1
            await run.emit("pod.exited", f"pod {pod.id}: {failed.reason}", pod=pod.id)
            self.supervision.start_heal(pod, PodFailure(pod_id=pod.id, kind="exited", detail=failed.reason))

    async def undeploy(self) -> None:
        run = self.run
        run.set_phase("Undeploying")
        run.stopping |= {p.id for p in run.state.pods}
        await self.feed.drain()
        stops = await asyncio.gather(*(stop_pod(run.spec, p, run.node_queue(p.node), schedule_to_start=NODE_PICKUP)
                                       for p in run.state.pods), return_exceptions=True)
        for pod, stopped in zip(run.state.pods, stops, strict=True):
            if isinstance(stopped, ActivityError):  # its node is gone: its worker removes it when back
                workflow.logger.warning("pod %s on %s not stopped: %s", pod.id, pod.node, error_message(stopped))
        await self._sweep()
        run.state.pods = []
        run.service_stopped = True
        await self.feed.publish()
        run.set_phase("Stopped")
        await run.emit("service.undeployed", "undeployed on request")

    async def _sweep(self) -> None:
        """Sweep every node for pods of this service that a record missed (a start that raced
        the undeploy): nothing may be left behind."""
        run = self.run
        nodes = {p.node for p in run.state.pods} | {n.name for n in run.placement.nodes}
        for node in sorted(nodes):
            try:
                left = await workflow.execute_activity_method(
                    PodActivities.list_pods,
                    ListPodsInput(service=run.spec.name),
                    task_queue=run.node_queue(node),
                    start_to_close_timeout=timedelta(seconds=60),
                    schedule_to_start_timeout=timedelta(seconds=60),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=POD_RETRY,
                )
            except ActivityError as e:
                workflow.logger.warning("could not sweep node %s: %s", node, e)
                continue
            await asyncio.gather(*(stop_pod(run.spec, p, run.node_queue(node), grace_s=0) for p in left.pods))
