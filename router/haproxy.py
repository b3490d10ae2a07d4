"""The haproxy engine: our process owns an HAProxy instance and drives it with no reload.

HAProxy 2.6 (Debian) cannot create backends at run time, so the generated configuration holds
a pool of empty backends (``be_0`` .. ``be_<N-1>``, ``balance random(2)``); a service is given
one the first time the feed names it, through the runtime map ``services.map`` (``add map``),
which the frontend reads to choose the backend from the first path segment. Everything after
that goes through the Runtime API on a unix socket (``stats socket ... level admin``):

- a pod appears        ``add server be_N/<pod> ADDR check ... observe layer7 error-limit 3
                       on-error mark-down``, ``enable health``, ``enable server``;
- a pod drains         ``set server be_N/<pod> state drain`` (no new requests; in-flight ones finish);
- a pod is gone        ``set server ... state maint``, then ``del server`` once its connections closed;
- twice a second       ``set server ... weight N`` from our score; the latency in it comes from
                       HAProxy's request log (each request's server response time), so a slow
                       pod gets less than HAProxy's connection count alone would give it.

Retries: ``retry-on conn-failure empty-response response-timeout 502 503`` with ``retries 2`` and
``option redispatch 1`` (each retry on another server). HAProxy's request log goes to a UDP
socket of ours (``format raw``): per-request status and time feed ``/-/stats`` and ``/metrics``.
Under load it is sampled (one request in k, k written in the line and counted back), so our
process reads about ``LOG_LINES_PER_S`` lines a second however busy HAProxy is; per-pod request,
retry and 5xx counters that are exact at any rate come from ``show stat``.
``/-/*`` and ``/metrics`` are forwarded to our control server on an internal port.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ctypes
import io
import logging
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hms_mgmt.config import Settings
from hms_mgmt.errors import ConfigError
from hms_mgmt.models import EndpointSet
from router import policy
from router.control import Control
from router.feed import EndpointTable, FeedSync
from router.stats import TrafficStats

log = logging.getLogger("hms.router.haproxy")

POOL_SIZE = 64  # services one router can carry (backends are pre-created: no reload)
TICK_S = 0.5
DRAIN_FORCE_S = 60.0  # a removed pod's connections are cut after this long
WEIGHT_MIN_CHANGE = 0.1
MAX_SAMPLES_PER_TICK = 500  # relative change before a weight is sent again
# HAProxy logs every request while the router answers fewer than this many a second, then one in k
# (k = 1 + rate / this): our process reads at most about this many lines a second, whatever the load.
LOG_LINES_PER_S = 200
# A server made by ``add server`` in HAProxy 2.6 keeps no idle connection unless both are given
# (a configured server gets them by default): without them every request opens a new connection
# to the pod, which costs a Python pod more than the request itself.
SERVER_POOL = "pool-max-conn -1 pool-purge-delay 5s"
INSTALL_HINT = "haproxy is not installed: `apt-get install haproxy` (Debian/Ubuntu), or use --engine builtin"


FALLBACK_PATHS = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")  # sbin is not on every user's PATH


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in FALLBACK_PATHS if Path(p).exists()), None)
    if found is None:
        raise ConfigError(INSTALL_HINT)
    return found


def _q(s: str) -> str:
    """An HAProxy double-quoted string (lf-string)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(*, host: str, port: int, socket_path: Path, map_path: Path, control_port: int, log_port: int,
                  pool_size: int, connect_timeout_s: float = 1.0, read_timeout_s: float = 30.0,
                  balance: str = "random(2)", log_lines_per_s: int = LOG_LINES_PER_S) -> str:
    """The whole configuration: one frontend, the control backend and ``pool_size`` empty backends."""
    unknown = _q('{"error":"unknown service","service":"%[var(txn.svc)]"}')
    no_pod = _q('{"error":"no ready pod","service":"%[var(txn.svc)]",'
                '"reason":"no ready pod: none in the endpoint table, or all draining or failing"}')
    bad_gw = _q('{"error":"bad gateway: the pod failed","service":"%[var(txn.svc)]","reached_pod":true}')
    timeout = _q('{"error":"the pod did not answer in time","service":"%[var(txn.svc)]","reached_pod":true}')
    lines = [
        "global",
        f"    stats socket {socket_path} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        f"    log 127.0.0.1:{log_port} len 2048 format raw local0",
        "    maxconn 4000",  # about 2 file descriptors each: fits a default ulimit
        "",
        "defaults",
        "    mode http",
        "    log global",
        '    log-format "%b %s %ST %Ta %Tr %rc %[var(txn.lk)]"',
        f"    timeout connect {int(connect_timeout_s * 1000)}ms",
        "    timeout client 60s",
        f"    timeout server {int(read_timeout_s * 1000)}ms",
        "    timeout http-keep-alive 30s",
        "    option redispatch 1",
        "    retries 2",
        "    retry-on conn-failure empty-response response-timeout 502 503",
        f"    http-error status 503 content-type application/json lf-string {no_pod} hdr Retry-After 1",
        f"    http-error status 502 content-type application/json lf-string {bad_gw}",
        f"    http-error status 504 content-type application/json lf-string {timeout}",
        "",
        "frontend fe_router",
        f"    bind {host}:{port}",
        # Log one request in k, k = 1 + (request rate / LOG_LINES_PER_S); each line carries its k.
        f"    http-request set-var(txn.lk) fe_req_rate,div({log_lines_per_s}),add(1)",
        "    http-request set-log-level silent unless { rand,mod(txn.lk) -m int eq 0 }",
        "    http-request set-var(txn.svc) path,field(2,/)",
        "    http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id) -m found }",
        "    http-request set-var(txn.rid) req.hdr(x-request-id)",
        "    http-response set-header X-Request-Id %[var(txn.rid)]",
        "    acl control path_beg /-/ || path /metrics",
        f"    acl known var(txn.svc),map({map_path}) -m found",
        f"    http-request return status 404 content-type application/json lf-string {unknown} if !known !control",
        "    use_backend be_control if control",
        f"    use_backend %[var(txn.svc),map({map_path})]",
        "",
        "backend be_control",
        "    no log",
        f"    server control 127.0.0.1:{control_port}",
    ]
    for i in range(pool_size):
        lines += [
            "",
            f"backend be_{i}",
            f"    balance {balance}",
            "    option forwardfor",
            "    http-request replace-path ^/[^/]*/?(.*) /\\1",
            "    http-response set-header X-HMS-Pod %s",
        ]
    return "\n".join(lines) + "\n"


