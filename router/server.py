"""Start a router: the endpoint table and its feed, then one engine serving until cancelled.

In-process: ``await serve(settings, port=8000, engine="builtin")``. As a process:
``python -m router --port 8000 --engine haproxy`` (or ``hms router``); :class:`RouterProcess`
starts and stops one for the local stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from hms_mgmt.config import Settings, temporal_tls
from hms_mgmt.errors import ConfigError
from router.feed import RESYNC_INTERVAL_S, EndpointTable, FeedSync
from router.registration import RouterAgent, advertised_address, router_identity
from router.stats import TrafficStats

log = logging.getLogger("hms.router")
STOP_WAIT_S = 5.0  # how long a stopping router waits for its registration and resync tasks

ENGINES = ("builtin", "haproxy")


async def serve(settings: Settings, *, port: int, engine: str = "builtin", host: str = "127.0.0.1",
                ready: asyncio.Event | None = None, resync_interval_s: float = RESYNC_INTERVAL_S,
                client: object | None = None, procs: int | None = None) -> None:
    """Route ``http://host:port/<service>/<path>`` until cancelled. ``ready`` is set once the
    port answers. ``client``: a Temporal client to reuse (else one is made from ``settings``).
    ``procs``: the builtin engine's processes (default ``settings.router_procs``, else one per CPU)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown router engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "builtin" and procs is None:
        from router.workers import process_count

        procs = process_count(settings)
    if client is None:
        temporal_tls(settings)  # a half-done TLS setting stops the router now, not at its first resync
    # Its key and certificate: self-enrolled on the control plane's host, from `hms router join` elsewhere.
    identity = await asyncio.to_thread(router_identity, settings, host=host, port=port)
    table = EndpointTable()
    sync = FeedSync(settings, table, interval_s=resync_interval_s, client=client, identity=identity)
    stats = TrafficStats(engine)
    resync = asyncio.create_task(sync.run(), name="router-resync")
    membership = asyncio.create_task(_membership(settings, sync, host=host, port=port, engine=engine),
                                     name="router-registration")
    try:
        if engine == "builtin":
            from router.builtin import run_builtin

            await run_builtin(table, sync, stats, host=host, port=port, ready=ready, procs=procs or 1)
        else:
            from router.haproxy import run_haproxy

            await run_haproxy(settings, table, sync, stats, host=host, port=port, ready=ready)
    finally:
        for task in (membership, resync):
            task.cancel()
        # Bounded: a stop must not hang on a Temporal call that misses its cancel.
        _, stuck = await asyncio.wait({membership, resync}, timeout=STOP_WAIT_S)
        for task in stuck:
            log.warning("router stopping: %s did not end within %g s", task.get_name(), STOP_WAIT_S)


async def _membership(settings: Settings, sync: FeedSync, *, host: str, port: int, engine: str) -> None:
    """Register this router and heartbeat (once Temporal is reached), until cancelled."""
    while True:
        try:
            client = await sync.connected()
            break
        except Exception as e:  # noqa: BLE001 - the resync says so too; try again
            log.info("router registration waits for Temporal: %s", e)
            await asyncio.sleep(settings.node_heartbeat_s)
    assert sync.identity is not None
    agent = RouterAgent(settings, sync.identity, address=advertised_address(settings, host), port=port,
                        engine=engine, client=client)
    await agent.run()


def run(settings: Settings, *, port: int, engine: str = "builtin", host: str = "127.0.0.1") -> None:
    """Blocking entry point (``hms router``, ``python -m router``): uvloop where installed;
    SIGINT/SIGTERM stop it cleanly."""
    async def main() -> None:
        task = asyncio.ensure_future(serve(settings, port=port, engine=engine, host=host))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


class RouterProcess:
    """``python -m router`` as a child process, for the local stack (``hms up``) and tests."""

    def __init__(self, settings: Settings, *, port: int, engine: str = "builtin", log_path: Path | None = None
                 ) -> None:
        self.settings = settings
        self.port = port
        self.engine = engine
        self.log_path = log_path or settings.state_dir / "router.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        s = self.settings
        env = dict(os.environ)
        env.update(HMS_TEMPORAL_ADDRESS=s.temporal_address, HMS_NAMESPACE=s.namespace,
                   HMS_STATE_DIR=str(s.state_dir), HMS_TASK_QUEUE=s.task_queue)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "router", "--port", str(self.port), "--engine", self.engine],
                env=env, cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until ``GET /-/health`` answers 200 (the first table load is done)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while loop.time() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the router exited with {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(f"{self.url}/-/health") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"the router did not answer on {self.url} within {timeout_s:g}s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
