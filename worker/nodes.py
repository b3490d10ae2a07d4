"""A node worker's membership: register with the NodeRegistry, heartbeat, remove stale pods.

A node that was Lost had its pods replaced elsewhere; when its worker registers again, the
pods it still runs that no service has on record are stale and are removed at once. Every
minute it also removes unknown pods older than the orphan grace (a crash at the wrong moment).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowQueryFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from activities.pods import ORPHAN_GRACE_S
from hms_mgmt import constants, names
from hms_mgmt.config import Settings
from hms_mgmt.models import NodeSpec, ServiceStatus
from hms_mgmt.nodeid import NodeIdentity
from hms_mgmt.runtimes import PodRuntime
from hms_mgmt.wire import NodeRegistration, NodeRegistryInput, RegisterResult
from workflows.nodes import NodeRegistry

log = logging.getLogger("hms.worker.node")

REGISTER_TIMEOUT_S = 30.0
SWEEP_EVERY_S = 60.0


class NodeAgent:
    """Keeps this node in the registry while the worker runs."""

    def __init__(self, client: Client, settings: Settings, spec: NodeSpec, runtime: PodRuntime,
                 settings_loader: Callable[[], Settings] | None = None, identity: NodeIdentity | None = None) -> None:
        self.client = client
        self.settings = settings
        self.settings_loader = settings_loader  # re-read each heartbeat: an operator resizes a node live
        self.spec = spec
        self.runtime = runtime
        self.identity = identity  # signs every registration and heartbeat (the registry checks)
        self.registration = NodeRegistration(spec=spec, worker=f"{socket.gethostname()}:{os.getpid()}",
                                             cert=identity.cert if identity else "")
        self.registry_id = constants.node_registry_id(settings.task_queue)
        self.registered = asyncio.Event()
        self._sweeping: asyncio.Task[list[str]] | None = None

    async def register(self) -> RegisterResult:
        """Update-with-start: the first worker of a control plane starts the registry, seeded
        with the static ``nodes:`` of its configuration."""
        s = self.settings
        seed = s.node_specs() if s.nodes else []
        start = WithStartWorkflowOperation(
            NodeRegistry.run,
            NodeRegistryInput(seed=seed, lost_after_s=s.node_lost_after_s, control_task_queue=s.task_queue),
            id=self.registry_id,
            task_queue=s.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary="the nodes pods may run on",
        )
        return await self.client.execute_update_with_start_workflow(
            NodeRegistry.register, self._signed("register"), start_workflow_operation=start
        )

    def _signed(self, kind: str) -> NodeRegistration:
        """The registration as it is now, signed by this node's key for ``kind``, fresh."""
        reg = self.registration
        if self.identity is None:
            return reg
        return reg.model_copy(update={"proof": self.identity.say(kind, reg.signed_part())})

    async def run(self) -> None:
        """Register, then heartbeat every ``node_heartbeat_s`` until cancelled."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SWEEP_EVERY_S
        while True:
            try:
                if not self.registered.is_set():
                    came_back = datetime.now(UTC)
                    result = await asyncio.wait_for(self.register(), REGISTER_TIMEOUT_S)
                    self.registered.set()
                    log.info("node %s registered (%s)%s", self.spec.name, self.registry_id,
                             ": it was lost, removing its stale pods" if result.was_lost else "")
                    if result.was_lost:
                        self._sweep_aside(started_before=came_back)
                else:
                    await self._refresh()
                    await self.client.get_workflow_handle(self.registry_id).signal(
                        NodeRegistry.heartbeat, self._signed("heartbeat"))
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + SWEEP_EVERY_S
                    self._sweep_aside()
            except asyncio.CancelledError:
                if self._sweeping is not None:
                    self._sweeping.cancel()
                raise
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:  # the registry ended: start it again
                    self.registered.clear()
                    continue
                log.warning("node %s: heartbeat failed: %s", self.spec.name, e)
            except Exception as e:  # noqa: BLE001 - keep heartbeating whatever one round hit
                log.warning("node %s: registration failed (is a control worker running?): %s", self.spec.name, e)
            await asyncio.sleep(self.settings.node_heartbeat_s)

    def _sweep_aside(self, *, started_before: datetime | None = None) -> None:
        """Sweep beside the heartbeat, never in its way: a sweep asks every service for its
        pods, which with many services on a busy control plane takes longer than the registry
        waits before it calls a silent node Lost (and replaces all its pods)."""
        if self._sweeping is not None and not self._sweeping.done():
            if started_before is None:
                return  # the one in flight will do
            self._sweeping.cancel()  # the node was lost: the stricter sweep replaces it
        self._sweeping = asyncio.ensure_future(self.sweep(started_before=started_before))
        self._sweeping.add_done_callback(self._swept)

    def _swept(self, task: asyncio.Task[list[str]]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("node %s: sweep failed: %s", self.spec.name, task.exception())

    async def _refresh(self) -> None:
        """The node as configured now (capacity, labels): a changed spec re-registers it."""
        if self.settings_loader is None:
            return
        try:
            current = await asyncio.to_thread(lambda: self.settings_loader().this_node(self.spec.runtime))  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - a bad edit of config.yaml keeps the last good spec
            log.warning("node %s: configuration not re-read: %s", self.spec.name, e)
            return
        if current.name == self.spec.name and current != self.spec:
            log.info("node %s: capacity or labels changed: %s", self.spec.name, current)
            self.spec = current
            self.registration = self.registration.model_copy(update={"spec": current})

    async def sweep(self, *, started_before: datetime | None = None) -> list[str]:
        """Remove this node's pods that no service has on record. With ``started_before``
        (the node was lost), every such pod started before then; otherwise only those older
        than the orphan grace, since a young one may be a start in flight."""
        handles = await asyncio.to_thread(self.runtime.list)
        now = datetime.now(UTC)
        known: dict[str, set[str] | None] = {}
        removed = []
        for h in handles:
            if h.service not in known:
                known[h.service] = await self._known_pods(h.service)
            pods = known[h.service]
            if pods is None or h.pod_id in pods:
                continue
            if started_before is not None:
                stale = h.started_at is None or h.started_at < started_before
            else:
                stale = h.started_at is None or (now - h.started_at).total_seconds() > ORPHAN_GRACE_S
            if stale:
                await asyncio.to_thread(self.runtime.stop, h.pod_id, 0)
                removed.append(h.pod_id)
                log.warning("node %s: removed stale pod %s of %s (no service has it on record)",
                            self.spec.name, h.pod_id, h.service)
        return removed

    async def _known_pods(self, service: str) -> set[str] | None:
        """The pod ids the service's workflow has on record; empty if it no longer runs;
        None when it cannot say (then nothing of it is removed)."""
        handle = self.client.get_workflow_handle(constants.service_workflow_id(service))
        try:
            status = await asyncio.wait_for(handle.query(names.Q.STATUS, result_type=ServiceStatus), 10)
        except RPCError as e:
            return set() if e.status == RPCStatusCode.NOT_FOUND else None
        except (WorkflowQueryFailedError, TimeoutError):
            return None
        if status.phase in names.ENDED:
            return set()
        return {p.id for p in status.pods}

    async def stop_all(self) -> int:
        """Stop every pod of this node (``sweep_on_exit``: a stack going down leaves none)."""
        handles = await asyncio.to_thread(self.runtime.list)
        await asyncio.gather(*(asyncio.to_thread(self.runtime.stop, h.pod_id, 2) for h in handles))
        if handles:
            log.info("node %s: stopped %d pod(s) on exit", self.spec.name, len(handles))
        return len(handles)
