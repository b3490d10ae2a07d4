"""The one helper a service team calls: ``orchestrator.deploy(spec)``.

Synchronous functions like the seed's (``deploy``, ``status``, ``list``, ``logs``,
``undeploy``) and their async twins (``deploy_async`` ...) on top of :class:`Orchestrator`.
Every call goes to Temporal: the workflow, not this process, owns the service.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from pydantic import BaseModel, ValidationError
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from hms_mgmt import auth, connection, constants, names
from hms_mgmt.config import Settings, connect
from hms_mgmt.errors import (
    HmsError,
    RequestRefused,
    ScaleRefused,
    ServiceNotFound,
    SpecError,
    error_for,
)
from hms_mgmt.models import (
    Approval,
    DeployResult,
    DryRunVerdict,
    PodStatus,
    RevisionRecord,
    SecretInfo,
    ServiceSpec,
    ServiceStatus,
    SlotClock,
    UpdateOutcome,
)
from hms_mgmt.policy.plan import heading_to
from hms_mgmt.wire import (
    AdmissionRequest,
    DryRunInput,
    LogGrantInput,
    LogGrantOutput,
    LogsOutput,
    Placement,
    PodLogsInput,
    PodProgress,
    ScaleRequest,
    ServiceInput,
    SpecUpdate,
    UndeployRequest,
    WatchHeartbeat,
)

if TYPE_CHECKING:
    from hms_mgmt.logstream import PodStreams

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
MAX_SPEC_BYTES = 1024 * 1024  # a spec is a page of YAML; the cap keeps a wrong path from being read whole
SpecLike = ServiceSpec | Mapping[str, Any] | str | Path
CLOSING_RETRY_S = 10.0  # how long an update waits for a run that is continuing-as-new


def load_spec(spec: SpecLike) -> ServiceSpec:
    """A dict (the seed's literal), a ServiceSpec, or a YAML/JSON file path -> ServiceSpec.

    Errors name every bad field: ``SpecError("invalid service spec: cpu_target: ...")``.
    """
    if isinstance(spec, ServiceSpec):
        return spec
    source = "service spec"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            with path.open("rb") as f:  # a pipe (`hms deploy <(...)`) works; /dev/zero ends
                raw = f.read(MAX_SPEC_BYTES + 1)
            if len(raw) > MAX_SPEC_BYTES:
                raise SpecError(f"spec file {path} is larger than {MAX_SPEC_BYTES // 1024} KiB")
            text = raw.decode("utf-8")
        except FileNotFoundError:
            raise SpecError(f"spec file {path} does not exist") from None
        except IsADirectoryError:
            raise SpecError(f"spec file {path} is a directory") from None
        except UnicodeDecodeError as e:
            raise SpecError(f"spec file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        except OSError as e:  # a name too long, no permission, ...
            raise SpecError(f"spec file {path} cannot be read: {e.strerror or e}") from None
        import yaml  # a spec file only

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"spec file {path} is not valid YAML: {e}") from e
        except RecursionError:
            raise SpecError(f"spec file {path} nests too deeply to be a spec") from None
        source = f"service spec {path}"
        spec = data
    if not isinstance(spec, Mapping):
        raise SpecError(f"invalid {source}: expected a mapping of fields, got {type(spec).__name__}")
    odd = [k for k in spec if not isinstance(k, str)]
    if odd:
        names = ", ".join(f"{k!r} ({type(k).__name__})" for k in odd)
        raise SpecError(f"invalid {source}: field names are text; got {names}")
    try:
        return ServiceSpec.model_validate(dict(spec))
    except ValidationError as e:
        raise SpecError(f"invalid {source}: {_problems(e)}") from None


def _request(model: type[M], what: str, **values: Any) -> M:
    """A request to a workflow from the caller's values; a bad one is a SpecError naming the field
    (a reason too long, a timeout out of range), before anything is sent."""
    try:
        return model(**values)
    except ValidationError as e:
        raise SpecError(f"{what}: {_problems(e)}") from None


def _problems(e: ValidationError) -> str:
    problems = []
    for err in e.errors():
        field = ".".join(_field_name(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{field}: {msg}")
    return "; ".join(problems)


def _field_name(part: str | int) -> str:
    """A field or key as an error shows it: quoted when it would not read as a name
    (empty, spaces, punctuation), so ``'': unknown field`` says which key."""
    text = str(part)
    return text if text and all(c.isalnum() or c in "_-" for c in text) else repr(text)


NOT_READY_RETRY_S = 120.0


def workflow_not_ready(e: RPCError) -> bool:
    """The server turns updates away while the workflow's task has failed or timed out several
    times in a row — a worker killed mid-task, again and again. It passes once a worker runs
    the task: worth waiting for, not a refusal."""
    from temporalio.api.errordetails.v1 import MultiOperationExecutionFailure

    details = builtins.list(e.grpc_status.details)  # (this module's list() is the service list)
    for d in builtins.list(details):
        if d.type_url.endswith("/temporal.api.errordetails.v1.MultiOperationExecutionFailure"):
            multi = MultiOperationExecutionFailure()  # update-with-start: one status per operation
            d.Unpack(multi)
            details += [detail for status in multi.statuses for detail in status.details]
    return any(d.type_url.endswith("/temporal.api.errordetails.v1.WorkflowNotReadyFailure") for d in details)


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

    async def _placement_now(self) -> Placement:
        """The placement with the NodeRegistry's Ready nodes, where a deploy verifies its image
        and an undeploy sweeps; this client's configured nodes while no registry runs."""
        from hms_mgmt.nodes import NotOurRegistry, ready_nodes

        placement = self._placement()
        try:
            ready = await ready_nodes(self.client, self.settings)
        except RPCError:
            ready = None
        except NotOurRegistry as e:
            log.warning("%s", e)
            ready = None
        return placement.model_copy(update={"nodes": ready}) if ready else placement

    def _prove(self, action: str, service: str, ttl_s: float = auth.PROOF_TTL_S, **bind: Any) -> str:
        """A proof of this one request made with the configured token, which itself never leaves
        this process (nor reaches workflow history)."""
        return auth.prove(self.settings.token, action=action, service=service, bind=bind, ttl_s=ttl_s)

    def _check_reader(self, action: str) -> None:
        """``status``/``logs`` need at least a viewer where a token is configured. Queries carry no
        identity, so for ``status`` this check is the client's own (anyone who reaches Temporal
        reads history anyway); ``logs`` is checked again by the workers."""
        if self.settings.token:
            auth.check_own_token(self.settings.token, action, self.settings.state_dir)

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

    @overload
    async def deploy(self, spec: SpecLike, *, wait: bool = ..., timeout: float = ...,
                     dry_run: Literal[False] = ...) -> DeployResult: ...

    @overload
    async def deploy(self, spec: SpecLike, *, wait: bool = ..., timeout: float = ...,
                     dry_run: Literal[True]) -> DryRunVerdict: ...

    async def deploy(self, spec: SpecLike, *, wait: bool = False, timeout: float = 300.0,
                     dry_run: bool = False) -> DeployResult | DryRunVerdict:
        """Start the service's workflow and return once admission has answered; a no-op when
        the same spec already runs.

        The start and the question "were we admitted?" are one call (update-with-start), so a
        refusal (access, governance, untrusted image) is raised here at once, typed. With
        ``wait=True``, return once the service is Running, or raise why it is not. With
        ``dry_run=True``, start nothing and return the admission verdict (:meth:`dry_run`).
        """
        if dry_run:
            return await self.dry_run(spec)
        spec = load_spec(spec)
        self._check_secrets_here(spec)
        wf_id = constants.service_workflow_id(spec.name)
        request_id = uuid.uuid4().hex
        inp = ServiceInput(spec=spec, placement=await self._placement_now(),
                           proof=self._prove("deploy", spec.name, spec=spec.digest()),
                           history_threshold=self.settings.history_threshold, request_id=request_id)

        until = "running" if wait else "admitted"
        status, start = await self._admission_with_start(spec, inp, until=until, timeout=timeout)
        handle = await start.workflow_handle()
        already = status.deploy_request_id != request_id
        revision: int | None = None
        if already and heading_to(status) != spec:
            # A changed spec for a running service: a new revision (or an in-place change).
            outcome = await self.update_spec(spec, wait=wait, timeout=timeout)
            revision = outcome.revision
        elif wait and status.phase not in names.SERVING:
            raise TimeoutError(f"service {spec.name} not Running after {timeout:g}s (phase {status.phase})")
        return DeployResult(workflow_id=wf_id, run_id=handle.result_run_id or handle.run_id,
                            web_ui_url=self.settings.web_ui_link(wf_id), already_running=already,
                            revision=revision)

    async def dry_run(self, spec: SpecLike) -> DryRunVerdict:
        """What a deploy of ``spec`` would do, with nothing started: the control plane runs
        admission's checks (this caller's proof and role, governance, secrets, image trust and
        its content id, placement per node, and for a running service the change and its
        rollout plan) in the NodeRegistry's ``dry_run`` update. A refusal is in the verdict
        (``failure``, typed; ``verdict.error()`` is its exception), not raised."""
        spec = load_spec(spec)
        from hms_mgmt.nodes import NotOurRegistry, node_registry

        arg = _request(DryRunInput, f"dry run {spec.name}", spec=spec, request_id=uuid.uuid4().hex,
                       proof=self._prove("dry_run", spec.name, spec=spec.digest()))
        try:
            handle = await node_registry(self.client, self.settings)
            return await handle.execute_update(names.NR.DRY_RUN, arg, result_type=DryRunVerdict)
        except NotOurRegistry as e:
            raise HmsError(f"dry run {spec.name}: {e}") from None
        except WorkflowUpdateFailedError as e:
            raise failure_error(e, f"dry run {spec.name}") from None
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise HmsError(f"dry run {spec.name}: no control plane answers (no node registry runs for "
                               f"{self.settings.task_queue}): start it with `hms up` or `hms worker`") from None
            raise

    async def _admission_with_start(self, spec: ServiceSpec, inp: ServiceInput, *, until: str,
                                    timeout: float) -> tuple[ServiceStatus, WithStartWorkflowOperation[Any, Any]]:
        """Start ``svc-<name>`` (or find it running) and ask ``admission`` in one call. Retries
        while the namespace is not ready yet, and when a run that has ended but not closed
        answers instead of ours; a refusal is raised typed."""
        wf_id = constants.service_workflow_id(spec.name)
        loop = asyncio.get_running_loop()
        not_ready_until = loop.time() + NOT_READY_RETRY_S
        attempts = 0
        while attempts < 3:
            attempts += 1
            if attempts > 1:  # a proof is good for the one run that took it: a fresh one for a fresh run
                inp = inp.model_copy(update={"proof": self._prove("deploy", spec.name, spec=spec.digest())})
            start = self._start_operation(spec, inp)
            try:
                status = await asyncio.wait_for(
                    self.client.execute_update_with_start_workflow(
                        names.U.ADMISSION,
                        _request(AdmissionRequest, f"deploy {spec.name}", until=until,
                                 timeout_s=min(max(timeout, 1.0), 3600.0)),
                        start_workflow_operation=start,
                        result_type=ServiceStatus,
                    ),
                    timeout + 30,
                )
                if status.deploy_request_id == inp.request_id or status.phase not in names.ENDED:
                    return status, start
                # An earlier run that has ended but not yet closed answered: start afresh once it has.
                error = HmsError(f"deploy {spec.name}: an earlier run of the service is still closing")
            except WorkflowUpdateFailedError as e:
                error = failure_error(e, f"deploy {spec.name}")
            except RPCError as e:
                if workflow_not_ready(e) and loop.time() < not_ready_until:
                    attempts -= 1
                    await asyncio.sleep(1.0)
                    continue
                raise HmsError(f"deploy {spec.name}: Temporal refused the start: {e.message}") from e
            if not await self._ending_other_run(wf_id, inp.request_id):
                raise error
        raise HmsError(f"deploy {spec.name}: an earlier run of the service kept ending; try again")

    def _start_operation(self, spec: ServiceSpec, inp: ServiceInput) -> WithStartWorkflowOperation[Any, Any]:
        """The start half of update-with-start (an operation is good for one call)."""
        return WithStartWorkflowOperation(
            names.SERVICE_WORKFLOW,
            inp,
            id=constants.service_workflow_id(spec.name),
            task_queue=self.settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"service {spec.name}: {spec.image}, {spec.min_replicas}-{spec.max_replicas} pods",
        )

    async def update_spec(self, spec: SpecLike, *, wait: bool = False, timeout: float = 300.0) -> UpdateOutcome:
        """Change a running service's spec: a new revision rolled out (surge, min_ready_s, drain,
        automatic rollback), or an in-place change when no pod field changed. Returns once the
        update is admitted; with ``wait``, once the revision runs everywhere — or raises
        ``RolloutFailed`` when it rolled back."""
        spec = load_spec(spec)
        self._check_secrets_here(spec)
        handle = await self._running_handle(spec.name)
        outcome = await self._update(
            handle, names.U.UPDATE_SPEC,
            _request(SpecUpdate, f"update {spec.name}", spec=spec,
                     proof=self._prove("update", spec.name, spec=spec.digest()), request_id=uuid.uuid4().hex),
            what=f"update {spec.name}", result_type=UpdateOutcome)
        if wait and outcome.revision is not None:
            await self.wait_for_revision(spec.name, outcome.revision, timeout=timeout)
        return outcome

    async def rollback(self, name: str, revision: int | None = None, *, wait: bool = False,
                       timeout: float = 300.0) -> UpdateOutcome:
        """Roll back to ``revision`` (default: the one before the current) and its pinned image."""
        handle = await self._running_handle(name)
        outcome = await self._update(
            handle, names.U.ROLLBACK,
            _request(SpecUpdate, f"roll back {name}", to_revision=revision,
                     proof=self._prove("rollback", name, to_revision=revision), request_id=uuid.uuid4().hex),
            what=f"roll back {name}", result_type=UpdateOutcome)
        if wait and outcome.revision is not None:
            await self.wait_for_revision(name, outcome.revision, timeout=timeout)
        return outcome

    async def rollout_history(self, name: str) -> builtins.list[RevisionRecord]:
        """Every revision kept: its spec, pinned image, who deployed it and when, how it ended."""
        return (await self.status(name, live=False)).revisions

    async def wait_for_revision(self, name: str, revision: int, *, timeout: float = 300.0) -> ServiceStatus:
        handle = await self._running_handle(name)
        status = await self._update(handle, names.U.ADMISSION,
                                    _request(AdmissionRequest, f"wait for {name}", until="revision",
                                             revision=revision, timeout_s=timeout),
                                    what=f"roll out revision {revision} of {name}")
        if status.revision < revision or status.phase not in names.SERVING:
            raise TimeoutError(f"{name}: revision {revision} not rolled out after {timeout:g}s "
                               f"(phase {status.phase}, revision {status.revision})")
        return status

    async def _ending_other_run(self, wf_id: str, request_id: str) -> bool:
        """True when the refusal came from an earlier run that ended (refused, failed, stopped)
        but had not closed yet as this deploy arrived; it has closed now, so start afresh."""
        handle = self.client.get_workflow_handle(wf_id)
        try:
            current = await handle.query(names.Q.STATUS, result_type=ServiceStatus)
        except (RPCError, WorkflowQueryFailedError):
            return False
        if current.deploy_request_id == request_id or current.phase not in names.ENDED:
            return False
        try:
            await asyncio.wait_for(handle.result(), 30)
        except Exception:  # noqa: BLE001 - a closed run of any outcome is what we wait for
            pass
        return True

    async def wait_for(self, name: str, *, timeout: float = 300.0) -> ServiceStatus:
        """Wait until the service runs (a bounded ``admission`` update, no polling); raise why
        it does not (refused, crash-looping, undeployed) or TimeoutError."""
        handle = await self._running(name)
        if handle is None:  # it ended: say why, from its final status
            raise status_error(await self._final_status(name))
        status = await self._update(handle, names.U.ADMISSION,
                                    _request(AdmissionRequest, f"wait for {name}", until="running", timeout_s=timeout),
                                    what=f"wait for {name}")
        if status.phase not in names.SERVING:
            raise TimeoutError(f"service {name} not Running after {timeout:g}s (phase {status.phase})")
        return status

    async def status(self, name: str, *, live: bool = True) -> ServiceStatus:
        """The workflow's state; with ``live``, merged with what the running health monitor
        has seen since it last reported (its heartbeat: failures in a row, CPU per pod)."""
        self._check_reader("status")
        return await self.read_status(name, live=live)

    async def read_status(self, name: str, *, live: bool = True) -> ServiceStatus:
        """``status`` without the client's reader check, for servers that apply their own
        access rules to what they show (the dashboard, the worker's metrics)."""
        handle = self._handle(name)
        try:
            status = await handle.query(names.Q.STATUS, result_type=ServiceStatus)
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
        child = (names.deploy_id(status.workflow_id, status.revision) if status.phase == "Deploying"
                 else names.scale_id(status.workflow_id, status.scale_count))
        try:
            pods = await self.client.get_workflow_handle(child).query(names.Q.PROGRESS, result_type=builtins.list[PodStatus])
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

    async def _final_status(self, name: str) -> ServiceStatus:
        handle = self.client.get_workflow_handle(constants.service_workflow_id(name), result_type=ServiceStatus)
        try:
            return await handle.result()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ServiceNotFound(f"no service named {name!r}") from None
            raise

    async def _running_handle(self, name: str) -> WorkflowHandle[Any, Any]:
        handle = await self._running(name)
        if handle is None:
            raise ServiceNotFound(f"no running service named {name!r}")
        return handle

    async def _update(self, handle: WorkflowHandle[Any, Any], update: str, arg: Any, *, what: str,
                      refine: type[HmsError] | None = None, result_type: type[Any] = ServiceStatus) -> Any:
        """Run a workflow update on the service's current run; a refusal comes back as the
        exception its kind maps to. An update that lands while the run is continuing-as-new is
        sent again, to the new run."""
        latest = self.client.get_workflow_handle(handle.id)  # no run id: follows continue-as-new
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSING_RETRY_S
        not_ready_until = loop.time() + NOT_READY_RETRY_S
        while True:
            try:
                return await latest.execute_update(update, arg, result_type=result_type)
            except WorkflowUpdateFailedError as e:
                raise failure_error(e, what, refine=refine) from None
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:
                    raise ServiceNotFound(f"{what}: the service is no longer running") from None
                if workflow_not_ready(e) and loop.time() < not_ready_until:
                    await asyncio.sleep(1.0)  # until a worker runs the workflow's task again
                    continue
                if e.status != RPCStatusCode.RESOURCE_EXHAUSTED or loop.time() > deadline:
                    raise
            await asyncio.sleep(0.1)  # the run is closing (continue-as-new): its successor takes it

    async def scale(self, name: str, replicas: int, *, reason: str = "") -> ServiceStatus:
        """Set the replica count (a validated workflow update: out of range is refused)."""
        handle = await self._running_handle(name)
        return await self._update(handle, names.U.SCALE,
                                  _request(ScaleRequest, f"scale {name}", replicas=replicas,
                                           proof=self._prove("scale", name, replicas=replicas), reason=reason),
                                  what=f"scale {name} to {replicas}", refine=ScaleRefused)

    async def time_slots(self, name: str) -> builtins.list[SlotClock]:
        """Each time slot of ``name`` with its next start and end (as its Temporal Schedules
        will fire them: none while paused), whether it is on and whether its bounds apply."""
        self._check_reader("status")
        from hms_mgmt.clock import service_clock  # Temporal schedules and cron parsing: only here

        return await service_clock(self.client, await self.read_status(name, live=False))

    def _check_secrets_here(self, spec: ServiceSpec) -> None:
        """On the control host, refuse before anything reaches Temporal's history: a secret's value
        pasted into ``env``, or a secret that does not exist. Admission checks both again."""
        if not spec.secrets and not spec.env:
            return  # nothing to check: the secrets store (and its crypto) is not even loaded
        from hms_mgmt import secrets

        if secrets.store_here(self.settings.state_dir):
            secrets.check_spec(self.settings.state_dir, spec)

    # --- secrets (on the control host: they need its state directory's secrets key) -------------

    def _secrets_admin(self) -> str:
        """The caller, if its token is an ops_admin's (the ``secrets`` action): who set a secret."""
        identity = auth.verify_token(self.settings.token, state_dir=self.settings.state_dir)
        auth.authorize(identity, "secrets", auth.load_access_matrix(self.settings.state_dir))
        return identity.user

    async def set_secret(self, name: str, value: bytes | str) -> SecretInfo:
        """Store ``value`` as ``name``'s next version, encrypted at rest, then roll every running
        service that names it onto that version: a new revision (its spec pins ``version``), the
        usual rolling update (surge, readiness, drain), ``secret NAME vN`` in its rollout history."""
        from hms_mgmt import secrets

        user = self._secrets_admin()
        data = value.encode() if isinstance(value, str) else bytes(value)
        info = await asyncio.to_thread(secrets.set_secret, self.settings.state_dir, name, data, by=user)
        for st in await self._using_secret(name):
            refs = [ref.model_copy(update={"version": info.version}) if ref.name == name else ref
                    for ref in st.spec.secrets]
            await self.update_spec(st.spec.model_copy(update={"secrets": refs}))
            info.used_by.append(st.name)
        return info

    async def _using_secret(self, name: str) -> builtins.list[ServiceStatus]:
        return [st for st in await self.list() if any(ref.name == name for ref in st.spec.secrets)]

    async def list_secrets(self) -> builtins.list[SecretInfo]:
        """Names, versions, who set each and when, and the running services naming each: never a value."""
        from hms_mgmt import secrets

        self._secrets_admin()
        infos = await asyncio.to_thread(secrets.list_secrets, self.settings.state_dir)
        running = await self.list()
        for info in infos:
            info.used_by = [st.name for st in running if any(ref.name == info.name for ref in st.spec.secrets)]
        return infos

    async def remove_secret(self, name: str) -> None:
        """Remove ``name``, refused while a running service's spec names it."""
        from hms_mgmt import secrets

        self._secrets_admin()
        users = [st.name for st in await self._using_secret(name)]
        if users:
            raise SpecError(f"secret {name} is named by running service(s) {', '.join(users)}: remove it from their "
                            "specs (hms update) or undeploy them first")
        if not await asyncio.to_thread(secrets.remove_secret, self.settings.state_dir, name):
            raise HmsError(f"no secret {name!r}")

    async def list(self) -> builtins.list[ServiceStatus]:
        self._check_reader("status")
        out = []
        async for wf in self.client.list_workflows(names.running_services_query(self.settings.task_queue)):
            try:
                out.append(await self.client.get_workflow_handle(wf.id).query(names.Q.STATUS, result_type=ServiceStatus))
            except RPCError:
                continue
        return sorted(out, key=lambda s: s.name)

    async def logs(self, service: str, pod_id: str | None = None, tail: int = 100) -> builtins.list[str]:
        """A pod's last ``tail`` lines (every pod's, prefixed, without ``pod_id``), read from the
        node that runs it: a viewer (or better) may read them; the node checks that too."""
        return [line async for line in self._logs(service, pod_id, tail, follow=False)]

    async def follow_logs(self, service: str, pod_id: str | None = None, tail: int = 100) -> AsyncIterator[str]:
        """``logs -f``: the last ``tail`` lines, then each new one as the pod writes it, straight
        from its node. Without ``pod_id``, every pod's, interleaved and prefixed ``POD@NODE | ``,
        and pods that start meanwhile join. Ends with a line saying so once the pod is gone (each
        pod's, without ``pod_id``: it ends when none is left)."""
        async for line in self._logs(service, pod_id, tail, follow=True):
            yield line

    async def _logs(self, service: str, pod_id: str | None, tail: int, *, follow: bool) -> AsyncIterator[str]:
        from hms_mgmt import logstream

        self._check_reader("logs")
        if not 0 <= tail <= logstream.MAX_TAIL:
            raise SpecError(f"tail must be 0..{logstream.MAX_TAIL}, not {tail}")
        pods = await self._log_pods(service, pod_id)
        key, key_hash = logstream.new_key()
        grant = await self._log_grant(service, [p.id for p in pods], key_hash)
        if pod_id is not None and not follow and not grant.endpoints[0].url:
            for line in await self._logs_through_temporal(service, pods[0], tail):  # a node without a log stream
                yield line
            return
        streams = logstream.PodStreams(key, service=service, tail=tail, follow=follow, each_alone=pod_id is None)
        streams.add(grant)
        nodes = {e.pod: e.node for e in grant.endpoints}
        # Following a whole service, as `docker service logs -f`: pods that start later join.
        joining = asyncio.create_task(self._join_new_pods(service, streams, key_hash, nodes)) \
            if follow and pod_id is None else None
        try:
            async for item in streams.lines():
                text = f"--- {item.text}" if item.end else item.text
                # One event, one line under its prefix: a node that sent a CR unescaped (an
                # older one) has it arrive as a line break, which would start an unprefixed line.
                text = text.replace("\n", "\\n")
                yield text if pod_id is not None else f"{item.pod[:8]}@{nodes[item.pod]} | {text}"
        finally:
            if joining is not None:
                joining.cancel()

    async def _join_new_pods(self, service: str, streams: PodStreams, key_hash: str, nodes: dict[str, str],
                             every_s: float = 2.0) -> None:
        """Add the service's new pods to ``streams`` until it ends (or the service does)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                status = await self.read_status(service, live=False)
                new = [p.id for p in status.pods if p.id not in streams.pods]
                if new:
                    grant = await self._log_grant(service, new, key_hash)
                    nodes.update({e.pod: e.node for e in grant.endpoints})
                    streams.add(grant)
            except (HmsError, RPCError, WorkflowQueryFailedError):  # ended, or a pod went before its grant
                continue

    async def _log_grant(self, service: str, pod_ids: builtins.list[str], key_hash: str) -> LogGrantOutput:
        from hms_mgmt import logstream

        return await self._logs_workflow(
            names.LOG_GRANT_WORKFLOW, service,
            LogGrantInput(service=service, pods=pod_ids, key_hash=key_hash,
                          proof=self._prove("logs", service, **logstream.grant_bind(pod_ids, key_hash))),
            LogGrantOutput)

    async def _log_pods(self, service: str, pod_id: str | None) -> builtins.list[PodStatus]:
        status = await self.read_status(service, live=False)
        if pod_id is None:
            if not status.pods:
                raise HmsError(f"service {service} has no pods ({status.phase})")
            return status.pods
        pod = next((p for p in status.pods if p.id == pod_id or p.id.startswith(pod_id)), None)
        if pod is None:
            raise HmsError(f"service {service} has no pod {pod_id!r}; pods: {', '.join(p.id for p in status.pods)}")
        return [pod]

    async def _logs_through_temporal(self, service: str, pod: PodStatus, tail: int) -> builtins.list[str]:
        out = await self._logs_workflow(
            names.POD_LOGS_WORKFLOW, service,
            PodLogsInput(pod_id=pod.id, node_task_queue=self.settings.node_task_queue(pod.node), tail=max(tail, 1),
                         service=service, proof=self._prove("logs", service, pod=pod.id)),
            LogsOutput)
        return out.lines

    async def _logs_workflow(self, workflow: str, service: str, arg: BaseModel, result_type: type[M]) -> M:
        """Run one of the logs workflows (id ``svc-NAME-logs-…``); its failure as the typed error."""
        try:
            return await self.client.execute_workflow(
                workflow, arg, id=names.logs_id(constants.service_workflow_id(service), uuid.uuid4().hex[:8]),
                task_queue=self.settings.task_queue, result_type=result_type)
        except WorkflowFailureError as e:
            cause: BaseException | None = e.cause
            while cause is not None and not isinstance(cause, ApplicationError):
                cause = getattr(cause, "cause", None)
            if cause is None:
                raise
            raise error_for(cause.type, cause.message) from None

    async def undeploy(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> ServiceStatus | None:
        """Stop every pod and end the service's workflow (ops_admin only, checked by the worker).

        The ``undeploy`` update answers once the request is accepted (or refused, typed); with
        ``wait`` this returns the final status once every pod is stopped."""
        handle = await self._running_handle(name)
        await self._update(handle, names.U.UNDEPLOY, _request(UndeployRequest, f"undeploy {name}",
                                                        proof=self._prove("undeploy", name),
                                                        request_id=uuid.uuid4().hex),
                           what=f"undeploy {name}")
        if not wait:
            return None
        typed = self.client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=ServiceStatus)
        return await asyncio.wait_for(typed.result(), timeout)

    async def approve(self, name: str, *, reason: str = "") -> ServiceStatus:
        """Approve a deployment waiting for governance (a ``gov_approver``, not the requester).
        Returns once the decision has taken effect (the service moved on from AwaitingApproval)."""
        return await self._decide("approve", name, reason)

    async def reject(self, name: str, *, reason: str = "") -> ServiceStatus:
        """Reject a deployment waiting for governance: it ends Rejected, with no pod started."""
        return await self._decide("reject", name, reason)

    async def _decide(self, kind: str, name: str, reason: str) -> ServiceStatus:
        handle = await self._running_handle(name)
        approval = await self.approval(kind, name, reason=reason)
        update = names.U.APPROVE if kind == "approve" else names.U.REJECT
        return await self._update(handle, update, approval, what=f"{kind} {name}")

    async def _check_genuine(self, name: str) -> None:
        """RequestRefused unless ``svc-<name>``'s current run is this control plane's own."""
        why = _genuine_problem(await self._handle(name).describe(), self.settings.task_queue)
        if why is not None:
            raise RequestRefused(f"not signing for {name}: {why}")

    async def approval(self, kind: str, name: str, *, reason: str = "",
                       ttl_s: float = auth.PROOF_TTL_S) -> Approval:
        """The ``approve``/``reject`` input for the service's pending request: a proof naming the
        service, the revision, the spec hash and the request, good once. ``hms approve
        --print-signal`` prints it for the Temporal CLI or the Web UI's "Send a signal" form."""
        # What the proof must name, read without the client's own reader check: a refused token
        # should reach the workflow, which records the attempt (pending_approval.invalid_attempts).
        try:
            await self._check_genuine(name)
            status = await self._handle(name).query(names.Q.STATUS, result_type=ServiceStatus)
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ServiceNotFound(f"no service named {name!r}") from e
            raise
        pending = status.pending_approval
        if pending is None:
            raise RequestRefused(f"cannot {kind} {name}: it is {status.phase}, not awaiting approval")
        proof = self._prove(kind, name, ttl_s=ttl_s, revision=pending.revision, spec=pending.spec_hash,
                            request=pending.id)
        return _request(Approval, f"{kind} {name}", proof=proof, reason=reason, request_id=uuid.uuid4().hex)


def _genuine_problem(desc: Any, task_queue: str) -> str | None:
    """Why the described run is not a service of this control plane that an approver may sign
    for, or None: anyone who reaches Temporal can start a run under ``svc-<name>`` whose status
    shows a small spec with a big request's hash, or reset a real one."""
    if desc.workflow_type != names.SERVICE_WORKFLOW or desc.task_queue != task_queue:
        return f"it is a {desc.workflow_type} on task queue {desc.task_queue}, not our ServiceWorkflow on {task_queue}"
    if desc.raw_description.workflow_extended_info.HasField("last_reset_time"):
        return "its run was made by a workflow reset"
    return None


def failure_error(err: WorkflowUpdateFailedError, what: str, *, refine: type[HmsError] | None = None) -> HmsError:
    """The typed error behind a failed update: its ApplicationError type is a FailureKind."""
    cause: BaseException | None = err.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = cause.__cause__ or getattr(cause, "cause", None)
    if cause is None:
        return HmsError(f"{what} failed: {err}")
    return error_for(cause.type, cause.message, refine=refine)


def status_error(status: ServiceStatus) -> HmsError:
    """The precise error for a service that ended or is failing, from its typed ``failure``."""
    if status.failure is not None:
        return error_for(status.failure.kind, status.failure.message)
    return HmsError(f"service {status.name} is {status.phase}: {status.message or 'see its workflow history'}")


# --- the synchronous helpers of the seed, and their async twins ------------------------
#
# The async twins connect per call, on the caller's loop. The synchronous functions run on the
# process's client thread (hms_mgmt.connection) with one shared client per connection, so a
# script that calls them many times connects once and always exits cleanly.


async def _with(fn_name: str, *args: Any, settings: Settings | None = None, **kwargs: Any) -> Any:
    orch = await Orchestrator.connect(settings)
    return await getattr(orch, fn_name)(*args, **kwargs)


async def _shared(fn_name: str, *args: Any, settings: Settings | None = None, **kwargs: Any) -> Any:
    settings = settings or Settings.from_env()
    orch = Orchestrator(await connection.shared_client(settings), settings)
    return await getattr(orch, fn_name)(*args, **kwargs)


def _sync(fn_name: str, *args: Any, settings: Settings | None = None, **kwargs: Any) -> Any:
    return connection.run(_shared(fn_name, *args, settings=settings, **kwargs))


async def deploy_async(spec: SpecLike, *, settings: Settings | None = None,
                       **kw: Any) -> DeployResult | DryRunVerdict:
    spec = load_spec(spec)  # a bad spec fails before any connection is made
    return await _with("deploy", spec, settings=settings, **kw)


async def status_async(name: str, *, settings: Settings | None = None) -> ServiceStatus:
    return await _with("status", name, settings=settings)


async def list_async(*, settings: Settings | None = None) -> builtins.list[ServiceStatus]:
    return await _with("list", settings=settings)


async def logs_async(service: str, pod_id: str | None = None, tail: int = 100, *,
                     settings: Settings | None = None) -> builtins.list[str]:
    return await _with("logs", service, pod_id, tail, settings=settings)


async def logs_follow_async(service: str, pod_id: str | None = None, tail: int = 100, *,
                            settings: Settings | None = None) -> AsyncIterator[str]:
    """``logs(..., follow=True)`` as an async iterator: ``async for line in logs_follow_async(...)``."""
    orch = await Orchestrator.connect(settings)
    async for line in orch.follow_logs(service, pod_id, tail):
        yield line


async def _shared_follow(service: str, pod_id: str | None, tail: int, settings: Settings | None) -> AsyncIterator[str]:
    settings = settings or Settings.from_env()
    orch = Orchestrator(await connection.shared_client(settings), settings)
    async for line in orch.follow_logs(service, pod_id, tail):
        yield line


async def scale_async(name: str, replicas: int, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus:
    return await _with("scale", name, replicas, settings=settings, **kw)


async def approve_async(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    return await _with("approve", name, reason=reason, settings=settings)


async def reject_async(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    return await _with("reject", name, reason=reason, settings=settings)


async def undeploy_async(name: str, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus | None:
    return await _with("undeploy", name, settings=settings, **kw)


def deploy(spec: SpecLike, *, settings: Settings | None = None, **kw: Any) -> DeployResult | DryRunVerdict:
    """Deploy a service: a dict like the seed's, a ServiceSpec, or a YAML file path. With
    ``dry_run=True``, start nothing and return the admission verdict (a DryRunVerdict)."""
    spec = load_spec(spec)
    return _sync("deploy", spec, settings=settings, **kw)


def status(name: str, *, settings: Settings | None = None) -> ServiceStatus:
    return _sync("status", name, settings=settings)


def list(*, settings: Settings | None = None) -> builtins.list[ServiceStatus]:  # noqa: A001 - the seed's word
    return _sync("list", settings=settings)


def logs(service: str, pod_id: str | None = None, tail: int = 100, *, follow: bool = False,
         settings: Settings | None = None) -> builtins.list[str] | Iterator[str]:
    """The last ``tail`` lines of a pod's log (``orchestrator.logs(service=..., pod_id=...)``;
    every pod's, prefixed, without ``pod_id``). With ``follow=True``, an iterator that goes on with
    each new line until the pod is gone (its last line says so) or the caller stops iterating."""
    if follow:
        return connection.iterate(_shared_follow(service, pod_id, tail, settings))
    return _sync("logs", service, pod_id, tail, settings=settings)


def scale(name: str, replicas: int, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus:
    """Set a service's replica count within [min_replicas, max_replicas]."""
    return _sync("scale", name, replicas, settings=settings, **kw)


def approve(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    """Approve a deployment waiting in AwaitingApproval (as a ``gov_approver``)."""
    return _sync("approve", name, reason=reason, settings=settings)


def reject(name: str, *, reason: str = "", settings: Settings | None = None) -> ServiceStatus:
    return _sync("reject", name, reason=reason, settings=settings)


def undeploy(name: str, *, settings: Settings | None = None, **kw: Any) -> ServiceStatus | None:
    return _sync("undeploy", name, settings=settings, **kw)


def rollback(name: str, revision: int | None = None, *, settings: Settings | None = None,
             **kw: Any) -> UpdateOutcome:
    """Roll a service back to ``revision`` (default: the one before the current), its pinned image."""
    return _sync("rollback", name, revision, settings=settings, **kw)


def time_slots(name: str, *, settings: Settings | None = None) -> builtins.list[SlotClock]:
    """Each time slot of ``name`` with its next start and end."""
    return _sync("time_slots", name, settings=settings)


def rollout_history(name: str, *, settings: Settings | None = None) -> builtins.list[RevisionRecord]:
    """A service's revisions: spec, pinned image id, who deployed it and when, how it ended."""
    return _sync("rollout_history", name, settings=settings)
