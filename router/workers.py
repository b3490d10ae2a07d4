"""The builtin engine on several processes: one primary and ``procs - 1`` workers.

Python serves one CPU per process, so the builtin engine runs as ``HMS_ROUTER_PROCS`` processes
(default: the number of CPUs) that all listen on the router's port (``SO_REUSEPORT``: the
kernel spreads new connections over them). Each one proxies with its own
:class:`~router.builtin.BuiltinEngine` (its own keep-alive pool to the pods, its own P2C and
latency estimates, retries and retry budget).

Only the **primary** (the ``python -m router`` process) holds the feed: it takes the signed
pushes, resyncs through Temporal, registers the router and answers every control endpoint
(``/-/...``, ``/metrics``), on its unix socket: every process (the primary too) relays a
control request there as it came (:class:`router.builtin.ControlRelay`), so the answer (a drain
confirmation signed with the router's key, a feed push verified against ``control.pub``) is the
same whichever process accepted it.

Between them, over unix sockets in a directory only the router's user may enter (mode 0700):

- the primary sends each worker every table change, coalesced per service and in order
  (``PUT /tables``; a worker opens its TCP listener once it has the first full table);
- the primary pulls each worker's snapshot (``GET /snapshot``) before answering ``/-/stats``,
  ``/metrics`` and ``/-/drained``, and every second: the requests it answered since the last
  pull (replayed into the primary's :class:`~router.stats.TrafficStats`, so figures are summed)
  and its view of each pod (in-flight requests, ready or draining), merged with the primary's
  own: a pod is drained only when no process routes to it or has a request in flight to it.

A worker exits when its primary's pipe closes (the primary stopped or died); a worker that
exits is started again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hms_mgmt.config import Settings
from hms_mgmt.logtext import setup_logging
from hms_mgmt.models import EndpointSet
from router.feed import EndpointTable
from router.stats import TrafficStats

log = logging.getLogger("hms.router.workers")

PULL_INTERVAL_S = 1.0
RESTART_DELAY_S = 1.0


def process_count(settings: Settings) -> int:
    """``router_procs`` (``HMS_ROUTER_PROCS``) if set, else the number of CPUs."""
    return settings.router_procs or max(1, os.cpu_count() or 1)


class StatsBatch:
    """A worker's traffic figures since the primary's last pull: the same calls as
    :class:`~router.stats.TrafficStats`, kept cheap per request. Requests are kept per (service,
    pod, status) as two columns of doubles (seconds taken, when), which cross the socket as
    base64: a few thousand requests a second, written out one JSON float at a time, cost the
    worker and the primary about a twentieth of what proxying them did."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, int], tuple[array[float], array[float]]] = {}
        self.retries: list[tuple[str, str, int, float]] = []
        self.ejections: list[tuple[str, str]] = []

    def record(self, service: str, pod: str, status: int, seconds: float, *, now: float | None = None,
               count: int = 1) -> None:
        key = (service, pod, status)
        columns = self.series.get(key)
        if columns is None:
            columns = self.series[key] = (array("d"), array("d"))
        columns[0].append(seconds)
        columns[1].append(time.monotonic() if now is None else now)

    def record_retry(self, service: str, reason: str, count: int = 1) -> None:
        self.retries.append((service, reason, count, time.monotonic()))

    def record_ejection(self, service: str, pod: str) -> None:
        self.ejections.append((service, pod))

    def take(self) -> dict[str, list[Any]]:
        """What was recorded since the last take, as JSON-ready lists."""
        series = [[service, pod, status, _pack(seconds), _pack(when)]
                  for (service, pod, status), (seconds, when) in self.series.items()]
        out = {"series": series, "retries": self.retries, "ejections": self.ejections}
        self.series, self.retries, self.ejections = {}, [], []
        return out


def _pack(column: array[float]) -> str:
    return base64.b64encode(column.tobytes()).decode("ascii")


def _unpack(text: str) -> array[float]:
    column = array("d")
    column.frombytes(base64.b64decode(text, validate=True))
    return column


def absorb(stats: TrafficStats, batch: dict[str, list[Any]]) -> None:
    """Replay a worker's :meth:`StatsBatch.take` into the primary's figures (monotonic clocks
    are system-wide, so the times land in the right second)."""
    for service, pod, status, seconds, when in batch.get("series", []):
        stats.record_series(service, pod, int(status), _unpack(seconds), _unpack(when))
    for service, reason, count, now in batch.get("retries", []):
        stats.record_retry(service, reason, count, now=now)
    for service, pod in batch.get("ejections", []):
        stats.record_ejection(service, pod)