class RuntimeAPI:
    """HAProxy's Runtime API over its unix socket, one connection per batch of commands."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def run(self, *commands: str) -> list[str]:
        """Run ``commands`` in one session (``;``-separated); one answer per command."""
        if not commands:
            return []
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            # Prompt mode keeps one session for several commands; each answer ends with "\n> ".
            writer.write(b"prompt\n")
            await writer.drain()
            await reader.readuntil(b"> ")
            out = []
            for c in commands:
                writer.write(c.encode() + b"\n")
                await writer.drain()
                out.append((await reader.readuntil(b"\n> "))[:-3].decode(errors="replace").strip())
            writer.write(b"quit\n")
            await writer.drain()
            return out
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def one(self, command: str) -> str:
        return (await self.run(command))[0]


def parse_stat(text: str) -> list[dict[str, str]]:
    """``show stat`` CSV into dicts keyed by column name."""
    text = text.lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


@dataclass
class Server:
    pod: str
    address: str
    state: str = "ready"  # ready | draining | removing
    weight: int = policy.MAX_WEIGHT
    removing_since: float = 0.0


@dataclass
class Backend:
    name: str
    service: str | None = None
    servers: dict[str, Server] = field(default_factory=dict)
    pods: dict[str, policy.PodState] = field(default_factory=dict)


class _LogProtocol(asyncio.DatagramProtocol):
    def __init__(self, engine: HAProxyEngine) -> None:
        self.engine = engine

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.engine.on_log(data)


class HAProxyEngine:
    def __init__(self, settings: Settings, table: EndpointTable, stats: TrafficStats, *, host: str, port: int,
                 pool_size: int = POOL_SIZE) -> None:
        self.binary = haproxy_binary()
        self.table = table
        self.stats = stats
        self.host = host
        self.port = port
        self.dir = settings.state_dir / "router" / f"haproxy-{port}"
        self.socket_path = self.dir / "admin.sock"
        if len(str(self.socket_path)) > 90:  # a unix socket path is at most ~100 bytes
            self.socket_path = Path(tempfile.mkdtemp(prefix="hms-haproxy-")) / "admin.sock"
        self.map_path = self.dir / "services.map"
        self.config_path = self.dir / "haproxy.cfg"
        self.backends = [Backend(f"be_{i}") for i in range(pool_size)]
        self.by_service: dict[str, Backend] = {}
        self.api = RuntimeAPI(self.socket_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.dirty = asyncio.Event()
        self.last_stat: list[dict[str, str]] = []
        self.server_ids = 1000
        self.samples: dict[tuple[str, str], list[float]] = {}  # (backend, pod) -> this tick's Tr
        self.sync: FeedSync | None = None
        self.applied = asyncio.Event()  # the first full table is in HAProxy
        self.applied_versions: dict[str, int] = {}  # service -> table version HAProxy carries
        stats.registry.register(_StatCollector(self))

    # --- process ---------------------------------------------------------------------------

    async def start(self, control_port: int, log_port: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.map_path.write_text("")
        self.socket_path.unlink(missing_ok=True)
        self.config_path.write_text(render_config(
            host=self.host, port=self.port, socket_path=self.socket_path, map_path=self.map_path,
            control_port=control_port, log_port=log_port, pool_size=len(self.backends)))
        check = await asyncio.to_thread(subprocess.run, [self.binary, "-c", "-f", str(self.config_path)],
                                        capture_output=True, text=True)
        if check.returncode != 0:
            raise ConfigError(f"generated HAProxy configuration is invalid: {check.stdout}{check.stderr}")
        out = open(self.dir / "haproxy.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config_path)], stdout=out,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        out.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "haproxy.log").read_text()[-2000:]
                raise ConfigError(f"haproxy exited at start ({self.proc.returncode}): {tail}")
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await self.api.one("show info")
                log.info("haproxy %s on http://%s:%d (runtime API %s)", self.binary, self.host, self.port,
                         self.socket_path)
                return
            await asyncio.sleep(0.05)
        raise ConfigError(f"haproxy did not open its runtime socket {self.socket_path} within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # soft stop: finish in-flight requests
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    # --- table -> servers ------------------------------------------------------------------------

    def _next_id(self) -> int:
        """An explicit server id: HAProxy 2.6 gives dynamic servers ids that collide in the
        consistent-hash tree behind ``balance random``, and one pod then never gets a request."""
        self.server_ids += 1
        return self.server_ids

    def on_table(self, table: EndpointSet) -> None:
        self.dirty.set()

    async def reconcile(self) -> None:
        """Make HAProxy's servers match the endpoint table (idempotent; runs on every change)."""
        now = time.monotonic()
        wanted = {name: t for name, t in self.table.services.items()}
        for name, t in wanted.items():
            be = self.by_service.get(name)
            if be is None:
                be = next((b for b in self.backends if b.service is None and not b.servers), None)
                if be is None:
                    log.error("no free backend for service %s: the pool holds %d (restart with a larger pool)",
                              name, len(self.backends))
                    continue
                be.service = name
                self.by_service[name] = be
                await self._sync_servers(be, t, now)
                # Servers first, then the route: no request meets an empty backend.
                await self.api.one(f"add map {self.map_path} {name} {be.name}")
            else:
                await self._sync_servers(be, t, now)
            self.applied_versions[name] = t.version
        for name in [n for n in self.by_service if n not in wanted]:
            be = self.by_service[name]
            await self._sync_servers(be, EndpointSet(service=name), now)
            if not be.servers:
                await self.api.one(f"del map {self.map_path} {name}")
                del self.by_service[name]
                self.applied_versions.pop(name, None)
                be.service = None
                be.pods.clear()

    async def _sync_servers(self, be: Backend, t: EndpointSet, now: float) -> None:
        eps = {e.pod: e for e in t.endpoints}
        cmds: list[str] = []
        for pod, ep in eps.items():
            srv = be.servers.get(pod)
            sid = f"{be.name}/{pod}"
            if srv is not None and srv.address != ep.address:
                await self._remove(be, srv, now, force=True)
                srv = None
            if srv is None:
                answer = await self.api.one(
                    f"add server {sid} {ep.address} weight {policy.MAX_WEIGHT} id {self._next_id()} {SERVER_POOL} "
                    f"check inter 2s fall 2 rise 1 observe layer7 error-limit 3 on-error mark-down")
                if "New server registered" not in answer:
                    log.warning("add server %s: %s", sid, answer)
                    continue
                srv = be.servers[pod] = Server(pod, ep.address)
                be.pods[pod] = policy.PodState(pod=pod, address=ep.address)
                cmds += [f"enable health {sid}", f"enable server {sid}"]
                if ep.state == "draining":
                    cmds.append(f"set server {sid} state drain")
                    srv.state = "draining"
            elif ep.state == "draining" and srv.state != "draining":
                cmds.append(f"set server {sid} state drain")
                srv.state = "draining"
            elif ep.state == "ready" and srv.state != "ready":
                cmds.append(f"set server {sid} state ready")
                srv.state = "ready"
            be.pods[pod].draining = srv.state != "ready"
        if cmds:
            await self.api.run(*cmds)
        for pod in [p for p in be.servers if p not in eps]:
            await self._remove(be, be.servers[pod], now)

    async def _remove(self, be: Backend, srv: Server, now: float, *, force: bool = False) -> None:
        """Maintenance first (nothing new), then ``del server`` once no connection is left."""
        sid = f"{be.name}/{srv.pod}"
        if srv.state != "removing":
            srv.state, srv.removing_since = "removing", now
            await self.api.one(f"set server {sid} state maint")
        if force or now - srv.removing_since > DRAIN_FORCE_S:
            await self.api.one(f"shutdown sessions server {sid}")
        answer = await self.api.one(f"del server {sid}")
        if "Server deleted" in answer:
            be.servers.pop(srv.pod, None)
            be.pods.pop(srv.pod, None)
        else:
            log.debug("del server %s deferred: %s", sid, answer)

    # --- scores -> weights -----------------------------------------------------------------------

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
        cmds = []
        for be in self.backends:
            if not be.pods:
                continue
            for pod_id, w in policy.weights(list(be.pods.values()), now).items():
                srv = be.servers.get(pod_id)
                if srv is None or srv.state != "ready":
                    continue
                if abs(w - srv.weight) > WEIGHT_MIN_CHANGE * max(w, srv.weight):
                    cmds.append(f"set server {be.name}/{pod_id} weight {w}")
                    srv.weight = w
        if cmds:
            await self.api.run(*cmds)
        for be in self.backends:
            for srv in [s for s in be.servers.values() if s.state == "removing"]:
                await self._remove(be, srv, now)

    async def run(self) -> None:
        """Reconcile on every table change, tick every second; until cancelled."""
        next_tick = 0.0
        while True:
            if not self.applied.is_set() and self.sync is not None and self.sync.synced.is_set():
                self.dirty.set()
            timeout = max(0.0, next_tick - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), timeout)
            try:
                if self.dirty.is_set():
                    self.dirty.clear()
                    synced = self.sync.synced.is_set()
                    await self.reconcile()
                    if synced:
                        self.applied.set()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    await self.tick()
            except (OSError, asyncio.IncompleteReadError) as e:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy exited ({self.proc.returncode}); see {self.dir}/haproxy.log") from e
                log.warning("haproxy runtime API: %s", e)
                await asyncio.sleep(0.2)

    # --- logs -> stats -------------------------------------------------------------------------

    def on_log(self, data: bytes) -> None:
        """One request: ``<backend> <server> <status> <Ta ms> <Tr ms> <retries> <k>``, standing
        for k requests (the log is sampled under load). Tr (the server's time to answer, -1 if it
        did not) is the latency sample for our score."""
        try:
            parts = data.decode(errors="replace").split()
            be_name, server, status, ta, tr, retries, k = parts[-7:]
        except ValueError:
            return
        count = int(k) if k.isdigit() and int(k) > 0 else 1
        if not be_name.startswith("be_") or be_name == "be_control":
            return
        try:
            be = self.backends[int(be_name[3:])]
        except (ValueError, IndexError):
            return
        if be.service is None:
            return
        if server in be.pods and tr.isdigit():
            samples = self.samples.setdefault((be.name, server), [])
            if len(samples) < MAX_SAMPLES_PER_TICK:
                samples.append(max(0.1, float(tr)))
        code = int(status) if status.lstrip("-").isdigit() else 0
        # HAProxy logs whole milliseconds: a logged t stands for [t, t + 1) ms, recorded as its middle
        # (a sub-millisecond reply is 0.5 ms, not 0).
        self.stats.record(be.service, server if server != "<NOSRV>" else "-", code, (max(0, int(ta)) + 0.5) / 1000.0
                          if ta.lstrip("-").isdigit() else 0.0, count=count)
        n = int(retries.lstrip("+")) if retries.lstrip("+").isdigit() else 0
        if n:
            self.stats.record_retry(be.service, "haproxy", n * count)

    def pods_info(self, service: str) -> dict[str, Any]:
        be = self.by_service.get(service)
        if be is None:
            return {}
        now = time.monotonic()
        floor = policy.best_latency(list(be.pods.values()))
        rows = {r.get("svname"): r for r in self.last_stat if r.get("pxname") == be.name}
        return {
            pod: {"address": srv.address, "state": srv.state, "weight": srv.weight,
                  "latency_ms": round(policy.latency(be.pods[pod], now, floor), 2) if pod in be.pods else None,
                  "haproxy_status": rows.get(pod, {}).get("status"), "outstanding": int(rows.get(pod, {}).get("scur") or 0)}
            for pod, srv in be.servers.items()
        }


