"""Host-loss benchmark: a host loses power under GET load; how long until the service is whole
again, and how many requests fail, through each router engine at once.

Two nodes on this machine, process pods: node "a" (a Temporal dev server, the control worker
and a node worker in this process) and node "b", a joined host whose worker (``python -m worker
--no-control``) is a process of its own. Both router engines run (``python -m router --engine
builtin`` and ``--engine haproxy``), fed by the control plane. Timing as shipped: a heartbeat
every 2 s, Lost after 6 s (``--heartbeat`` / ``--lost-after`` to try others).

Each round: a service of ``--replicas`` (4) pods spread 2 + 2 over a and b; ``--concurrency``
(8) clients GET back to back through *each* router; after ``--lead`` (2 s) b's worker and its
pods are SIGKILLed at once (t0, a power loss). Measured from t0:
  lost    the registry holds b as Lost
  whole   every replica ready on a in the service's record, and in both routers' tables
  failed  GETs that did not get a 200, per engine (out of how many)
Then b's worker starts again (it removes its stale pods, then registers), the service is
undeployed, and the next round deploys afresh. Target: whole <= 15 s, 0 failed GETs.

    .venv/bin/python bench/hostloss.py [--rounds 5] [--replicas 4] [--concurrency 8]

Prints a table and writes bench/results/hostloss.json (per-round figures, load averages).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib import EXAMPLE_IMAGE  # noqa: E402
from bench.lib.results import Run, add_source_arg, parser, print_table, run_main  # noqa: E402
from bench.lib.source import current, use_source  # noqa: E402
from bench.lib.stack import grant_access  # noqa: E402
from bench.lib.stats import rnd, summary  # noqa: E402

NAME = "hostloss"
TARGET_S = 15.0
ENGINES = ("builtin", "haproxy")


@dataclass
class Load:
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)  # the first few failures' bodies or errors

    def fail(self, kind: str, detail: str) -> None:
        self.failed[kind] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{kind}: {detail[:200]}")


async def get_load(url: str, clients: int, stop: asyncio.Event) -> Load:
    """``clients`` GETs back to back until ``stop``; anything but a 200 is a failure."""
    out = Load()

    async def client(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with http.get(url) as r:
                    body = await r.read()
                    if r.status == 200:
                        out.ok += 1
                    else:
                        out.fail(str(r.status), body.decode(errors="replace"))
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                out.fail(type(e).__name__, str(e))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return out


class Bench:
    """The two nodes, both routers, and one round's steps."""

    def __init__(self, stack: Any, routers: dict[str, Any], b_settings: Any, b_worker: Any, args: Any) -> None:
        self.stack, self.routers, self.b, self.b_worker, self.args = stack, routers, b_settings, b_worker, args
        self.a = stack.settings
        self.dropped: list[str] = []  # b's pod ports whose packets are dropped (--unplug)

    async def node_state(self, node: str) -> str | None:
        from hms_mgmt.nodes import list_nodes

        views = {v.spec.name: v for v in await list_nodes(self.stack.client, self.a)}
        return views[node].state if node in views else None

    async def until(self, predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
        """Seconds until ``predicate()`` holds (polled every ``interval``)."""
        t0 = time.monotonic()
        while not await predicate():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} not within {timeout:g}s")
            await asyncio.sleep(interval)
        return time.monotonic() - t0

    async def tables_hold(self, service: str, pods: set[str]) -> bool:
        from hms_mgmt import feed

        async with aiohttp.ClientSession() as http:
            for router in self.routers.values():
                try:
                    async with http.get(f"{router.url}/-/table",
                                        headers=feed.inspect_headers(self.a.state_dir, "/-/table")) as r:
                        t = (await r.json())["services"].get(service)
                except (aiohttp.ClientError, OSError, ValueError):
                    return False
                if t is None or {e["pod"] for e in t["endpoints"] if e["state"] == "ready"} != pods \
                        or len(t["endpoints"]) != len(pods) or t.get("applied_version") != t["version"]:
                    return False
        return True

    async def whole_on_a(self, service: str) -> bool:
        st = await self.stack.orch.status(service, live=False)
        ready = {p.id for p in st.pods if p.ready and p.node == self.a.node}
        return len(ready) == self.args.replicas and len([p for p in st.pods if p.ready]) == len(ready) \
            and await self.tables_hold(service, ready)

    async def deploy(self, service: str) -> None:
        spec = {"name": service, "image": EXAMPLE_IMAGE, "min_replicas": self.args.replicas,
                "max_replicas": self.args.replicas, "cpu_target": 60, "health_interval_s": 1.0}
        await self.stack.orch.deploy(spec, wait=True, timeout=120)
        st = await self.stack.orch.status(service, live=False)
        on_b = sum(p.node == self.b.node for p in st.pods)
        if on_b == 0:
            raise RuntimeError(f"no pod of {service} on node b: {[p.node for p in st.pods]}")
        await self.until(lambda: self.tables_hold(service, {p.id for p in st.pods}), 30, "both routers' tables")

    def power_loss(self) -> int:
        """b's worker and every pod of b, SIGKILLed together; returns how many pods died. With
        ``--unplug``, b's pod ports first drop every packet, as a host without power sends no
        reset (a process killed on a live kernel would)."""
        from hms_mgmt.runtimes import make_runtime

        rt = make_runtime("process", node=self.b.node, state_dir=self.b.state_dir)
        try:
            handles = rt.list()
        finally:
            rt.close()
        pids = [int(h.extra["pid"]) for h in handles if h.extra.get("pid")]
        if self.args.unplug:
            for h in handles:
                port = (h.endpoint or "").rpartition(":")[2]
                if port:
                    self.dropped.append(port)
                    iptables("-I", port)
        self.b_worker.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    async def round(self, k: int) -> dict[str, Any]:
        service = f"hostloss-{k}"
        await self.deploy(service)
        stop = asyncio.Event()
        loads = {e: asyncio.ensure_future(get_load(f"{r.url}/{service}/", self.args.concurrency, stop))
                 for e, r in self.routers.items()}
        try:
            await asyncio.sleep(self.args.lead)
            killed = self.power_loss()
            lost = asyncio.ensure_future(self.until(lambda: self._is_lost(), 60, "b Lost", interval=0.2))
            whole = await self.until(lambda: self.whole_on_a(service), self.args.timeout, f"{service} whole on a")
            lost_s = await lost
            await asyncio.sleep(self.args.tail)
        finally:
            stop.set()
            results = {e: await t for e, t in loads.items()}
        row = {"round": k, "pods_killed": killed, "lost_s": rnd(lost_s), "whole_s": rnd(whole),
               "load_avg": os.getloadavg()[0],
               **{f"{e}_ok": results[e].ok for e in ENGINES},
               **{f"{e}_failed": sum(results[e].failed.values()) for e in ENGINES},
               **{f"{e}_failures": dict(results[e].failed) for e in ENGINES},
               **{f"{e}_failure_samples": results[e].samples for e in ENGINES}}
        print(f"round {k}: lost {row['lost_s']} s, whole {row['whole_s']} s since t0; failed: "
              + ", ".join(f"{e} {row[e + '_failed']}/{row[e + '_ok'] + row[e + '_failed']}" for e in ENGINES),
              flush=True)
        await self.bring_b_back()
        await self.stack.orch.undeploy(service, wait=True, timeout=120)
        return row

    async def _is_lost(self) -> bool:
        return await self.node_state(self.b.node) == "Lost"

    def plug_in(self) -> None:
        while self.dropped:
            iptables("-D", self.dropped.pop())

    async def bring_b_back(self) -> None:
        self.plug_in()
        self.b_worker.start()
        await self.until(lambda: self._is_ready(), 60, "b Ready again", interval=0.2)

    async def _is_ready(self) -> bool:
        return await self.node_state(self.b.node) == "Ready"


