"""Rolling-update benchmark: 4 pods of hms-ach move from 1.4 to 1.5 under steady load through
our router, against ``docker service update`` of a 4-replica Swarm service (same image pair),
measured in the same run.

    ours   ``orchestrator.deploy(spec with image 1.5, wait=True)`` on a running 4-pod service
           (defaults: max_surge 25 %, max_unavailable 0, min_ready_s 1, drain_s 2): seconds
           until the call returns (every pod runs 1.5 and the old ones are stopped), and the
           failed requests of a steady GET load (8 clients) through the builtin router. The
           router and the load run in a process of their own, as a router and its clients do
           beside a worker (``--in-process`` puts them in the worker's process, as before).
    peer   ``docker service update --image hms-ach:1.5`` of a 4-replica Swarm service, once with
           ``--update-order start-first`` and once with the default stop-first: seconds until
           the command returns (it waits until the update converged). Swarm's routing mesh does
           not answer on these machines, so failed requests are counted for ours only.

Each run is a Swarm pair then ours, alternating, so both see the same load on a shared machine.

    .venv/bin/python bench/rollout.py [--runs 3] [--in-process]

Target: 0 failed requests, and ours <= 1.0x Swarm's start-first time. Writes
bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    grant_access,
    hms_stack,
    loadavg,
    machine_info,
    median,
    print_table,
    rnd,
    verdict,
    write_result,
)

V1, V2 = "registry.gov/hms-ach:1.4", "registry.gov/hms-ach:1.5"
SWARM_V1, SWARM_V2 = "hms-ach:1.4", "hms-ach:1.5"
REPLICAS = 4
TARGET = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def steady_load(url: str, stop: asyncio.Event, clients: int = 8) -> dict[str, int]:
    import aiohttp

    counts = {"ok": 0, "failed": 0}

    async def one(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with http.get(url) as r:
                    await r.read()
                    counts["ok" if r.status == 200 else "failed"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                counts["failed"] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        await asyncio.gather(*(one(http) for _ in range(clients)))
    return counts


class Traffic:
    """The router and the steady load, in this process or in a child of its own."""

    def __init__(self, settings, client, port: int, *, in_process: bool) -> None:  # noqa: ANN001 - Settings, Client
        self.settings, self.client, self.in_process = settings, client, in_process
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.router: asyncio.Task[None] | None = None
        self.load: tuple[asyncio.Event, asyncio.Future[dict[str, int]]] | None = None

    async def __aenter__(self) -> Traffic:
        if self.in_process:
            from router import serve

            ready = asyncio.Event()
            self.router = asyncio.create_task(serve(self.settings, port=self.port, engine="builtin", ready=ready,
                                                    client=self.client))
            await asyncio.wait_for(ready.wait(), 30)
            return self
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--traffic", str(self.port),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        # Settings (with the bench's token) on stdin, not on a command line anyone can read.
        await self._send(self.settings.model_dump_json())
        assert await self._line() == {"ready": True}
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.router is not None:
            self.router.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.router
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def _send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def _line(self) -> dict:
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60))

    async def start(self, service: str) -> None:
        url = f"http://127.0.0.1:{self.port}/{service}/"
        if self.proc is not None:
            await self._send(json.dumps({"start": url}))
            assert await self._line() == {"started": True}
            return
        stop = asyncio.Event()
        self.load = (stop, asyncio.ensure_future(steady_load(url, stop)))

    async def stop(self) -> dict[str, int]:
        if self.proc is not None:
            await self._send(json.dumps({"stop": True}))
            return await self._line()
        stop, counts = self.load
        stop.set()
        return await counts


async def traffic_child(port: int) -> None:
    """``--traffic PORT``: serve the router and, on request, a steady load through it.

    Reads one line of settings JSON, then ``{"start": URL}`` / ``{"stop": true}`` lines; answers
    each with one JSON line on stdout. Ends when stdin closes."""
    from hms_mgmt.config import Settings
    from router import serve

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    settings = Settings(**json.loads(await reader.readline()))
    ready = asyncio.Event()
    router = asyncio.create_task(serve(settings, port=port, engine="builtin", ready=ready))
    await asyncio.wait_for(ready.wait(), 60)
    answer({"ready": True})
    load: tuple[asyncio.Event, asyncio.Future[dict[str, int]]] | None = None
    try:
        while line := await reader.readline():
            msg = json.loads(line)
            if "start" in msg:
                stop = asyncio.Event()
                load = (stop, asyncio.ensure_future(steady_load(msg["start"], stop)))
                answer({"started": True})
            elif "stop" in msg and load is not None:
                load[0].set()
                answer(await load[1])
                load = None
    finally:
        router.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await router


async def ours(runs: int, *, in_process: bool, before_each: Callable[[int], None]) -> list[dict[str, float | int]]:
    out = []
    port = free_port()
    async with hms_stack("docker", routers=[f"http://127.0.0.1:{port}"]) as stack:
        grant_access(stack, images=(V1, V2))
        async with Traffic(stack.settings, stack.client, port, in_process=in_process) as traffic:
            for i in range(runs):
                await asyncio.to_thread(before_each, i)
                name = f"roll-{i}"
                spec = {"name": name, "image": V1, "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                        "cpu_target": 60}
                await stack.orch.deploy(spec, wait=True, timeout=120)
                await asyncio.sleep(2.0)  # the router has the table
                await traffic.start(name)
                await asyncio.sleep(1.0)
                t0 = time.monotonic()
                result = await stack.orch.deploy({**spec, "image": V2}, wait=True, timeout=300)
                seconds = time.monotonic() - t0
                await asyncio.sleep(0.5)
                counts = await traffic.stop()
                st = await stack.orch.status(name)
                assert {p.revision for p in st.pods} == {result.revision}, st.pods
                out.append({"seconds": seconds, "requests": counts["ok"] + counts["failed"],
                            "failed": counts["failed"], "load": loadavg()})
                print(f"  ours run {i + 1}: {seconds:.2f} s, {counts['failed']} failed of "
                      f"{counts['ok'] + counts['failed']} requests", flush=True)
                await stack.orch.undeploy(name)
    return out


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=300)


@contextlib.contextmanager
def swarm_mode():
    joined = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "active"
    if not joined:
        sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        yield
    finally:
        if not joined:
            sh("docker", "swarm", "leave", "--force", check=False)


def swarm_round(i: int, out: dict[str, list[float]]) -> None:
    """One Swarm update of each order; the caller alternates these with ours, so both see the
    same load on a shared machine."""
    for order in ("start-first", "stop-first"):
        name = f"hms-bench-roll-{order}-{i}"
        sh("docker", "service", "create", "--quiet", "--name", name, "--replicas", str(REPLICAS),
           "--env", "PORT=8080", SWARM_V1)
        try:
            t0 = time.monotonic()
            sh("docker", "service", "update", "--quiet", "--image", SWARM_V2, "--update-order", order, name)
            seconds = time.monotonic() - t0
        finally:
            sh("docker", "service", "rm", name, check=False)
        out.setdefault(order, []).append(seconds)
        print(f"  swarm {order} run {i + 1}: {seconds:.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="router and load in the worker's process")
    ap.add_argument("--traffic", type=int, help=argparse.SUPPRESS)  # the child: router + load on this port
    args = ap.parse_args()
    if args.traffic:
        asyncio.run(traffic_child(args.traffic))
        return
    print("ours (rolling update through the router), alternating with the peer (docker service update, Swarm)",
          flush=True)
    peer: dict[str, list[float]] = {}
    with swarm_mode():
        mine = asyncio.run(ours(args.runs, in_process=args.in_process,
                                before_each=lambda i: swarm_round(i, peer)))
    ours_s = median(r["seconds"] for r in mine)
    start_first = median(peer["start-first"])
    stop_first = median(peer["stop-first"])
    failed = sum(int(r["failed"]) for r in mine)
    ratio = ours_s / start_first if ours_s and start_first else None
    rows = [
        ["ours (router, 0 failed wanted)", rnd(ours_s, 2), f"{failed} failed", ""],
        ["swarm start-first", rnd(start_first, 2), "-", ""],
        ["swarm stop-first", rnd(stop_first, 2), "-", ""],
        ["ours / swarm start-first", rnd(ratio, 2), "", verdict(ratio, TARGET)],
    ]
    print_table(rows, ["", "seconds (median)", "requests", f"target <= {TARGET}x"])
    path = write_result("rollout", {
        "replicas": REPLICAS, "images": [V1, V2], "ours": mine, "swarm": peer,
        "router_and_load": "worker's process" if args.in_process else "a process of their own",
        "median_s": {"ours": ours_s, "swarm_start_first": start_first, "swarm_stop_first": stop_first},
        "ratio_vs_start_first": ratio, "failed_requests": failed, "target": TARGET, "machine": machine_info(),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
