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
           the command returns. Swarm's routing mesh does not answer on these machines, so failed
           requests are counted for ours only.

What each figure holds. The command returns once every task runs 1.5 *and* a further 5 s have
passed without one failing (the CLI's "verify: Waiting 5 seconds to verify that tasks are
stable", the service's ``UpdateConfig.Monitor``, 5 s by default): Swarm's stability check, as
``min_ready_s`` (1 s per pod) is ours. Swarm counts a task as updated once its container runs,
without asking the app anything; ours waits for each new pod's first health answer. So the run
also records, read from the Docker API while the command runs, when every running task was
on 1.5 and no 1.4 task ran ("converged", the 5 s check not included), and runs ours once more
with ``min_ready_s 0`` (Kubernetes' ``minReadySeconds`` default): the like-for-like pair with no
stability wait on either side. The target is on the first pair, both sides as they ship.

Each run is a Swarm pair then ours, alternating, so both see the same load on a shared machine;
a run starts only once the previous one's containers are gone (``docker service rm`` returns
before Swarm's tasks stop; our ``undeploy`` returns after its pods stopped) and 1 s more. The
same steady load runs during Swarm's updates too (through our router, at a 4-pod service nobody
updates), so both share the machine with the same traffic; ``--peer-unloaded`` leaves it out.

    .venv/bin/python bench/rollout.py [--runs 3] [--in-process] [--peer-unloaded]

Target: 0 failed requests, and ours <= 1.0x Swarm's start-first time. Writes
bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lib.ports import docker_client  # noqa: E402
from bench.lib.results import Run, add_source_arg, loadavg, print_table, verdict  # noqa: E402
from bench.lib.source import use_source  # noqa: E402
from bench.lib.stack import grant_access, hms_stack  # noqa: E402
from bench.lib.stats import median, rnd  # noqa: E402

V1, V2 = "registry.gov/hms-ach:1.4", "registry.gov/hms-ach:1.5"
SWARM_V1, SWARM_V2 = "hms-ach:1.4", "hms-ach:1.5"
REPLICAS = 4
TARGET = 1.0
SETTLE_S = 1.0  # after a service is gone, before the next measured run


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
        from bench.lib.source import current

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--traffic", str(self.port), "--source-root", current()["root"],
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


async def traffic_child(port: int, source_root: str | None) -> None:
    """``--traffic PORT``: serve the router and, on request, a steady load through it.

    Reads one line of settings JSON, then ``{"start": URL}`` / ``{"stop": true}`` lines; answers
    each with one JSON line on stdout. Ends when stdin closes."""
    if source_root:  # the product code the parent measures
        sys.path.insert(0, source_root)
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


VARIANTS = {"defaults": {}, "min_ready_s 0": {"min_ready_s": 0}}


async def ours(runs: int, *, in_process: bool, before_each: Callable[[int], None], peer_loaded: bool = True
               ) -> dict[str, list[dict[str, float | int]]]:
    """Per run, one update with the spec's defaults and one with ``min_ready_s`` 0."""
    out: dict[str, list[dict[str, float | int]]] = {v: [] for v in VARIANTS}
    from bench.lib import ports

    port = ports.free_port()
    async with hms_stack("docker", routers=[f"http://127.0.0.1:{port}"]) as stack:
        grant_access(stack, images=(V1, V2))
        async with Traffic(stack.settings, stack.client, port, in_process=in_process) as traffic:
            # The same steady load runs while Swarm updates, through the router at a 4-pod service
            # nobody updates (Swarm's routing mesh does not answer here): both updates share the
            # machine with the same traffic.
            ballast = {"name": "ballast", "image": V1, "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                       "cpu_target": 60}
            if peer_loaded:
                await stack.orch.deploy(ballast, wait=True, timeout=120)
                await asyncio.sleep(2.0)  # the router has the table
            for i in range(runs):
                if peer_loaded:
                    await traffic.start("ballast")
                await asyncio.to_thread(before_each, i)
                if peer_loaded:
                    counts = await traffic.stop()
                    print(f"  (load during Swarm's run {i + 1}: {counts['ok'] + counts['failed']} requests)", flush=True)
                for variant, extra in VARIANTS.items():
                    name = f"roll-{i}" if variant == "defaults" else f"roll-{i}-fast"
                    spec = {"name": name, "image": V1, "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                            "cpu_target": 60, **extra}
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
                    out[variant].append({"seconds": seconds, "requests": counts["ok"] + counts["failed"],
                                         "failed": counts["failed"], "load": loadavg()})
                    print(f"  ours ({variant}) run {i + 1}: {seconds:.2f} s, {counts['failed']} failed of "
                          f"{counts['ok'] + counts['failed']} requests", flush=True)
                    await stack.orch.undeploy(name)  # returns once every pod is stopped
                    await asyncio.sleep(SETTLE_S)
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


def swarm_converged(name: str, t0: float, done: threading.Event) -> float | None:
    """Seconds from ``t0`` until every running task of ``name`` runs ``SWARM_V2`` and no task of
    another image runs (polled every 50 ms through the Docker API until ``done``)."""
    client = docker_client()
    try:
        service = client.services.get(name)
        while not done.is_set():
            running = [t for t in service.tasks() if t["Status"]["State"] == "running"]
            images = [t["Spec"]["ContainerSpec"]["Image"].split("@")[0] for t in running]
            if len(running) == REPLICAS and all(i == SWARM_V2 for i in images):
                return time.monotonic() - t0
            done.wait(0.05)
        return None
    finally:
        client.close()


def swarm_gone(name: str, timeout_s: float = 60.0) -> None:
    """``docker service rm`` returns before its containers stop: wait until they are gone, so the
    next measured run (ours or Swarm's) does not share the machine with their teardown."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sh("docker", "ps", "-aq", "--filter", f"label=com.docker.swarm.service.name={name}").stdout.strip():
            break
        time.sleep(0.2)
    time.sleep(SETTLE_S)


def swarm_round(i: int, out: dict[str, list[float]], converged: dict[str, list[float | None]]) -> None:
    """One Swarm update of each order; the caller alternates these with ours, so both see the
    same load on a shared machine."""
    for order in ("start-first", "stop-first"):
        name = f"hms-bench-roll-{order}-{i}"
        sh("docker", "service", "create", "--quiet", "--name", name, "--replicas", str(REPLICAS),
           "--env", "PORT=8080", SWARM_V1)
        done = threading.Event()
        try:
            with ThreadPoolExecutor(1) as pool:
                t0 = time.monotonic()
                watch = pool.submit(swarm_converged, name, t0, done)
                sh("docker", "service", "update", "--quiet", "--image", SWARM_V2, "--update-order", order, name)
                seconds = time.monotonic() - t0
                done.set()
                seen = watch.result()
        finally:
            sh("docker", "service", "rm", name, check=False)
            swarm_gone(name)
        out.setdefault(order, []).append(seconds)
        converged.setdefault(order, []).append(seen)
        print(f"  swarm {order} run {i + 1}: {seconds:.2f} s (every task on 1.5 after "
              f"{'-' if seen is None else f'{seen:.2f}'} s)", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="router and load in the worker's process")
    ap.add_argument("--peer-unloaded", action="store_true",
                    help="no steady load while Swarm updates (only ours runs under load)")
    add_source_arg(ap)
    ap.add_argument("--traffic", type=int, help=argparse.SUPPRESS)  # the child: router + load on this port
    ap.add_argument("--source-root", help=argparse.SUPPRESS)  # the child: the parent's measured code
    return ap.parse_args(argv)


def figures(runs: dict[str, list[dict[str, float | int]]], peer: dict[str, list[float]],
            converged: dict[str, list[float | None]]) -> dict[str, Any]:
    mine, fast = runs["defaults"], runs["min_ready_s 0"]
    m = {"ours": median(r["seconds"] for r in mine), "ours_min_ready_0": median(r["seconds"] for r in fast),
         "swarm_start_first": median(peer["start-first"]), "swarm_stop_first": median(peer["stop-first"]),
         "swarm_start_first_converged": median(x for x in converged["start-first"] if x is not None)}
    ratio = m["ours"] / m["swarm_start_first"] if m["ours"] and m["swarm_start_first"] else None
    like = (m["ours_min_ready_0"] / m["swarm_start_first_converged"]
            if m["ours_min_ready_0"] and m["swarm_start_first_converged"] else None)
    return {"median_s": m, "ratio": ratio, "like_for_like": like,
            "failed": {"defaults": sum(int(r["failed"]) for r in mine), "fast": sum(int(r["failed"]) for r in fast)}}


def report(f: dict[str, Any]) -> None:
    m, ratio, failed = f["median_s"], f["ratio"], f["failed"]
    rows = [
        ["ours, defaults (min_ready_s 1 per pod)", rnd(m["ours"], 2), f"{failed['defaults']} failed", ""],
        ["swarm start-first, command returns (5 s check)", rnd(m["swarm_start_first"], 2), "-", ""],
        ["swarm stop-first, command returns (5 s check)", rnd(m["swarm_stop_first"], 2), "-", ""],
        ["ours / swarm start-first (the target)", rnd(ratio, 2), "", verdict(ratio, TARGET)],
        ["ours, min_ready_s 0", rnd(m["ours_min_ready_0"], 2), f"{failed['fast']} failed", ""],
        ["swarm start-first, every task on v2 (no check)", rnd(m["swarm_start_first_converged"], 2), "-", ""],
        ["ours min_ready_s 0 / swarm converged", rnd(f["like_for_like"], 2), "", "reported"],
    ]
    print_table(rows, ["", "seconds (median)", "requests", f"target <= {TARGET}x"])
    print("  Swarm's command waits 5 s after the last task runs v2 (UpdateConfig.Monitor) before it returns;\n"
          "  Swarm counts a task as updated once its container runs, ours once the pod answers its health path.")


def main() -> None:
    args = parse_args()
    if args.traffic:
        asyncio.run(traffic_child(args.traffic, args.source_root))
        return
    use_source(args.source)  # before the first product import
    bench_run = Run("rollout")
    bench_run.announce(args.source)
    print("ours (rolling update through the router), alternating with the peer (docker service update, Swarm)",
          flush=True)
    peer: dict[str, list[float]] = {}
    converged: dict[str, list[float | None]] = {}
    with swarm_mode():
        runs = asyncio.run(ours(args.runs, in_process=args.in_process,
                                before_each=lambda i: swarm_round(i, peer, converged),
                                peer_loaded=not args.peer_unloaded))
    f = figures(runs, peer, converged)
    report(f)
    bench_run.done({
        "replicas": REPLICAS, "images": [V1, V2], "ours": runs["defaults"], "ours_min_ready_0": runs["min_ready_s 0"],
        "swarm": peer, "swarm_converged": converged,
        "router_and_load": "worker's process" if args.in_process else "a process of their own",
        "load_during_swarm": not args.peer_unloaded,
        "median_s": f["median_s"],
        "ratio_vs_start_first": f["ratio"], "ratio_min_ready_0_vs_start_first_converged": f["like_for_like"],
        "failed_requests": f["failed"]["defaults"] + f["failed"]["fast"], "target": TARGET,
        "notes": "swarm seconds: until `docker service update` returns, which includes its 5 s stability check "
                 "(UpdateConfig.Monitor); swarm_converged: until every running task runs v2, read from the API",
    })


if __name__ == "__main__":
    main()
