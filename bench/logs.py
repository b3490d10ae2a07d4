"""Log streaming benchmark: how soon a line a pod writes reaches ``logs -f``, against the
runtime's own follower reading the same pod in the same run.

    ours   ``Orchestrator.follow_logs(service, pod)``: a grant from the control plane, then the
           node's log stream (hms_mgmt/logstream.py).
    peer   docker runtime: ``docker logs -f --tail 1 <container>``; process runtime:
           ``tail -F -n 1 <the pod's log file>``.
Each round GETs ``/?marker=<id>`` on the pod (its access log writes one line naming the marker)
and times, from just before the request, when each follower prints that line. Rounds are
``--gap`` apart. Also: seconds from the call to the first line (ours asks for a grant first), and
how many history events the grant workflows hold for all the lines read (none per line).
Target: ours' p95 within 1 s (the issue's "each new line within 1 s").

    .venv/bin/python bench/logs.py [--runtime all|docker|process] [--rounds 30] [--gap 0.2]

Prints a table per runtime with the ratio and pass/fail, writes bench/results/logs.json.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib import EXAMPLE_IMAGE  # noqa: E402
from bench.lib.results import Run, parse_common, parser, print_table, run_main, verdict  # noqa: E402
from bench.lib.source import use_source  # noqa: E402
from bench.lib.stack import grant_access, hms_stack  # noqa: E402
from bench.lib.stats import pct, rnd, summary  # noqa: E402

NAME = "logs"
TARGET_P95_S = 1.0
SERVICE = "bench-logs"


class Seen:
    """When each marker was first seen by one follower."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.first_line: float | None = None

    def line(self, text: str) -> None:
        now = time.perf_counter()
        if self.first_line is None:
            self.first_line = now
        if "marker=" in text:
            self.at.setdefault(text.split("marker=", 1)[1].split()[0], now)


async def follow_ours(orch: Any, pod: str, seen: Seen) -> None:
    async for line in orch.follow_logs(SERVICE, pod, tail=1):
        seen.line(line)


async def follow_peer(argv: list[str], seen: Seen) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            seen.line(raw.decode(errors="replace"))

    asyncio.get_running_loop().create_task(read())
    return proc


def peer_argv(stack: Any, pod: str) -> list[str]:
    if stack.settings.runtime == "docker":
        import docker

        from hms_mgmt import constants

        client = docker.from_env()
        (ct,) = client.containers.list(filters={"label": f"{constants.LABEL_POD}={pod}"})
        client.close()
        return ["docker", "logs", "-f", "--tail", "1", ct.id]
    return ["tail", "-F", "-n", "1", str(stack.settings.state_dir / "logs" / stack.settings.node / f"{pod}.log")]


async def rounds(endpoint: str, sides: dict[str, Seen], n: int, gap: float) -> dict[str, list[float | None]]:
    delays: dict[str, list[float | None]] = {k: [] for k in sides}
    for _ in range(n):
        marker = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{endpoint}/?marker={marker}", timeout=5).read())
        deadline = t0 + 5
        while time.perf_counter() < deadline and not all(marker in s.at for s in sides.values()):
            await asyncio.sleep(0.002)
        for k, s in sides.items():
            delays[k].append(s.at[marker] - t0 if marker in s.at else None)
        await asyncio.sleep(gap)
    return delays


async def grant_events(stack: Any) -> dict[str, int]:
    """History events of each logs workflow (by run id: a listing may repeat an execution)."""
    runs = {}
    async for wf in stack.client.list_workflows(f'TaskQueue = "{stack.settings.task_queue}"'):
        if wf.id.startswith(f"svc-{SERVICE}-logs-"):
            runs[wf.run_id] = wf.id
    return {wf_id: len((await stack.client.get_workflow_handle(wf_id, run_id=run).fetch_history()).events)
            for run, wf_id in runs.items()}


