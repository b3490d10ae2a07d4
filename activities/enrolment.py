"""Control-plane activities of node identity (task queue ``hms-control``): enrol a joining host,
check what nodes sign (registrations, heartbeats, pod reports) and stamp each pod start with the
control plane's word that its image is trusted now. Workflows cannot do this themselves: the
enrolment record and the keys are files on the control host (hms_mgmt/nodeid.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.callers import Callers
from hms_mgmt import constants, nodeid, tickets
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied, ActivityErrorType, HmsError
from hms_mgmt.events import Event, EventSink
from hms_mgmt.files import DamagedRecord, expiring_record
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import (
    EnrolInput,
    EnrolOutput,
    NodeCheckInput,
    NodeCheckOutput,
    NodeLost,
    NodeRegistration,
    NodeVerdict,
    PodPlace,
    PodReportCheck,
    PodReportVerdict,
    RegistrySettings,
    RoundGrantsInput,
    RoundGrantsOutput,
    RouterCheckInput,
    RouterRegistration,
    StampInput,
    StampOutput,
    VerifyImageInput,
    VerifyImageOutput,
)

log = logging.getLogger("hms.enrolment")

QUIET_S = 60.0  # the same refusal for the same node is written to the event log once a minute
FORWARDED_FILE = "forwarded-events.json"  # in the state directory: ids of node events written here
# A heartbeat's events are remembered while that heartbeat could pass its signature check again
# (its statement may be dated MAX_SKEW_S either side of this clock).
FORWARDED_KEPT_S = 2 * nodeid.MAX_SKEW_S


def _take_fresh(state_dir: Path, node: str, ids: list[str]) -> list[str]:
    """Of ``ids``, those not written before (by this worker or another, before a restart or
    not); they are recorded as written. Refuses (DamagedRecord) rather than forget them all."""
    now = time.time()
    with expiring_record(state_dir / FORWARDED_FILE, now=now) as written:
        fresh = [i for i in dict.fromkeys(ids) if i not in written]
        for i in fresh:
            written[i] = [node, now + FORWARDED_KEPT_S]
    return fresh


MAX_FORWARDED_REASON = 2000


class NodeTrustActivities:
    def __init__(self, settings: Callable[[], Settings], sink: EventSink) -> None:
        self.settings = settings
        self.sink = sink
        self._told: dict[tuple[str, str], float] = {}

    async def _denied(self, reason: str, *, service: str = "", **data: object) -> None:
        key = (str(data.get("node", "")), reason)
        now = time.monotonic()
        if now - self._told.get(key, -QUIET_S) < QUIET_S:
            return
        self._told[key] = now
        await self.sink.publish(Event(type="access.denied", service=service, reason=reason, data=data))

    @activity.defn(name="enrol_node")
    async def enrol_node(self, inp: EnrolInput) -> EnrolOutput:
        """A host joins: its request must be signed with a live join token's key. The token's
        role (node or router) is the certificate's."""
        settings = await asyncio.to_thread(self.settings)
        try:
            cert = await asyncio.to_thread(nodeid.enrol, settings.state_dir, inp.request)
            pub = await asyncio.to_thread(nodeid.control_public_pem, settings.state_dir)
        except (AccessDenied, HmsError, ValueError) as e:
            await self._denied(f"enrolment refused: {e}", action="enrol")
            raise ApplicationError(f"enrolment refused: {e}", type=ActivityErrorType.ACCESS_DENIED,
                                   non_retryable=True) from None
        role = str(tickets.open_claims(settings.state_dir, cert, "certificate").get("typ"))
        claims = nodeid.open_cert(settings.state_dir, cert, role)
        await self.sink.publish(Event(type=f"{role}.enrolled", service="", reason=f"{role} {claims['node']} joined "
                                      f"at {claims['addr']}", data={role: claims["node"], "address": claims["addr"]}))
        return EnrolOutput(cert=cert, control_pub=pub.decode())

    @activity.defn(name="registry_settings")
    async def registry_settings(self) -> RegistrySettings:
        """The NodeRegistry's and RouterRegistry's settings, as this control plane is configured:
        a registry believes these, not the input it was started with (anyone who reaches
        Temporal can start one)."""
        settings = await asyncio.to_thread(self.settings)
        return RegistrySettings(seed=settings.node_specs() if settings.nodes else [],
                                lost_after_s=settings.node_lost_after_s)

    @activity.defn(name="check_nodes")
    async def check_nodes(self, inp: NodeCheckInput) -> NodeCheckOutput:
        """Each registration (or heartbeat): a valid certificate of an enrolled, unremoved node
        for exactly this spec's name, address and queue, and a fresh signature by its key."""
        settings = await asyncio.to_thread(self.settings)
        verdicts = []
        for reg in inp.registrations:
            name = reg.spec.name
            try:
                at, kid = await asyncio.to_thread(self._check, settings, reg, inp.kind)
                verdicts.append(NodeVerdict(node=name, ok=True, key_id=kid, at=at))
                await self._record_node_events(reg)
            except (AccessDenied, ValueError) as e:
                reason = f"node {name}: {inp.kind} refused: {e}"
                await self._denied(reason, action=inp.kind, node=name, worker=reg.worker[:200])
                verdicts.append(NodeVerdict(node=name, ok=False, reason=reason))
        return NodeCheckOutput(verdicts=verdicts)

    async def _record_node_events(self, reg: NodeRegistration) -> None:
        """The events a node signed into this heartbeat, into the control host's log (and so
        the dashboard and webhooks), each once, marked with the node that vouched for them.
        Once across control-worker restarts too: the ids written are kept in the state directory,
        since a heartbeat copied from a history and signalled again within its minutes passes its
        signature check."""
        if not reg.events:
            return
        state_dir = (await asyncio.to_thread(self.settings)).state_dir
        try:
            fresh_ids = set(await asyncio.to_thread(_take_fresh, state_dir, reg.spec.name, [ev.id for ev in reg.events]))
        except DamagedRecord as e:
            log.error("node %s: its events are not written: %s", reg.spec.name, e)
            return
        fresh = [ev for ev in reg.events if ev.id in fresh_ids]
        for ev in fresh:
            data = {**ev.data, "node": reg.spec.name, "forwarded_by": reg.spec.name}
            await self.sink.publish(ev.model_copy(update={"reason": ev.reason[:MAX_FORWARDED_REASON], "data": data}))

    @activity.defn(name="check_routers")
    async def check_routers(self, inp: RouterCheckInput) -> NodeCheckOutput:
        """Each router registration (or heartbeat): a valid certificate of an enrolled, unremoved
        router for exactly this name and address, a feed URL at that address, and a fresh
        signature by its key. Refusals are ``access.denied`` events."""
        settings = await asyncio.to_thread(self.settings)
        verdicts = []
        for reg in inp.registrations:
            try:
                at, kid = await asyncio.to_thread(self._check_router, settings, reg, inp.kind)
                verdicts.append(NodeVerdict(node=reg.name, ok=True, key_id=kid, at=at))
            except (AccessDenied, ValueError) as e:
                reason = f"router {reg.name}: {inp.kind} refused: {e}"
                await self._denied(reason, action=f"router_{inp.kind}", router=reg.name, worker=reg.worker[:200])
                verdicts.append(NodeVerdict(node=reg.name, ok=False, reason=reason))
        return NodeCheckOutput(verdicts=verdicts)

    @staticmethod
    def _check_router(settings: Settings, reg: RouterRegistration, kind: str) -> tuple[float, str]:
        claims = nodeid.check_cert(settings.state_dir, reg.cert, reg.name, role="router")
        if claims.get("addr") != reg.address:
            raise AccessDenied(f"it enrolled at address {claims.get('addr')}, not {reg.address}")
        url = urlsplit(reg.url)
        if url.scheme != "http" or url.hostname != reg.address:
            raise AccessDenied(f"its feed URL {reg.url[:100]} is not http:// at its address {reg.address}")
        at = nodeid.check_statement(nodeid.pub_of(claims), reg.proof, node=reg.name, kind=f"router-{kind}",
                                    message=reg.signed_part())
        return at, nodeid.key_id(claims)

    @staticmethod
    def _check(settings: Settings, reg: NodeRegistration, kind: str) -> tuple[float, str]:
        spec = reg.spec
        claims = nodeid.check_cert(settings.state_dir, reg.cert, spec.name)
        if claims.get("addr") != spec.address:
            raise AccessDenied(f"it enrolled at address {claims.get('addr')}, not {spec.address}")
        queue = constants.node_task_queue(spec.name, settings.node_queue_prefix)
        if spec.task_queue != queue:
            raise AccessDenied(f"its task queue is {queue}, not {spec.task_queue}")
        at = nodeid.check_statement(nodeid.pub_of(claims), reg.proof, node=spec.name, kind=kind,
                                    message=reg.signed_part())
        return at, nodeid.key_id(claims)

    @activity.defn(name="node_removed")
    async def node_removed(self, inp: NodeLost) -> bool:
        """Whether ``hms node remove`` revoked the node: what the registry checks before it
        believes a ``remove`` hint."""
        settings = await asyncio.to_thread(self.settings)
        rec = (await asyncio.to_thread(nodeid.enrolled, settings.state_dir)).get(inp.node)
        return bool(rec and rec.get("revoked_at"))

    @activity.defn(name="check_pod_report")
    async def check_pod_report(self, inp: PodReportCheck) -> PodReportVerdict:
        """A ``pod_reported`` signal counts only as its node's own signed word about its own pod."""
        settings = await asyncio.to_thread(self.settings)
        pod = inp.pod
        try:
            if inp.recorded_node and inp.recorded_node != pod.node:
                raise AccessDenied(f"pod {pod.id[:8]} runs on node {inp.recorded_node}, not {pod.node}")
            pub = await asyncio.to_thread(nodeid.node_public_key, settings.state_dir, pod.node)
            nodeid.check_statement(pub, pod.report, node=pod.node, kind="pod",
                                   message=nodeid.pod_report_message(inp.service, pod),
                                   max_age_s=nodeid.REPORT_MAX_AGE_S)
            if pod.endpoint:
                await asyncio.to_thread(nodeid.check_endpoint_on_node, settings.state_dir, pod.node, pod.endpoint)
        except AccessDenied as e:
            return PodReportVerdict(ok=False, reason=str(e))
        return PodReportVerdict(ok=True)

    @activity.defn(name="check_started_pod")
    async def check_started_pod(self, inp: PodReportCheck) -> None:
        """A ``start_pod`` result counts only as the node's own signed word about the very pod it
        was asked to start, on that node: anyone who polls a node's task queue can take a start
        and answer it with an address of theirs. Refused: ``AccessDenied`` (non-retryable) and an
        ``access.denied`` event; the workflow stops the pod and counts the start as failed."""
        verdict = await self.check_pod_report(inp)
        if verdict.ok and inp.asked_pod and inp.pod.id != inp.asked_pod:
            verdict = PodReportVerdict(ok=False, reason=f"it reports pod {inp.pod.id[:8]}, not {inp.asked_pod[:8]}")
        if not verdict.ok:
            reason = (f"the start of pod {inp.asked_pod[:8] or inp.pod.id[:8]} on node {inp.recorded_node} was "
                      f"answered without that node's word: {verdict.reason}")
            await self._denied(reason, service=inp.service, action="start_pod", node=inp.recorded_node,
                               pod=inp.asked_pod or inp.pod.id)
            raise ApplicationError(reason, type=ActivityErrorType.ACCESS_DENIED, non_retryable=True)

    _callers: Callers | None = None  # the calling runs, as the server records them (made at first use)

    @activity.defn(name="stamp_start")
    async def stamp_start(self, inp: StampInput) -> StampOutput:
        """The control plane's word for one pod start, for the service's own workflow (or its
        child) only: the revision was admitted (its ticket) and its pinned image is signed and not
        revoked now. A revocation here stops new pods on every host at once: none of them keeps a
        trust store of its own."""
        pods = [PodPlace(pod_id=inp.pod_id, node=inp.node)]
        return StampOutput(stamp=(await self._stamped(inp, pods))[0])

    @activity.defn(name="stamp_round")
    async def stamp_round(self, inp: RoundGrantsInput) -> RoundGrantsOutput:
        """``stamp_start`` for every pod of a round: the caller, the ticket and the image's trust
        are checked once, now, and each pod gets its own stamp (bound to its id and node)."""
        return RoundGrantsOutput(grants=await self._stamped(inp, inp.pods))

    async def _stamp_caller(self, service: str, pods: list[PodPlace]) -> None:
        """The trust rule's caller check, as ``start_ticket`` makes it: the run named by
        ``activity.info()``, as the server records it, is ``service``'s own workflow or its child
        on our control queue; else an ``access.denied`` event naming it and a refusal."""
        if self._callers is None:
            self._callers = Callers(activity.client())
        settings = await asyncio.to_thread(self.settings)
        try:
            await self._callers.entitled(service, settings.task_queue)
        except AccessDenied as e:
            caller = await self._callers.current()
            which = ",".join(p.pod_id for p in pods)
            await self._denied(f"trust stamp for pod {which} of {service} refused: {e}", service=service,
                               action="start_pod", node=pods[0].node, pod=which, **caller.data())
            raise ApplicationError(f"trust stamp refused: {e}", type=ActivityErrorType.ACCESS_DENIED,
                                   non_retryable=True) from None

    async def _stamped(self, inp: StampInput | RoundGrantsInput, pods: list[PodPlace]) -> list[str]:
        await self._stamp_caller(inp.service, pods)
        # One thread for the file reads and signatures: a start waits on this.
        stamps, refusal = await asyncio.to_thread(self._stamp, inp, pods)
        if refusal is None:
            return stamps
        kind, reason, message = refusal
        await self._denied(reason, service=inp.service, action="start_pod", node=pods[0].node,
                           pod=",".join(p.pod_id for p in pods))
        raise ApplicationError(message, type=kind, non_retryable=True)

    def _stamp(self, inp: StampInput | RoundGrantsInput,
               pods: list[PodPlace]) -> tuple[list[str], tuple[str, str, str] | None]:
        """(a stamp per pod, None), or ([], (error type, the event's reason, the error's message))."""
        state_dir = self.settings().state_dir
        which = f"pod {pods[0].pod_id}" if len(pods) == 1 else f"{len(pods)} pods ({pods[0].pod_id}, ...)"
        try:
            tickets.verify(state_dir, inp.ticket, service=inp.service, revision=inp.revision, spec=inp.spec,
                           image_id=inp.image_id)
        except AccessDenied as e:
            return [], (ActivityErrorType.ACCESS_DENIED, f"{which} of {inp.service} not stamped: {e}",
                        f"{which} not started: {e}")
        store = TrustStore(state_dir)
        ok, detail = store.verify(inp.spec.image, inp.image_id)
        if not ok:
            return [], (ActivityErrorType.IMAGE_UNTRUSTED,
                        f"{which} not started on node {pods[0].node}: image {inp.spec.image} is not "
                        f"trusted now ({detail})",
                        f"image {inp.spec.image} ({inp.image_id[:19]}) may not start: {detail}")
        digest = store.repo_digest(inp.spec.image, inp.image_id)
        return [nodeid.issue_stamp(state_dir, service=inp.service, revision=inp.revision, image_id=inp.image_id,
                                   pod_id=p.pod_id, node=p.node, repo_digest=digest) for p in pods], None

    @activity.defn(name="trust_now")
    async def trust_now(self, inp: VerifyImageInput) -> VerifyImageOutput:
        """Is the pinned content still signed and not revoked? Asked of the control plane (an
        ``image_revoked`` hint's re-check): nodes keep no trust store to ask."""
        settings = await asyncio.to_thread(self.settings)
        ok, detail = await asyncio.to_thread(TrustStore(settings.state_dir).verify, inp.image, inp.content_id)
        if not ok:
            raise ApplicationError(f"image {inp.image} is not trusted: {detail}", type=ActivityErrorType.IMAGE_UNTRUSTED,
                                   non_retryable=True)
        return VerifyImageOutput(content_id=inp.content_id, detail=detail)
