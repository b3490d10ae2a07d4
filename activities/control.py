"""Control-plane activities (task queue ``hms-control``): scheduling, node loss, the
service-wide autoscaler, events, and the control plane's signatures (grants, tickets, stops).

Anyone who reaches Temporal can run these from a workflow of their own, so each one that acts
believes only a caller the server records as the service's own workflow (``activities.callers``)
or checks a signature of ours bound to exactly that act (SECURITY.md, "The trust rule")."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.callers import Caller, Callers, deny
from activities.fleetview import FleetView, pods_by_key
from activities.scaling import ScaleCheck
from hms_mgmt import auth, constants, names, nodeid, tickets
from hms_mgmt import secrets as secret_store
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied, ActivityErrorType, HmsError
from hms_mgmt.events import Event, EventSink, RefusalLog
from hms_mgmt.governance_config import load_governance_policy
from hms_mgmt.models import NodeRecord, NodeSpec, PodStatus, ServiceSpec, ServiceStatus, WaitingFor
from hms_mgmt.nodes import NotOurRegistry, node_registry
from hms_mgmt.nodes import ready_nodes as nodes_ready
from hms_mgmt.policy.autoscale import CpuSample
from hms_mgmt.policy.governance import evaluate
from hms_mgmt.policy.plan import first_replicas, plan_change, plan_placement, slot_edges
from hms_mgmt.policy.scheduler import NodeUsage, PlacementRequest, pick_nodes, placement_request
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import (
    AuthorizeInput,
    AuthorizeOutput,
    CapacityWaitsInput,
    CapacityWaitsOutput,
    DrainClaim,
    EventInput,
    GovernanceInput,
    GovernanceOutput,
    HealAttempt,
    NodeLost,
    NodesOutput,
    PickNodeInput,
    PickNodeOutput,
    PlanInput,
    PlanOutput,
    PodPlace,
    RoundGrantsInput,
    RoundGrantsOutput,
    SealInput,
    SealOutput,
    StartTicketInput,
    StopGrantInput,
    TicketInput,
    TicketOutput,
    WatchCpuInput,
    WatchHeartbeat,
    WatchResult,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
READ_CONCURRENCY = 16  # status queries in flight at once when the Scheduler reads the other services
BEHIND_READ_CONCURRENCY = 2  # the same, for a refresh in the background that no placement waits for


# What a grant may say (the claim its proof is made for) and the access-matrix action whose
# roles may hold it: an update, a rollback and a dry run are a deployer's.
CLAIM_ACTIONS = {"update": "deploy", "rollback": "deploy", "dry_run": "deploy"}


def _grant_identity(claims: dict[str, object]) -> auth.Identity:
    """The identity a grant names (its times are the grant's: the proof behind it was checked)."""
    at = datetime.fromtimestamp(float(claims.get("iat", 0)), UTC)  # type: ignore[arg-type]
    until = datetime.fromtimestamp(float(claims.get("exp", 0)), UTC)  # type: ignore[arg-type]
    role = claims.get("role")
    if role not in auth.ROLES:
        raise AccessDenied(f"the grant names an unknown role {role!r}")
    return auth.Identity(user=str(claims.get("sub")), role=role, issued_at=at, expires_at=until)  # type: ignore[arg-type]


def evicted(nodes: list[NodeRecord], node: str) -> bool:
    """Whether the registry's records hold ``node`` as Lost with its pods to be replaced."""
    return any(r.spec.name == node and r.state == "Lost" and not r.pods_kept for r in nodes)


class ControlActivities:
    def __init__(self, client: Client, settings: Callable[[], Settings], sink: EventSink,
                 callers: Callers | None = None) -> None:
        self.client = client
        self.settings = settings  # re-read on each call: an operator adds nodes without a restart
        self.sink = sink
        self.refusals = RefusalLog(sink)  # a registry impostor is read often: its refusals are capped
        self.callers = callers or Callers(client)
        self._reads: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._fleets: dict[str, FleetView] = {}  # task queue -> the other services' pods, as last read
        # service -> {the placing workflow's id: its wait}: placements waiting for room now, what
        # status().waiting_for shows (the service re-reads them on a ``capacity_changed`` hint)
        self._short: dict[str, dict[str, WaitingFor]] = {}

    async def _entitled(self, service: str, action: str, **data: object) -> Caller:
        """The calling run, if the server records it as ``service``'s own workflow (or its child)
        on our control queue; else an ``access.denied`` event naming it and a non-retryable refusal."""
        settings = await asyncio.to_thread(self.settings)
        try:
            return await self.callers.entitled(service, settings.task_queue)
        except AccessDenied as e:
            caller = await self.callers.current()
            await deny(self.sink, service, action, f"{action} refused: {e}", **data, **caller.data())

    @activity.defn(name="start_ticket")
    async def start_ticket(self, inp: StartTicketInput) -> TicketOutput:
        """A fresh, short-lived ticket to start one pod (this pod id, on this node) of an admitted
        revision, re-issued from the revision's own admission ticket, for the service's workflow only.

        The one place a pod start is authorized: a check that must hold *now*, at each start
        (heals and scale-ups come long after admission), goes here."""
        pods = [PodPlace(pod_id=inp.pod_id, node=inp.node)]
        return TicketOutput(ticket=(await self._start_tickets(inp, pods))[0])

    @activity.defn(name="start_tickets")
    async def start_tickets(self, inp: RoundGrantsInput) -> RoundGrantsOutput:
        """``start_ticket`` for every pod of a round: the caller and the revision's ticket are
        checked once, now, and each pod gets its own ticket (its id, its node)."""
        return RoundGrantsOutput(grants=await self._start_tickets(inp, inp.pods))

    async def _start_tickets(self, inp: StartTicketInput | RoundGrantsInput, pods: list[PodPlace]) -> list[str]:
        which = {"pod": ",".join(p.pod_id for p in pods), "node": pods[0].node, "revision": inp.revision}
        await self._entitled(inp.service, "start_ticket", **which)

        def issue() -> list[str]:  # one thread for the file reads and signatures: a start waits on this
            state_dir = self.settings().state_dir
            tickets.verify(state_dir, inp.ticket, service=inp.service, revision=inp.revision, spec=inp.spec,
                           image_id=inp.image_id)
            return [tickets.start_ticket(state_dir, service=inp.service, revision=inp.revision, spec=inp.spec,
                                         image_id=inp.image_id, pod_id=p.pod_id, node=p.node) for p in pods]

        try:
            return await asyncio.to_thread(issue)
        except AccessDenied as e:
            await deny(self.sink, inp.service, "start_ticket", f"pod {which['pod']} not started: {e}", **which)

    @activity.defn(name="seal_secrets")
    async def seal_secrets(self, inp: SealInput) -> SealOutput:
        """The spec's secrets for one pod start, sealed to the node's key (only it can open them)
        and signed, for the service's own workflow and an admitted revision only. Workflows
        carry the bundle and the names and versions; never a value (hms_mgmt/secrets.py)."""
        await self._entitled(inp.service, "seal_secrets", pod=inp.pod_id, node=inp.node, revision=inp.revision)
        settings = await asyncio.to_thread(self.settings)
        try:
            await asyncio.to_thread(tickets.verify, settings.state_dir, inp.ticket, service=inp.service,
                                    revision=inp.revision, spec=inp.spec, image_id=inp.image_id)
            node_key = await asyncio.to_thread(nodeid.node_public_key, settings.state_dir, inp.node)
            bundle, versions = await asyncio.to_thread(
                secret_store.seal, settings.state_dir, inp.spec.secrets, node_key, service=inp.service,
                revision=inp.revision, pod_id=inp.pod_id, node=inp.node)
        except (AccessDenied, HmsError) as e:
            await deny(self.sink, inp.service, "seal_secrets", f"pod {inp.pod_id} not started: {e}", pod=inp.pod_id,
                       node=inp.node, revision=inp.revision)
        return SealOutput(bundle=bundle, versions=versions)

    @activity.defn(name="stop_grant")
    async def stop_grant(self, inp: StopGrantInput) -> TicketOutput:
        """The control plane's signature on one stop (this pod of this service, on this node, for a
        few minutes), for the service's own workflow only: what a node's ``stop_pod`` checks."""
        await self._entitled(inp.service, "stop_grant", pod=inp.pod_id, node=inp.node)
        settings = await asyncio.to_thread(self.settings)
        grant = await asyncio.to_thread(tickets.stop_grant, settings.state_dir, service=inp.service,
                                        pod_id=inp.pod_id, node=inp.node)
        return TicketOutput(ticket=grant)

    def _fleet(self, task_queue: str) -> FleetView:
        """The other services' pods as this worker last read them, and the pods it placed since:
        one read of the fleet serves every placement for a while (``FleetView``), instead of each
        placement querying every service."""
        view = self._fleets.get(task_queue)
        if view is None:
            view = self._fleets[task_queue] = FleetView(
                lambda: self._read_services(task_queue),
                read_behind=lambda: self._read_services(task_queue, BEHIND_READ_CONCURRENCY))
        return view

    async def _other_services(self, exclude: str, task_queue: str, *, fresh: bool = False,
                              stale_ok: bool = False) -> list[ServiceStatus]:
        """Every other running service's status (``fresh``: from a read begun after this call;
        ``stale_ok``: from the last read, however old)."""
        statuses = await self._fleet(task_queue).services(fresh=fresh, stale_ok=stale_ok)
        skip = constants.service_workflow_id(exclude) if exclude else None
        return [st for wf_id, st in statuses if wf_id != skip]

    async def _shared(self, key: tuple[str, str], read: Callable[[], Awaitable[T]]) -> T:
        """Callers that ask for the same read while it is in flight get its one answer."""
        fut = self._reads.get(key)
        if fut is None:
            fut = asyncio.ensure_future(read())
            self._reads[key] = fut
            fut.add_done_callback(lambda done: self._reads.pop(key, None) if self._reads.get(key) is done else None)
        return await asyncio.shield(fut)  # one caller cancelled must not cancel the others' read

    async def _read_services(self, task_queue: str, concurrency: int = READ_CONCURRENCY) -> list[tuple[str, ServiceStatus]]:
        ids = [wf.id async for wf in self.client.list_workflows(names.running_services_query(task_queue))]
        gate = asyncio.Semaphore(concurrency)

        async def one(wf_id: str) -> tuple[str, ServiceStatus] | None:
            async with gate:
                try:
                    return wf_id, await self.client.get_workflow_handle(wf_id).query(names.Q.STATUS, result_type=ServiceStatus)
                except Exception as e:  # noqa: BLE001 - a service that cannot answer holds no capacity we know of
                    log.warning("could not read pods of %s: %s", wf_id, e)
                    return None

        return [r for r in await asyncio.gather(*(one(i) for i in ids)) if r is not None]

    async def _usage(self, service: str, spec: ServiceSpec, placed: list[PodStatus], nodes: list[NodeSpec], *,
                     fresh: bool = False, stale_ok: bool = False,
                     ) -> tuple[list[NodeSpec], dict[str, NodeUsage], tuple[FleetView, Counter[tuple[str, str]]]]:
        """The Ready nodes (or ``nodes``) and what is placed on each: ``placed`` (the service's
        own pods) and every other running service's pods, each at its spec's cpu and memory (the
        pods this worker placed since are added by ``_assume``); and the view with the pods it
        read per service and node."""
        settings = await asyncio.to_thread(self.settings)
        # The nodes and the other services' pods: two reads, at the same time.
        others = asyncio.ensure_future(self._other_services(service, settings.task_queue, fresh=fresh,
                                                            stale_ok=stale_ok))
        try:
            nodes = nodes or await self._shared(("nodes", settings.task_queue), lambda: self.ready_nodes(settings))
        except BaseException:
            others.cancel()
            raise
        usage = {n.name: NodeUsage(name=n.name, cpu=n.cpu, memory_mb=n.memory_mb, max_pods=n.max_pods,
                                   labels=n.labels) for n in nodes}

        def take(node: str, n: int, cpu: float, memory_mb: int, own: bool = False) -> None:
            if (u := usage.get(node)) is not None:
                u.used_pods, u.used_cpu, u.used_memory_mb = u.used_pods + n, u.used_cpu + n * cpu, u.used_memory_mb + n * memory_mb
                u.service_pods += n if own else 0

        for pod in placed:
            if pod.health != "exited":
                take(pod.node, 1, spec.cpu_limit or 0.0, spec.memory_mb or 0, own=True)
        statuses = await others
        for other in statuses:
            for pod in other.pods:
                if pod.health != "exited":
                    take(pod.node, 1, other.spec.cpu_limit or 0.0, other.spec.memory_mb or 0)
        return nodes, usage, (self._fleet(settings.task_queue), pods_by_key(statuses))

    @staticmethod
    def _assume(service: str, spec: ServiceSpec, usage: dict[str, NodeUsage],
                read: tuple[FleetView, Counter[tuple[str, str]]]) -> Callable[[list[str]], None]:
        """Add the pods this worker placed that the read does not show yet; the result books a
        placement made on this usage. No ``await`` between the two: placements see each other."""
        view, seen = read
        for node, n, cpu, memory_mb in view.assumed(seen, exclude=service):
            if (u := usage.get(node)) is not None:
                u.used_pods, u.used_cpu, u.used_memory_mb = u.used_pods + n, u.used_cpu + n * cpu, u.used_memory_mb + n * memory_mb
        request = placement_request(spec)
        return lambda picked: view.book(service, picked, seen, request.cpu, request.memory_mb)

    @staticmethod
    def _shortage(service: str, request: PlacementRequest, usage: dict[str, NodeUsage], missing: int) -> str:
        """Why ``missing`` pods fit nowhere: what each needs, and each node's room."""
        selector = ", ".join(f"{k}={v}" for k, v in sorted(request.node_selector.items()))
        return (
            f"no node has room for {missing} more pod(s) of {service} "
            f"(cpu {request.cpu:g}, memory {request.memory_mb} MB each"
            + (f", nodes labelled {selector}" if selector else "") + "); "
            + ("; ".join(f"{u.name}: {u.used_pods}/{u.max_pods} pods, cpu {u.used_cpu:g}/{u.cpu:g}"
                         for u in usage.values()) or "no Ready node")
        )

    @activity.defn(name="pick_node")
    async def pick_node(self, inp: PickNodeInput) -> PickNodeOutput:
        """The Scheduler: place ``count`` pods, spreading across nodes, then packing. No room is
        decided on a fresh read of the fleet, never on the view kept between placements."""
        # The reads start while the caller is checked (both are round trips to the server); an
        # unentitled caller is refused before anything read is used or returned. A heal places a
        # pod the last read still counts (its failed one): it goes on with that read, however old.
        heal = activity.info().workflow_type == names.HEAL_WORKFLOW
        reading = asyncio.ensure_future(self._usage(inp.service, inp.spec, inp.placed, inp.nodes, stale_ok=heal))
        try:
            caller = await self._entitled(inp.service, "pick_node")
        except BaseException:
            reading.cancel()
            raise
        request = placement_request(inp.spec)
        nodes, usage, seen = await reading
        book = self._assume(inp.service, inp.spec, usage, seen)
        picked = pick_nodes(list(usage.values()), request, inp.count)
        if None in picked:
            nodes, usage, seen = await self._usage(inp.service, inp.spec, inp.placed, inp.nodes, fresh=True)
            book = self._assume(inp.service, inp.spec, usage, seen)
            picked = pick_nodes(list(usage.values()), request, inp.count)
        missing = picked.count(None)
        if not (missing and inp.require_all):
            book([p for p in picked if p])  # no await since the usage was read: placements see each other
        else:  # refused: nothing placed, nothing booked
            info = activity.info()
            reason = self._shortage(inp.service, request, usage, missing)
            # A local first try is asked again as an activity: that one's first attempt alerts.
            if not info.is_local and (info.attempt == 1 or info.attempt % 20 == 0):
                await self.sink.publish(Event(type="capacity.alert", service=inp.service, reason=reason,
                                              data={"missing": missing, "attempt": info.attempt}))
            await self._waiting(inp.service, caller.workflow_id, reason)
            raise ApplicationError(reason, type=ActivityErrorType.CAPACITY_UNAVAILABLE)
        await self._waiting(inp.service, caller.workflow_id, None)
        by_name = {n.name: n for n in nodes}
        return PickNodeOutput(nodes=[by_name[p] if p else None for p in picked])

    async def _waiting(self, service: str, placer: str, reason: str | None) -> None:
        """Record that ``placer`` (a workflow of ``service``) waits for room, or no longer does;
        when that changes, hint the service to re-read its waits (``capacity_waits``)."""
        waits = self._short.setdefault(service, {})
        known = waits.get(placer)
        if reason is not None:
            waits[placer] = WaitingFor(kind="capacity", reason=reason, since=known.since if known else datetime.now(UTC))
        else:
            waits.pop(placer, None)
        if not waits:
            self._short.pop(service, None)
        if (known is None) == (reason is None):
            return  # it went on waiting, or never waited: nothing the service does not know
        try:
            await self.client.get_workflow_handle(constants.service_workflow_id(service)).signal(names.S.CAPACITY)
        except RPCError as e:
            log.warning("could not tell %s its capacity waits changed: %s", service, e.message)

    @activity.defn(name="capacity_waits")
    async def capacity_waits(self, inp: CapacityWaitsInput) -> CapacityWaitsOutput:
        """The placements of ``inp.service`` that wait for room now, each with what it needs: for
        the service's own workflow (``status().waiting_for``), read from the Scheduler itself."""
        await self._entitled(inp.service, "capacity_waits")
        waits = self._short.get(inp.service, {})
        for placer in list(waits):  # a placement cancelled while it waited says nothing: ask the server
            try:
                gone = (await self.client.get_workflow_handle(placer).describe()).status != WorkflowExecutionStatus.RUNNING
            except RPCError:
                gone = True
            if gone:
                waits.pop(placer, None)
        return CapacityWaitsOutput(waits=[waits[k] for k in sorted(waits)])

    async def ready_nodes(self, settings: Settings) -> list[NodeSpec]:
        """The Scheduler's nodes: the registry's Ready ones (from its run's memo: no query on a
        placement's path); the configured ones while no registry runs yet (a control plane from
        before the registry, or its very first start)."""
        try:
            ready = await self._from_registry(lambda: nodes_ready(self.client, settings))
        except WorkflowQueryFailedError:
            ready = None
        if ready is None:
            return await asyncio.to_thread(settings.node_specs)
        return ready

    async def _registry_nodes(self, settings: Settings) -> NodesOutput | None:
        """What the NodeRegistry holds, or None while no registry runs."""

        async def query() -> NodesOutput:
            handle = await node_registry(self.client, settings)
            return await handle.query(names.NR.NODES, result_type=NodesOutput)

        return await self._from_registry(query)

    async def _from_registry(self, read: Callable[[], Awaitable[T]]) -> T | None:
        """``read()`` of this control plane's registry, or None while none runs (or only an
        impostor does: as if none ran, the configured nodes, and no node called lost)."""
        try:
            return await read()
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
            return None
        except NotOurRegistry as e:
            await self.refusals.record("", str(e), action="read the node registry")
            return None

    @activity.defn(name="node_is_lost")
    async def node_is_lost(self, inp: NodeLost) -> bool:
        """Whether the NodeRegistry itself holds ``inp.node`` as Lost, its pods to be replaced: what
        a service checks before it believes a ``node_lost`` signal (anyone who reaches Temporal can
        send one). A node Lost with every node at once keeps its pods (``pods_kept``): the
        registry deliberately replaces nothing then, and neither does a signal."""
        settings = await asyncio.to_thread(self.settings)
        out = await self._registry_nodes(settings)
        if out is None:
            return False  # no registry runs: no node can have been declared lost
        return evicted(out.nodes, inp.node)

    @activity.defn(name="confirm_heal_attempt")
    async def confirm_heal_attempt(self, attempt: HealAttempt) -> bool:
        """Whether the calling service's own heal of ``attempt.failed_pod`` says it failed so (its
        ``attempts`` query, answered by a worker of ours): anyone who reaches Temporal can send
        ``heal_attempt_failed``. The heal must be a HealWorkflow on the control queue whose
        parent is the calling run."""
        info = activity.info()
        heal = names.heal_id(info.workflow_id, attempt.failed_pod)
        try:
            run = await self.client.get_workflow_handle(heal).describe()
            if (run.workflow_type != names.HEAL_WORKFLOW or run.task_queue != info.task_queue
                    or run.parent_id != info.workflow_id or run.parent_run_id != info.workflow_run_id):
                return False
            told = await self.client.get_workflow_handle(heal, run_id=run.run_id).query(
                names.Q.ATTEMPTS, result_type=list[HealAttempt])
        except (RPCError, WorkflowQueryFailedError):
            return False
        return attempt in told

    @activity.defn(name="confirm_draining")
    async def confirm_draining(self, claim: DrainClaim) -> list[str]:
        """Of ``claim.pods``, those the calling service's running rollout says it drains (its
        ``retiring`` query, answered by a worker of ours): anyone can send ``pods_draining``. The
        rollout must be a DeployWorkflow on the control queue whose parent is the calling run."""
        info = activity.info()
        try:
            run = await self.client.get_workflow_handle(claim.rollout_workflow_id).describe()
            if (run.workflow_type != names.DEPLOY_WORKFLOW or run.task_queue != info.task_queue
                    or run.parent_id != info.workflow_id or run.parent_run_id != info.workflow_run_id):
                return []
            told = await self.client.get_workflow_handle(claim.rollout_workflow_id, run_id=run.run_id).query(
                names.Q.RETIRING, result_type=list[str])
        except (RPCError, WorkflowQueryFailedError):
            return []
        return [p for p in claim.pods if p in set(told)]

    @activity.defn(name="notify_node_lost")
    async def notify_node_lost(self, inp: NodeLost) -> int:
        """Tell every running service with pods on the lost node (``node_lost`` signal); they
        replace those pods elsewhere. Returns how many services were told."""
        settings = await asyncio.to_thread(self.settings)
        caller = await self.callers.current()
        if (caller.workflow_type != names.NODE_REGISTRY_WORKFLOW or caller.task_queue != settings.task_queue
                or caller.workflow_id != constants.node_registry_id(settings.task_queue) or caller.reset):
            await deny(self.sink, "", "notify_node_lost", f"node.lost of {inp.node} refused: {caller} is not the "
                       "NodeRegistry", node=inp.node, **caller.data())
        told = 0
        for st in await self._other_services("", settings.task_queue, fresh=True) if inp.evict else []:
            if not any(p.node == inp.node for p in st.pods):
                continue
            try:
                await self.client.get_workflow_handle(st.workflow_id).signal(names.S.NODE_LOST, inp)
                told += 1
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:  # ended meanwhile: nothing to replace
                    raise
        await self.sink.publish(Event(type="node.lost", service="", reason=inp.reason,
                                      data={"node": inp.node, "services": told, "evicted": inp.evict}))
        return told

    @activity.defn(name="watch_cpu")
    async def watch_cpu(self, inp: WatchCpuInput) -> WatchResult:
        """The Auto-Scaler, once per service across all its nodes.

        Every ``scale_interval_s`` it reads the latest CPU samples each node's ``watch_pods``
        heartbeats (a describe of the service's workflow: no history events), merges them and
        runs the policy once; it returns only on a recommendation (two rounds agree) or after
        ``max_duration_s``, so a steady service costs nothing here."""
        spec = inp.spec
        scaler = ScaleCheck(spec, inp.current, inp.history, inp.at_max_reported)
        details = activity.info().heartbeat_details
        if details:  # a retry keeps the stabilisation window it had
            try:
                scaler.history = WatchHeartbeat.model_validate(details[0]).history or scaler.history
            except ValueError:
                pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + inp.max_duration_s
        wanted = set(inp.pods)
        seen_rounds: dict[str, int] = {}
        last_check = loop.time()
        samples: list[CpuSample] = []
        # Read twice per sampling interval: a node's new round is used soon after it lands,
        # and a round is counted once however often it is read.
        every = max(0.5, spec.scale_interval_s / 2)
        next_check = loop.time() + every
        while True:
            now = loop.time()
            if now >= deadline:
                return WatchResult(reason="timeout", samples=samples, history=scaler.history)
            if now >= next_check:
                next_check = max(next_check + every, now)
                merged, rounds = await self._node_samples(inp.workflow_id, wanted)
                fresh = [k for k in rounds if rounds[k] > seen_rounds.get(k, 0)]
                # A round is the policy's input once every node has sampled again (or, should a
                # node's watch be stuck, once two intervals passed), so a check does not mix one
                # node's new reading with another's from before a load step.
                if fresh and (len(fresh) == len(rounds) or now - last_check >= 2 * spec.scale_interval_s):
                    seen_rounds, last_check = rounds, now
                    samples = merged
                    verdict = scaler.check(samples, datetime.now(UTC))
                    if verdict is not None:
                        return WatchResult(reason=verdict[0], decision=verdict[1], samples=samples,
                                           history=scaler.history)
            activity.heartbeat(WatchHeartbeat(samples=samples, history=scaler.history))
            await asyncio.sleep(max(0.05, min(next_check - loop.time(), deadline - loop.time(), 1.0)))

    async def _node_samples(self, workflow_id: str, wanted: set[str]) -> tuple[list[CpuSample], dict[str, int]]:
        """The latest samples of the workflow's pending node watches, and each watch's round."""
        desc = await self.client.get_workflow_handle(workflow_id).describe()
        merged: dict[str, CpuSample] = {}
        rounds: dict[str, int] = {}
        for pending in desc.raw_description.pending_activities:
            if pending.activity_type.name != "watch_pods" or not pending.heartbeat_details.payloads:
                continue
            (beat,) = await self.client.data_converter.decode(pending.heartbeat_details.payloads[:1], [WatchHeartbeat])
            if beat.round == 0:
                continue
            rounds[pending.activity_id] = beat.round
            for sample in beat.samples:
                if sample.pod_id in wanted:
                    merged[sample.pod_id] = sample
        return [merged[p] for p in sorted(merged)], rounds

    @activity.defn(name="authorize")
    async def authorize(self, inp: AuthorizeInput) -> AuthorizeOutput:
        """Verify the caller's request proof (made with their token, bound to exactly this
        request) and role in the worker: a client check alone can be skipped. Allowed, the
        answer carries a grant — the verified identity, signed by the control plane — which is
        all the workflow keeps. A refusal is an answer, not an error, and an event."""
        settings = await asyncio.to_thread(self.settings)
        claim = inp.claim or inp.action  # what the proof asks for, and what the grant will say
        try:
            proven = await asyncio.to_thread(auth.verify_proof, inp.proof or None, action=claim,
                                             service=inp.service, bind=inp.bind, state_dir=settings.state_dir)
            identity = proven.identity
            await asyncio.to_thread(auth.take_proof, settings.state_dir, proven, activity.info().workflow_run_id)
            # The role is checked for what the grant will say, whatever action the caller names.
            needed = CLAIM_ACTIONS.get(claim, claim)
            if inp.action != needed:
                raise AccessDenied(f"a grant to {claim} is not given for a request to {inp.action}")
            matrix = await asyncio.to_thread(auth.load_access_matrix, settings.state_dir)
            if needed == "approve" and inp.requester is not None:
                auth.check_approver(identity, inp.requester, matrix)
            else:
                auth.authorize(identity, needed, matrix)
            # A grant to read logs is good for the one request (workflow run) that asked for it.
            bind = {**inp.bind, "run": activity.info().workflow_run_id} if claim == "logs" else inp.bind
            grant = await asyncio.to_thread(tickets.grant, settings.state_dir, action=claim,
                                            service=inp.service, user=identity.user, role=identity.role, bind=bind)
        except (AccessDenied, HmsError) as e:
            reason = str(e)
            # A proof of another request (a copied approval) is an access attempt, not a vote.
            judged = inp.action in ("approve", "reject") and not isinstance(e, auth.ProofMismatch)
            type_ = "approval.invalid" if judged else "access.denied"
            await self.sink.publish(Event(type=type_, service=inp.service, reason=f"{inp.action} refused: {reason}",
                                          data={"action": inp.action, "request_id": inp.request_id}))
            return AuthorizeOutput(allowed=False, reason=reason)
        return AuthorizeOutput(allowed=True, user=identity.user, role=identity.role, grant=grant)

    @activity.defn(name="check_governance")
    async def check_governance(self, inp: GovernanceInput) -> GovernanceOutput:
        settings = await asyncio.to_thread(self.settings)
        policy = await asyncio.to_thread(load_governance_policy, settings.state_dir)
        verdict = evaluate(inp.spec, policy)
        return GovernanceOutput(
            needs_approval=verdict.needs_approval,
            reasons=verdict.reasons,
            approval_timeout_s=min(policy.approval_timeout_s, inp.spec.approval_timeout_s),
        )

    @activity.defn(name="plan_deploy")
    async def plan_deploy(self, inp: PlanInput) -> PlanOutput:
        """A dry run's read-only checks, with the rules a deploy uses: governance, the spec's
        secrets, the Scheduler's placement with the room left on each node, and for a running
        service the change and its rollout plan. Only for a ``dry_run`` grant of this spec
        (``authorize`` issued it to a caller who may deploy). Writes nothing."""
        spec = inp.spec
        settings = await asyncio.to_thread(self.settings)
        try:
            claims = await asyncio.to_thread(tickets.check_grant, settings.state_dir, inp.grant, service=spec.name,
                                             actions={"dry_run"}, bind={"spec": spec.digest()})
            matrix = await asyncio.to_thread(auth.load_access_matrix, settings.state_dir)
            auth.authorize(_grant_identity(claims), "deploy", matrix)  # its holder may deploy, now
        except (AccessDenied, HmsError) as e:
            await deny(self.sink, spec.name, "plan_deploy", f"dry run refused: {e}")
        policy = await asyncio.to_thread(load_governance_policy, settings.state_dir)
        verdict = evaluate(spec, policy)
        out = PlanOutput(needs_approval=verdict.needs_approval, approval_reasons=verdict.reasons,
                         time_slots=slot_edges(spec, datetime.now(UTC)))
        try:
            await asyncio.to_thread(secret_store.check_spec, settings.state_dir, spec)
        except HmsError as e:
            out.secrets_problem, out.secrets_kind = str(e), e.kind
        running = await self._running_status(spec.name)
        count, placed = first_replicas(spec, datetime.now(UTC)), []
        if running is not None:
            out.change = plan_change(running, spec)
            if out.change.no_op:  # deploying the spec that runs changes nothing: nothing to approve
                out.needs_approval, out.approval_reasons = False, []
            rollout_plan = out.change.rollout
            count = rollout_plan.rounds[0].start if rollout_plan and rollout_plan.rounds else 0
            placed = [p for p in running.pods if p.health != "exited"]
        _, usage, seen = await self._usage(spec.name, spec, placed, [])
        self._assume(spec.name, spec, usage, seen)  # a dry run books nothing
        out.placement, out.pod_nodes = plan_placement(spec, usage, count)
        out.replicas, out.unplaced = count, out.pod_nodes.count(None)
        if out.unplaced:
            out.capacity = self._shortage(spec.name, placement_request(spec), usage, out.unplaced)
        return out

    async def _running_status(self, service: str) -> ServiceStatus | None:
        """The service's status while its workflow runs (not ended), else None."""
        handle = self.client.get_workflow_handle(constants.service_workflow_id(service))
        try:
            status = await handle.query(names.Q.STATUS, result_type=ServiceStatus)
        except (RPCError, WorkflowQueryFailedError):
            return None
        return None if status.phase in names.ENDED else status

    @activity.defn(name="issue_ticket")
    async def issue_ticket(self, inp: TicketInput) -> TicketOutput:
        """Admission's last step, redone where no workflow can skip it: the deployer may deploy,
        a spec over the governance limit carries a gov_approver's approval (not the deployer's),
        or is a rollback to a revision that was admitted before; the pinned content is still
        signed. Then the control plane signs the ticket every node checks before a pod starts."""
        await self._entitled(inp.service, "admit", revision=inp.revision)
        settings = await asyncio.to_thread(self.settings)
        try:
            await asyncio.to_thread(self._admit, settings, inp)
            ticket = await asyncio.to_thread(tickets.issue, settings.state_dir, service=inp.service,
                                             revision=inp.revision, spec=inp.spec, image_id=inp.image_id)
        except (AccessDenied, HmsError) as e:
            await self.sink.publish(Event(type="access.denied", service=inp.service,
                                          reason=f"admission ticket refused: {e}",
                                          data={"action": "admit", "revision": inp.revision}))
            raise ApplicationError(f"admission refused: {e}", type=ActivityErrorType.ACCESS_DENIED, non_retryable=True) from None
        return TicketOutput(ticket=ticket)

    @staticmethod
    def _admit(settings: Settings, inp: TicketInput) -> None:
        state_dir = settings.state_dir
        secret_store.check_spec(state_dir, inp.spec)  # its secrets exist; no env value is one of them
        matrix = auth.load_access_matrix(state_dir)
        policy = load_governance_policy(state_dir)
        verdict = evaluate(inp.spec, policy)
        # The deployer's grant waited, in the service's own workflow, for the image check and (over
        # the limit) the approval: it is good for as long as this spec lets those take.
        waited = inp.spec.image_verify_timeout_s + tickets.GRANT_TTL_S
        if verdict.needs_approval and not inp.prior_ticket:
            waited += min(policy.approval_timeout_s, inp.spec.approval_timeout_s)
        if inp.prior_ticket:
            deployer = tickets.check_grant(state_dir, inp.grant, service=inp.service, actions={"rollback"})
        else:
            deployer = tickets.check_grant(state_dir, inp.grant, service=inp.service, actions={"deploy", "update"},
                                           bind={"spec": inp.spec.digest()}, max_age_s=waited)
        auth.authorize(_grant_identity(deployer), "deploy", matrix)
        if inp.prior_ticket:
            tickets.verify(state_dir, inp.prior_ticket, service=inp.service, revision=inp.prior_revision or 0,
                           spec=inp.spec, image_id=inp.image_id)
        else:
            if verdict.needs_approval:
                if not inp.approval_grant:
                    raise AccessDenied("over the governance limit and not approved: " + "; ".join(verdict.reasons))
                # The approval waited, in the service's own workflow, for the image check: it is
                # good for as long as this spec lets that take.
                approval = tickets.check_grant(state_dir, inp.approval_grant, service=inp.service,
                                               actions={"approve"},
                                               bind={"spec": inp.spec.digest(), "revision": inp.revision},
                                               max_age_s=inp.spec.image_verify_timeout_s + tickets.GRANT_TTL_S)
                auth.check_approver(_grant_identity(approval), str(deployer["sub"]), matrix)
        ok, detail = TrustStore(state_dir).verify(inp.spec.image, inp.image_id)
        if not ok:
            raise AccessDenied(f"image {inp.spec.image} ({inp.image_id[:19]}) is not trusted: {detail}")

    @activity.defn(name="emit_event")
    async def emit_event(self, inp: EventInput) -> None:
        """Write an event for the service's own workflow. A run of our code that is not the
        service's (a child started on its own) may record only its own refusal, which names it."""
        settings = await asyncio.to_thread(self.settings)
        data = inp.data
        try:
            await self.callers.entitled(inp.service, settings.task_queue)
        except AccessDenied as e:
            ours = await self.callers.runs_our_code(settings.task_queue)
            caller = await self.callers.current()
            if ours is None or inp.type != "access.denied":
                await deny(self.sink, inp.service, "emit_event", f"event {inp.type} refused: {e}", event=inp.type,
                           **caller.data())
            data = {**inp.data, "workflow": caller.workflow_id}
        await self.sink.publish(Event(type=inp.type, service=inp.service, reason=inp.reason, data=data))

