"""Pieces the workflows share: activity options and the start-and-wait-ready step.

Deterministic code only: no I/O, no clock, no randomness but ``workflow.*``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from activities.enrolment import NodeTrustActivities
    from activities.feed import FeedActivities
    from activities.pods import PodActivities
    from hms_mgmt import constants, errors
    from hms_mgmt.errors import ActivityErrorType
    from hms_mgmt.models import (
        DrainInput,
        EventInput,
        NodeSpec,
        PickNodeInput,
        Placement,
        PodStatus,
        ServiceSpec,
        StartPodInput,
        StartTicketInput,
        StopGrantInput,
        StopPodInput,
        TicketOutput,
    )
    from hms_mgmt.names import service_workflow_id
    from hms_mgmt.wire import PodPlace, PodReportCheck, RoundGrantsInput, SealInput, StampInput

# Failures no retry will fix: the pod itself is bad. The caller decides (replace, back off).
POD_FATAL = list(errors.POD_FATAL)
SIGNED_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=10), non_retryable_error_types=[ActivityErrorType.ACCESS_DENIED])
POD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
                        non_retryable_error_types=POD_FATAL)
POD_HEARTBEAT = timedelta(seconds=10)
# A node's worker takes a pod task within this, or the node is gone (its worker stopped, the
# node Lost): the task fails instead of waiting in the queue forever.
NODE_PICKUP = timedelta(seconds=60)

Report = Callable[[PodStatus], Awaitable[None]]

# patch: each pod start carries the control plane's fresh word that its image is trusted now
TRUST_STAMP = "trust-stamp"
# patch: a drain ends once every router confirms it is done with the pods (else after drain_s)
DRAIN_CONFIRMED = "drain-confirmed"
# patch: each stop carries the control plane's signature on it; each start a fresh ticket for that pod
SIGNED_STOP = "signed-stop"
START_TICKET = "start-ticket"
GRANTS_AT_ONCE = "start-grants-at-once"  # patch: the trust stamp and the start ticket asked together
# patch: a spec's secrets travel to the pod's node sealed for it (asked only when the spec names some)
POD_SECRETS = "pod-secrets"
# patch: a first rollout places its pods with a local activity first and asks the stamps and start
# tickets of the whole round in one go (two local activities, not two per pod)
ROUND_GRANTS = "round-grants"
# patch: a start_pod result is believed only as its node's signed report on that very pod
CHECKED_STARTS = "checked-starts"
MAX_DRAIN_ASK = 256  # pods one await_drained asks about (DrainInput's bound); more: the timer


async def drain(placement: Placement, spec: ServiceSpec, pods: list[str], *, max_s: float | None = None) -> None:
    """Give ``pods`` (already published as draining) up to ``max_s`` (default ``spec.drain_s``)
    for their in-flight requests: less when every router says it sends them nothing and has
    nothing in flight to them (``await_drained``), all of it when that cannot be confirmed."""
    limit = spec.drain_s if max_s is None else max_s
    if limit <= 0 or not pods:
        return
    if not workflow.patched(DRAIN_CONFIRMED) or len(pods) > MAX_DRAIN_ASK:
        await workflow.sleep(timedelta(seconds=limit), summary=f"drain {limit:g}s")
        return
    start = workflow.now()
    try:
        result = await workflow.execute_activity_method(
            FeedActivities.await_drained,
            DrainInput(service=spec.name, pods=pods, max_s=limit),
            task_queue=placement.control_task_queue,
            schedule_to_close_timeout=timedelta(seconds=limit + 10),
            heartbeat_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=1),
            summary=f"drain: until routers are done with {len(pods)} pod(s), at most {limit:g}s",
        )
        if result.confirmed:
            return
    except ActivityError as e:
        if isinstance(e.cause, CancelledError):
            raise
        workflow.logger.warning("drain of %s not confirmed: %s", pods, e)
    left = limit - (workflow.now() - start).total_seconds()
    if left > 0:
        await workflow.sleep(timedelta(seconds=left), summary=f"drain {left:.1f}s (routers did not confirm)")


def node_queue(placement: Placement, node: str) -> str:
    """The task queue of ``node``'s worker: the one its NodeSpec names, else the rule
    ``constants.node_task_queue`` (a node that has left the config still has pods to stop)."""
    for n in placement.nodes:
        if n.name == node:
            return n.task_queue
    return constants.node_task_queue(node, placement.node_queue_prefix)


def error_type(err: BaseException) -> str | None:
    """The ApplicationError type at the root of an activity or child failure."""
    cause: BaseException | None = err
    while isinstance(cause, (ActivityError, ChildWorkflowError)):
        cause = cause.cause
    return cause.type if isinstance(cause, ApplicationError) else None


def proof_jti(proof: str) -> str:
    """The one-time id a request proof names, read without verifying it (the ``authorize``
    activity verifies); "" when there is none. Lets a workflow refuse a proof it has seen."""
    try:
        part = proof.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return ""
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti[:64] if isinstance(jti, str) else ""


def error_message(err: BaseException) -> str:
    cause: BaseException | None = err
    while isinstance(cause, (ActivityError, ChildWorkflowError)) and cause.cause is not None:
        cause = cause.cause
    return str(cause)


def own_continuation() -> bool:
    """Whether this run is this workflow's own continue-as-new, the one way state may be handed
    to it. The server also names a previous run (``continued_run_id``) in a cron run and in a
    retry, and both get the first run's input again: anyone who reaches Temporal can start a
    workflow with ``--cron`` or a retry policy, so such a run's input is the outsider's."""
    info = workflow.info()
    return info.continued_run_id is not None and not info.cron_schedule and info.attempt == 1


async def require_parent(kind: str, service: str) -> None:
    """Children run only under their service's workflow: one started on its own (say, with the
    Temporal CLI) ends at once, refused, with an ``access.denied`` event and no pod started."""
    if workflow.info().parent is not None:
        return
    reason = f"{kind} started on its own (not by {service_workflow_id(service)}): refused, nothing started"
    await workflow.execute_activity_method(
        ControlActivities.emit_event,
        EventInput(type="access.denied", service=service, reason=reason, data={"workflow": workflow.info().workflow_id}),
        task_queue=workflow.info().task_queue,
        start_to_close_timeout=timedelta(seconds=30),
    )
    raise ApplicationError(reason, type=ActivityErrorType.ACCESS_DENIED, non_retryable=True)


async def emit(placement: Placement, type_: str, service: str, reason: str, **data: object) -> None:
    await workflow.execute_activity_method(
        ControlActivities.emit_event,
        EventInput(type=type_, service=service, reason=reason, data=data),
        task_queue=placement.control_task_queue,
        start_to_close_timeout=timedelta(seconds=30),
        summary=f"{type_}: {reason}"[:200],
    )


async def control_activity(activity: Callable[..., Awaitable[Any]], inp: object, *, task_queue: str, local: bool,
                           timeout: timedelta, summary: str, retry_policy: RetryPolicy | None = None) -> Any:
    """A control activity for a workflow that runs on the control queue: as a local activity
    (the worker running the workflow answers, with no round trip through the server) or, for
    histories recorded before, as the activity it was."""
    if local:
        return await workflow.execute_local_activity_method(activity, inp, start_to_close_timeout=timeout,
                                                            retry_policy=retry_policy, summary=summary)
    return await workflow.execute_activity_method(activity, inp, task_queue=task_queue, start_to_close_timeout=timeout,
                                                  retry_policy=retry_policy, summary=summary)


async def pick_nodes(
    placement: Placement,
    spec: ServiceSpec,
    count: int,
    placed: list[PodStatus],
    *,
    require_all: bool,
    local_first: bool = False,
) -> list[NodeSpec | None]:
    """Ask the Scheduler. With ``require_all`` it raises CapacityUnavailable (and emits
    ``capacity.alert``) until every pod fits, and the retry policy keeps asking: the
    service waits for capacity instead of failing.

    ``local_first`` (a workflow on the control queue): ask once as a local activity, with no
    round trip through the server; only when that fails (no room yet, a read failed) is it
    asked as an activity that retries, so a long wait for room adds no events meanwhile."""
    inp = PickNodeInput(service=spec.name, spec=spec, nodes=[], count=count, placed=placed, require_all=require_all)
    if local_first:
        try:
            result = await workflow.execute_local_activity_method(
                ControlActivities.pick_node, inp, start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=1), summary=f"place {count} pod(s)")
            return result.nodes
        except ActivityError as e:
            if isinstance(e.cause, CancelledError):
                raise
    result = await workflow.execute_activity_method(
        ControlActivities.pick_node,
        inp,
        task_queue=placement.control_task_queue,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=RetryPolicy(
            initial_interval=timedelta(seconds=1),
            maximum_interval=timedelta(seconds=placement.capacity_retry_max_s),
        ),
        summary=f"place {count} pod(s)",
    )
    return result.nodes


async def signed(activity: Callable[[ControlActivities, Any], Awaitable[TicketOutput]], inp: object,
                 summary: str) -> str:
    """The control worker's signature on one act of this service's (a stop grant, a start
    ticket): it signs only for the service's own workflow and its children (our control queue)."""
    out = await workflow.execute_activity_method(
        activity,
        inp,
        task_queue=workflow.info().task_queue,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=SIGNED_RETRY,
        summary=summary,
    )
    return out.ticket


