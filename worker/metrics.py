"""Prometheus ``/metrics`` of the worker (127.0.0.1:``metrics_port``, default 9464).

Three sources, so a scrape never waits on Temporal:
- an activity interceptor times every activity this worker runs (``hms_activity_duration_seconds``);
- the event sink's listener counts events and times approval waits (requested → granted/rejected);
- a background task reads the fleet's status every few seconds (one list call, bounded
  concurrent queries) and a collector turns that snapshot into gauges and counters: services by
  phase, pods by health, heals, crash loops, scale decisions, pending approvals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from hms_mgmt.config import Settings
from hms_mgmt.events import Event
from hms_mgmt.fleet import fleet_status
from hms_mgmt.models import Health, Phase, ServiceStatus
from hms_mgmt.orchestrator import Orchestrator

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = get_args(Phase)
HEALTHS: tuple[str, ...] = get_args(Health)
CRASH_LOOP_AFTER = 2  # replacements failing in a row: the service is crash-looping
ACTIVITY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
PROBE_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
APPROVAL_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
FLEET_READ_SHARE = 20  # the fleet gauges' refresh waits this many times as long as a read took
FLEET_READ_CONCURRENCY = 4  # status reads in flight: a refresh must not crowd out the workflows' tasks


class _ActivityTimer(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, histogram: Histogram) -> None:
        super().__init__(next)
        self.histogram = histogram

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type
        start = time.perf_counter()
        outcome = "failed"
        try:
            result = await self.next.execute_activity(input)
            outcome = "completed"
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.histogram.labels(activity=name, outcome=outcome).observe(time.perf_counter() - start)


class ActivityMetricsInterceptor(Interceptor):
    """Times every activity of the worker it is passed to (``Worker(interceptors=[...])``)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityTimer(next, self.histogram)


class FleetCollector(Collector):
    """Turns the latest fleet snapshot into metric families at scrape time."""

    def __init__(self) -> None:
        self.snapshot: list[ServiceStatus] = []
        self.refreshed_at: float = 0.0
        self.ok = False
        self.lock = threading.Lock()

    def update(self, statuses: list[ServiceStatus] | None) -> None:
        with self.lock:
            if statuses is not None:
                self.snapshot = statuses
                self.refreshed_at = time.time()
            self.ok = statuses is not None

    def collect(self) -> Iterator[Any]:
        with self.lock:
            services, refreshed_at, ok = list(self.snapshot), self.refreshed_at, self.ok
        now = datetime.now(UTC)

        up = GaugeMetricFamily("hms_fleet_up", "1 when the last fleet status read from Temporal succeeded")
        up.add_metric([], 1.0 if ok else 0.0)
        yield up
        age = GaugeMetricFamily("hms_fleet_snapshot_timestamp_seconds", "When the fleet status was last read")
        age.add_metric([], refreshed_at)
        yield age

        by_phase = GaugeMetricFamily("hms_services", "Running service workflows by phase", labels=["phase"])
        for phase in PHASES:
            by_phase.add_metric([phase], sum(1 for s in services if s.phase == phase))
        yield by_phase

        pods = GaugeMetricFamily("hms_pods", "Pods by health", labels=["service", "health"])
        pods_total = GaugeMetricFamily("hms_pods_total", "Pods of every service by health", labels=["health"])
        for health in HEALTHS:
            pods_total.add_metric([health], sum(1 for s in services for p in s.pods if p.health == health))
            for s in services:
                pods.add_metric([s.name, health], sum(1 for p in s.pods if p.health == health))
        yield pods
        yield pods_total

        desired = GaugeMetricFamily("hms_service_desired_replicas", "Desired replicas", labels=["service"])
        ready = GaugeMetricFamily("hms_service_ready_replicas", "Ready replicas", labels=["service"])
        cpu = GaugeMetricFamily("hms_service_cpu_percent", "Mean CPU of the service's pods (percent of limit)",
                                labels=["service"])
        heals = CounterMetricFamily("hms_heals", "Pods replaced by a heal", labels=["service"])
        scales = CounterMetricFamily("hms_scale_decisions", "Scaling actions taken", labels=["service"])
        crashes = GaugeMetricFamily("hms_service_crashes_in_a_row", "Failed replacements in a row",
                                    labels=["service"])
        looping = GaugeMetricFamily("hms_service_crash_loop", "1 while the service is crash-looping",
                                    labels=["service"])
        backoff = GaugeMetricFamily("hms_service_backoff_seconds", "Current heal back-off", labels=["service"])
        waiting = GaugeMetricFamily("hms_approval_pending_seconds",
                                    "How long a deployment has waited for approval", labels=["service"])
        for s in services:
            desired.add_metric([s.name], s.desired_replicas)
            ready.add_metric([s.name], s.ready_replicas)
            samples = [p.cpu_percent for p in s.pods if p.cpu_percent is not None]
            if samples:
                cpu.add_metric([s.name], sum(samples) / len(samples))
            heals.add_metric([s.name], s.heal_count)
            scales.add_metric([s.name], s.scale_count)
            crashes.add_metric([s.name], s.crash_count)
            looping.add_metric([s.name], 1.0 if is_crash_looping(s) else 0.0)
            backoff.add_metric([s.name], s.backoff_s)
            if s.pending_approval is not None:
                waiting.add_metric([s.name], max(0.0, (now - s.pending_approval.requested_at).total_seconds()))
        yield from (desired, ready, cpu, heals, scales, crashes, looping, backoff, waiting)

        loops = GaugeMetricFamily("hms_crash_loops", "Services crash-looping now")
        loops.add_metric([], sum(1 for s in services if is_crash_looping(s)))
        yield loops
        pending = GaugeMetricFamily("hms_approvals_pending", "Deployments waiting for a governance approval")
        pending.add_metric([], sum(1 for s in services if s.phase == "AwaitingApproval"))
        yield pending


