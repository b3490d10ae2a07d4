"""HealWorkflow (id ``svc-<name>-heal-<pod>``): replace one failed pod.

Start the replacement, wait until it is ready, then stop and remove what is left of the old
pod. Replacements that keep failing back off exponentially (a durable timer between tries).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from hms_mgmt.models import HealAttempt, HealInput, HealOutput
    from hms_mgmt.names import HEAL_WORKFLOW, Q, S
    from hms_mgmt.policy.backoff import backoff_delay

from workflows.common import (
    NODE_PICKUP,
    drain,
    error_message,
    node_queue,
    pick_nodes,
    require_parent,
    start_and_wait,
    stop_pod,
)
from workflows.deploy import report_to_parent

HEAL_LOCAL_PLACEMENT = "heal-local-placement"  # patch: pick_node asked once as a local activity first
LOST_NODE_STOP_WAIT = timedelta(seconds=10)  # for a Lost node's worker to take the old pod's stop


MAX_ATTEMPTS_KEPT = 20  # failed attempts its ``attempts`` query answers (the latest)


@workflow.defn(name=HEAL_WORKFLOW)
class HealWorkflow:
    def __init__(self) -> None:
        self.failed_attempts: list[HealAttempt] = []

    @workflow.query(name=Q.ATTEMPTS)
    def attempts(self) -> list[HealAttempt]:
        """What it told its parent failed: the parent believes a ``heal_attempt_failed`` signal
        only as this heal's own word (``confirm_heal_attempt``)."""
        return self.failed_attempts

    @workflow.run
    async def run(self, inp: HealInput) -> HealOutput:
        await require_parent(HEAL_WORKFLOW, inp.spec.name)
        spec = inp.spec
        attempt = 0
        # The first placement asked as a local activity: no round trip before the replacement starts.
        local = workflow.patched(HEAL_LOCAL_PLACEMENT)
        while True:
            failures = inp.crash_count + attempt
            delay = backoff_delay(failures, initial_s=spec.backoff_initial_s, max_s=spec.backoff_max_s)
            if delay > 0:
                await workflow.sleep(timedelta(seconds=delay), summary=f"crash-loop backoff {delay:g}s")
            pod_id = str(workflow.uuid4())
            node = (await pick_nodes(inp.placement, spec, 1, inp.existing, require_all=True, local_first=local))[0]
            assert node is not None
            try:
                replacement = await start_and_wait(spec, inp.revision, pod_id, node, report_to_parent,
                                                   image_id=inp.image_id, ticket=inp.ticket)
                break
            except ActivityError as e:
                attempt += 1
                next_delay = backoff_delay(inp.crash_count + attempt, initial_s=spec.backoff_initial_s,
                                           max_s=spec.backoff_max_s)
                failed = HealAttempt(failed_pod=inp.failed.id, replacement=pod_id, attempt=attempt,
                                     reason=error_message(e), next_delay_s=next_delay)
                self.failed_attempts = (self.failed_attempts + [failed])[-MAX_ATTEMPTS_KEPT:]
                parent = workflow.info().parent
                if parent is not None:
                    await workflow.get_external_workflow_handle(parent.workflow_id).signal(S.HEAL_ATTEMPT_FAILED, failed)
                if workflow.info().is_continue_as_new_suggested():
                    # A crash loop can last days: carry the count into a fresh history.
                    workflow.continue_as_new(inp.model_copy(update={"crash_count": inp.crash_count + attempt}))
        old_queue = node_queue(inp.placement, inp.failed.node)
        grace = 0.0 if inp.failure.kind == "exited" else spec.stop_grace_s
        if inp.failure.kind != "exited":
            # Routers have had it as draining since it failed: give in-flight requests drain_s in
            # all, less once every router says it is done with it.
            left = spec.drain_s - (workflow.now() - workflow.info().start_time).total_seconds()
            if left > 0:
                await drain(inp.placement, spec, [inp.failed.id], max_s=round(left, 3))
        try:
            # A worker restarting takes the stop within NODE_PICKUP; a Lost node's likely never will.
            wait = LOST_NODE_STOP_WAIT if inp.failure.node_lost else NODE_PICKUP
            await stop_pod(spec, inp.failed, old_queue, grace_s=grace, schedule_to_start=wait)
        except ActivityError as e:
            # Its node is gone (lost, or its worker down): the replacement runs, and the node's
            # worker removes the stale pod when it comes back (it is no longer on record).
            stop_error = f"old pod {inp.failed.id} on node {inp.failed.node} not stopped: {error_message(e)}"
            workflow.logger.warning(stop_error)
            return HealOutput(old_pod=inp.failed.id, replacement=replacement, attempts=attempt + 1,
                              stop_error=stop_error)
        return HealOutput(old_pod=inp.failed.id, replacement=replacement, attempts=attempt + 1)