async def stop_pod(spec: ServiceSpec, pod: PodStatus, task_queue: str, *, grace_s: float | None = None,
                   schedule_to_start: timedelta | None = None) -> None:
    """Stop and remove one pod on its node. ``schedule_to_start`` bounds the wait for the
    node's worker to pick it up (a lost node's may never come back)."""
    signing = workflow.patched(SIGNED_STOP)

    async def once() -> None:
        grant = ""
        if signing:
            grant = await signed(ControlActivities.stop_grant,
                                 StopGrantInput(service=spec.name, pod_id=pod.id, node=pod.node),
                                 f"sign: stop {pod.id[:8]}")
        await workflow.execute_activity_method(
            PodActivities.stop_pod,
            StopPodInput(pod_id=pod.id, grace_s=spec.stop_grace_s if grace_s is None else grace_s,
                         service=spec.name, node=pod.node, grant=grant),
            task_queue=task_queue,
            schedule_to_start_timeout=schedule_to_start,
            start_to_close_timeout=timedelta(seconds=spec.stop_grace_s + 60),
            heartbeat_timeout=POD_HEARTBEAT,
            retry_policy=POD_RETRY,
            summary=f"stop {pod.id[:8]}",
        )

    try:
        await once()
    except ActivityError as e:
        if error_type(e) != ActivityErrorType.GRANT_EXPIRED:
            raise
        await once()  # its node took the stop only after the grant's minutes (a worker restarting)


