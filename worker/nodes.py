"""A node worker's membership: register with the NodeRegistry, heartbeat, remove stale pods.

A node that was Lost had its pods replaced elsewhere; before its worker registers again, the
pods it still runs that no service has on record are stale and are removed, so the node is
given no work while it still runs them. A heartbeat that fails, or a registry that holds the
node as Lost, sends the worker through that path again. On a host that joined with a token,
the node's own events (a refused pod start, a sandbox warning) ride on its signed heartbeats
to the control host's event log. Every
minute (or three times as long as a sweep takes, on a large fleet) it also removes unknown
pods older than the orphan grace (a crash at the wrong moment),
and pods whose service has no running ServiceWorkflow (terminated from outside, ended): those
``orphan_grace_s`` after the node first saw them so, with a ``pod.orphaned`` event.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.pods import ORPHAN_GRACE_S, StoppedPods
from hms_mgmt import constants, names
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import Event, EventSink, read_events
from hms_mgmt.files import atomic_write
from hms_mgmt.joining import join_registry, new_request_id
from hms_mgmt.models import NodeSpec, ServiceStatus
from hms_mgmt.nodeid import NodeIdentity
from hms_mgmt.runtimes import PodRuntime
from hms_mgmt.wire import NodeRegistration, NodeRegistryInput, RegisterResult
from workflows.nodes import NodeRegistry

log = logging.getLogger("hms.worker.node")

REGISTER_TIMEOUT_S = 30.0
SWEEP_EVERY_S = 60.0
SWEEP_SHARE = 3  # a sweep waits at least this many times as long as the last one took
EVENTS_PER_BEAT = 20  # node events forwarded with one heartbeat (the rest wait for the next)
FORWARD_CURSOR = "forward-cursor.json"  # on a joined node: the last of its events a heartbeat carried
EVENTS_KEPT = 500  # node events waiting to be forwarded; the oldest go first when the control plane is away


class _Service(NamedTuple):
    """What a sweep learns of one service: whether its workflow runs (else ``how`` it is not),
    and the pods it has on record."""

    running: bool
    pods: set[str]
    how: str = "running"
    failed: frozenset[str] = frozenset()  # on record, but as exited (a lost node's, being replaced)


class NodeAgent:
    """Keeps this node in the registry while the worker runs."""

    def __init__(self, client: Client, settings: Settings, spec: NodeSpec, runtime: PodRuntime,
                 settings_loader: Callable[[], Settings] | None = None, events: EventSink | None = None,
                 identity: NodeIdentity | None = None) -> None:
        self.client = client
        self.events = events
        self._orphaned_since: dict[str, datetime] = {}  # pod id -> when a sweep first found its service not running
        self.settings = settings
        self.settings_loader = settings_loader  # re-read each heartbeat: an operator resizes a node live
        self.spec = spec
        self.runtime = runtime
        self.identity = identity  # signs every registration and heartbeat (the registry checks)
        self.registration = NodeRegistration(spec=spec, worker=f"{socket.gethostname()}:{os.getpid()}",
                                             cert=identity.cert if identity else "")
        self.registry_id = constants.node_registry_id(settings.task_queue)
        self.registered = asyncio.Event()
        self._served: dict[str, object] = {}
        self._sweeping: asyncio.Task[list[str]] | None = None
        self.outbox: collections.deque[Event] = collections.deque(maxlen=EVENTS_KEPT)  # to forward
        self.stopped = StoppedPods(settings.state_dir)  # a pod swept here starts no more on its ticket

    def forward(self, event: Event) -> None:
        """An event listener (any thread): this node's event, for the control host's log."""
        self.outbox.append(event)

    def resume_forwarding(self) -> int:
        """Queue the events of this node's log that no heartbeat carried yet (a worker stopped
        before they went: a refusal recorded just before a restart still reaches the control
        host). The first time, the log so far is taken as carried. Returns how many."""
        path = self.settings.state_dir / FORWARD_CURSOR
        events = list(read_events(self.settings.state_dir))
        try:
            last = json.loads(path.read_text())["id"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self._carried(events[-1].id if events else "")
            return 0
        ids = [e.id for e in events]
        pending = events[ids.index(last) + 1:] if last in ids else events  # rotated out: all it still has
        self.outbox.extend(pending[-EVENTS_KEPT:])
        return len(pending[-EVENTS_KEPT:])

    def _carried(self, event_id: str) -> None:
        atomic_write(self.settings.state_dir / FORWARD_CURSOR, json.dumps({"id": event_id}))

    def advertise(self, **fields: object) -> None:
        """What the worker serves beside its pods (``log_port``): part of every registration."""
        self._served.update(fields)
        self.spec = self.spec.model_copy(update=self._served)
        self.registration = self.registration.model_copy(update={"spec": self.spec})

    async def register(self) -> RegisterResult:
        """Join (signal-with-start: the first worker of a control plane starts the registry,
        seeded with the static ``nodes:`` of its configuration) and wait for the answer."""
        s = self.settings
        seed = s.node_specs() if s.nodes else []
        signed = self._signed("register").model_copy(update={"request_id": new_request_id()})
        answer = await join_registry(
            self.client, workflow=names.NODE_REGISTRY_WORKFLOW, registry_id=self.registry_id, task_queue=s.task_queue,
            start_input=NodeRegistryInput(seed=seed, lost_after_s=s.node_lost_after_s, control_task_queue=s.task_queue),
            registration=signed, summary="the nodes pods may run on")
        assert answer.node is not None
        return answer.node

    def _signed(self, kind: str, events: list[Event] | None = None) -> NodeRegistration:
        """The registration as it is now (with ``events`` to forward), signed by this node's key
        for ``kind``, fresh."""
        reg = self.registration.model_copy(update={"events": events or []})
        if self.identity is None:
            return reg
        return reg.model_copy(update={"proof": self.identity.say(kind, reg.signed_part())})

    async def _heartbeat(self) -> None:
        """One signed heartbeat, carrying the oldest events waiting; sent, they leave the outbox."""
        events = list(self.outbox)[:EVENTS_PER_BEAT]
        await self.client.get_workflow_handle(self.registry_id).signal(
            NodeRegistry.heartbeat, self._signed("heartbeat", events))
        for _ in events:
            self.outbox.popleft()
        if events:
            await asyncio.to_thread(self._carried, events[-1].id)

    async def _state_in_registry(self, *, timeout_s: float | None = None) -> str | None:
        """This node's state as the registry holds it (None: it does not know the node, or no
        registry runs); "Lost (pods kept)" for a node lost with every other one (nothing of it
        was replaced, so it has no stale pod to remove)."""
        try:
            out = await self.client.get_workflow_handle(self.registry_id).query(
                NodeRegistry.nodes, rpc_timeout=timedelta(seconds=timeout_s) if timeout_s else None)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        rec = next((r for r in out.nodes if r.spec.name == self.spec.name), None)
        if rec is None:
            return None
        return "Lost (pods kept)" if rec.state == "Lost" and rec.pods_kept else rec.state

    async def _join(self) -> RegisterResult:
        """(Re)join: a node the registry holds as Lost first removes the pods no service has on
        record any more (they were replaced elsewhere), then registers."""
        came_back = datetime.now(UTC)
        if await self._state_in_registry() == "Lost":
            if self._sweeping is not None:
                self._sweeping.cancel()
            removed = await self.sweep(started_before=came_back)
            log.info("node %s was lost: removed %d stale pod(s) before registering", self.spec.name, len(removed))
        result = await asyncio.wait_for(self.register(), REGISTER_TIMEOUT_S)
        self.registered.set()
        self._checked_at = asyncio.get_running_loop().time()
        log.info("node %s registered (%s)%s", self.spec.name, self.registry_id,
                 ": it was lost, removing its stale pods" if result.was_lost else "")
        if result.was_lost:  # lost between the check and the registration: sweep now
            self._sweep_aside(started_before=came_back)
        return result

    async def _still_ready(self) -> None:
        """Once per grace, ask whether the registry still holds this node Ready: one that was
        called Lost while its heartbeats went out (a registry stalled, a slow network) joins again."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < self.settings.node_lost_after_s:
            return
        self._checked_at = loop.time()
        try:  # never long in the heartbeat's way: a control plane too busy to answer is asked next time
            state = await self._state_in_registry(timeout_s=min(1.0, self.settings.node_heartbeat_s / 2))
        except (RPCError, WorkflowQueryFailedError, TimeoutError) as e:
            log.debug("node %s: could not ask the registry for its state: %s", self.spec.name, e)
            return
        if state == "Lost":
            log.warning("node %s: the registry holds it as Lost: joining again", self.spec.name)
            self.registered.clear()

    _checked_at = 0.0

    async def run(self) -> None:
        """Register, then heartbeat every ``node_heartbeat_s`` until cancelled."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.sweep_every_s
        while True:
            try:
                if not self.registered.is_set():
                    await self._join()
                else:
                    await self._refresh()
                    await self._heartbeat()
                    await self._still_ready()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.sweep_every_s
                    self._sweep_aside()
            except asyncio.CancelledError:
                if self._sweeping is not None:
                    self._sweeping.cancel()
                raise
            except RPCError as e:
                # Not found: the registry ended, start it again. Otherwise the node may have been
                # called Lost meanwhile: it joins again (stale pods first) once it gets through.
                self.registered.clear()
                if e.status == RPCStatusCode.NOT_FOUND:
                    continue
                log.warning("node %s: heartbeat failed: %s", self.spec.name, e)
            except AccessDenied as e:  # not enrolled, revoked, or a second worker for this node
                self.registered.clear()
                log.error("node %s: registration refused: %s", self.spec.name, e)
            except Exception as e:  # noqa: BLE001 - keep heartbeating whatever one round hit
                self.registered.clear()
                log.warning("node %s: registration failed (is a control worker running?): %s", self.spec.name, e)
            await asyncio.sleep(self.settings.node_heartbeat_s)

    _sweep_took = 0.0  # how long the last sweep took (s)

    @property
    def sweep_every_s(self) -> float:
        """Often enough that an orphan goes within about twice the grace; at most once a minute;
        and no more than a ``SWEEP_SHARE`` of the time: a sweep asks every service with pods here
        for its status, 500 queries at 500 services, each a workflow task of the control worker."""
        return max(min(SWEEP_EVERY_S, max(self.settings.orphan_grace_s / 2, 0.5)), SWEEP_SHARE * self._sweep_took)

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
            current = current.model_copy(update=self._served)
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
        than the orphan grace, since a young one may be a start in flight. A pod whose service
        has no running workflow goes ``orphan_grace_s`` after a sweep first saw it so: a
        workflow that runs, however young, keeps its pods to the rules above."""
        began = time.monotonic()
        handles = await asyncio.to_thread(self.runtime.list)
        now = datetime.now(UTC)
        known: dict[str, _Service | None] = {}
        removed: list[str] = []
        orphans: set[str] = set()
        for h in handles:
            if h.service not in known:
                known[h.service] = await self._service(h.service)
            svc = known[h.service]
            # Once lost, a pod the service holds as exited is stale too: its replacement runs elsewhere.
            if svc is None or (h.pod_id in svc.pods and (started_before is None or h.pod_id not in svc.failed)):
                continue
            if not svc.running:
                orphans.add(h.pod_id)
                since = self._orphaned_since.setdefault(h.pod_id, now)
                if (now - since).total_seconds() < self.settings.orphan_grace_s:
                    continue
                why = (f"its service has no running workflow ({constants.service_workflow_id(h.service)} "
                       f"is {svc.how}) for {self.settings.orphan_grace_s:g} s")
            elif started_before is not None:
                if h.started_at is not None and h.started_at >= started_before:
                    continue
                why = "its service replaced it elsewhere (the node was lost)"
            else:
                if h.started_at is not None and (now - h.started_at).total_seconds() <= ORPHAN_GRACE_S:
                    continue
                why = "no service has it on record"
            await asyncio.to_thread(self._stop, h.pod_id, h.service, 0)
            removed.append(h.pod_id)
            log.warning("node %s: removed stale pod %s of %s: %s", self.spec.name, h.pod_id, h.service, why)
            await self._orphaned(h.service, h.pod_id, why)
        self._orphaned_since = {p: t for p, t in self._orphaned_since.items() if p in orphans and p not in removed}
        self._sweep_took = time.monotonic() - began
        return removed

    async def _orphaned(self, service: str, pod_id: str, why: str) -> None:
        if self.events is not None:
            await self.events.publish(Event(type="pod.orphaned", service=service, reason=f"removed pod {pod_id}: {why}",
                                            data={"pod": pod_id, "node": self.spec.name}))

    async def _service(self, service: str) -> _Service | None:
        """Whether the service's workflow runs (its latest run, from Temporal itself) and the pod
        ids it has on record (none once its phase has ended); None when it cannot say (then
        nothing of it is removed)."""
        handle = self.client.get_workflow_handle(constants.service_workflow_id(service))
        try:
            desc = await asyncio.wait_for(handle.describe(), 10)
        except RPCError as e:
            return _Service(False, set(), "not found") if e.status == RPCStatusCode.NOT_FOUND else None
        except TimeoutError:
            return None
        if desc.status != WorkflowExecutionStatus.RUNNING:
            if desc.status in (None, WorkflowExecutionStatus.CONTINUED_AS_NEW):
                return None  # between two runs: ask again next sweep
            return _Service(False, set(), desc.status.name.lower().replace("_", " "))
        try:
            status = await asyncio.wait_for(handle.query(names.Q.STATUS, result_type=ServiceStatus), 10)
        except RPCError as e:
            return _Service(False, set(), "not found") if e.status == RPCStatusCode.NOT_FOUND else None
        except (WorkflowQueryFailedError, TimeoutError):
            return None
        if status.phase in names.ENDED:
            return _Service(True, set())
        return _Service(True, {p.id for p in status.pods}, failed=frozenset(p.id for p in status.pods
                                                                     if p.health == "exited"))

    def _stop(self, pod_id: str, service: str, grace_s: float) -> None:
        self.stopped.mark(pod_id, service)
        self.runtime.stop(pod_id, grace_s)

    async def stop_all(self) -> int:
        """Stop every pod of this node (``sweep_on_exit``: a stack going down leaves none)."""
        handles = await asyncio.to_thread(self.runtime.list)
        await asyncio.gather(*(asyncio.to_thread(self._stop, h.pod_id, h.service, 2) for h in handles))
        if handles:
            log.info("node %s: stopped %d pod(s) on exit", self.spec.name, len(handles))
        return len(handles)
