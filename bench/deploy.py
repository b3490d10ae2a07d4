"""Deploy benchmark: a user's script, run cold, against 10 parallel ``docker run``, in one run.

Ours: a fresh interpreter runs ``bench/deploy_client.py`` (imports ``hms_mgmt``, connects,
calls ``orchestrator.deploy`` for N pods of the fast-pod image, exits). Timed from the moment
the process is spawned until all N pods answer ``/health`` from outside.
Peer: N ``docker run -d`` processes spawned at once, same image, same poller, same t0.

Rounds alternate (ours, peer, ours, peer, ...), each from a clean state (every container
removed in between, not counted); the first round of each side is a warm-up (it also writes the
client's .pyc files, as any user's second run finds them). Both sides use the one poller
(``bench.lib.poll.HealthPoller``), discovering endpoints by container label.

Where our time goes, per round, as milestones on the critical path (seconds since spawn): the
client's own marks (imported, connected, returned), the service and deploy workflows' histories
(each activity's scheduled -> completed), Docker's created/started times of each container, and
the poller's answers. One ``python -X importtime`` of the client's imports names the heaviest.

    .venv/bin/python bench/deploy.py [--runs 5] [--replicas 10] [--poll 0.1] [--warmup 1]

Prints a table, the ratio (ours median / peer median) and the breakdown, and writes
bench/results/deploy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib.cpu import CpuMeter  # noqa: E402
from bench.lib.history import activity_timeline  # noqa: E402
from bench.lib.poll import DEFAULT_POLL_S, HealthPoller  # noqa: E402
from bench.lib.ports import docker_client, docker_discoverer, label_filter, remove_containers  # noqa: E402
from bench.lib.results import Run, parse_common, parser, print_table, run_main, verdict  # noqa: E402
from bench.lib.source import current, use_source  # noqa: E402
from bench.lib.stack import grant_access, hms_stack, require_image, sweep_node, undeploy_and_sweep  # noqa: E402
from bench.lib.stats import median, pct, rnd, summary  # noqa: E402

NAME = "deploy"
TARGET = 1.1
PEER_LABEL = "bench"
FAST_IMAGE = "registry.gov/hms-fast:1.0"
CLIENT = Path(__file__).resolve().parent / "deploy_client.py"
CLIENT_IMPORTS = "from hms_mgmt import connection, orchestrator; from hms_mgmt.config import Settings"


# --- one round of each side -----------------------------------------------------------------


def client_env(stack: Any) -> dict[str, str]:
    """The environment a user's script would have: the stack's settings as HMS_* variables,
    and the measured source on PYTHONPATH."""
    from hms_mgmt.testing import WorkerProcess

    env = WorkerProcess(stack.settings, Path(os.devnull), source_root=current()["root"]).env()
    env.pop("HMS_METRICS_PORT", None)
    # A user's interpreter writes the .pyc files its first run compiles (pip writes them at install):
    # a bench run from a shell with PYTHONDONTWRITEBYTECODE would compile the client on every round.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


async def run_ours(stack: Any, i: int, n: int, poller: HealthPoller, dclient: Any, args: Any,
                   env: dict[str, str]) -> dict[str, Any]:
    from hms_mgmt import constants

    name = f"bench-deploy-{i}"
    spec = {"name": name, "image": args.image, "min_replicas": n, "max_replicas": n, "cpu_target": 60}
    labels = {constants.LABEL_SERVICE: name, constants.LABEL_NODE: stack.settings.node}
    cpu = CpuMeter().start()
    t0_wall, t0 = time.time(), time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, str(CLIENT), json.dumps(spec), env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    http_task = asyncio.ensure_future(poller.wait(docker_discoverer(dclient, labels), n, t0=t0, timeout_s=args.timeout))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.timeout)
        exited = time.perf_counter() - t0
        http = await http_task
        cpu_used = cpu.stop()
    finally:
        http_task.cancel()
    marks = _client_marks(out)
    r: dict[str, Any] = {"service": name, "http_s": rnd(http.elapsed_s), "exited_s": rnd(exited),
                         "returncode": proc.returncode, "cpu": cpu_used,
                         "client": {k: rnd(v - t0_wall) for k, v in marks.items()},
                         "http_healthy_s": sorted(rnd(v) for v in http.healthy_s.values())}
    if not marks or not http.ok:
        raise RuntimeError(f"our deploy {name} did not reach {n} healthy pods: {r}\n{err.decode()[-2000:]}")
    r["containers"] = await asyncio.to_thread(container_times, dclient, labels, t0_wall)
    r["workflows"] = await workflow_times(stack.client, name, t0_wall)
    return r


def _client_marks(out: bytes) -> dict[str, float]:
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


async def run_peer(i: int, n: int, poller: HealthPoller, dclient: Any, args: Any) -> dict[str, Any]:
    """N ``docker run -d`` processes at once (the CLI a user would type), then the same poller."""
    labels = {PEER_LABEL: "1", f"{PEER_LABEL}.run": f"{i}-{uuid.uuid4().hex[:6]}"}
    cmd = ["docker", "run", "-d", "-p", "127.0.0.1::8080", "-e", "PORT=8080",
           *(x for k, v in labels.items() for x in ("--label", f"{k}={v}")), args.image]
    cpu = CpuMeter().start()
    t0_wall, t0 = time.time(), time.perf_counter()
    procs = [await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(n)]
    http_task = asyncio.ensure_future(poller.wait(docker_discoverer(dclient, labels), n, t0=t0, timeout_s=args.timeout))
    try:
        await asyncio.gather(*(p.wait() for p in procs))
        t_returned = time.perf_counter() - t0
        http = await http_task
        cpu_used = cpu.stop()
    finally:
        http_task.cancel()
    r = {"http_s": rnd(http.elapsed_s), "all_run_returned_s": rnd(t_returned), "cpu": cpu_used,
         "returncodes": sorted({p.returncode for p in procs}),
         "http_healthy_s": sorted(rnd(v) for v in http.healthy_s.values())}
    if not http.ok:
        raise RuntimeError(f"peer run {i} did not reach {n} healthy containers: {r}")
    r["containers"] = await asyncio.to_thread(container_times, dclient, labels, t0_wall)
    return r


# --- where the time goes ----------------------------------------------------------------------


def _docker_time(value: str) -> float:
    """Docker's RFC 3339 time with nanoseconds -> unix seconds."""
    m = re.match(r"(.*?)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
    if not m:
        return float("nan")
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return _dt.datetime.fromisoformat(f"{m.group(1)}{frac}{tz}").timestamp()


def container_times(dclient: Any, labels: dict[str, str], t0_wall: float) -> dict[str, float | None]:
    """When Docker created and started the last of the labelled containers (s since t0)."""
    created, started = [], []
    for c in dclient.api.containers(all=True, filters=label_filter(labels)):
        attrs = dclient.api.inspect_container(c["Id"])
        created.append(_docker_time(attrs["Created"]) - t0_wall)
        started.append(_docker_time(attrs["State"]["StartedAt"]) - t0_wall)
    return {"created_first": rnd(min(created, default=None)), "created_last": rnd(max(created, default=None)),
            "started_last": rnd(max(started, default=None))}


async def workflow_times(client: Any, name: str, t0_wall: float) -> dict[str, Any]:
    """Each workflow's start and, per activity type, when its last one completed (s since t0)
    and every scheduled -> completed duration (ms): the control steps' cost."""
    from hms_mgmt import constants

    out: dict[str, Any] = {"steps_ms": {}}
    for key, wf_id in (("service", constants.service_workflow_id(name)), ("deploy", f"svc-{name}-deploy-1")):
        tl = await activity_timeline(client, wf_id)
        out[f"{key}_started"] = rnd(tl["workflow"]["started"] - t0_wall) if "started" in tl["workflow"] else None
        for a in tl["activities"]:
            if "completed" not in a:
                continue
            last = out.setdefault(f"{key}.{a['type']}", a["completed"] - t0_wall)
            out[f"{key}.{a['type']}"] = rnd(max(last, a["completed"] - t0_wall))
            out["steps_ms"].setdefault(a["type"], []).append(round((a["completed"] - a["scheduled"]) * 1000, 1))
        out[f"{key}_events"] = tl["events"]
    return out


# (label, where in a round's result): the critical path in order; absent steps are skipped.
OURS_PATH: list[tuple[str, tuple[str, ...]]] = [
    ("interpreter up (first line of the script)", ("client", "started")),
    ("imports done", ("client", "imported")),
    ("connected to Temporal", ("client", "connected")),
    ("ServiceWorkflow started (update-with-start)", ("workflows", "service_started")),
    ("admission: authorize", ("workflows", "service.authorize")),
    ("admission: governance", ("workflows", "service.check_governance")),
    ("admission: image verified", ("workflows", "service.verify_image")),
    ("admission: ticket", ("workflows", "service.issue_ticket")),
    ("DeployWorkflow started", ("workflows", "deploy_started")),
    ("placement: pick_node", ("workflows", "deploy.pick_node")),
    ("per pod: trust stamp (last)", ("workflows", "deploy.stamp_start")),
    ("per pod: start ticket (last)", ("workflows", "deploy.start_ticket")),
    ("round: trust stamps, all pods at once", ("workflows", "deploy.stamp_round")),
    ("round: start tickets, all pods at once", ("workflows", "deploy.start_tickets")),
    ("container created (last)", ("containers", "created_last")),
    ("container started (last)", ("containers", "started_last")),
    ("start_pod returned: pod answered its node (last)", ("workflows", "deploy.start_pod")),
    ("all answer /health (the poller)", ("http_s",)),
]
PEER_PATH: list[tuple[str, tuple[str, ...]]] = [
    ("container created (first)", ("containers", "created_first")),
    ("container created (last)", ("containers", "created_last")),
    ("container started (last)", ("containers", "started_last")),
    ("all answer /health (the poller)", ("http_s",)),
]


def _at(r: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = r
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return v if isinstance(v, (int, float)) else None


def critical_path(rounds: list[dict[str, Any]], path: list[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
    """Per milestone: its median time since t0 and the median step from the milestone before it."""
    rows = []
    for i, (label, where) in enumerate(path):
        at = [_at(r, where) for r in rounds]
        if not any(v is not None for v in at):
            continue
        steps = []
        for r, v in zip(rounds, at, strict=True):
            before = [p for p in (_at(r, w) for _, w in path[:i]) if p is not None]
            if v is not None:
                steps.append(v - max(before, default=0.0))
        rows.append({"milestone": label, "at_s": rnd(median(at)), "step_s": rnd(median(steps))})
    return rows


def step_costs(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each control step's median and p95 ms (activity scheduled -> completed) over all rounds."""
    steps: dict[str, list[float]] = {}
    for r in rounds:
        for kind, xs in (r.get("workflows") or {}).get("steps_ms", {}).items():
            steps.setdefault(kind, []).extend(xs)
    return {k: {"n": len(v), "median_ms": rnd(median(v), 1), "p95_ms": rnd(pct(v, 0.95), 1)}
            for k, v in sorted(steps.items())}


def import_costs(env: dict[str, str], repeat: int = 3) -> dict[str, Any]:
    """Interpreter start alone, the client's imports (wall, median of ``repeat``), and the
    heaviest top-level packages by ``python -X importtime`` (ms, cumulative)."""
    # `python -c` puts its working directory first on sys.path: run where the measured source is,
    # or the working tree's packages would be measured whatever --source chose.
    root = current()["root"]

    def wall(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=root)
        return time.perf_counter() - t

    bare = median(wall("pass") for _ in range(repeat))
    full = median(wall(CLIENT_IMPORTS) for _ in range(repeat))
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", CLIENT_IMPORTS], env=env, check=True,
                         capture_output=True, text=True, cwd=root).stderr
    top: dict[str, float] = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # top level: one space before the name
        if m:
            pkg = m.group(2).split(".")[0]
            top[pkg] = top.get(pkg, 0.0) + int(m.group(1)) / 1000
    heaviest = dict(sorted(((k, round(v, 1)) for k, v in top.items()), key=lambda kv: -kv[1])[:10])
    return {"interpreter_s": rnd(bare), "interpreter_and_imports_s": rnd(full), "importtime_top_ms": heaviest,
            "loaded_heavy": loaded_heavy(env)}


def loaded_heavy(env: dict[str, str]) -> list[str]:
    """Which of the heavy libraries the client's imports pull in (they should be none)."""
    code = (f"{CLIENT_IMPORTS}; import sys; print(' '.join(m for m in "
            "('docker', 'aiohttp', 'rich', 'cryptography', 'jwt', 'psutil', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         cwd=current()["root"]).stdout
    return out.split()


# --- main ------------------------------------------------------------------------------------


async def measure(stack: Any, dclient: Any, args: Any, bench_run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Alternating rounds, ours then the peer's, each from a clean state; the warm-ups dropped."""
    poller = HealthPoller(interval_s=args.poll)
    env = client_env(stack)
    ours: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    for k in range(args.warmup + args.runs):
        tag = "" if k >= args.warmup else " (warm-up, not counted)"
        r = await run_ours(stack, k, args.replicas, poller, dclient, args, env)
        await undeploy_and_sweep(stack, dclient, r["service"], whole_node=True)
        await asyncio.sleep(args.settle)
        p = await run_peer(k, args.replicas, poller, dclient, args)
        await asyncio.to_thread(remove_containers, dclient, {PEER_LABEL: "1"})
        await asyncio.sleep(args.settle)
        print(f"round {k}{tag}: ours {r['http_s']:.3f}s (script exited {r['exited_s']:.3f}s), "
              f"peer {p['http_s']:.3f}s, load {os.getloadavg()[0]:.2f}", flush=True)
        if bench_run.source_changed():
            r["source_changed"] = p["source_changed"] = True
            print("  WARNING: product sources changed on disk since the start of the benchmark", flush=True)
        if k >= args.warmup:
            ours.append(r)
            peer.append(p)
    return ours, peer


CPU_KEYS = ("self_cpu_s", "children_cpu_s", "docker_daemons_cpu_s", "machine_cpu_s")


def figures(ours: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, Any]:
    figs = {"ours_http": summary((r["http_s"] for r in ours), "_s"),
            "ours_exited": summary((r["exited_s"] for r in ours), "_s"),
            "peer_http": summary((r["http_s"] for r in peer), "_s")}
    peer_med = figs["peer_http"]["median_s"]
    ratio = figs["ours_http"]["median_s"] / peer_med if peer_med and figs["ours_http"]["median_s"] else None
    # Paired: each round's ours against the peer right after it (the load drifts between rounds).
    paired = [r["http_s"] / p["http_s"] for r, p in zip(ours, peer, strict=True) if r["http_s"] and p["http_s"]]
    cpu = {side: {k: rnd(median(r["cpu"][k] for r in rows if "cpu" in r)) for k in CPU_KEYS}
           for side, rows in (("ours", ours), ("peer", peer))}
    return {"figures": figs, "ratio": ratio, "paired_ratios": [rnd(x) for x in paired], "cpu": cpu,
            "ours_path": critical_path(ours, OURS_PATH), "peer_path": critical_path(peer, PEER_PATH),
            "steps": step_costs(ours)}


def report(f: dict[str, Any], imports: dict[str, Any], args: Any) -> None:
    figs = f["figures"]
    print(f"\ncold script deploys {args.replicas} pods of {args.image} vs {args.replicas}x parallel `docker run`, "
          f"{args.runs} rounds each (alternating), poll {args.poll:g}s")
    print_table([["ours: script spawned -> all answer /health", figs["ours_http"]["median_s"],
                  figs["ours_http"]["max_s"], f["ratio"]],
                 ["ours: script spawned -> script exited", figs["ours_exited"]["median_s"],
                  figs["ours_exited"]["max_s"], None],
                 [f"peer: {args.replicas}x docker run -> all answer /health", figs["peer_http"]["median_s"],
                  figs["peer_http"]["max_s"], 1.0]],
                ["side", "median s", "max s", "x peer"])
    print(f"ratio (median / median) = {f['ratio'] or float('nan'):.2f}x, target <= {TARGET}x: "
          f"{verdict(f['ratio'], TARGET)}; per round: {f['paired_ratios']}")
    for side in ("ours", "peer"):
        print(f"\ncritical path, {side} (median over rounds; s since spawn, and the step from the milestone before):")
        print_table([[row["milestone"], row["at_s"], row["step_s"]] for row in f[f"{side}_path"]],
                    ["milestone", "at s", "step s"])
    print(f"\ninterpreter alone {imports['interpreter_s']}s, interpreter + client imports "
          f"{imports['interpreter_and_imports_s']}s; heaviest imports (ms): {imports['importtime_top_ms']}; "
          f"heavy libraries loaded: {imports['loaded_heavy'] or 'none'}")
    print("\ncontrol steps (activity scheduled -> completed, ms):")
    print_table([[k, v["n"], v["median_ms"], v["p95_ms"]] for k, v in f["steps"].items()],
                ["activity", "n", "median", "p95"])


def payload(f: dict[str, Any], imports: dict[str, Any], ours: list[dict[str, Any]], peer: list[dict[str, Any]],
            args: Any) -> dict[str, Any]:
    return {
        "what": f"seconds from spawning a cold deploy script to {args.replicas} pods answering /health, "
                f"vs {args.replicas} parallel `docker run` processes + polling",
        "peer_description": f"{args.replicas} `docker run -d` processes at once, same /health poller",
        "image": args.image, "replicas": args.replicas, "runs": args.runs, "warmup_runs": args.warmup,
        "poll_interval_s": args.poll, "target_ratio": TARGET,
        "ratio": rnd(f["ratio"]), "ratio_http": rnd(f["ratio"]), "paired_ratios": f["paired_ratios"],
        "headline": "ours_http: a cold script's pods all answer /health, same poller as the peer",
        "pass": f["ratio"] is not None and f["ratio"] <= TARGET,
        "figures": {k: {"median_s": v["median_s"], "max_s": v["max_s"]} for k, v in f["figures"].items()},
        "critical_path": {"ours": f["ours_path"], "peer": f["peer_path"]},
        "imports": imports, "control_steps_ms": f["steps"], "cpu_median_s": f["cpu"],
        "ours": ours, "peer": peer,
    }


async def main(args: Any) -> int:
    use_source(args.source)  # before the first product import
    bench_run = Run(NAME)
    bench_run.announce(args.source)
    dclient = docker_client(pool=max(32, args.replicas * 2))
    if not require_image(dclient, args.image):
        return 2
    node = None
    try:
        async with hms_stack("docker") as stack:
            node = stack.settings.node
            grant_access(stack, [args.image])
            remove_containers(dclient, {PEER_LABEL: "1"})
            ours, peer = await measure(stack, dclient, args, bench_run)
            imports = await asyncio.to_thread(import_costs, client_env(stack))
    finally:
        sweep_node(dclient, node, {PEER_LABEL: "1"})
        dclient.close()
    f = figures(ours, peer)
    report(f, imports, args)
    bench_run.done(payload(f, imports, ours, peer, args))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--runs", type=int, default=5, help="counted rounds per side (default 5)")
    ap.add_argument("--replicas", type=int, default=10, help="pods per deploy (default 10)")
    ap.add_argument("--poll", type=float, default=DEFAULT_POLL_S, help="poll interval, both sides (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted warm-up rounds per side (default 1)")
    ap.add_argument("--settle", type=float, default=1.0, help="pause after each cleanup, not counted (default 1 s)")
    return parse_common(ap, argv, timeout_s=180.0, image=FAST_IMAGE)


if __name__ == "__main__":
    run_main(main, parse_args())
