"""The worker process: workflows and control activities on ``hms-control``, pod activities on
this node's queue ``hms-node-<name>``. ``--node NAME`` on another machine adds a node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.callers import Callers
from activities.control import ControlActivities
from activities.enrolment import NodeTrustActivities
from activities.feed import FeedActivities
from activities.logs import LogActivities
from activities.pods import PodActivities
from activities.slots import SlotActivities
from hms_mgmt import constants, nodeid, tickets
from hms_mgmt.config import Settings, connect
from hms_mgmt.errors import HmsError
from hms_mgmt.events import EventSink, WebhookDelivery, webhook_secret
from hms_mgmt.files import secure_state_dir
from hms_mgmt.logstream import LogServer
from hms_mgmt.runtimes import make_runtime
from hms_mgmt.runtimes.podnet import PodFirewall
from hms_mgmt.trust import TrustStore
from worker.metrics import WorkerMetrics
from worker.nodes import NodeAgent
from workflows import ALL_WORKFLOWS, SCHEDULED_WORKFLOWS, MessageGuard

FIREWALL_PORTS_EVERY_S = 30.0  # how often the Temporal server's ports are read again for the pod firewall
log = logging.getLogger("hms.worker")

# Every service with ready pods on a node holds one watch_pods activity on that node's queue the
# whole time, and every autoscaling service one watch_cpu on the control queue: the slots must
# outnumber the watches with room to spare, or pod starts, stops and heals wait until a watch
# ends (up to watch_max_s). Every activity is async, so an idle slot costs nothing.
NODE_SLOTS_SPARE = 200
CONTROL_ACTIVITY_SLOTS = 10_000
# Open files a node needs per pod: a process pod's pidfd (exit events), a health probe's socket.
FILES_PER_POD, FILES_BASE = 2, 512
NOFILE_CAP = 65536  # the soft open-files limit is raised to the hard one, at most this (or what the pods need)


def node_activity_slots(settings: Settings) -> int:
    """Activity slots of a node's worker: one watch per service it can hold, and spare."""
    return max(500, settings.node_max_pods + NODE_SLOTS_SPARE)


def raise_open_files_limit(node_max_pods: int) -> int:
    """Raise this process's soft limit on open files to its hard limit, at most NOFILE_CAP (a login shell's or
    systemd's soft 1024 runs out near 500 process pods); warn when even that is short of what
    ``node_max_pods`` pods need. Returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FILES_BASE + FILES_PER_POD * node_max_pods
    cap = max(NOFILE_CAP, need)  # a hard limit of a million (or none) is not a reason to take it all
    target = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open files limit raised from %s to %s (hard %s)", soft, target, hard)
        soft = target
    except (ValueError, OSError) as e:
        log.warning("could not raise the open files limit from %s to %s: %s", soft, target, e)
    if soft < need:
        log.warning("open files limit %s (hard %s) is short of the ~%s that node_max_pods=%s needs: raise "
                    "`ulimit -n` (LimitNOFILE= in a systemd unit)", soft, hard, need, node_max_pods)
    return soft


# The sandbox imports a workflow's modules afresh for every new run: the whole ``workflows``
# package, 100-300 ms of one core per heal, scale or rollout child on a busy 2-core host. Our
# workflow modules hold no state of their own (constants and classes only), so they are imported
# once and passed through. Passed-through code is not checked at run time for calls a workflow
# must not make (clock, environment, I/O): tests/replay replays the recorded histories under the
# default sandbox, which does check them.
WORKFLOW_RUNNER = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("workflows"))


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register HmsService/HmsPhase so the Web UI can filter (a no-op once they exist)."""
    wanted = {constants.SEARCH_ATTR_SERVICE, constants.SEARCH_ATTR_PHASE}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = wanted - set(existing.custom_attributes)
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=namespace,
                    search_attributes={k: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in missing},
                )
            )
    except Exception as e:  # noqa: BLE001 - e.g. Temporal Cloud, where an admin registers them once
        log.warning("could not register search attributes %s: %s", sorted(wanted), e)