async def measure(stack: Any, args: Any) -> dict[str, Any]:
    await stack.orch.deploy({"name": SERVICE, "image": args.image, "min_replicas": 1, "max_replicas": 1,
                             "cpu_target": 60}, wait=True, timeout=args.timeout)
    (pod,) = (await stack.orch.status(SERVICE)).pods
    sides = {"ours": Seen(), "peer": Seen()}
    t0 = time.perf_counter()
    ours = asyncio.create_task(follow_ours(stack.orch, pod.id, sides["ours"]))
    t_peer = time.perf_counter()
    peer = await follow_peer(peer_argv(stack, pod.id), sides["peer"])
    await asyncio.sleep(2.0)  # both connected; the first rounds' lines then count
    delays = await rounds(pod.endpoint or "", sides, args.rounds, args.gap)
    peer.kill()
    await peer.wait()
    await stack.orch.undeploy(SERVICE)
    await asyncio.wait_for(ours, 30)
    first = {"ours": (sides["ours"].first_line or t0) - t0, "peer": (sides["peer"].first_line or t_peer) - t_peer}
    return {"delays": delays, "first_line_s": first, "grant_history_events": await grant_events(stack),
            "lines_read": len(sides["ours"].at)}


def report(result: dict[str, Any], runtime: str, args: Any) -> dict[str, Any]:
    d = result["delays"]
    p95 = {k: pct(v, 0.95) for k, v in d.items()}
    ratio = p95["ours"] / p95["peer"] if p95["ours"] is not None and p95["peer"] else None
    rows = [[k, pct(v, 0.5), p95[k], max((x for x in v if x is not None), default=None),
             sum(x is None for x in v), result["first_line_s"][k]] for k, v in d.items()]
    print(f"\nline written -> line shown, {runtime} pods, {args.rounds} rounds (seconds)")
    print_table(rows, ["follower", "median", "p95", "max", "missed", "first line"])
    grants = result["grant_history_events"]
    print(f"\nours / peer p95: {rnd(ratio, 2)}x; {len(grants)} grant workflow(s), {sum(grants.values())} history "
          f"events in all, for {result['lines_read']} marker lines read")
    ok = verdict(p95["ours"], TARGET_P95_S)
    print(f"ours p95 <= {TARGET_P95_S:g} s: {ok}")
    return {"summary": {k: summary(v, "s") for k, v in d.items()}, "p95_s": p95["ours"], "ratio_p95": rnd(ratio, 3),
            "verdict": ok}


async def run_one(runtime: str, args: Any) -> dict[str, Any]:
    async with hms_stack(runtime) as stack:
        access = grant_access(stack, [args.image])
        if runtime == "process":  # grant_access signs Docker image ids
            from hms_mgmt.trust import TrustStore

            pods = stack.worker.pods.runtime
            TrustStore(stack.settings.state_dir).sign(args.image, pods.content_id(args.image), signer="bench")
        result = await measure(stack, args)
    return {"access": access, **report(result, runtime, args), "raw": result}


async def main(args: Any) -> int:
    use_source(args.source)
    bench_run = Run(NAME)
    bench_run.announce(args.source)
    runtimes = ["process", "docker"] if args.runtime == "all" else [args.runtime]
    if "docker" in runtimes and args.runtime == "all":
        from hms_mgmt.runtimes.docker import docker_available

        if not docker_available():
            print("no Docker Engine answers: process pods only")
            runtimes.remove("docker")
    per = {rt: await run_one(rt, args) for rt in runtimes}
    worst = max((p["p95_s"] for p in per.values() if p["p95_s"] is not None), default=None)
    ratio = rnd(worst / TARGET_P95_S, 3) if worst is not None else None
    # As the soak reports absolute targets: the ratio is the worst p95 over the target.
    bench_run.done({"rounds": args.rounds, "runtimes": per, "ratio": ratio, "target": 1.0,
                    "pass": worst is not None and worst <= TARGET_P95_S})
    return 0


def parse_args(argv: list[str] | None = None) -> Any:
    ap = parser(__doc__)
    ap.add_argument("--runtime", choices=["all", "docker", "process"], default="all")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between rounds (0.2)")
    return parse_common(ap, argv, timeout_s=120.0, image=EXAMPLE_IMAGE)


if __name__ == "__main__":
    run_main(main, parse_args())
