"""The routers' endpoint feed: the routable pods, published on every change of that set
wherever in the workflow it happens, and the drain before a planned stop."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError

with workflow.unsafe.imports_passed_through():
    from activities.feed import FeedActivities
    from hms_mgmt.models import Endpoint, EndpointSet

from workflows.common import drain
from workflows.service.state import ServiceRun


class EndpointFeed:
    def __init__(self, run: ServiceRun) -> None:
        self.run = run

    def endpoint_set(self) -> EndpointSet:
        """Ready pods, and pods still serving but on their way out (a planned stop, or unhealthy
        and being replaced) as draining: a router sends them nothing new."""
        run = self.run
        eps = []
        for p in sorted(run.state.pods, key=lambda p: p.id):
            if p.endpoint is None or p.health == "exited":
                continue
            if p.id in run.stopping or (p.id in run.heals and p.health == "unhealthy"):
                state = "draining"
            elif p.ready:
                state = "ready"
            else:
                continue
            eps.append(Endpoint(pod=p.id, address=p.endpoint, state=state, node=p.node, revision=p.revision))
        slot = run.state.active_slot
        return EndpointSet(service=run.spec.name, version=run.state.endpoints_version, endpoints=eps,
                           stopped=run.service_stopped,
                           landed_until=slot.ends_at if slot is not None and slot.landed else None)

    def current(self) -> EndpointSet:
        """The routable pods as last published to the routers: what a router loads at start."""
        return self.run.published or self.endpoint_set()

    def due(self) -> bool:
        table = self.endpoint_set()
        return not table.same_pods(self.run.published) and (self.run.published is not None or bool(table.endpoints))

    async def loop(self) -> None:
        """Publish on every change of the routable set, wherever in the workflow it happens."""
        while True:
            await workflow.wait_condition(self.due)
            await self.publish()

    async def publish(self) -> None:
        """Send the current table to the routers, unless it is the one last sent. A failed push
        is the activity's to log: routers reload the full table on their own."""
        run = self.run
        table = self.endpoint_set()
        if table.same_pods(run.published):
            return
        # Milliseconds since the epoch, never backwards: newer than anything a previous run of
        # this service (a redeploy after an undeploy) published.
        run.state.endpoints_version = max(run.state.endpoints_version + 1, int(workflow.now().timestamp() * 1000))
        table.version = run.state.endpoints_version
        run.published = table
        ready = sum(1 for e in table.endpoints if e.state == "ready")
        try:
            await workflow.execute_activity_method(
                FeedActivities.publish_endpoints,
                table,
                task_queue=run.placement.control_task_queue,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary=f"endpoints v{table.version}: {ready} ready, {len(table.endpoints) - ready} draining",
            )
        except ActivityError as e:
            if isinstance(e.cause, CancelledError):
                raise  # the run is ending (continue-as-new): nothing to report
            workflow.logger.warning("endpoint feed: could not publish %s: %s", table.version, e)

    async def drain(self) -> None:
        """Publish the pods in ``stopping`` as draining, then give their in-flight requests
        up to ``spec.drain_s`` (less once every router is done with them) before anything stops them."""
        await self.publish()
        run = self.run
        until = workflow.now() + timedelta(seconds=run.spec.drain_s)
        with run.waiting("drain", f"routers to finish their requests to {len(run.stopping)} draining pod(s)",
                         until=until):
            await drain(run.placement, run.spec, sorted(run.stopping))
