"""Rolling-update benchmark: 4 pods of hms-ach move from 1.4 to 1.5 under steady load through
our router, against ``docker service update`` of a 4-replica Swarm service (same image pair),
measured in the same run.

    ours   ``orchestrator.deploy(spec with image 1.5, wait=True)`` on a running 4-pod service
           (defaults: max_surge 25 %, max_unavailable 0, min_ready_s 1, drain_s 2): seconds
           until the call returns (every pod runs 1.5 and the old ones are stopped), and the
           failed requests of a steady GET load (8 clients) through the builtin router.
    peer   ``docker service update --image hms-ach:1.5`` of a 4-replica Swarm service, once with
           ``--update-order start-first`` and once with the default stop-first: seconds until
           the command returns (it waits until the update converged). Swarm's routing mesh does
           not answer on these machines, so failed requests are counted for ours only.

    .venv/bin/python bench/rollout.py [--runs 3]

Target: 0 failed requests, and ours <= 1.0x Swarm's start-first time. Writes
bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
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


async def ours(runs: int) -> list[dict[str, float | int]]:
    from router import serve

    out = []
    port = free_port()
    async with hms_stack("docker", routers=[f"http://127.0.0.1:{port}"]) as stack:
        grant_access(stack, images=(V1, V2))
        ready = asyncio.Event()
        router = asyncio.create_task(serve(stack.settings, port=port, engine="builtin", ready=ready,
                                           client=stack.client))
        await asyncio.wait_for(ready.wait(), 30)
        try:
            for i in range(runs):
                name = f"roll-{i}"
                spec = {"name": name, "image": V1, "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                        "cpu_target": 60}
                await stack.orch.deploy(spec, wait=True, timeout=120)
                await asyncio.sleep(2.0)  # the router has the table
                stop = asyncio.Event()
                load = asyncio.ensure_future(steady_load(f"http://127.0.0.1:{port}/{name}/", stop))
                await asyncio.sleep(1.0)
                t0 = time.monotonic()
                result = await stack.orch.deploy({**spec, "image": V2}, wait=True, timeout=300)
                seconds = time.monotonic() - t0
                await asyncio.sleep(0.5)
                stop.set()
                counts = await load
                st = await stack.orch.status(name)
                assert {p.revision for p in st.pods} == {result.revision}, st.pods
                out.append({"seconds": seconds, "requests": counts["ok"] + counts["failed"],
                            "failed": counts["failed"], "load": loadavg()})
                print(f"  ours run {i + 1}: {seconds:.2f} s, {counts['failed']} failed of "
                      f"{counts['ok'] + counts['failed']} requests", flush=True)
                await stack.orch.undeploy(name)
        finally:
            router.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await router
    return out


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=300)


def swarm(runs: int) -> dict[str, list[float]]:
    joined = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "active"
    if not joined:
        sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")
    out: dict[str, list[float]] = {"start-first": [], "stop-first": []}
    try:
        for i in range(runs):
            for order in ("start-first", "stop-first"):
                name = f"hms-bench-roll-{order}-{i}"
                sh("docker", "service", "create", "--quiet", "--name", name, "--replicas", str(REPLICAS),
                   "--env", "PORT=8080", SWARM_V1)
                t0 = time.monotonic()
                sh("docker", "service", "update", "--quiet", "--image", SWARM_V2, "--update-order", order, name)
                seconds = time.monotonic() - t0
                out[order].append(seconds)
                print(f"  swarm {order} run {i + 1}: {seconds:.2f} s", flush=True)
                sh("docker", "service", "rm", name, check=False)
    finally:
        if not joined:
            sh("docker", "swarm", "leave", "--force", check=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("peer: docker service update (Swarm)", flush=True)
    peer = swarm(args.runs)
    print("ours: rolling update through the router", flush=True)
    mine = asyncio.run(ours(args.runs))
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
        "median_s": {"ours": ours_s, "swarm_start_first": start_first, "swarm_stop_first": stop_first},
        "ratio_vs_start_first": ratio, "failed_requests": failed, "target": TARGET, "machine": machine_info(),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
