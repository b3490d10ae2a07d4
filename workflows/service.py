"""ServiceWorkflow (id ``svc-<name>``): the one writer of a service's desired and actual state.

A long-lived entity. Rollouts, heals and scaling actions are child workflows so each is its
own execution in the Web UI; children report back and this workflow applies the result.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.pods import PodActivities
    from hms_mgmt import constants
    from hms_mgmt.models import (
        Decision,
        DeployInput,
        ListPodsInput,
        Phase,
        PodStatus,
        ServiceInput,
        ServiceSpec,
        ServiceState,
        ServiceStatus,
    )

from workflows.common import POD_HEARTBEAT, POD_RETRY, emit, error_message, stop_pod
from workflows.deploy import POD_REPORTED, DeployWorkflow

PHASE_KEY = SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_PHASE)
SERVICE_KEY = SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_SERVICE)
MAX_DECISIONS = 20


@workflow.defn
class ServiceWorkflow:
    @workflow.init
    def __init__(self, inp: ServiceInput) -> None:
        self.spec: ServiceSpec = inp.spec
        self.placement = inp.placement
        self.state: ServiceState = inp.state or ServiceState(desired_replicas=inp.spec.min_replicas)
        self.undeploy_requested = False
        self.lock = asyncio.Lock()
        self._history_threshold = inp.history_threshold

    # --- messages --------------------------------------------------------------------

    @workflow.query
    def status(self) -> ServiceStatus:
        s = self.state
        return ServiceStatus(
            name=self.spec.name,
            phase=s.phase,
            revision=s.revision,
            spec=self.spec,
            desired_replicas=s.desired_replicas,
            ready_replicas=sum(1 for p in s.pods if p.ready),
            pods=list(s.pods),
            pending_approval=s.pending_approval,
            last_decisions=s.decisions[-MAX_DECISIONS:],
            workflow_id=workflow.info().workflow_id,
            web_ui_url=self._web_ui_url(),
            message=s.message,
            backoff_s=s.backoff_s,
        )

    @workflow.signal
    def undeploy(self) -> None:
        self.undeploy_requested = True

    @workflow.signal(name=POD_REPORTED)
    def pod_reported(self, pod: PodStatus) -> None:
        """Live progress from a child; the child's result is still the authority."""
        self._upsert_pod(pod)

    # --- run ---------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: ServiceInput) -> ServiceStatus:
        if inp.state is None:
            workflow.upsert_search_attributes([SERVICE_KEY.value_set(self.spec.name)])
            self._set_phase("Validating")
            await self._deploy()
        elif self.state.phase not in ("Undeploying", "Stopped"):
            self._set_phase(self.state.phase, force=True)
        while not self.undeploy_requested:
            await workflow.wait_condition(lambda: self.undeploy_requested or self._continue_as_new_due())
            if not self.undeploy_requested and self._continue_as_new_due():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(inp.model_copy(update={"state": self.state}))
        await self._undeploy()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    # --- steps -------------------------------------------------------------------------

    async def _deploy(self) -> None:
        self._set_phase("Deploying")
        count = self.state.desired_replicas
        pod_ids = [str(workflow.uuid4()) for _ in range(count)]
        child = asyncio.ensure_future(
            workflow.execute_child_workflow(
                DeployWorkflow.run,
                DeployInput(spec=self.spec, revision=self.state.revision, pod_ids=pod_ids, placement=self.placement),
                id=f"{workflow.info().workflow_id}-deploy-{self.state.revision}",
                task_queue=self.placement.control_task_queue,
                static_summary=f"deploy {count} pod(s) of {self.spec.image}",
            )
        )
        await workflow.wait_condition(lambda: child.done() or self.undeploy_requested)
        if not child.done():
            child.cancel()
        try:
            result = await child
        except (ChildWorkflowError, asyncio.CancelledError) as e:
            if self.undeploy_requested:
                return
            self.state.message = f"deployment failed: {error_message(e)}"
            self._set_phase("Failed")
            await emit(self.placement, "service.failed", self.spec.name, self.state.message)
            return
        by_id = {p.id: p for p in result.pods}
        self.state.pods = [by_id.get(p.id, p) for p in self.state.pods if p.id in by_id]
        for pod in result.pods:
            self._upsert_pod(pod)
        for pod in self.state.pods:
            await emit(self.placement, "pod.started", self.spec.name, f"pod {pod.id} ready on {pod.node} at {pod.endpoint}",
                       pod=pod.id, node=pod.node, endpoint=pod.endpoint)
        if result.failed:
            self.state.message = "; ".join(f"{f.pod_id}: {f.reason}" for f in result.failed)
        self._set_phase("Running" if len(self.state.pods) >= count else "Degraded")
        await emit(self.placement, "service.deployed", self.spec.name,
                   f"{len(self.state.pods)}/{count} pods ready", revision=self.state.revision)

    async def _undeploy(self) -> None:
        self._set_phase("Undeploying")
        tq = {n.name: n.task_queue for n in self.placement.nodes}
        await asyncio.gather(*(stop_pod(self.spec, p, self._node_queue(p.node)) for p in self.state.pods))
        # Sweep every node for pods of this service that a record missed (a start that raced
        # the undeploy): nothing may be left behind.
        nodes = {p.node for p in self.state.pods} | set(tq)
        for node in sorted(nodes):
            try:
                left = await workflow.execute_activity_method(
                    PodActivities.list_pods,
                    ListPodsInput(service=self.spec.name),
                    task_queue=self._node_queue(node),
                    start_to_close_timeout=timedelta(seconds=60),
                    schedule_to_start_timeout=timedelta(seconds=60),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=POD_RETRY,
                )
            except ActivityError as e:
                workflow.logger.warning("could not sweep node %s: %s", node, e)
                continue
            await asyncio.gather(*(stop_pod(self.spec, p, self._node_queue(node), grace_s=0) for p in left.pods))
        self.state.pods = []
        self._set_phase("Stopped")
        await emit(self.placement, "service.undeployed", self.spec.name, "undeployed on request")

    # --- helpers -----------------------------------------------------------------------

    def _node_queue(self, node: str) -> str:
        for n in self.placement.nodes:
            if n.name == node:
                return n.task_queue
        return f"{self.placement.node_queue_prefix}{node}"

    def _upsert_pod(self, pod: PodStatus) -> None:
        for i, existing in enumerate(self.state.pods):
            if existing.id == pod.id:
                self.state.pods[i] = pod
                return
        self.state.pods.append(pod)

    def _set_phase(self, phase: Phase, *, force: bool = False) -> None:
        if phase != self.state.phase or force:
            self.state.phase = phase
            workflow.upsert_search_attributes([PHASE_KEY.value_set(phase)])

    def _decide(self, decision: Decision) -> None:
        self.state.decisions = (self.state.decisions + [decision])[-MAX_DECISIONS:]

    def _continue_as_new_due(self) -> bool:
        info = workflow.info()
        threshold = self._history_threshold
        if threshold is not None and info.get_current_history_length() >= threshold:
            return True
        return info.is_continue_as_new_suggested()

    def _web_ui_url(self) -> str:
        base = self.placement.web_ui_base.rstrip("/")
        return f"{base}/namespaces/{self.placement.namespace}/workflows/{workflow.info().workflow_id}"
