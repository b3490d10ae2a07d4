"""The haproxy engine's loop: observe (the endpoint table, our record of HAProxy's servers,
``show stat``, the request log) -> plan (:mod:`router.haproxy.plan`, pure) -> act (the Runtime API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from hms_mgmt.config import Settings
from hms_mgmt.models import EndpointSet
from router import policy
from router.control import Control
from router.feed import EndpointTable, FeedSync
from router.haproxy.config import MAX_WEIGHT, render_config
from router.haproxy.logs import LogProtocol, parse_log_line
from router.haproxy.metrics import StatCollector, pods_info
from router.haproxy.plan import Plan, plan_removals, plan_servers, plan_weights
from router.haproxy.process import HAProxyProcess, haproxy_binary
from router.haproxy.runtime import RuntimeAPI, apply, parse_stat
from router.haproxy.state import Backend
from router.sockets import destroy_connections
from router.stats import TrafficStats

log = logging.getLogger("hms.router.haproxy")

POOL_SIZE = 64  # services one router can carry (backends are pre-created: no reload)
TICK_S = 0.5
MAX_SAMPLES_PER_TICK = 500  # latency samples kept per pod between two ticks


class HAProxyEngine:
    def __init__(self, settings: Settings, table: EndpointTable, stats: TrafficStats, *, host: str, port: int,
                 pool_size: int = POOL_SIZE, binary: str | None = None) -> None:
        self.binary = binary  # None: found when HAProxy starts
        self.table = table
        self.stats = stats
        self.host = host
        self.port = port
        self.process = HAProxyProcess(settings.state_dir / "router" / f"haproxy-{port}")
        self.api = RuntimeAPI(self.process.socket_path)
        self.backends = [Backend(f"be_{i}") for i in range(pool_size)]
        self.dirty = asyncio.Event()
        self.last_stat: list[dict[str, str]] = []
        self.server_ids = 1000  # the last explicit server id given (see plan._addition)
        self.samples: dict[tuple[str, str], list[float]] = {}  # (backend, pod) -> this tick's Tr
        self.sync: FeedSync | None = None
        self.applied = asyncio.Event()  # the first full table is in HAProxy
        self.applied_versions: dict[str, int] = {}  # service -> table version HAProxy carries
        stats.registry.register(StatCollector(lambda: (self.backends, self.last_stat)))

    @property
    def by_service(self) -> dict[str, Backend]:
        return {b.service: b for b in self.backends if b.service is not None}

    # --- process ---------------------------------------------------------------------------

    async def start(self, control_socket: Path, log_port: int) -> None:
        p = self.process
        config = render_config(host=self.host, port=self.port, socket_path=p.socket_path, map_path=p.map_path,
                               landed_path=p.landed_path, control_socket=control_socket, log_port=log_port,
                               pool_size=len(self.backends))
        await p.start(config, self.api, binary=self.binary)
        log.info("haproxy %s on http://%s:%d (runtime API %s)", p.binary, self.host, self.port, p.socket_path)

    def stop(self) -> None:
        self.process.stop()

    # --- table -> servers ------------------------------------------------------------------

    def on_table(self, table: EndpointSet) -> None:
        self.dirty.set()

    async def reconcile(self) -> None:
        """Make HAProxy's servers match the endpoint table (idempotent; runs on every change)."""
        wanted = dict(self.table.services)
        gone = self._leaving(wanted)
        await self._act(plan_servers(self.backends, wanted, time.monotonic(), **self._maps(),
                                     first_id=self.server_ids + 1))
        held = self.by_service
        self.applied_versions.update({name: t.version for name, t in wanted.items() if name in held})
        for name in [n for n in self.applied_versions if n not in held]:
            del self.applied_versions[name]
        if gone:  # out of rotation now: what is still in flight to them goes to another pod
            await destroy_connections(gone)

    def _leaving(self, wanted: dict[str, EndpointSet]) -> set[str]:
        """Addresses of the servers this table takes out (not already on their way out)."""
        keep = {(name, ep.pod) for name, t in wanted.items() if not t.stopped for ep in t.endpoints}
        return {srv.address for be in self.backends if be.service is not None for srv in be.servers.values()
                if srv.state != "removing" and (be.service, srv.pod) not in keep}

    def _maps(self) -> dict[str, str]:
        return {"map_path": str(self.process.map_path), "landed_path": str(self.process.landed_path)}

    async def _act(self, p: Plan) -> None:
        for why in p.refused:
            log.error("not routed: %s", why)
        self.server_ids += p.adds()  # taken before sending: an id is never given twice
        await apply(self.api, p, self.backends, time.monotonic())

    # --- scores -> weights -----------------------------------------------------------------

    async def refresh_stat(self) -> None:
        self.last_stat = parse_stat(await self.api.one("show stat -1 4 -1"))

    async def tick(self) -> None:
        """Turn our score into weights, retry pending deletions, refresh ``show stat``."""
        await self.refresh_stat()
        now = time.monotonic()
        for (be_name, pod_id), samples in self.samples.items():
            pod = self.backends[int(be_name[3:])].pods.get(pod_id)
            if pod is not None and samples:
                # One median per tick: a lone stall on a busy machine must not swing a weight.
                policy.record_latency(pod, statistics.median(samples), now)
        self.samples.clear()
        weights = {be.name: policy.weights(list(be.pods.values()), now, max_weight=MAX_WEIGHT) for be in self.backends if be.pods}
        await self._act(plan_weights(self.backends, weights))
        await self._act(plan_removals(self.backends, self.table.services, now, **self._maps()))

    async def run(self) -> None:
        """Reconcile on every table change, tick every ``TICK_S``; until cancelled."""
        next_tick = 0.0
        while True:
            if not self.applied.is_set() and self.sync is not None and self.sync.synced.is_set():
                self.dirty.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), max(0.0, next_tick - time.monotonic()))
            try:
                if self.dirty.is_set():
                    self.dirty.clear()
                    synced = self.sync is not None and self.sync.synced.is_set()
                    await self.reconcile()
                    if synced:
                        self.applied.set()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    await self.tick()
            except (OSError, asyncio.IncompleteReadError) as e:
                code = self.process.returncode()
                if code is not None:
                    raise RuntimeError(f"haproxy exited ({code}); see {self.process.log_path}") from e
                log.warning("haproxy runtime API: %s", e)
                self.dirty.set()  # the plan is idempotent: reconcile again from what was recorded
                await asyncio.sleep(0.2)

    # --- logs -> stats ---------------------------------------------------------------------

    def on_log(self, data: bytes) -> None:
        """One request (or k, under load) into our traffic stats; Tr, the server's time to
        answer, is the latency sample for our score."""
        line = parse_log_line(data)
        if line is None or line.backend >= len(self.backends):
            return
        be = self.backends[line.backend]
        if be.service is None:
            return
        if line.server in be.pods and line.server_ms is not None:
            samples = self.samples.setdefault((be.name, line.server), [])
            if len(samples) < MAX_SAMPLES_PER_TICK:
                samples.append(line.server_ms)
        pod = line.server if line.server != "<NOSRV>" else "-"
        self.stats.record(be.service, pod, line.status, line.seconds, count=line.count)
        if line.retries:
            self.stats.record_retry(be.service, "haproxy", line.retries * line.count)

    def pods_info(self, service: str) -> dict[str, Any]:
        be = self.by_service.get(service)
        return {} if be is None else pods_info(be, self.last_stat, time.monotonic())