async def start_and_wait(
    spec: ServiceSpec, revision: int, pod_id: str, node: NodeSpec, report: Report, *, image_id: str = "",
    ticket: str = "", min_ready_s: float = 0.0, grants: tuple[str, str] | None = None,
) -> PodStatus:
    """Start one pod on its node and wait until it answers its health path (and, with
    ``min_ready_s``, has kept running and answering that long since it first did).
    ``grants``: its (trust stamp, start ticket) when the round asked them already (``round_grants``).

    Raises the activity error when the pod cannot become ready; the pod is stopped first so
    nothing of it is left behind.
    """
    admitted = ticket
    if grants is None:
        grants = await start_grants(spec, revision, pod_id, node, image_id=image_id, ticket=ticket)
    stamp, ticket = grants
    sealed = await seal_secrets(spec, revision, pod_id, node, image_id=image_id, ticket=admitted)
    try:
        ready = await workflow.execute_activity_method(
            PodActivities.start_pod,
            StartPodInput(pod_id=pod_id, service=spec.name, revision=revision, node=node.name, spec=spec,
                          image_id=image_id, ticket=ticket, min_ready_s=min_ready_s, stamp=stamp, secrets=sealed),
            task_queue=node.task_queue,
            schedule_to_start_timeout=NODE_PICKUP,
            start_to_close_timeout=timedelta(seconds=120 + spec.ready_timeout_s + min_ready_s),
            heartbeat_timeout=POD_HEARTBEAT,
            retry_policy=POD_RETRY,
            summary=f"start {pod_id[:8]} on {node.name}",
        )
        if workflow.patched(CHECKED_STARTS):
            await control_activity(
                NodeTrustActivities.check_started_pod,
                PodReportCheck(service=spec.name, pod=ready, recorded_node=node.name, asked_pod=pod_id),
                task_queue=workflow.info().task_queue, local=True, timeout=timedelta(seconds=30),
                summary=f"check {node.name}'s word on {pod_id[:8]}")
    except (ActivityError, asyncio.CancelledError):
        failed = PodStatus(id=pod_id, node=node.name, revision=revision, image=spec.image, health="exited")
        try:
            await asyncio.shield(stop_pod(spec, failed, node.task_queue, grace_s=0, schedule_to_start=NODE_PICKUP))
        except ActivityError as e:  # its node is gone: its worker removes the pod when back
            workflow.logger.warning("pod %s on %s not stopped: %s", pod_id, node.name, error_message(e))
        raise
    await report(ready)
    return ready