def merge_pods(views: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Several processes' ``pods_info`` of one service as one: in-flight requests and ejections
    summed; ready if any process still routes to it; ejected if any has it ejected."""
    out: dict[str, dict[str, Any]] = {}
    for view in views:
        for pod, info in view.items():
            have = out.get(pod)
            if have is None:
                out[pod] = dict(info)
                continue
            have["outstanding"] += info["outstanding"]
            have["ejections"] += info["ejections"]
            have["ejected"] = have["ejected"] or info["ejected"]
            if info["state"] == "ready":
                have["state"] = "ready"
    return out


class WorkerProc:
    """One worker process as the primary sees it: its socket, its pending tables, its view."""

    def __init__(self, index: int, sock: Path) -> None:
        self.index = index
        self.sock = sock
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.pending: dict[str, EndpointSet] = {}
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.acked: dict[str, int] = {}
        self.pods: dict[str, dict[str, dict[str, Any]]] = {}

    def session(self) -> aiohttp.ClientSession:
        if self.http is None or self.http.closed:
            self.http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.sock)),
                                              timeout=aiohttp.ClientTimeout(total=5))
        return self.http

    def queue(self, table: EndpointSet) -> None:
        self.pending[table.service] = table
        self.idle.clear()
        self.wake.set()


class Workers:
    """The primary's side: starts the workers, sends them the table, pulls their figures."""

    def __init__(self, table: EndpointTable, stats: TrafficStats, own_versions: dict[str, int], *, host: str,
                 port: int, count: int, own: StatsBatch | None = None) -> None:
        self.table = table
        self.stats = stats
        self.own = own  # the primary's own engine's figures, batched like a worker's
        self.own_versions = own_versions  # the primary's engine: service -> version it carries
        self.host, self.port = host, port
        self.dir = Path(tempfile.mkdtemp(prefix="hms-router-"))  # mode 0700: only our user may connect
        self.control_sock = self.dir / "primary.sock"
        self.workers = [WorkerProc(i, self.dir / f"worker-{i}.sock") for i in range(1, count)]
        self.versions: dict[str, int | None] = {}  # service -> the version every process carries
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False
        self._pulling = asyncio.Lock()
        table.subscribe(self._on_table)

    def _on_table(self, table: EndpointSet) -> None:
        for w in self.workers:
            w.queue(table)
        self._settle(table.service)

    def _settle(self, service: str) -> None:
        if service not in self.table.services:
            self.versions.pop(service, None)
            return
        held = [self.own_versions.get(service), *(w.acked.get(service) for w in self.workers)]
        self.versions[service] = None if None in held else min(v for v in held if v is not None)

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._supervise(w), name=f"router-worker-{w.index}")
                      for w in self.workers]
        self.tasks.append(asyncio.create_task(self._pull_loop(), name="router-worker-pull"))

    async def close(self) -> None:
        self.closing = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop(w) for w in self.workers))
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- one worker ------------------------------------------------------------------------

    async def _supervise(self, w: WorkerProc) -> None:
        """Start the worker, feed it until it exits, start it again."""
        while True:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router.workers", "--host", self.host, "--port", str(self.port),
                "--primary", str(self.control_sock), "--sock", str(w.sock), stdin=asyncio.subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[1])
            feeder = asyncio.create_task(self._feed(w))
            try:
                code = await w.proc.wait()
            finally:
                feeder.cancel()
                # gather, not a suppressed await: a cancel of this task that lands here (the
                # router stopping) must end it, not be taken for the feeder's
                await asyncio.gather(feeder, return_exceptions=True)
            w.pods, w.acked = {}, {}
            if self.closing:
                return
            log.warning("router worker %d exited with %s; starting it again", w.index, code)
            await asyncio.sleep(RESTART_DELAY_S)

    async def _feed(self, w: WorkerProc) -> None:
        """Every table first (the worker opens its port after it), then each change, in order."""
        await self._wait_socket(w)
        w.pending = dict(self.table.services)
        w.wake.set()
        while True:
            await w.wake.wait()
            w.wake.clear()
            batch, w.pending = w.pending, {}
            body = [t.model_dump(mode="json") for t in batch.values()]
            try:
                async with w.session().put("http://worker/tables", json=body) as r:
                    r.raise_for_status()
                    w.acked.update((await r.json())["versions"])
            except (aiohttp.ClientError, OSError) as e:
                log.warning("router worker %d did not take the table: %s", w.index, e)
                w.pending = {**batch, **w.pending}
                await asyncio.sleep(0.1)
                w.wake.set()
                continue
            for service in batch:
                self._settle(service)
            if not w.pending:
                w.idle.set()

    async def _wait_socket(self, w: WorkerProc, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with w.session().get("http://worker/snapshot") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"router worker {w.index} did not answer on {w.sock} within {timeout_s:g}s")

    async def _stop(self, w: WorkerProc) -> None:
        if w.http is not None:
            await w.http.close()
        if w.proc is None or w.proc.returncode is not None:
            return
        if w.proc.stdin is not None:
            w.proc.stdin.close()  # the worker exits when this pipe closes
        try:
            await asyncio.wait_for(w.proc.wait(), 5)
        except TimeoutError:
            w.proc.kill()
            await w.proc.wait()

    # --- figures ---------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        while True:
            await asyncio.sleep(PULL_INTERVAL_S)
            await self.pull()

    async def pull(self) -> None:
        """Each process's requests since the last pull, into our figures; each worker's view of the pods."""
        async with self._pulling:
            if self.own is not None:
                absorb(self.stats, self.own.take())
            await asyncio.gather(*(self._pull_one(w) for w in self.workers))

    async def _pull_one(self, w: WorkerProc) -> None:
        if w.proc is None or w.proc.returncode is not None or not w.idle.is_set() and not w.acked:
            return
        try:
            async with w.session().get("http://worker/snapshot") as r:
                snap = await r.json()
        except (aiohttp.ClientError, OSError, ValueError) as e:
            log.debug("router worker %d: no snapshot: %s", w.index, e)
            return
        absorb(self.stats, snap["stats"])
        w.pods = snap["pods"]

    def pods_info(self, service: str, own: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """The primary's view of a service's pods merged with each worker's (last pull)."""
        return merge_pods([own(service), *(w.pods.get(service, {}) for w in self.workers)])


# --- the worker process ----------------------------------------------------------------------


def _worker_api(table: EndpointTable, engine: Any, stats: StatsBatch, first: asyncio.Event) -> web.Application:
    """What the primary calls on a worker's unix socket."""
    async def put_tables(request: web.Request) -> web.Response:
        for raw in await request.json():
            table.put(EndpointSet.model_validate(raw))
        first.set()
        return web.json_response({"versions": engine.applied})

    async def snapshot(request: web.Request) -> web.Response:
        pods = {service: engine.pods_info(service) for service in list(engine.pools)}
        return web.json_response({"stats": stats.take(), "pods": pods})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_put("/tables", put_tables)
    app.router.add_get("/snapshot", snapshot)
    return app


async def run_worker(*, host: str, port: int, primary: Path, sock: Path) -> None:
    """Serve the proxy on ``host:port`` (shared) until the primary's pipe closes."""
    from router.builtin import BuiltinEngine, ControlRelay, caller_server

    table, stats, first = EndpointTable(), StatsBatch(), asyncio.Event()
    engine = BuiltinEngine(table, stats)
    runner = web.AppRunner(_worker_api(table, engine, stats, first), access_log=None, handle_signals=False)
    server = caller_server(engine, ControlRelay(primary))
    try:
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        await first.wait()  # no caller reaches a worker that has no table yet
        await server.listen(host, port, reuse_port=True)
        await asyncio.to_thread(sys.stdin.buffer.read)  # returns when the primary closes the pipe
    finally:
        await server.close()
        await runner.cleanup()
        await engine.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m router.workers", description="a builtin router worker process")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--primary", type=Path, required=True, help="the primary's unix socket")
    p.add_argument("--sock", type=Path, required=True, help="this worker's unix socket")
    args = p.parse_args(argv)
    # A Ctrl-C, or a service manager's SIGTERM to the whole group, reaches the primary too, which
    # closes our pipe: we leave with it (also if it dies), never ahead of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(logging.INFO)
    coro = run_worker(host=args.host, port=args.port, primary=args.primary, sock=args.sock)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
