"""The one helper a service team calls: ``orchestrator.deploy(spec)``.

Synchronous functions like the seed's (``deploy``, ``status``, ``list``, ``logs``,
``undeploy``) and their async twins (``deploy_async`` ...) on top of :class:`Orchestrator`.
Every call goes to Temporal: the workflow, not this process, owns the service.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from hms_mgmt import constants
from hms_mgmt.config import Settings, connect
from hms_mgmt.errors import (
    AccessDenied,
    ApprovalRejected,
    HmsError,
    ImageUntrusted,
    ScaleRefused,
    ServiceNotFound,
    SpecConflict,
    SpecError,
)
from hms_mgmt.models import (
    Approval,
    DeployResult,
    LogsOutput,
    Placement,
    PodLogsInput,
    PodProgress,
    PodStatus,
    ScaleRequest,
    ServiceInput,
    ServiceSpec,
    ServiceStatus,
    UndeployRequest,
    WatchHeartbeat,
)

SpecLike = ServiceSpec | Mapping[str, Any] | str | Path


def load_spec(spec: SpecLike) -> ServiceSpec:
    """A dict (the seed's literal), a ServiceSpec, or a YAML/JSON file path -> ServiceSpec.

    Errors name every bad field: ``SpecError("invalid service spec: cpu_target: ...")``.
    """
    if isinstance(spec, ServiceSpec):
        return spec
    source = "service spec"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.exists():
            raise SpecError(f"spec file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"spec file {path} is not valid YAML: {e}") from e
        source = f"service spec {path}"
        spec = data
    if not isinstance(spec, Mapping):
        raise SpecError(f"invalid {source}: expected a mapping of fields, got {type(spec).__name__}")
    try:
        return ServiceSpec.model_validate(dict(spec))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "spec"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append(f"{field}: {msg}")
        raise SpecError(f"invalid {source}: " + "; ".join(problems)) from None


class Orchestrator:
    """Async client of the management layer, bound to one Temporal connection."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> Orchestrator:
        settings = settings or Settings.from_env()
        return cls(await connect(settings), settings)

    def _placement(self) -> Placement:
        s = self.settings
        return Placement(
            control_task_queue=s.task_queue,
            nodes=s.node_specs(),
            web_ui_base=s.web_ui_url,
            namespace=s.namespace,
            node_queue_prefix=s.node_queue_prefix,
            capacity_retry_max_s=s.capacity_retry_max_s,
            watch_max_s=s.watch_max_s,
        )

    def _handle(self, name: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(constants.service_workflow_id(name))

    async def _running(self, name: str) -> WorkflowHandle[Any, Any] | None:
        handle = self._handle(name)
        try:
            desc = await handle.describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return None
        return self.client.get_workflow_handle(handle.id, run_id=desc.run_id)

    async def deploy(self, spec: SpecLike, *, wait: bool = False, timeout: float = 300.0) -> DeployResult:
        """Start the service's workflow; a no-op when the same spec already runs.

        With ``wait=True``, return once the service is Running (or raise why it is not).
        """
        spec = load_spec(spec)
        wf_id = constants.service_workflow_id(spec.name)
        url = self.settings.web_ui_link(wf_id)
        existing = await self._running(spec.name)
        already = existing is not None
        if existing is None:
            inp = ServiceInput(spec=spec, placement=self._placement(), token=self.settings.token or "",
                               history_threshold=self.settings.history_threshold)
            try:
                handle = await self.client.start_workflow(
                    "ServiceWorkflow",
                    inp,
                    id=wf_id,
                    task_queue=self.settings.task_queue,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                    static_summary=f"service {spec.name}: {spec.image}, {spec.min_replicas}-{spec.max_replicas} pods",
                )
                run_id = handle.result_run_id
            except WorkflowAlreadyStartedError:
                already = True
                existing = await self._running(spec.name)
        if already:
            assert existing is not None
            current = await existing.query("status", result_type=ServiceStatus)
            if current.spec != spec:
                changed = sorted(
                    k for k in ServiceSpec.model_fields if getattr(current.spec, k) != getattr(spec, k)
                )
                raise SpecConflict(
                    f"service {spec.name} already runs with a different spec (changed: {', '.join(changed)}); "
                    f"undeploy it first"
                )
            run_id = existing.run_id
        if not already:
            await self._admitted(spec.name, timeout=timeout)
        if wait:
            await self.wait_for(spec.name, {"Running"}, timeout=timeout)
        return DeployResult(workflow_id=wf_id, run_id=run_id, web_ui_url=url, already_running=already)

    async def _admitted(self, name: str, *, timeout: float) -> ServiceStatus:
        """Wait until the worker has checked the caller's identity (and the policy): a refusal
        is raised here, to the caller, with the reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        handle = self._handle(name)
        while loop.time() < deadline:
            desc = await handle.describe()
            if desc.status != WorkflowExecutionStatus.RUNNING:
                final = await self.client.get_workflow_handle(handle.id, run_id=desc.run_id,
                                                              result_type=ServiceStatus).result()
                raise refusal_error(final)
            status = await self.status(name, live=False)
            if status.phase != "Validating":
                return status
            await asyncio.sleep(0.05)
        raise TimeoutError(f"service {name}: no worker checked the request within {timeout:g}s (is a worker running?)")

    async def wait_for(self, name: str, phases: set[str], *, timeout: float = 300.0, poll_s: float = 0.25) -> ServiceStatus:
        """Poll ``status()`` until the phase is one of ``phases``; raise on a terminal failure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: ServiceStatus | None = None
        while loop.time() < deadline:
            try:
                last = await self.status(name)
            except ServiceNotFound:
                last = None
            if last is not None:
                if last.phase in phases:
                    return last
                if last.phase in ("Failed", "Rejected", "Stopped"):
                    raise refusal_error(last)
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"service {name} not {'/'.join(sorted(phases))} after {timeout:g}s (last: {last.phase if last else 'none'})")

    async def status(self, name: str, *, live: bool = True) -> ServiceStatus:
        """The workflow's state; with ``live``, merged with what the running health monitor
        has seen since it last reported (its heartbeat: failures in a row, CPU per pod)."""
        handle = self._handle(name)
        try:
            status = await handle.query("status", result_type=ServiceStatus)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ServiceNotFound(f"no service named {name!r}") from e
            raise
        if live and status.phase in ("Deploying", "Scaling"):
            status = await self._merge_rollout(status)
        if live and status.pods:
            try:
                status = await self._merge_heartbeats(handle, status)
            except RPCError:
                pass
        return status

    async def _merge_rollout(self, status: ServiceStatus) -> ServiceStatus:
        """Pods a running rollout has brought up so far (its ``progress`` query)."""
        child = (f"{status.workflow_id}-deploy-{status.revision}" if status.phase == "Deploying"
                 else f"{status.workflow_id}-scale-{status.scale_count}")
        try:
            pods = await self.client.get_workflow_handle(child).query("progress", result_type=builtins.list[PodStatus])
        except (RPCError, WorkflowQueryFailedError):
            return status
        merged = {p.id: p for p in status.pods}
        for pod in pods:
            if pod.health != "exited":
                merged[pod.id] = pod
        ready = sum(1 for p in merged.values() if p.ready)
        return status.model_copy(update={"pods": builtins.list(merged.values()), "ready_replicas": ready})

    async def _merge_heartbeats(self, handle: WorkflowHandle[Any, Any], status: ServiceStatus) -> ServiceStatus:
        desc = await handle.describe()
        progress: dict[str, PodProgress] = {}
        for pending in desc.raw_description.pending_activities:
            if pending.activity_type.name != "watch_pods" or not pending.heartbeat_details.payloads:
                continue
            (beat,) = await self.client.data_converter.decode(pending.heartbeat_details.payloads[:1], [WatchHeartbeat])
            progress.update({p.pod_id: p for p in beat.progress})
        if not progress:
            return status
        pods = []
        for pod in status.pods:
            prog = progress.get(pod.id)
            if prog is not None and pod.ready:
                pod = pod.model_copy(update={
                    "consecutive_failures": prog.consecutive_failures,
                    "cpu_percent": prog.cpu_percent if prog.cpu_percent is not None else pod.cpu_percent,
                    "health": prog.health,
                })
            pods.append(pod)
        return status.model_copy(update={"pods": pods})

    async def scale(self, name: str, replicas: int, *, reason: str = "") -> ServiceStatus:
        """Set the replica count (a validated workflow update: out of range is refused)."""
        handle = await self._running(name)
        if handle is None:
            raise ServiceNotFound(f"no running service named {name!r}")
        try:
            return await handle.execute_update(
                "scale",
                ScaleRequest(replicas=replicas, token=self.settings.token or "", reason=reason),
                result_type=ServiceStatus,
            )
        except WorkflowUpdateFailedError as e:
            cause = e.cause
            message = getattr(cause, "message", None) or str(cause or e)
            if getattr(cause, "type", None) == "AccessDenied":
                raise AccessDenied(f"scale {name} refused: {message}") from None
            raise ScaleRefused(f"scale {name} to {replicas} refused: {message}") from None

    async def list(self) -> builtins.list[ServiceStatus]:
        query = (
            f'WorkflowType = "ServiceWorkflow" AND ExecutionStatus = "Running" '
            f'AND TaskQueue = "{self.settings.task_queue}"'
        )
        out = []
        async for wf in self.client.list_workflows(query):
            try:
                out.append(await self.client.get_workflow_handle(wf.id).query("status", result_type=ServiceStatus))
            except RPCError:
                continue
        return sorted(out, key=lambda s: s.name)

    async def logs(self, service: str, pod_id: str, tail: int = 100) -> builtins.list[str]:
        status = await self.status(service)
        pod = next((p for p in status.pods if p.id == pod_id or p.id.startswith(pod_id)), None)
        if pod is None:
            raise HmsError(f"service {service} has no pod {pod_id!r}; pods: {', '.join(p.id for p in status.pods)}")
        out = await self.client.execute_workflow(
            "PodLogsWorkflow",
            PodLogsInput(pod_id=pod.id, node_task_queue=self.settings.node_task_queue(pod.node), tail=tail),
            id=f"{constants.service_workflow_id(service)}-logs-{uuid.uuid4().hex[:8]}",
            task_queue=self.settings.task_queue,
            result_type=LogsOutput,
        )
        return out.lines

    async def undeploy(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> ServiceStatus | None:
        """Stop every pod and end the service's workflow (ops_admin only, checked by the worker)."""
        handle = await self._running(name)
        if handle is None:
            raise ServiceNotFound(f"no running service named {name!r}")
        request_id = uuid.uuid4().hex
        await handle.signal("undeploy", UndeployRequest(token=self.settings.token or "", request_id=request_id))
        if not wait:
            return None
        typed = self.client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=ServiceStatus)
        return await self._await_answer(name, request_id, typed.result(), timeout=timeout)

    async def approve(self, name: str, *, reason: str = "", timeout: float = 60.0) -> ServiceStatus:
        """Approve a deployment waiting for governance (a ``gov_approver``, not the requester)."""
        return await self._decide("approve", name, reason, timeout)

    async def reject(self, name: str, *, reason: str = "", timeout: float = 60.0) -> ServiceStatus:
        return await self._decide("reject", name, reason, timeout)

    async def _decide(self, kind: str, name: str, reason: str, timeout: float) -> ServiceStatus:
        handle = await self._running(name)
        if handle is None:
            raise ServiceNotFound(f"no running service named {name!r}")
        status = await self.status(name, live=False)
        if status.phase != "AwaitingApproval":
            raise HmsError(f"service {name} is {status.phase}, not awaiting approval")
        request_id = uuid.uuid4().hex
        await handle.signal(kind, Approval(token=self.settings.token or "", reason=reason, request_id=request_id))

        async def decided() -> ServiceStatus:
            while True:
                st = await self.status(name, live=False)
                if st.phase != "AwaitingApproval":
                    return st
                await asyncio.sleep(0.1)

        return await self._await_answer(name, request_id, decided(), timeout=timeout)

    async def _await_answer(self, name: str, request_id: str, outcome: Any, *, timeout: float) -> ServiceStatus:
        """The signal's outcome, or AccessDenied when the worker refused that very request."""
        done = asyncio.ensure_future(outcome)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                finished, _ = await asyncio.wait({done}, timeout=0.1)
                if finished:
                    return done.result()
                try:
                    st = await self.status(name, live=False)
                except (RPCError, ServiceNotFound):
                    continue
                refused = next((r for r in st.refusals if r.request_id == request_id), None)
                if refused is not None:
                    raise AccessDenied(f"{refused.action} {name} refused: {refused.reason}")
            raise TimeoutError(f"no answer from service {name} within {timeout:g}s")
        finally:
            done.cancel()


def refusal_error(status: ServiceStatus) -> HmsError:
    """The precise error for a service that ended before running."""
    msg = f"service {status.name} is {status.phase}: {status.message or 'see its workflow history'}"
    text = status.message or ""
    if text.startswith("access denied"):
        return AccessDenied(f"deploy {status.name} refused: {text.removeprefix('access denied: ')}")
    if status.phase == "Rejected":
        return ApprovalRejected(msg)
    if "not trusted" in text:
        return ImageUntrusted(msg)
    return HmsError(msg)


# --- the synchronous helpers of the seed, and their async twins ------------------------


async def _with(fn_name: str, *args: Any, settings: Settings | None = None, **kwargs: Any) -> Any:
    orch = await Orchestrator.connect(settings)
    return await getattr(orch, fn_name)(*args, **kwargs)


async def deploy_async(spec: SpecLike, *, settings: Settings | None = None, **kw: Any) -> DeployResult:
    spec = load_spec(spec)  # a bad spec fails before any connection is made
    return await _with("deploy", spec, settings=settings, **kw)


async def status_async(name: str, *, settings: Settings | None = None) -> ServiceStatus:
    return await _with("status", name, settings=settings)


async def list_async(*, settings: Settings | None = None) -> builtins.list[ServiceStatus]:
    return await _with("list", settings=settings)


async def logs_async(service: str, pod_id: str, tail: int = 100, *, settings: Settings | None = None) -> builtins.list[str]:
    return await _with("logs", service, pod_id, tail, settings=settings)


async def scale_async(name: str, replicas: int, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus:
    return await _with("scale", name, replicas, settings=settings, **kw)


async def approve_async(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    return await _with("approve", name, reason=reason, settings=settings)


async def reject_async(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    return await _with("reject", name, reason=reason, settings=settings)


async def undeploy_async(name: str, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus | None:
    return await _with("undeploy", name, settings=settings, **kw)


def _run(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise HmsError("called the synchronous API inside an event loop: use the *_async variant")


def deploy(spec: SpecLike, *, settings: Settings | None = None, **kw: Any) -> DeployResult:
    """Deploy a service: a dict like the seed's, a ServiceSpec, or a YAML file path."""
    return _run(deploy_async(spec, settings=settings, **kw))


def status(name: str, *, settings: Settings | None = None) -> ServiceStatus:
    return _run(status_async(name, settings=settings))


def list(*, settings: Settings | None = None) -> builtins.list[ServiceStatus]:  # noqa: A001 - the seed's word
    return _run(list_async(settings=settings))


def logs(service: str, pod_id: str, tail: int = 100, *, settings: Settings | None = None) -> builtins.list[str]:
    """The last ``tail`` lines of a pod's log (``orchestrator.logs(service=..., pod_id=...)``)."""
    return _run(logs_async(service, pod_id, tail, settings=settings))


def scale(name: str, replicas: int, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus:
    """Set a service's replica count within [min_replicas, max_replicas]."""
    return _run(scale_async(name, replicas, settings=settings, **kw))


def approve(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    """Approve a deployment waiting in AwaitingApproval (as a ``gov_approver``)."""
    return _run(approve_async(name, reason=reason, settings=settings))


def reject(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    return _run(reject_async(name, reason=reason, settings=settings))


def undeploy(name: str, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus | None:
    return _run(undeploy_async(name, settings=settings, **kw))