class HmsWorker:
    """Both workers of one process, built from settings; ``run()`` until ``stop()``."""

    def __init__(
        self,
        client: Client,
        settings: Settings,
        *,
        control: bool = True,
        node: bool = True,
        settings_loader: Callable[[], Settings] | None = None,
        metrics: bool = False,
    ) -> None:
        if not (control or node):
            raise HmsError("a worker runs the control plane, a node, or both: not neither")
        self.client = client
        self.settings = settings
        self.workers: list[Worker] = []
        self.pods: PodActivities | None = None
        self.feed: FeedActivities | None = None
        self.control = control
        self.serve_metrics = metrics  # /metrics on 127.0.0.1:settings.metrics_port
        self.metrics = WorkerMetrics()
        self.agent: NodeAgent | None = None
        self.pod_firewall: PodFirewall | None = None
        self._firewall_task: asyncio.Future[None] | None = None
        self.log_server: LogServer | None = None
        self._agent_task: asyncio.Task[None] | None = None
        sink = EventSink(settings.state_dir, webhooks=settings.webhook_urls())
        sink.listeners.append(self.metrics.on_event)
        self.sink = sink
        if control:
            self.workers.append(self._control_worker(settings_loader or (lambda: settings)))
        if node:
            self.workers.append(self._node_worker(settings_loader))

    def _control_worker(self, load: Callable[[], Settings]) -> Worker:
        """The control queue: every workflow, and the activities that decide (access, governance,
        tickets, the Scheduler, the endpoint feed, node trust, slot schedules)."""
        client, settings, sink = self.client, self.settings, self.sink
        # The admission-ticket key, made before any node needs its public half.
        tickets.ensure_control_key(settings.state_dir)
        callers = Callers(client)  # one cache of described runs for every control activity
        ctl = ControlActivities(client, load, sink, callers)
        trust = NodeTrustActivities(load, sink)
        self.feed = FeedActivities(load, client=client, sink=sink, callers=callers)
        return Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[*ALL_WORKFLOWS, *SCHEDULED_WORKFLOWS],
            workflow_runner=WORKFLOW_RUNNER,
            activities=[ctl.pick_node, ctl.capacity_waits, ctl.plan_deploy, ctl.emit_event, ctl.authorize, ctl.check_governance,
                        ctl.issue_ticket, ctl.start_ticket, ctl.start_tickets, ctl.seal_secrets, ctl.stop_grant,
                        self.feed.publish_endpoints,
                        self.feed.await_drained, ctl.confirm_heal_attempt, ctl.confirm_draining, ctl.notify_node_lost, ctl.node_is_lost, ctl.watch_cpu,
                        trust.enrol_node, trust.registry_settings, trust.check_nodes, trust.check_routers,
                        trust.node_removed, trust.check_pod_report, trust.check_started_pod, trust.stamp_start, trust.stamp_round, trust.trust_now,
                        LogActivities(client, load).locate_log_endpoints,
                        *SlotActivities(client, load, sink).all()],
            # MessageGuard: a malformed signal or update never reaches a workflow's handler.
            interceptors=[self.metrics.interceptor, MessageGuard()],
            max_concurrent_activities=CONTROL_ACTIVITY_SLOTS,
            # HMS_STICKY_TIMEOUT_S (1 s; the SDK's default is 10 s): how long a workflow task waits for this
            # worker's sticky queue before it goes to the control queue. When a worker is killed, its sticky
            # queue is dead: a query answered meanwhile by the next worker, from a history whose last events no
            # task had taken yet, left that worker's cached run ahead of what it later completed, and a replay
            # of the history it wrote then failed with a non-determinism error (tests/chaos/test_worker_kills.py
            # replays every history of its run). A second closes that window before a restarted worker polls.
            # The cost: a task this worker is too busy to take within it is replayed from its whole history.
            sticky_queue_schedule_to_start_timeout=timedelta(seconds=settings.sticky_timeout_s),
        )

    def _node_worker(self, settings_loader: Callable[[], Settings] | None) -> Worker:
        """This node's queue: the pod activities over its runtime; and its NodeAgent."""
        client, settings, sink = self.client, self.settings, self.sink
        raise_open_files_limit(settings.node_max_pods)
        # Its own key and certificate: made here on the control plane's host, from `hms node join` elsewhere.
        identity = nodeid.node_identity(settings.state_dir, settings.node, settings.node_address)
        runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir,
                               docker_host=settings.docker_host, limits=settings.pod_limits(), events=sink,
                               address=settings.node_address)
        log.info("node %s at %s: %s runtime, task queue %s", settings.node, settings.node_address, runtime.name,
                 settings.node_task_queue())
        self.pods = PodActivities(runtime, TrustStore(settings.state_dir), sink, on_probe=self.metrics.on_probe,
                                  identity=identity, trust_here=not nodeid.is_joined(settings.state_dir))
        self.agent = NodeAgent(client, settings, settings.this_node(runtime.name), runtime, settings_loader,
                               events=sink, identity=identity)
        if settings.log_port >= 0:
            self.log_server = LogServer(runtime, settings.state_dir, sink=sink)
        if nodeid.is_joined(settings.state_dir):  # its events reach the control host's log on its heartbeats
            resumed = self.agent.resume_forwarding()
            if resumed:
                log.info("node %s: %d event(s) of its log still to forward", settings.node, resumed)
            sink.listeners.append(self.agent.forward)
        return Worker(
            client,
            task_queue=settings.node_task_queue(),
            activities=[
                self.pods.start_pod,
                self.pods.stop_pod,
                self.pods.list_pods,
                self.pods.pod_logs,
                self.pods.watch_pods,
                self.pods.verify_image,
            ],
            max_concurrent_activities=node_activity_slots(settings),
            # Heartbeats carry the monitor's live view (failures, CPU) to status():
            # send them each second rather than at 80% of the heartbeat timeout.
            max_heartbeat_throttle_interval=timedelta(seconds=1),
            default_heartbeat_throttle_interval=timedelta(seconds=1),
            interceptors=[self.metrics.interceptor],
        )

    @property
    def runtime_name(self) -> str | None:
        return self.pods.runtime.name if self.pods else None

    @contextlib.asynccontextmanager
    async def _extras(self) -> AsyncIterator[None]:
        """Beside the workers: webhook delivery from the spool (control worker only) and metrics."""
        async with contextlib.AsyncExitStack() as stack:
            if self.control and self.sink.webhooks:
                secret = await asyncio.to_thread(webhook_secret, self.settings.state_dir, self.settings.webhook_secret)
                await stack.enter_async_context(WebhookDelivery(self.sink, secret, on_result=self.metrics.on_delivery))
            await stack.enter_async_context(
                self.metrics.running(self.client, self.settings, serve=self.serve_metrics,
                                     fleet=self.control and self.serve_metrics)
            )
            yield

    async def run(self) -> None:
        await ensure_search_attributes(self.client, self.settings.namespace)
        await self._guard_pods()
        await self._serve_logs()
        self._start_agent()
        try:
            async with self._extras():
                await asyncio.gather(*(w.run() for w in self.workers))
        finally:
            await self._close()

    async def _serve_logs(self) -> None:
        """The node's log stream, on its address; the port it got goes into its registration."""
        if self.log_server is None or self.agent is None:
            return
        try:
            port = await self.log_server.start(self.settings.node_address, self.settings.log_port)
        except HmsError as e:
            log.warning("%s: `hms logs` reads this node's pods through Temporal only", e)
            self.log_server = None
            return
        self.agent.advertise(log_port=port)

    def _start_agent(self) -> None:
        if self.agent is not None:
            self._agent_task = asyncio.ensure_future(self.agent.run())

    # --- process pods may not reach the control plane's ports (issue 19; hms_mgmt/runtimes/podnet.py)

    async def _guard_pods(self) -> None:
        runtime = self.pods.runtime if self.pods is not None else None
        if runtime is None or runtime.name != "process" or not self.settings.pod_firewall or os.geteuid() != 0:
            return
        # the whole per-pod uid range (pod_user: auto), or the named pod user's uid
        owner = await asyncio.to_thread(runtime.firewall_owner)  # type: ignore[attr-defined]
        if owner is None:
            return
        firewall = PodFirewall(self.settings, owner)
        try:
            await asyncio.to_thread(firewall.install)
        except OSError as e:
            log.warning("process pods can reach Temporal and the control ports of this host: %s", e)
            return
        self.pod_firewall = firewall
        self._firewall_task = asyncio.ensure_future(self._follow_server_ports(firewall))

    async def _follow_server_ports(self, firewall: PodFirewall) -> None:
        """A Temporal dev server that restarts picks new ports for its HTTP API and the rest:
        the rule follows them."""
        while True:
            await asyncio.sleep(FIREWALL_PORTS_EVERY_S)
            try:
                if await asyncio.to_thread(firewall.ports_changed):
                    await asyncio.to_thread(firewall.install)
            except OSError as e:
                log.warning("the process pods' iptables rule was not updated: %s", e)

    async def _unguard_pods(self) -> None:
        """Remove the pods' rule, unless pods of this node still run: process pods outlive a
        worker stopped without ``sweep_on_exit`` (the next worker adopts them and replaces the
        rule), and must not reach the control plane meanwhile."""
        if self._firewall_task is not None:
            self._firewall_task.cancel()
            await asyncio.gather(self._firewall_task, return_exceptions=True)
            self._firewall_task = None
        if self.pod_firewall is None:
            return
        left = await asyncio.to_thread(self.pods.runtime.list) if self.pods is not None else []
        if left:
            log.info("node %s: %d pod(s) keep running after this worker, so their iptables rule stays",
                     self.settings.node, len(left))
        else:
            await asyncio.to_thread(self.pod_firewall.remove)
        self.pod_firewall = None

    # ---

    async def _stop_agent(self) -> None:
        """Stop heartbeating: the registry calls the node Lost once ``node_lost_after_s`` pass."""
        if self._agent_task is not None:
            self._agent_task.cancel()
            await asyncio.gather(self._agent_task, return_exceptions=True)
            self._agent_task = None

    async def _close(self) -> None:
        await self._stop_agent()
        if self.agent is not None and self.settings.sweep_on_exit:
            # After the workers stopped: no activity can start a pod here any more.
            await self.agent.stop_all()
        await self._unguard_pods()
        if self.log_server is not None:
            await self.log_server.stop()
        if self.pods is not None:
            await self.pods.close()
        if self.feed is not None:
            await self.feed.close()

    async def stop(self) -> None:
        await self._stop_agent()
        await asyncio.gather(*(w.shutdown() for w in self.workers))

    async def __aenter__(self) -> HmsWorker:
        await ensure_search_attributes(self.client, self.settings.namespace)
        self._extras_cm = self._extras()
        await self._extras_cm.__aenter__()
        await self._guard_pods()
        await self._serve_logs()
        self._task = asyncio.ensure_future(asyncio.gather(*(w.run() for w in self.workers)))
        self._start_agent()
        if self.agent is not None:  # the node is Ready before the caller deploys onto it
            try:
                await asyncio.wait_for(self.agent.registered.wait(), 15)
            except TimeoutError:
                log.warning("node %s not registered yet (no control worker?); it keeps trying", self.settings.node)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        try:
            await self._task
        finally:
            await self._extras_cm.__aexit__(None, None, None)
            await self._close()


async def main(
    settings: Settings | None = None, *, control: bool = True, node_worker: bool = True, **overrides: object
) -> None:
    """Run until SIGINT/SIGTERM. The Scheduler re-reads the configuration with
    ``settings.reload()``, which keeps the overrides the settings were built with (e.g. ``node=``),
    so a ``--node`` flag places pods where this worker runs."""
    settings = settings or Settings.from_env(**overrides)
    secure_state_dir(settings.state_dir)
    client = await connect(settings)
    worker = HmsWorker(client, settings, control=control, node=node_worker, settings_loader=settings.reload,
                       metrics=True)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    task = asyncio.create_task(worker.run())
    log.info("worker ready: %s", ", ".join(
        ([f"control queue {settings.task_queue}"] if control else []) + ([f"node {settings.node}"] if node_worker else [])))
    await asyncio.wait({task, asyncio.create_task(stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        await worker.stop()
    await task