def iptables(op: str, port: str) -> None:
    """Insert (``-I``) or delete (``-D``) the rule that drops packets to 127.0.0.1:``port``."""
    subprocess.run(["iptables", op, "OUTPUT", "-d", "127.0.0.1", "-p", "tcp", "--dport", str(port), "-j", "DROP",
                    "-m", "comment", "--comment", "hms-bench-hostloss"], check=op == "-I", capture_output=True,
                   timeout=10)


def can_unplug() -> bool:
    return os.geteuid() == 0 and shutil.which("iptables") is not None


@contextlib.asynccontextmanager
async def two_nodes(args: Any) -> Any:
    """The stack with both routers, and node b's worker process, joined."""
    from hms_mgmt.testing import WorkerProcess, enrol_node_dir, free_port, local_stack
    from router.server import RouterProcess

    class NodeWorker(WorkerProcess):
        def start(self) -> None:
            import subprocess

            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "worker", "--no-control"], env=self.env(),
                                             cwd=self.source_root, stdout=out, stderr=subprocess.STDOUT)

    ports = {e: free_port() for e in ENGINES}
    timing = {"node_heartbeat_s": args.heartbeat, "node_lost_after_s": args.lost_after}
    async with local_stack("process", prefix="hms-bench", node_prefix="h",
                           routers=[f"http://127.0.0.1:{p}" for p in ports.values()], **timing) as stack:
        grant_access(stack, [EXAMPLE_IMAGE], runtime="process")
        routers = {e: RouterProcess(stack.settings, port=p, engine=e) for e, p in ports.items()}
        tmp = Path(tempfile.mkdtemp(prefix="hms-bench-b-"))
        b = stack.settings.model_copy(update={"state_dir": tmp / "state", "node": f"{stack.settings.node}b"})
        enrol_node_dir(stack.settings.state_dir, b.state_dir, b.node)
        b_worker = NodeWorker(b, tmp / "worker.log", source_root=current()["root"],
                              extra_env={"HMS_NODE_HEARTBEAT_S": str(args.heartbeat),
                                         "HMS_NODE_LOST_AFTER_S": str(args.lost_after)})
        try:
            for r in routers.values():
                r.start()
            for r in routers.values():
                await r.wait_ready(30)
            b_worker.start()
            bench = Bench(stack, routers, b, b_worker, args)
            await bench.until(bench._is_ready, 60, "node b Ready", interval=0.2)
            yield bench
        finally:
            if "bench" in locals():
                bench.plug_in()
            b_worker.stop()
            for r in routers.values():
                await asyncio.to_thread(r.stop)
            from hms_mgmt.runtimes import make_runtime

            for s in (stack.settings, b):
                rt = make_runtime("process", node=s.node, state_dir=s.state_dir)
                for h in rt.list():
                    rt.stop(h.pod_id, 0)
                rt.close()


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "whole_s": summary([r["whole_s"] for r in rows], "_s"),
        "lost_s": summary([r["lost_s"] for r in rows], "_s"),
        **{f"{e}_failed": sum(r[f"{e}_failed"] for r in rows) for e in ENGINES},
        **{f"{e}_requests": sum(r[f"{e}_ok"] + r[f"{e}_failed"] for r in rows) for e in ENGINES},
    }