def is_crash_looping(s: ServiceStatus) -> bool:
    return s.phase == "Degraded" or s.crash_count >= CRASH_LOOP_AFTER


class WorkerMetrics:
    """The worker's registry. Build it before the Temporal workers (for the interceptor), then
    ``async with metrics.running(client, settings, serve=...)`` around the workers' run."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.activity_seconds = Histogram(
            "hms_activity_duration_seconds", "Activity run time on this worker", ["activity", "outcome"],
            registry=self.registry, buckets=ACTIVITY_BUCKETS,
        )
        self.events = Counter("hms_events", "Events recorded, by type", ["type"], registry=self.registry)
        self.approval_wait = Histogram(
            "hms_approval_wait_seconds", "Time from approval.requested to granted or rejected",
            ["outcome"], registry=self.registry, buckets=APPROVAL_BUCKETS,
        )
        self.webhook_deliveries = Counter(
            "hms_webhook_deliveries", "Webhook POSTs by outcome", ["outcome"], registry=self.registry
        )
        self.probe_lag = Histogram(
            "hms_health_probe_lag_seconds", "How late each health ping was sent, behind its schedule",
            registry=self.registry, buckets=PROBE_LAG_BUCKETS,
        )
        self.probe_seconds = Histogram(
            "hms_health_probe_duration_seconds", "Health ping duration (the answer or the 1 s timeout)",
            registry=self.registry, buckets=PROBE_LAG_BUCKETS,
        )
        self.fleet = FleetCollector()
        self.registry.register(self.fleet)
        self.interceptor = ActivityMetricsInterceptor(self.activity_seconds)
        self._requested: dict[str, datetime] = {}
        self.port: int | None = None
        self.fleet_interval_s = 5.0  # how often the fleet gauges are re-read (tests shorten it)

    def on_event(self, event: Event) -> None:
        """An :class:`~hms_mgmt.events.EventSink` listener (called in the activity's thread)."""
        self.events.labels(type=event.type).inc()
        if event.type == "approval.requested":
            self._requested[event.service] = event.time
        elif event.type in ("approval.granted", "approval.rejected"):
            started = self._requested.pop(event.service, None)
            if started is not None:
                outcome = event.type.removeprefix("approval.")
                self.approval_wait.labels(outcome=outcome).observe((event.time - started).total_seconds())

    def on_probe(self, lag_s: float, duration_s: float) -> None:
        """A :class:`~activities.pods.PodActivities` probe listener (on the worker's event loop)."""
        self.probe_lag.observe(lag_s)
        self.probe_seconds.observe(duration_s)

    def on_delivery(self, url: str, ok: bool) -> None:
        self.webhook_deliveries.labels(outcome="accepted" if ok else "failed").inc()

    async def refresh(self, orch: Orchestrator, *, interval_s: float) -> None:
        """Re-read the fleet every ``interval_s``, or ``FLEET_READ_SHARE`` times as long as the
        last read took, until cancelled: a read is a status query and a describe per service,
        and at 500 services one every 5 s was a core's worth of control worker and Temporal."""
        while True:
            began = time.monotonic()
            try:
                self.fleet.update(await fleet_status(orch, concurrency=FLEET_READ_CONCURRENCY))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Temporal away: hms_fleet_up says so
                log.warning("metrics: cannot read the fleet: %s", e)
                self.fleet.update(None)
            took = time.monotonic() - began
            await asyncio.sleep(max(interval_s, FLEET_READ_SHARE * took) - took)

    @contextlib.asynccontextmanager
    async def running(
        self, client: Client, settings: Settings, *, serve: bool, fleet: bool = True
    ) -> Any:
        """The fleet refresher (with ``fleet``) and, with ``serve``, the HTTP server on
        127.0.0.1:``settings.metrics_port``. A busy port is a warning, not a dead worker."""
        server = None
        if serve and settings.metrics_port:
            try:
                server, _thread = start_http_server(settings.metrics_port, addr="127.0.0.1", registry=self.registry)
                self.port = server.server_port
                log.info("metrics on http://127.0.0.1:%s/metrics", self.port)
            except OSError as e:
                log.warning("metrics: cannot listen on 127.0.0.1:%s: %s", settings.metrics_port, e)
        orch = Orchestrator(client, settings)
        task = asyncio.create_task(self.refresh(orch, interval_s=self.fleet_interval_s)) if fleet else None
        try:
            yield self
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if server is not None:
                await asyncio.to_thread(server.shutdown)
                server.server_close()