async def run_haproxy(settings: Settings, table: EndpointTable, sync: FeedSync, stats: TrafficStats, *, host: str,
                      port: int, ready: asyncio.Event | None = None) -> None:
    """HAProxy on ``host:port``, our control server behind it; serve until cancelled."""
    engine = HAProxyEngine(settings, table, stats, host=host, port=port, binary=haproxy_binary())
    engine.sync = sync
    control = Control("haproxy", table, sync, stats, pods_info=engine.pods_info, before_metrics=engine.refresh_stat,
                      applied=engine.applied, applied_versions=engine.applied_versions)
    app = web.Application()
    control.add_routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    transport = None
    # A private directory (0700): only the router's user reaches the control socket, so the
    # X-Forwarded-For on it is HAProxy's word on the caller, as on the builtin engine's relay.
    sock_dir = Path(tempfile.mkdtemp(prefix="hms-router-"))
    try:
        site = web.UnixSite(runner, str(sock_dir / "control.sock"))
        await site.start()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: LogProtocol(engine.on_log), local_addr=("127.0.0.1", 0))
        await engine.start(sock_dir / "control.sock", transport.get_extra_info("sockname")[1])
        table.subscribe(engine.on_table)
        engine.dirty.set()
        if ready is not None:
            ready.set()
        await engine.run()
    finally:
        engine.stop()
        if transport is not None:
            transport.close()
        await runner.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)
