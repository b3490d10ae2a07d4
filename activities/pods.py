"""Pod activities. They run on the node's own worker (task queue ``hms-node-<name>``), so a
second machine joins by running a worker for its node against the same Temporal cluster."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import aiohttp
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.scaling import ScaleCheck
from hms_mgmt import nodeid, tickets
from hms_mgmt import secrets as pod_secrets
from hms_mgmt.errors import AccessDenied, ActivityErrorType, GrantExpired, HmsError
from hms_mgmt.events import Event, EventSink
from hms_mgmt.files import DamagedRecord, expiring_record
from hms_mgmt.models import PodStatus
from hms_mgmt.policy.autoscale import AutoscaleDecision, CpuSample
from hms_mgmt.runtimes import PodHandle, PodLaunch, PodRuntime, PodRuntimeError
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import (
    ListPodsInput,
    ListPodsOutput,
    LogsOutput,
    PodFailure,
    PodLogsInput,
    PodProgress,
    StartPodInput,
    StopPodInput,
    VerifyImageInput,
    VerifyImageOutput,
    WatchHeartbeat,
    WatchInput,
    WatchResult,
)

T = TypeVar("T")
log = logging.getLogger("hms.pods")
ORPHAN_GRACE_S = 120.0
PROBE_TIMEOUT_S = 1.0  # a health ping not answered within this fails
PROBE_LATE_S = 0.25  # a failed ping whose timeout fired this much late: this worker was stalled, not the pod slow
ORPHAN_CHECK_S = 30.0  # how often a watch looks for pods of its service that the workflow does not know
BEAT_EVERY_MAX_S = 5.0  # a watch's keep-alive heartbeat: a cancel reaches it within this
RUNTIME_THREADS = 32  # pod starts/stops in flight at once on one node
STOPPED_FILE = "pods-stopped.json"  # in the state directory: pods this node stopped, while a ticket could start them
STOPPED_KEPT_S = tickets.START_TICKET_TTL_S + 60.0  # a start ticket's life and the clock skew it is allowed


class StoppedPods:
    """The pod ids this node stopped, for as long as a start ticket for them could still be
    good: a ticket read from a history must not start a pod again after its stop, and a worker
    restart (or a power loss: the file is fsynced) must not forget. Shared by the pod
    activities and the node's sweep through one file under a lock."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / STOPPED_FILE

    def mark(self, pod_id: str, service: str = "") -> None:
        now = time.time()
        try:
            with expiring_record(self.path, now=now) as stopped:
                stopped[pod_id] = [service, now + STOPPED_KEPT_S]
        except DamagedRecord as e:  # the stop goes on; starts are refused until it is looked at
            log.error("pod %s stopped but not recorded as stopped: %s", pod_id, e)

    def why_not_start(self, pod_id: str) -> str | None:
        """None if the pod may start; else why not (stopped here, or the record is damaged)."""
        try:
            with expiring_record(self.path, now=time.time()) as stopped:
                return "this node stopped it: a pod id starts once" if pod_id in stopped else None
        except DamagedRecord as e:
            return f"{e}: it records the pods this node stopped, so no pod starts until an operator removes it"


def pod_status(handle: PodHandle, *, health: str | None = None, ready: bool = False) -> PodStatus:
    return PodStatus(
        id=handle.pod_id,
        node=handle.node,
        endpoint=handle.endpoint,
        revision=handle.revision,
        image=handle.image,
        ready=ready,
        health=health or ("starting" if handle.running else "exited"),  # type: ignore[arg-type]
        started_at=handle.started_at,
    )


_runtime_calls: ThreadPoolExecutor | None = None


def runtime_calls() -> ThreadPoolExecutor:
    """The threads blocking runtime calls (start, stop) run on: a rollout starts every pod of a
    node at once, which asyncio's default pool (cores + 4 threads, shared with everything else
    on the worker) would queue a few at a time."""
    global _runtime_calls
    if _runtime_calls is None:
        _runtime_calls = ThreadPoolExecutor(max_workers=RUNTIME_THREADS, thread_name_prefix="hms-pod-runtime")
    return _runtime_calls