async def start_grants(spec: ServiceSpec, revision: int, pod_id: str, node: NodeSpec, *, image_id: str,
                       ticket: str) -> tuple[str, str]:
    """(trust stamp, start ticket) for one pod start, both from the control worker.

    Asked now, not at admission: heals and scale-ups start pods long after it, and a revocation
    on the control host must stop them on every host (no node keeps a trust store). The
    revision's ticket is the record that it was admitted; the node takes only a ticket for this
    pod. Neither needs the other, so both are asked at once (GRANTS_AT_ONCE)."""

    stamp_in = StampInput(service=spec.name, revision=revision, spec=spec, image_id=image_id, ticket=ticket,
                          pod_id=pod_id, node=node.name)
    ticket_in = StartTicketInput(service=spec.name, revision=revision, spec=spec, image_id=image_id, ticket=ticket,
                                 pod_id=pod_id, node=node.name)
    retry = RetryPolicy(maximum_interval=timedelta(seconds=10), non_retryable_error_types=POD_FATAL)

    async def stamp() -> str:
        return (await workflow.execute_activity_method(
            NodeTrustActivities.stamp_start, stamp_in,
            task_queue=workflow.info().task_queue,  # children run on the control queue
            start_to_close_timeout=timedelta(seconds=30), retry_policy=retry,
            summary=f"trust stamp for {pod_id[:8]}",
        )).stamp

    async def start_ticket() -> str:
        return await signed(ControlActivities.start_ticket, ticket_in, f"ticket: start {pod_id[:8]} on {node.name}")

    if workflow.patched(GRANTS_AT_ONCE):
        # Local activities: the control worker that runs this workflow signs, with no round trip
        # through the server (a rollout's pods all ask at the same moment).
        workflow.patched(TRUST_STAMP)
        workflow.patched(START_TICKET)
        got = await asyncio.gather(
            workflow.execute_local_activity_method(NodeTrustActivities.stamp_start, stamp_in,
                                                   start_to_close_timeout=timedelta(seconds=30), retry_policy=retry,
                                                   summary=f"trust stamp for {pod_id[:8]}"),
            workflow.execute_local_activity_method(ControlActivities.start_ticket, ticket_in,
                                                   start_to_close_timeout=timedelta(seconds=30), retry_policy=SIGNED_RETRY,
                                                   summary=f"ticket: start {pod_id[:8]} on {node.name}"),
        )
        return got[0].stamp, got[1].ticket
    got_stamp = await stamp() if workflow.patched(TRUST_STAMP) else ""
    return got_stamp, (await start_ticket() if workflow.patched(START_TICKET) else ticket)


