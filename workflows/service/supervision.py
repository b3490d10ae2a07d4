"""Supervision: watch the pods (one long-running activity per node, and one that autoscales),
heal the ones that fail, scale on the watch's recommendation or by hand, and replace the pods
of a node the NodeRegistry lost."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from activities.pods import PodActivities
    from hms_mgmt.models import (
        HealAttempt,
        HealInput,
        PodFailure,
        PodStatus,
        ScaleInput,
        WatchCpuInput,
        WatchInput,
        WatchResult,
    )
    from hms_mgmt.names import heal_id, scale_id
    from hms_mgmt.policy.autoscale import AutoscaleInput, CpuSample, Recommendation, autoscale
    from hms_mgmt.policy.phases import scale_down_victims

from workflows.common import POD_HEARTBEAT, stop_pod
from workflows.heal import HealWorkflow
from workflows.scale import ScaleWorkflow
from workflows.service.feed import EndpointFeed
from workflows.service.state import CONTROL_TIMEOUT, ServiceRun, cancel_quietly

HEAL_ATTEMPT_CONFIRMED = "heal-attempt-confirmed"  # patch: heal_attempt_failed believed as its heal's word
HEAL_FIRST = "heal-before-event"  # patch: a failed pod's heal child starts in the same task as its event
WATCH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10))


class Supervision:
    def __init__(self, run: ServiceRun, feed: EndpointFeed) -> None:
        self.run = run
        self.feed = feed

    # --- lost nodes --------------------------------------------------------------------------

    async def replace_lost(self) -> None:
        """Pods on a lost node are failed ("exited"): the usual heal path replaces them."""
        run = self.run
        while run.state.lost_nodes and not run.undeploy_requested:
            lost = run.state.lost_nodes.pop(0)
            if workflow.patched("node-lost-confirmed"):
                confirmed = await workflow.execute_activity_method(
                    ControlActivities.node_is_lost,
                    lost,
                    task_queue=run.placement.control_task_queue,
                    start_to_close_timeout=CONTROL_TIMEOUT,
                    summary=f"is node {lost.node} lost?",
                )
                if not confirmed:
                    run.post("access.denied", f"ignored a node_lost signal for node {lost.node[:64]}: "
                                              "the node registry does not hold it as Lost")
                    continue
            for pod in [p for p in run.state.pods if p.node == lost.node]:
                # The registry's word, not the signal's text (anyone can send one; its reason
                # would reach decisions, events and an operator's terminal).
                await self.pod_failed(PodFailure(pod_id=pod.id, kind="exited", node_lost=True,
                                                 detail=f"node {lost.node} lost"))

    # --- the watch ---------------------------------------------------------------------------

    async def watch(self) -> WatchResult | None:
        """One watch activity per node that runs ready pods, plus one ``watch_cpu`` on the
        control queue that autoscales on all nodes' samples at once; the first to return wins."""
        run = self.run
        healthy = [p for p in run.state.pods if p.ready and p.id not in run.heals and p.id not in run.stopping]
        by_node: dict[str, list[PodStatus]] = {}
        for pod in healthy:
            by_node.setdefault(pod.node, []).append(pod)
        if not by_node:
            await workflow.wait_condition(lambda: False)  # until cancelled: nothing to watch
        max_s = run.placement.watch_max_s
        if run.state.phase == "Degraded" or run.state.crash_count:
            # Recovery is "pods stay ready": a quiet round of this length proves it.
            max_s = min(max_s, max(10.0, 3 * run.spec.health_interval_s))
        known = [p.id for p in run.state.pods]
        spec = run.scaling_spec()  # the active time slot's bounds, if one is on
        autoscaling = spec.min_replicas < spec.max_replicas and run.scaling is None
        tasks = [
            asyncio.ensure_future(
                workflow.execute_activity_method(
                    PodActivities.watch_pods,
                    WatchInput(
                        service=run.spec.name, spec=spec, pods=pods, known=known,
                        current=run.effective(), max_duration_s=max_s, autoscale=False,
                        history=run.state.history, at_max_reported=run.state.at_max_reported,
                    ),
                    task_queue=run.node_queue(node),
                    start_to_close_timeout=timedelta(seconds=max_s + 120),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=WATCH_RETRY,
                    summary=f"watch {len(pods)} pod(s) on {node}",
                )
            )
            for node, pods in sorted(by_node.items())
        ]
        if autoscaling:
            tasks.append(asyncio.ensure_future(
                workflow.execute_activity_method(
                    ControlActivities.watch_cpu,
                    WatchCpuInput(workflow_id=workflow.info().workflow_id, spec=spec, current=run.effective(),
                                  pods=[p.id for p in healthy], history=run.state.history,
                                  at_max_reported=run.state.at_max_reported, max_duration_s=max_s),
                    task_queue=run.placement.control_task_queue,
                    start_to_close_timeout=timedelta(seconds=max_s + 120),
                    heartbeat_timeout=POD_HEARTBEAT,
                    retry_policy=WATCH_RETRY,
                    summary=f"autoscale {len(healthy)} pod(s) on {len(by_node)} node(s)",
                )
            ))
        try:
            done, pending = await workflow.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for t in tasks:
                cancel_quietly(t)
            raise
        for t in pending:
            cancel_quietly(t)
        return next(iter(done)).result()

    async def on_watch(self, result: WatchResult) -> None:
        run = self.run
        self._apply_progress(result)
        if result.reason == "failed":
            for failure in result.failed:
                await self.pod_failed(failure)
        elif result.reason == "scale" and result.decision is not None:
            run.state.history = result.history
            await self._autoscale(result.samples)
        elif result.reason == "at_max" and result.decision is not None:
            run.state.at_max_reported = True
            run.state.history = result.history
            await run.emit("service.at_max", result.decision.reason, max_replicas=run.spec.max_replicas,
                           mean_cpu=result.decision.mean_cpu)
        elif result.reason == "unknown_pods":
            for pod_id in result.unknown_pods:
                orphan = PodStatus(id=pod_id, node=self._node_of_watch(result), health="exited")
                await stop_pod(run.spec, orphan, run.node_queue(orphan.node), grace_s=0)
                await run.emit("pod.stopped", f"removed pod {pod_id}: it carries our labels but no record (orphan)",
                               pod=pod_id)
        elif result.reason == "timeout":
            run.state.history = result.history or run.state.history
            if run.state.crash_count and not run.heals and run.all_ready():
                await self._recovered()

    async def _recovered(self) -> None:
        """A quiet watch round after crashes, every pod ready: the crash loop is over."""
        run = self.run
        recovered = run.state.phase == "Degraded"
        run.state.crash_count = 0
        run.state.backoff_s = 0.0
        run.state.message = None
        run.state.failure = None
        if recovered:
            run.set_phase("Running")
            reason = f"all {run.state.desired_replicas} pods ready and staying ready"
            run.decide("recovered", reason)
            await run.emit("service.recovered", reason)

    def _node_of_watch(self, result: WatchResult) -> str:
        ids = {p.pod_id for p in result.progress}
        return next((p.node for p in self.run.state.pods if p.id in ids), self.run.placement.nodes[0].name)

    def _apply_progress(self, result: WatchResult) -> None:
        state = self.run.state
        state.last_samples = result.samples
        for prog in result.progress:
            for i, pod in enumerate(state.pods):
                if pod.id == prog.pod_id:
                    state.pods[i] = pod.model_copy(
                        update={"consecutive_failures": prog.consecutive_failures,
                                "cpu_percent": prog.cpu_percent if prog.cpu_percent is not None else pod.cpu_percent}
                    )

    # --- healing -----------------------------------------------------------------------------

    async def pod_failed(self, failure: PodFailure) -> None:
        run = self.run
        pod = next((p for p in run.state.pods if p.id == failure.pod_id), None)
        if pod is None or pod.id in run.heals or pod.id in run.stopping:
            return
        now = workflow.now()
        stable_s = max(10.0, 3 * run.spec.health_interval_s)
        if pod.started_at is not None and (now - pod.started_at).total_seconds() < stable_s:
            run.state.crash_count += 1  # it died young: part of a crash loop
        run.upsert_pod(pod.model_copy(update={"ready": False, "health": failure.kind,
                                              "consecutive_failures": failure.consecutive_failures}))
        event = "pod.exited" if failure.kind == "exited" else "pod.unhealthy"
        run.failing.add(pod.id)
        try:
            heal_first = workflow.patched(HEAL_FIRST)
            if heal_first:
                self.start_heal(pod, failure)  # the replacement is on its way while the event is written
            await run.emit(event, f"pod {pod.id}: {failure.detail}", pod=pod.id, node=pod.node,
                           exit_code=failure.exit_code)
            if not heal_first:
                self.start_heal(pod, failure)
        finally:
            run.failing.discard(pod.id)

    def start_heal(self, pod: PodStatus, failure: PodFailure) -> None:
        run = self.run
        if run.state.phase == "Running":
            run.set_phase("Healing")
        run.state.heal_counter += 1
        run.heals[pod.id] = asyncio.ensure_future(self._heal(pod, failure))

    async def heal_says(self, attempt: HealAttempt) -> bool:
        """Whether this run's heal of ``attempt.failed_pod`` itself told of that failed attempt
        (asked by the control worker through the heal's ``attempts`` query)."""
        try:
            return await workflow.execute_activity_method(
                ControlActivities.confirm_heal_attempt, attempt,
                task_queue=self.run.placement.control_task_queue, start_to_close_timeout=CONTROL_TIMEOUT,
                summary=f"confirm heal attempt {attempt.attempt} for {attempt.failed_pod[:8]}")
        except ActivityError as e:  # not confirmed is not believed: the heal goes on all the same
            workflow.logger.warning("heal attempt for %s not confirmed: %s", attempt.failed_pod, e)
            return False

    async def _heal(self, pod: PodStatus, failure: PodFailure) -> None:
        run = self.run
        try:
            result = await workflow.execute_child_workflow(
                HealWorkflow.run,
                HealInput(spec=run.spec, revision=run.state.revision, failed=pod, failure=failure,
                          placement=run.placement, existing=[p for p in run.state.pods if p.id != pod.id],
                          crash_count=run.state.crash_count, image_id=run.state.image_id,
                          ticket=run.state.ticket),
                id=heal_id(workflow.info().workflow_id, pod.id),
                task_queue=run.placement.control_task_queue,
                static_summary=f"replace {failure.kind} pod {pod.id[:8]}: {failure.detail}"[:200],
            )
        except (ChildWorkflowError, asyncio.CancelledError):
            run.heals.pop(pod.id, None)
            if run.undeploy_requested:
                return
            raise
        run.heals.pop(pod.id, None)
        run.state.pods = [p for p in run.state.pods if p.id != pod.id]
        run.upsert_pod(result.replacement)
        reason = f"pod {pod.id} {failure.kind} ({failure.detail}); replaced by {result.replacement.id}"
        run.decide("heal", reason, pod=pod.id)
        run.pods_changed = True
        if run.state.phase == "Healing" and not run.heals:
            run.set_phase("Running")
        await run.emit("pod.replaced", reason, old_pod=pod.id, new_pod=result.replacement.id,
                       attempts=result.attempts, endpoint=result.replacement.endpoint)

    # --- scaling -----------------------------------------------------------------------------

    async def scale(self, replicas: int, reason: str, *, manual: bool = False) -> None:
        """Scale to ``replicas`` now and wait for it: one scaling action at a time, and always
        the one recorded in ``run.scaling``, so continue-as-new never hands over a half-applied
        scale. A manual value enters the autoscaler's window (it holds off its scale-down)."""
        run = self.run
        await workflow.wait_condition(lambda: run.scaling is None)
        if manual:
            run.state.history = run.state.history + [Recommendation(at=workflow.now(), replicas=replicas)]
        run.scaling = asyncio.ensure_future(self._scale_to(replicas, reason, samples=[]))
        await run.scaling

    async def _autoscale(self, samples: list[CpuSample]) -> None:
        """Re-check the watch's recommendation with the same pure policy before acting."""
        run = self.run
        low, high = run.bounds()  # the active time slot's, if one is on
        decision = autoscale(
            AutoscaleInput(
                current=run.effective(), samples=samples, min_replicas=low,
                max_replicas=high, cpu_target=run.spec.cpu_target,
                scale_down_window_s=run.spec.scale_down_window_s, history=run.state.history,
                now=workflow.now(),
            )
        )
        run.state.history = decision.history
        if decision.desired == run.effective() or run.scaling is not None or run.heals:
            return
        if decision.at_max and not run.state.at_max_reported:
            run.state.at_max_reported = True
            await run.emit("service.at_max", decision.reason, max_replicas=run.spec.max_replicas,
                           mean_cpu=decision.mean_cpu)
        elif not decision.at_max:
            run.state.at_max_reported = False
        run.scaling = asyncio.ensure_future(self._scale_to(decision.desired, decision.reason, samples=samples))

    async def _scale_to(self, replicas: int, reason: str, *, samples: list[CpuSample]) -> None:
        run = self.run
        try:
            async with run.lock:
                with run.wait_for_heals(f"scaling to {replicas}"):
                    await workflow.wait_condition(lambda: not run.heals and not run.failing)
                current = [p for p in run.state.pods if p.id not in run.heals]
                if replicas == len(current):
                    run.state.desired_replicas = replicas
                    return
                run.state.scale_counter += 1
                before = len(current)
                run.state.desired_replicas = replicas
                previous_phase = run.state.phase
                run.set_phase("Scaling")
                new_ids = [str(workflow.uuid4()) for _ in range(max(0, replicas - before))]
                victims = scale_down_victims(current, before - replicas)
                if victims:  # the monitor must not mistake a pod we stop for a crash
                    run.stopping |= {v.id for v in victims}
                    run.pods_changed = True
                    await self.feed.drain()
                result = await workflow.execute_child_workflow(
                    ScaleWorkflow.run,
                    ScaleInput(spec=run.spec, revision=run.state.revision, from_replicas=before,
                               to_replicas=replicas, reason=reason, samples=samples, placement=run.placement,
                               existing=current, new_pod_ids=new_ids, victims=victims,
                               image_id=run.state.image_id, ticket=run.state.ticket),
                    id=scale_id(workflow.info().workflow_id, run.state.scale_counter),
                    task_queue=run.placement.control_task_queue,
                    static_summary=f"{before} -> {replicas} pods: {reason}"[:200],
                )
                stopped = set(result.stopped) | {f.pod_id for f in result.failed}
                run.state.pods = [p for p in run.state.pods if p.id not in stopped]
                run.stopping -= stopped
                for pod in result.started:
                    run.upsert_pod(pod)
                run.decide("scale", reason, from_replicas=before, to_replicas=replicas)
                run.set_phase("Running" if previous_phase in ("Scaling", "Healing") else previous_phase)
                await run.emit("service.scaled", reason, from_replicas=before, to_replicas=replicas,
                               samples=[s.model_dump() for s in samples])
        finally:
            run.scaling = None
            run.pods_changed = True  # restart the watch on the new pod set, autoscaling again