async def heartbeating(fn: Callable[..., T], *args: Any, every_s: float = 1.0) -> T:
    """Run a blocking runtime call on a thread while heartbeating, so a worker that dies in
    the middle is noticed within the heartbeat timeout and the call is retried elsewhere."""
    task = asyncio.get_running_loop().run_in_executor(runtime_calls(), functools.partial(fn, *args))
    while True:
        activity.heartbeat()
        done, _ = await asyncio.wait({task}, timeout=every_s)
        if done:
            try:
                return task.result()
            except PodRuntimeError as e:
                raise ApplicationError(str(e), type=e.error_type, non_retryable=True) from e


async def probe(session: aiohttp.ClientSession, endpoint: str | None, path: str,
                timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One health ping: any 2xx/3xx within the timeout is healthy."""
    if not endpoint:
        return False
    try:
        async with session.get(
            f"http://{endpoint}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as resp:
            return 200 <= resp.status < 400
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


class NodePods:
    """The node's pods by service, for every watch's orphan check: one listing serves every
    watch that asks for one begun after a given moment (each watch listing the whole node every
    ``ORPHAN_CHECK_S`` was 16,000 record reads a second at 500 services and 1,000 pods)."""

    def __init__(self, runtime: PodRuntime) -> None:
        self.runtime = runtime
        self._lock = asyncio.Lock()
        self._began = float("-inf")  # loop time the last listing began
        self._by_service: dict[str, list[PodHandle]] = {}

    async def of_service(self, service: str, since: float) -> list[PodHandle]:
        """The pods of ``service``, from a listing begun at or after ``since`` (loop time)."""
        async with self._lock:
            if self._began < since:
                began = asyncio.get_running_loop().time()
                by_service: dict[str, list[PodHandle]] = {}
                for h in await asyncio.to_thread(self.runtime.list):
                    by_service.setdefault(h.service, []).append(h)
                self._by_service, self._began = by_service, began
            return self._by_service.get(service, [])


class PodActivities:
    """Activities bound to one node's runtime."""

    def __init__(self, runtime: PodRuntime, trust: TrustStore | None = None, sink: EventSink | None = None, *,
                 on_probe: Callable[[float, float], None] | None = None,
                 identity: nodeid.NodeIdentity | None = None, trust_here: bool = True) -> None:
        self.runtime = runtime
        self.trust = trust  # with it, the node also checks admission tickets (keys beside the trust store)
        # --- node identity (hms_mgmt/nodeid.py): this node signs its reports; a joined node keeps
        # no trust store (trust_here False) and starts a pod only with the control plane's stamp.
        self.identity = identity
        self.trust_here = trust_here
        self.sink = sink
        # The health monitor reports each ping's lag behind its schedule and its duration (seconds):
        # how far a loaded worker lets the monitor drift (the worker's Prometheus histograms).
        self.on_probe = on_probe
        self.node_pods = NodePods(runtime)
        self._session: aiohttp.ClientSession | None = None
        # Pods this node stopped, while a start ticket for them could still be good (with a trust
        # store: it is where tickets are checked): no pod id starts again after its stop.
        self.stopped = StoppedPods(trust.state_dir) if trust is not None else None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self.runtime.close)

    @activity.defn(name="start_pod")
    async def start_pod(self, inp: StartPodInput) -> PodStatus:
        """Start the pod and wait until it answers its health path; fail at once if it exits.

        With ``min_ready_s``, it must then keep running and answering that long, counted from
        its first answer: watched here, beside the pod, so a rolling update pays no extra round
        trip per pod. A failed answer in the window starts it again; an exit fails the start.

        Idempotent by pod id: a retried or replayed start finds the pod it already started.
        One activity for both halves keeps a rollout's cost at one task per pod."""
        await self._check_ticket(inp)
        digest = ""
        if inp.stamp or not self.trust_here:
            digest = await self._check_stamp(inp)
        elif inp.image_id:
            digest = await self._check_pinned(inp.spec.image, inp.image_id)
        if inp.image_id:
            await self._fetch(inp, digest)
        req = PodLaunch(pod_id=inp.pod_id, service=inp.service, revision=inp.revision, node=inp.node, spec=inp.spec,
                        image_id=inp.image_id)
        # issue 21: the spec's sealed secrets, opened with this node's key (hms_mgmt/secrets.py)
        req.secrets = await heartbeating(pod_secrets.open_for_pod, self.identity, self.trust and self.trust.state_dir, inp)
        await heartbeating(self.runtime.start, req)
        loop = asyncio.get_running_loop()
        died = asyncio.Event()

        def on_exit(pod_id: str) -> None:
            if pod_id == inp.pod_id:
                loop.call_soon_threadsafe(died.set)

        # Learn of an exit from the runtime's event stream rather than asking the engine
        # several times a second per pod while a rollout is booting them all.
        unsubscribe = self.runtime.subscribe_exits(on_exit)
        try:
            return await self._until_ready(inp, died, state_every=0.5 if unsubscribe is None else 5.0)
        finally:
            if unsubscribe is not None:
                unsubscribe()

    async def _until_ready(self, inp: StartPodInput, died: asyncio.Event, *, state_every: float) -> PodStatus:
        """Probe the started pod until it has answered for ``min_ready_s``; an exit, or no answer
        within ``ready_timeout_s``, fails the start. Its state is read again when ``died`` is set,
        and at least every ``state_every`` seconds."""
        spec = inp.spec
        handle = await asyncio.to_thread(self.runtime.find, inp.pod_id)  # died before we listened?
        deadline = time.monotonic() + spec.ready_timeout_s
        last_state_check = time.monotonic()
        delay = 0.05
        ready_since: float | None = None
        while True:
            if handle is None or not handle.running:
                raise _exited_error(inp, handle, ready_since)
            answers = await probe(self.session(), handle.endpoint, spec.health_path)
            # Details: whether it answers yet (in the Web UI's pending activity).
            activity.heartbeat(PodProgress(pod_id=inp.pod_id, health="healthy" if answers else "starting"))
            if answers:
                now = time.monotonic()
                ready_since = now if ready_since is None else ready_since
                if now - ready_since >= inp.min_ready_s:
                    return self._signed(inp.service, pod_status(handle, health="healthy", ready=True))
                wait = min(0.5, ready_since + inp.min_ready_s - now)
            else:
                ready_since = None
                if time.monotonic() > deadline:
                    raise ApplicationError(
                        f"pod {inp.pod_id} did not answer {spec.health_path} within {spec.ready_timeout_s:g}s",
                        type=ActivityErrorType.POD_NOT_READY,
                        non_retryable=True,
                    )
                wait = delay
                delay = min(delay * 1.5, 0.1)  # a local GET is cheap; readiness seen late costs more
            try:
                await asyncio.wait_for(died.wait(), timeout=wait)
            except TimeoutError:
                pass
            if died.is_set() or time.monotonic() - last_state_check > state_every:
                died.clear()
                handle = await asyncio.to_thread(self.runtime.find, inp.pod_id)
                last_state_check = time.monotonic()

    async def _check_ticket(self, inp: StartPodInput) -> None:
        """Only a start the control plane signed for exactly this pod, on this node, starts it,
        whoever scheduled this activity; and never a pod this node has stopped (its ticket, read
        from a history, could restart it for the ticket's minutes)."""
        if self.trust is None:
            return
        why = await asyncio.to_thread(self.stopped.why_not_start, inp.pod_id) if self.stopped else None
        if why is not None:
            await self._refuse(inp.service, "start_pod", AccessDenied(why), f"pod {inp.pod_id} not started: {why}",
                               pod=inp.pod_id, node=inp.node)
        try:
            await asyncio.to_thread(tickets.verify_start, self.trust.state_dir, inp.ticket, service=inp.service,
                                    revision=inp.revision, spec=inp.spec, image_id=inp.image_id, pod_id=inp.pod_id,
                                    node=self.runtime.node)
        except AccessDenied as e:
            await self._refuse(inp.service, "start_pod", e, f"pod {inp.pod_id} not started: {e}", pod=inp.pod_id,
                               node=inp.node)

    async def _refuse(self, service: str, action: str, error: AccessDenied, reason: str, **data: object) -> NoReturn:
        """An ``access.denied`` event (naming the calling workflow, as the server gave it) and a
        non-retryable refusal (``GrantExpired`` for a signature that is only too old: ask again)."""
        info = activity.info()
        if self.sink is not None:
            await self.sink.publish(Event(type="access.denied", service=service, reason=reason,
                                          data={"action": action, **data, "workflow": info.workflow_id,
                                                "workflow_type": info.workflow_type}))
        kind = ActivityErrorType.GRANT_EXPIRED if isinstance(error, GrantExpired) else ActivityErrorType.ACCESS_DENIED
        raise ApplicationError(reason, type=kind, non_retryable=True)

    def _signed(self, service: str, pod: PodStatus) -> PodStatus:
        """The report as this node's own word (the service checks it before it believes it)."""
        if self.identity is None:
            return pod
        return pod.model_copy(update={"report": self.identity.say("pod", nodeid.pod_report_message(service, pod))})

    async def _check_stamp(self, inp: StartPodInput) -> str:
        """The control plane's word, for this very start, that the pinned image is trusted now;
        returns the registry digest it names for that content ("" if none)."""
        state_dir = self.trust.state_dir if self.trust is not None else None
        try:
            if state_dir is None:
                raise AccessDenied("this node cannot check trust stamps (no state directory)")
            return await asyncio.to_thread(nodeid.check_stamp, state_dir, inp.stamp, service=inp.service,
                                           revision=inp.revision, image_id=inp.image_id, pod_id=inp.pod_id,
                                           node=inp.node)
        except AccessDenied as e:
            if self.sink is not None:
                await self.sink.publish(Event(type="access.denied", service=inp.service,
                                              reason=f"pod {inp.pod_id} not started: {e}",
                                              data={"action": "start_pod", "pod": inp.pod_id, "node": inp.node}))
            raise ApplicationError(f"image {inp.spec.image} ({inp.image_id[:19]}) may not start: {e}",
                                   type=ActivityErrorType.IMAGE_UNTRUSTED, non_retryable=True) from None

    async def _check_pinned(self, image: str, image_id: str) -> str:
        """Checked again where the pod starts (heals and scale-ups too): the content admitted for
        this revision must still be signed and not revoked. Returns its registry digest."""
        if self.trust is None:
            return ""
        ok, detail = await asyncio.to_thread(self.trust.verify, image, image_id)
        if not ok:
            raise ApplicationError(f"image {image} ({image_id[:19]}) may not start: {detail}",
                                   type=ActivityErrorType.IMAGE_UNTRUSTED, non_retryable=True)
        return await asyncio.to_thread(self.trust.repo_digest, image, image_id)

    async def _fetch(self, inp: StartPodInput, digest: str) -> None:
        """The pinned content, pulled by digest when this node lacks it; a node that cannot get
        exactly that content refuses the pod and says why (it never runs what the tag holds)."""
        try:
            await heartbeating(self.runtime.fetch, inp.image_id, digest)
        except ApplicationError as e:
            if self.sink is not None:
                await self.sink.publish(Event(type="image.unavailable", service=inp.service,
                                              reason=f"pod {inp.pod_id} not started on node {inp.node}: {e.message}",
                                              data={"image": inp.spec.image, "content_id": inp.image_id,
                                                    "repo_digest": digest, "pod": inp.pod_id, "node": inp.node}))
            raise

    @activity.defn(name="stop_pod")
    async def stop_pod(self, inp: StopPodInput) -> bool:
        """Stop and remove a pod, for the control plane's signed word (``stop_grant``) that its own
        service's workflow stops exactly this pod on this node."""
        if self.trust is not None:
            try:
                service = await asyncio.to_thread(tickets.verify_stop, self.trust.state_dir, inp.grant,
                                                  pod_id=inp.pod_id, node=self.runtime.node)
                handle = await asyncio.to_thread(self.runtime.find, inp.pod_id)
                if handle is not None and handle.service != service:
                    raise AccessDenied(f"pod {inp.pod_id} is not a pod of {service}")
            except AccessDenied as e:
                await self._refuse(inp.service, "stop_pod", e, f"pod {inp.pod_id} not stopped: {e}", pod=inp.pod_id,
                                   node=self.runtime.node)
        if self.stopped is not None:
            await asyncio.to_thread(self.stopped.mark, inp.pod_id, inp.service)
        return await heartbeating(self.runtime.stop, inp.pod_id, inp.grace_s)

    @activity.defn(name="list_pods")
    async def list_pods(self, inp: ListPodsInput) -> ListPodsOutput:
        handles = await heartbeating(self.runtime.list, inp.service or None)
        return ListPodsOutput(pods=[pod_status(h) for h in handles])

    @activity.defn(name="pod_logs")
    async def pod_logs(self, inp: PodLogsInput) -> LogsOutput:
        """A pod's last lines, for a caller the control plane has authorized to read this pod's
        logs (its grant, from ``PodLogsWorkflow``), and only for a pod of that service."""
        if self.trust is not None:
            try:
                # The grant is for this one request: the run of PodLogsWorkflow it was issued to.
                claims = await asyncio.to_thread(
                    tickets.check_grant, self.trust.state_dir, inp.grant, service=inp.service, actions={"logs"},
                    bind={"pod": inp.pod_id, "run": activity.info().workflow_run_id})
                # ... held by a role that may read logs (this node's access matrix, else the defaults).
                from hms_mgmt.auth import load_access_matrix

                matrix = await asyncio.to_thread(load_access_matrix, self.trust.state_dir)
                if "logs" not in matrix.get(str(claims.get("role")), []):
                    raise AccessDenied(f"{claims.get('sub')} ({claims.get('role')}) may not read logs")
                handle = await asyncio.to_thread(self.runtime.find, inp.pod_id)
                if handle is not None and handle.service != inp.service:
                    raise AccessDenied(f"pod {inp.pod_id} is not a pod of {inp.service}")
            except (AccessDenied, HmsError) as e:
                await self._refuse(inp.service, "logs", e, f"logs of pod {inp.pod_id} refused: {e}", pod=inp.pod_id)
        lines = await heartbeating(self.runtime.logs, inp.pod_id, inp.tail)
        return LogsOutput(lines=lines)

    @activity.defn(name="verify_image")
    async def verify_image(self, inp: VerifyImageInput) -> VerifyImageOutput:
        """The image must be marked signed and safe, for the content this node would run.

        Raises a retryable error while it is not: the workflow's retry policy keeps checking
        until ``image_verify_timeout_s``, so signing it meanwhile lets the rollout go on."""
        if self.trust is None:
            raise ApplicationError("this node has no trust store", type=ActivityErrorType.IMAGE_UNTRUSTED, non_retryable=True)
        if not self.trust_here:
            return await self._resolve_only(inp)
        content_id = inp.content_id
        if not content_id:
            try:
                content_id = await asyncio.to_thread(self._signed_content, inp.image)
            except PodRuntimeError as e:
                raise ApplicationError(f"image {inp.image} is not trusted: {e}", type=ActivityErrorType.IMAGE_UNTRUSTED,
                                       non_retryable=inp.one_try) from e
        ok, detail = await asyncio.to_thread(self.trust.verify, inp.image, content_id)
        if not ok:
            if not inp.one_try:
                await self._awaiting_signature(inp, detail)
            raise ApplicationError(f"image {inp.image} is not trusted: {detail}", type=ActivityErrorType.IMAGE_UNTRUSTED,
                                   non_retryable=inp.one_try)
        if inp.spec is not None:
            # Would this node's runtime run it? A refusal is permanent: no retry, no pod tried.
            problems = await asyncio.to_thread(self.runtime.check_spec, inp.spec)
            if problems:
                raise ApplicationError("; ".join(problems) + f" (node {self.runtime.node})",
                                       type=ActivityErrorType.SPEC_UNRUNNABLE, non_retryable=True)
        return VerifyImageOutput(content_id=content_id, detail=detail)

    def _signed_content(self, image: str) -> str:
        """The content a pod of ``image`` would run here. Signed with a registry digest, that is the
        signed content, whatever the tag holds on this node: a pod pulls it by digest if missing."""
        record = self.trust.checked(image)[0] if self.trust is not None else None
        if record is not None and record.repo_digest:
            return record.content_id
        return self.runtime.content_id(image)

    async def _awaiting_signature(self, inp: VerifyImageInput, detail: str) -> None:
        """A deploy now waits for a signature: say so once (the first failed attempt; the retries
        that follow are the wait itself), with the command that ends the wait and its deadline."""
        info = activity.info()
        if info.attempt != 1 or self.sink is None:
            return
        command = f"hms image sign {inp.image}"
        deadline = info.scheduled_time + info.schedule_to_close_timeout if info.schedule_to_close_timeout else None
        until = f" before {deadline.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}" if deadline else ""
        reason = (f"{inp.service} waits for image {inp.image} to be signed ({detail}): run `{command}`{until}, "
                  "or the deploy fails")
        await self.sink.publish(Event(type="image.awaiting_signature", service=inp.service, reason=reason,
                                      data={"image": inp.image, "command": command, "node": self.runtime.node,
                                            "deadline": deadline.isoformat() if deadline else None}))

    async def _resolve_only(self, inp: VerifyImageInput) -> VerifyImageOutput:
        """A joined node keeps no trust store: it says what content it would run and whether its
        runtime would run the spec; the control plane judges the trust (``issue_ticket``, and a
        stamp at every start)."""
        try:
            content_id = inp.content_id or await asyncio.to_thread(self.runtime.pull_content_id, inp.image)
        except PodRuntimeError as e:
            raise ApplicationError(f"image {inp.image}: {e}", type=ActivityErrorType.IMAGE_UNTRUSTED,
                                   non_retryable=inp.one_try) from e
        if inp.spec is not None:
            problems = await asyncio.to_thread(self.runtime.check_spec, inp.spec)
            if problems:
                raise ApplicationError("; ".join(problems) + f" (node {self.runtime.node})",
                                       type=ActivityErrorType.SPEC_UNRUNNABLE, non_retryable=True)
        return VerifyImageOutput(content_id=content_id, detail=f"trust is the control plane's (node {self.runtime.node})")

    @activity.defn(name="watch_pods")
    async def watch_pods(self, inp: WatchInput) -> WatchResult:
        """The Health Monitor and the Auto-Scaler's eyes, in one long-running activity.

        Pings every pod each ``health_interval_s`` and samples CPU each ``scale_interval_s``,
        heartbeating what it sees; returns only when the workflow must act (a pod failed or
        exited, the policy recommends a new size, an unknown pod appeared) or after
        ``max_duration_s`` — so a steady service costs a handful of history events per hour.
        """
        return await _Watch(self, inp).run()


