"""NodeRegistry (id ``hms-nodes``): which nodes exist, their capacity and labels, and whether
they are alive.

Workers register with the ``register`` update (update-with-start, so whichever comes first
starts the registry) and then heartbeat with a signal. One durable timer, set for the
earliest moment a Ready node would have been silent for ``lost_after_s``, is all the
registry waits on: a node whose heartbeat did not come is ``Lost``, and every service with
pods there is told (``node_lost``) so it replaces them on other nodes through its heal path.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from hms_mgmt.models import (
        NodeLost,
        NodeRecord,
        NodeRegistration,
        NodeRegistryInput,
        NodesOutput,
        RegisterResult,
    )
    from hms_mgmt.names import NODE_REGISTRY_WORKFLOW

NOTIFY_TIMEOUT = timedelta(seconds=60)


@workflow.defn(name=NODE_REGISTRY_WORKFLOW)
class NodeRegistry:
    @workflow.init
    def __init__(self, inp: NodeRegistryInput) -> None:
        self.inp = inp
        self.lost_after = timedelta(seconds=inp.lost_after_s)
        self.nodes: dict[str, NodeRecord] = {}
        if inp.nodes is not None:
            self.nodes = {r.spec.name: r for r in inp.nodes}
        else:
            now = workflow.now()
            # A static node counts as heard from at the registry's start: its worker has
            # lost_after_s to show up before pods stop being placed there.
            for spec in inp.seed:
                self.nodes[spec.name] = NodeRecord(spec=spec, source="config", registered_at=now, last_heartbeat=now)
        self.newly_lost: list[str] = []
        self.wake = False

    @workflow.query
    def nodes(self) -> NodesOutput:
        return NodesOutput(nodes=sorted(self.nodes.values(), key=lambda r: r.spec.name))

    @workflow.update
    def register(self, reg: NodeRegistration) -> RegisterResult:
        """A worker (re)joins. ``was_lost`` tells it to remove the stale pods it still runs."""
        return self._upsert(reg)

    @workflow.signal
    def heartbeat(self, reg: NodeRegistration) -> None:
        """A live node. A heartbeat from a node the registry does not know (or knew as Lost)
        registers it again, so a registry restarted from its seed relearns every node."""
        rec = self.nodes.get(reg.spec.name)
        if rec is None or rec.state != "Ready" or rec.spec != reg.spec:
            self._upsert(reg)
        else:
            rec.last_heartbeat = workflow.now()

    def _upsert(self, reg: NodeRegistration) -> RegisterResult:
        now = workflow.now()
        old = self.nodes.get(reg.spec.name)
        was_lost = old is not None and old.state == "Lost"
        rec = NodeRecord(
            spec=reg.spec,
            state="Ready",
            source=old.source if old is not None else "worker",
            registered_at=now,
            last_heartbeat=now,
            rejoins=(old.rejoins + 1) if was_lost and old is not None else (old.rejoins if old else 0),
        )
        self.nodes[reg.spec.name] = rec
        if was_lost:
            workflow.logger.info("node %s is back", reg.spec.name)
        self.wake = True  # the timer may be unset (no Ready node) or later than this node's deadline
        return RegisterResult(record=rec, was_lost=was_lost)

    def _continue_as_new_due(self) -> bool:
        info = workflow.info()
        threshold = self.inp.history_threshold
        return info.is_continue_as_new_suggested() or (
            threshold is not None and info.get_current_history_length() >= threshold
        )

    @workflow.run
    async def run(self, inp: NodeRegistryInput) -> None:
        while not self._continue_as_new_due():
            while self.newly_lost:
                await self._notify(self.newly_lost.pop(0))
            deadline = self._next_deadline()
            now = workflow.now()
            if deadline is None or deadline > now:
                self.wake = False
                try:
                    await workflow.wait_condition(
                        lambda: self.wake or self._continue_as_new_due(),
                        timeout=None if deadline is None else deadline - now,
                        timeout_summary="next node heartbeat due",
                    )
                except TimeoutError:
                    pass
            self._mark_lost()
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(inp.model_copy(update={"nodes": list(self.nodes.values())}))

    def _next_deadline(self) -> datetime | None:
        beats = [r.last_heartbeat for r in self.nodes.values() if r.state == "Ready" and r.last_heartbeat]
        return min(beats) + self.lost_after if beats else None

    def _mark_lost(self) -> None:
        now = workflow.now()
        for rec in self.nodes.values():
            if rec.state == "Ready" and rec.last_heartbeat is not None and rec.last_heartbeat + self.lost_after <= now:
                rec.state = "Lost"
                rec.lost_at = now
                self.newly_lost.append(rec.spec.name)
                workflow.logger.warning("node %s lost: no heartbeat for %ss", rec.spec.name, self.inp.lost_after_s)

    async def _notify(self, node: str) -> None:
        rec = self.nodes[node]
        silent = (workflow.now() - rec.last_heartbeat).total_seconds() if rec.last_heartbeat else 0.0
        await workflow.execute_activity_method(
            ControlActivities.notify_node_lost,
            NodeLost(node=node, reason=f"node {node} lost: no heartbeat for {silent:.0f}s"),
            task_queue=self.inp.control_task_queue,
            start_to_close_timeout=NOTIFY_TIMEOUT,
            summary=f"node {node} lost: tell its services",
        )