class _StatCollector:
    """``/metrics`` figures read from HAProxy's ``show stat`` (refreshed before each scrape)."""

    def __init__(self, engine: HAProxyEngine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        e = self.engine
        total = CounterMetricFamily("hms_haproxy_server_requests", "Requests HAProxy sent to each pod",
                                    labels=["service", "pod"])
        retries = CounterMetricFamily("hms_haproxy_server_retries", "Connection retries per pod (wretr)",
                                      labels=["service", "pod"])
        redisp = CounterMetricFamily("hms_haproxy_server_redispatches", "Requests redispatched to another pod",
                                     labels=["service", "pod"])
        ejections = CounterMetricFamily("hms_haproxy_server_ejections",
                                        "Times a pod was marked down (failed checks or layer-7 errors)",
                                        labels=["service", "pod"])
        errors = CounterMetricFamily("hms_haproxy_server_responses_5xx", "5xx answers per pod",
                                     labels=["service", "pod"])
        conns = CounterMetricFamily("hms_haproxy_server_connections",
                                    "Connections HAProxy opened to each pod (connect)", labels=["service", "pod"])
        reuses = CounterMetricFamily("hms_haproxy_server_connection_reuses",
                                     "Requests sent over an already open connection (reuse)",
                                     labels=["service", "pod"])
        weight = GaugeMetricFamily("hms_haproxy_server_weight", "Weight set from the router's score",
                                   labels=["service", "pod"])
        up = GaugeMetricFamily("hms_haproxy_server_up", "1 if HAProxy sends new requests to the pod",
                               labels=["service", "pod"])
        names = {b.name: b.service for b in e.backends if b.service}
        for row in e.last_stat:
            service = names.get(row.get("pxname", ""))
            if service is None:
                continue
            labels = [service, row.get("svname", "")]

            def num(key: str, row: dict[str, str] = row) -> float:
                v = row.get(key) or "0"
                return float(v) if v.replace(".", "", 1).isdigit() else 0.0

            total.add_metric(labels, num("stot"))
            retries.add_metric(labels, num("wretr"))
            redisp.add_metric(labels, num("wredis"))
            ejections.add_metric(labels, num("chkdown"))
            errors.add_metric(labels, num("hrsp_5xx"))
            conns.add_metric(labels, num("connect"))
            reuses.add_metric(labels, num("reuse"))
            weight.add_metric(labels, num("weight"))
            up.add_metric(labels, 1.0 if row.get("status") == "UP" else 0.0)
        yield from (total, retries, redisp, ejections, errors, conns, reuses, weight, up)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the router dies, so no orphan HAProxy keeps the port."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def run_haproxy(settings: Settings, table: EndpointTable, sync: FeedSync, stats: TrafficStats, *, host: str,
                      port: int, ready: asyncio.Event | None = None) -> None:
    """HAProxy on ``host:port``, our control server behind it; serve until cancelled."""
    engine = HAProxyEngine(settings, table, stats, host=host, port=port)
    engine.sync = sync
    control = Control("haproxy", table, sync, stats, pods_info=engine.pods_info, before_metrics=engine.refresh_stat,
                      applied=engine.applied, applied_versions=engine.applied_versions)
    app = web.Application()
    control.add_routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    transport = None
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        control_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        transport, _ = await loop.create_datagram_endpoint(lambda: _LogProtocol(engine), local_addr=("127.0.0.1", 0))
        log_port = transport.get_extra_info("sockname")[1]
        await engine.start(control_port, log_port)
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