def _exited_error(inp: StartPodInput, handle: PodHandle | None, ready_since: float | None) -> ApplicationError:
    """A start failed for good: the pod exited before it was ready, or within ``min_ready_s``."""
    code = handle.exit_code if handle else None
    when = "before it was ready" if ready_since is None else f"within min_ready_s {inp.min_ready_s:g}s"
    return ApplicationError(
        f"pod {inp.pod_id} exited {when} (exit code {code})",
        {"exit_code": code},
        type=ActivityErrorType.POD_EXITED,
        non_retryable=True,
    )


class _Watch:
    def __init__(self, acts: PodActivities, inp: WatchInput) -> None:
        self.acts = acts
        self.runtime = acts.runtime
        self.inp = inp
        self.spec = inp.spec
        self.pods = {p.id: p for p in inp.pods}
        self.failures = {pid: 0 for pid in self.pods}
        self.cpu: dict[str, float | None] = {pid: None for pid in self.pods}
        self.history = list(inp.history)
        self.samples: list[CpuSample] = []
        self.cpu_before: dict[str, float] = {}  # CPU seconds of each pod at the last round, read at cpu_at
        self.cpu_at = 0.0
        self.exited: set[str] = set()
        self.rounds = 0
        self.wake = asyncio.Event()
        self.beaten: tuple[Any, ...] | None = None  # what the last heartbeat said
        timeout = activity.info().heartbeat_timeout
        self.beat_every_s = min(BEAT_EVERY_MAX_S, timeout.total_seconds() / 2) if timeout else BEAT_EVERY_MAX_S
        details = activity.info().heartbeat_details
        if details:  # a retry after a worker restart keeps the autoscale window it had
            try:
                self.history = WatchHeartbeat.model_validate(details[0]).history or self.history
            except ValueError:
                pass
        # With several nodes the service's one watch_cpu decides from every node's samples
        # (autoscale=False here); a single watch may still decide on its own.
        self.scaler = ScaleCheck(self.spec, inp.current, self.history, inp.at_max_reported) if inp.autoscale else None

    def progress(self) -> list[PodProgress]:
        return [
            PodProgress(
                pod_id=pid,
                health="exited" if pid in self.exited else ("unhealthy" if self.failures[pid] else "healthy"),
                consecutive_failures=self.failures[pid],
                cpu_percent=self.cpu[pid],
            )
            for pid in self.pods
        ]

    def result(self, reason: str, **kw: Any) -> WatchResult:
        return WatchResult(reason=reason, samples=self.samples, history=self.history, progress=self.progress(), **kw)

    async def exited_failures(self, pod_ids: list[str]) -> list[PodFailure]:
        out = []
        for pid in pod_ids:
            # An exit the event stream reported comes with its code: no engine call before the
            # workflow hears of it (an inspect takes 100-200 ms on a busy Docker host).
            code = self.runtime.reported_exit(pid)
            found = code is not None
            if not found:
                handle = await asyncio.to_thread(self.runtime.find, pid)
                found, code = handle is not None, handle.exit_code if handle else None
            out.append(PodFailure(pod_id=pid, kind="exited", exit_code=code,
                                  detail=f"pod process exited (exit code {code})" if found else "pod is gone"))
        return out

    async def run(self) -> WatchResult:
        loop = asyncio.get_running_loop()

        def on_exit(pod_id: str) -> None:
            loop.call_soon_threadsafe(self._mark_exited, pod_id)

        unsubscribe = self.runtime.subscribe_exits(on_exit)
        try:
            return await self._rounds(list(self.pods), poll_exits=unsubscribe is None)
        finally:
            if unsubscribe is not None:
                unsubscribe()

    async def _rounds(self, ids: list[str], *, poll_exits: bool) -> WatchResult:
        """Health, CPU and orphan rounds, each on its own period, until one of them needs the
        workflow or ``max_duration_s`` is up. ``poll_exits``: the runtime has no event stream."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        start = loop.time()
        deadline = start + self.inp.max_duration_s
        next_health = start + spec.health_interval_s
        next_scale = start + spec.scale_interval_s
        next_orphans = start + ORPHAN_CHECK_S  # younger than ORPHAN_GRACE_S, no pod is an orphan yet
        next_beat = start
        self.cpu_before = await asyncio.to_thread(self.runtime.cpu_seconds, ids)
        self.cpu_at = loop.time()
        await self._poll_exits(ids)
        while True:
            if self.exited:
                return self.result("failed", failed=await self.exited_failures(sorted(self.exited)))
            now = loop.time()
            if now >= next_health and ids:
                failing = await self._health_round(ids, scheduled=next_health)
                next_health = max(next_health + spec.health_interval_s, loop.time())
                if failing:
                    return self.result("failed", failed=await self._failures(failing))
            if now >= next_scale and ids:
                await self._cpu_round(ids)
                next_scale = max(next_scale + spec.scale_interval_s, loop.time())
                verdict = self._scale_verdict()
                if verdict is not None:
                    return self.result(verdict[0], decision=verdict[1])
            if now >= next_orphans:
                next_orphans = now + ORPHAN_CHECK_S
                unknown = await self.unknown_pods(since=max(start, now - ORPHAN_CHECK_S))
                if unknown:
                    return self.result("unknown_pods", unknown_pods=unknown)
            if now >= deadline:
                return self.result("timeout")
            next_beat = self._beat(next_beat, loop.time())
            await self._sleep(min(next_health, next_scale, deadline, next_orphans, next_beat) - loop.time(),
                              poll_exits)
            if poll_exits and ids:
                await self._poll_exits(ids)

    async def _health_round(self, ids: list[str], *, scheduled: float) -> list[str]:
        """Ping every pod; the pods that have now failed ``health_failures`` times in a row."""
        oks = await asyncio.gather(*(self.ping(p, scheduled=scheduled) for p in ids))
        for pid, ok in zip(ids, oks, strict=True):
            if ok is not None:  # an inconclusive ping neither fails the pod nor clears its failures
                self.failures[pid] = 0 if ok else self.failures[pid] + 1
        return [p for p in ids if self.failures[p] >= self.spec.health_failures]

    async def _failures(self, failing: list[str]) -> list[PodFailure]:
        """What happened to each failing pod: it exited meanwhile, or it is still there but unhealthy."""
        gone = set(await asyncio.to_thread(self.runtime.exited, failing))
        failed = await self.exited_failures(sorted(gone))
        failed += [
            PodFailure(pod_id=p, kind="unhealthy", consecutive_failures=self.failures[p],
                       detail=f"{self.spec.health_path} failed {self.failures[p]} times in a row")
            for p in failing if p not in gone
        ]
        return failed

    async def _cpu_round(self, ids: list[str]) -> None:
        """Each pod's CPU since the last round, as a percent of its limit, into ``samples``."""
        loop = asyncio.get_running_loop()
        cpu_now = await asyncio.to_thread(self.runtime.cpu_seconds, ids)
        elapsed = max(loop.time() - self.cpu_at, 1e-3)
        self.cpu_at = loop.time()
        self.samples = []
        for pid in ids:
            pct = None
            if pid in cpu_now and pid in self.cpu_before:
                limit = self.spec.cpu_limit or 1.0
                pct = round(max(0.0, cpu_now[pid] - self.cpu_before[pid]) / elapsed / limit * 100, 1)
            self.cpu[pid] = pct
            self.samples.append(CpuSample(pod_id=pid, cpu_percent=pct, ready=True))
        self.cpu_before = cpu_now
        self.rounds += 1

    def _scale_verdict(self) -> tuple[Literal["scale", "at_max"], AutoscaleDecision] | None:
        """The autoscaler's reason to return on this round's samples, when this watch decides."""
        if self.scaler is None:
            return None
        verdict = self.scaler.check(self.samples)
        self.history = self.scaler.history
        return verdict

    def _beat(self, due: float, now: float) -> float:
        """Heartbeat what the watch sees when it changed (a ping's verdict, a CPU round), else
        only when ``due``: a keep-alive every half heartbeat timeout. At 500 services a heartbeat
        a second per watch (each one a write of the workflow's state on the server) was most of
        the node worker's and the Temporal server's CPU. Returns when the next keep-alive is due."""
        seen = (self.rounds, tuple((p.pod_id, p.health, p.consecutive_failures) for p in self.progress()))
        if seen == self.beaten and now < due:
            return due
        self.beaten = seen
        activity.heartbeat(WatchHeartbeat(progress=self.progress(), samples=self.samples,
                                          history=self.history, round=self.rounds))
        return now + self.beat_every_s

    async def _sleep(self, wait: float, poll_exits: bool) -> None:
        """Until the next round or keep-alive is due or a pod exits (at most 0.1 s when exits
        are polled)."""
        if poll_exits:  # no event stream: poll for exits, cheaply
            wait = min(wait, 0.1)
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=max(0.01, wait))
        except TimeoutError:
            pass

    async def _poll_exits(self, ids: list[str]) -> None:
        for pid in await asyncio.to_thread(self.runtime.exited, ids):
            self._mark_exited(pid)

    async def ping(self, pod_id: str, *, scheduled: float) -> bool | None:
        """One ping's verdict; None (inconclusive) when it failed but took well past its timeout:
        this worker's event loop was stalled (a starved host, a burst of work), so the answer may
        have sat unread. Counting those made healthy pods "unhealthy" by the hundred on a loaded
        host, and their replacements loaded it further."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        ok = await probe(self.acts.session(), self.pods[pod_id].endpoint, self.spec.health_path)
        took = loop.time() - sent
        if self.acts.on_probe is not None:
            self.acts.on_probe(max(0.0, sent - scheduled), took)
        return None if not ok and took > PROBE_TIMEOUT_S + PROBE_LATE_S else ok

    def _mark_exited(self, pod_id: str) -> None:
        if pod_id in self.pods:
            self.exited.add(pod_id)
            self.wake.set()

    async def unknown_pods(self, since: float) -> list[str]:
        """Pods of this service on the node that the workflow does not know: leaked by a
        crash at the wrong moment. Young ones may be a start in flight, so they get time.
        ``since``: from a listing of the node's pods begun no earlier (loop time)."""
        known = set(self.inp.known) | set(self.pods)
        handles = await self.acts.node_pods.of_service(self.inp.service, since)
        now = datetime.now(UTC)
        return [
            h.pod_id for h in handles
            if h.pod_id not in known and (h.started_at is None or (now - h.started_at).total_seconds() > ORPHAN_GRACE_S)
        ]