def report(fig: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print()
    table = [["power loss -> b Lost (s, median)", fig["lost_s"].get("median_s"), "-", "-"],
             ["power loss -> whole again (s, median)", fig["whole_s"].get("median_s"), f"<= {TARGET_S:g}",
              "PASS" if (fig["whole_s"].get("max_s") or 1e9) <= TARGET_S else "FAIL"],
             ["power loss -> whole again (s, max)", fig["whole_s"].get("max_s"), f"<= {TARGET_S:g}", "-"]]
    for e in ENGINES:
        table.append([f"failed GETs, {e} engine", f"{fig[e + '_failed']} of {fig[e + '_requests']}", "0",
                      "PASS" if fig[e + "_failed"] == 0 else "FAIL"])
    print_table(table, ["figure", "value", "target", "verdict"])


async def main(args: Any) -> int:
    use_source(args.source)
    bench_run = Run(NAME)
    bench_run.announce(args.source)
    rows = []
    async with two_nodes(args) as bench:
        for k in range(1, args.rounds + 1):
            rows.append(await bench.round(k))
            await asyncio.sleep(args.settle)
    fig = figures(rows)
    report(fig, rows)
    bench_run.done({"figures": fig, "rounds": rows, "target_whole_s": TARGET_S,
                    "settings": {k: getattr(args, k) for k in ("rounds", "replicas", "concurrency", "lead", "tail",
                                                                "heartbeat", "lost_after", "unplug")}})
    return 0


def parse_args(argv: list[str] | None = None) -> Any:
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5, help="power losses (default 5)")
    ap.add_argument("--replicas", type=int, default=4, help="pods of the service, spread over a and b (default 4)")
    ap.add_argument("--concurrency", type=int, default=8, help="GET clients per router (default 8)")
    ap.add_argument("--lead", type=float, default=2.0, help="seconds of load before the power loss (default 2)")
    ap.add_argument("--tail", type=float, default=1.0, help="seconds of load after whole again (default 1)")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="node_heartbeat_s (default: as shipped, 2)")
    ap.add_argument("--lost-after", type=float, default=6.0, help="node_lost_after_s (default: as shipped, 6)")
    ap.add_argument("--unplug", action=argparse.BooleanOptionalAction, default=None,
                    help="drop b's pod packets at the power loss, as a dead host sends no reset (default: on as "
                         "root with iptables)")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between rounds (default 1 s)")
    ap.add_argument("--timeout", type=float, default=90.0, help="give up on a round after this (default 90 s)")
    add_source_arg(ap)
    args = ap.parse_args(argv)
    if args.unplug is None:
        args.unplug = can_unplug()
    return args


if __name__ == "__main__":
    run_main(main, parse_args())