async def round_grants(spec: ServiceSpec, revision: int, pods: list[tuple[str, NodeSpec]], *, image_id: str,
                       ticket: str) -> list[tuple[str, str]]:
    """``start_grants`` for every pod of a round at once, in the order given: the control worker
    checks the revision's ticket, the caller and the image's trust once, now, and signs a stamp
    and a start ticket per pod (each bound to its pod id and node, as one at a time)."""
    inp = RoundGrantsInput(service=spec.name, revision=revision, spec=spec, image_id=image_id, ticket=ticket,
                           pods=[PodPlace(pod_id=p, node=n.name) for p, n in pods])
    retry = RetryPolicy(maximum_interval=timedelta(seconds=10), non_retryable_error_types=POD_FATAL)
    summary = f"{len(pods)} pod(s)"
    stamps, starts = await asyncio.gather(
        workflow.execute_local_activity_method(NodeTrustActivities.stamp_round, inp,
                                               start_to_close_timeout=timedelta(seconds=30), retry_policy=retry,
                                               summary=f"trust stamps for {summary}"),
        workflow.execute_local_activity_method(ControlActivities.start_tickets, inp,
                                               start_to_close_timeout=timedelta(seconds=30), retry_policy=SIGNED_RETRY,
                                               summary=f"tickets: start {summary}"),
    )
    return list(zip(stamps.grants, starts.grants, strict=True))


async def seal_secrets(spec: ServiceSpec, revision: int, pod_id: str, node: NodeSpec, *, image_id: str,
                       ticket: str) -> str:
    """The spec's secrets sealed by the control worker for this pod on ``node`` ("" when it names
    none: a spec without secrets issues exactly the commands it did before secrets existed).
    History holds the sealed bundle and the names and versions, never a value."""
    if not spec.secrets or not workflow.patched(POD_SECRETS):
        return ""
    out = await workflow.execute_activity_method(
        ControlActivities.seal_secrets,
        SealInput(service=spec.name, revision=revision, spec=spec, image_id=image_id, ticket=ticket, pod_id=pod_id,
                  node=node.name),
        task_queue=workflow.info().task_queue,  # children run on the control queue
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10), non_retryable_error_types=POD_FATAL),
        summary=f"seal secrets {', '.join(ref.name for ref in spec.secrets)}"[:160] + f" for {pod_id[:8]}",
    )
    return out.bundle


async def start_pods(
    placement: Placement,
    spec: ServiceSpec,
    revision: int,
    pod_ids: list[str],
    existing: list[PodStatus],
    report: Report,
    *,
    image_id: str = "",
    ticket: str = "",
) -> tuple[list[PodStatus], list[tuple[str, str]]]:
    """Place and start pods in parallel; pods that fit nowhere wait for capacity.

    Returns the ready pods and (pod id, reason) for those that failed.
    """
    batched = workflow.patched(ROUND_GRANTS)
    nodes = await pick_nodes(placement, spec, len(pod_ids), existing, require_all=False, local_first=batched)
    ready: list[PodStatus] = []
    failed: list[tuple[str, str]] = []

    async def fail(pod_id: str, node: NodeSpec, e: ActivityError) -> None:
        failed.append((pod_id, error_message(e)))
        await report(PodStatus(id=pod_id, node=node.name, revision=revision, image=spec.image, health="exited"))

    async def one(pod_id: str, node: NodeSpec | None, grants: tuple[str, str] | None = None) -> None:
        if node is None:
            placed = existing + ready
            node = (await pick_nodes(placement, spec, 1, placed, require_all=True))[0]
            assert node is not None
        try:
            ready.append(await start_and_wait(spec, revision, pod_id, node, report, image_id=image_id, ticket=ticket,
                                              grants=grants))
        except ActivityError as e:
            await fail(pod_id, node, e)

    placed = [(p, n) for p, n in zip(pod_ids, nodes, strict=True) if n is not None]
    waiting = [p for p, n in zip(pod_ids, nodes, strict=True) if n is None]
    grants: list[tuple[str, str] | None] = [None] * len(placed)
    if batched and placed:
        try:
            grants = list(await round_grants(spec, revision, placed, image_id=image_id, ticket=ticket))
        except ActivityError as e:  # refused for the round: each start would have been refused the same
            await asyncio.gather(*(fail(p, n, e) for p, n in placed))
            placed = []
    await asyncio.gather(*(one(p, n, g) for (p, n), g in zip(placed, grants, strict=False)))
    for pod_id in waiting:  # one at a time: each waits until the Scheduler finds room
        await one(pod_id, None)
    return ready, failed
