"""Soak at scale: one worker (``python -m worker``, its own process) supervises many process-pod
services for a while, with pods killed at random, and reports what it costs and how late it gets.

    .venv/bin/python bench/soak.py                 # 100 services x 2 pods, 600 s, 20 kills
    .venv/bin/python bench/soak.py --quick         # smoke run: 20 services, 60 s, 4 kills
    .venv/bin/python bench/soak.py --duration 300 --services 50 --kills 10

Set-up: a Temporal dev server (child of this process), one worker subprocess with the process
runtime and its Prometheus ``/metrics``, ``--services`` services of ``--image`` (a light stdlib
HTTP service from the process catalog) at ``min = max = --replicas`` (no autoscaling), default
health settings (``health_interval_s`` 5, ``health_failures`` 2). The steady window starts once
every service is Running and lasts ``--duration`` seconds.

Figures, each over the steady window only:
- **health-probe lag**: for every ping, the time between when the health monitor scheduled it
  and when it was sent, from the worker's ``hms_health_probe_lag_seconds`` histogram (scraped
  at the start and end of the window; p50/p99 interpolated inside buckets as Prometheus'
  ``histogram_quantile`` does, and the exact share of pings sent within 1 s). Target p99 <= 1 s.
- **replacement**: ``--kills`` pods, chosen at random among ready pods older than the service's
  "died young" threshold, SIGKILLed at random moments; seconds from the kill to the service
  showing ``min`` ready pods again without the killed one (``status()``), and to the replacement
  process first answering ``/health`` (an outside poller). Target: every one <= 2 x
  ``health_interval_s`` + 1.5 s.
- **worker cost**: CPU (user + system) and RSS of the worker process, sampled with psutil; the
  pods (its child processes) and the Temporal dev server reported separately; load average.
- **history events per service-hour**: the service workflows' histories (all runs) of a sample
  of never-killed services and of the killed ones (with their heal children), events inside
  the window, scaled to an hour.

There is no peer to race here: the ratios are measured / target. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    EXAMPLE_IMAGE,
    Run,
    loadavg,
    median,
    print_table,
    rnd,
    temporal_binary,
    use_source,
)

NAME = "soak"
TARGET_LAG_P99_S = 1.0
REPLACE_SLACK_S = 1.5  # replacement target: 2 x health_interval_s + this
SAMPLE_EVERY_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of xs, nearest rank."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


# --- the worker's /metrics -----------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, port: int) -> str:
    async with session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        r.raise_for_status()
        return await r.text()


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts ``{le: count}`` of an unlabelled histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != name:
            continue
        for s in fam.samples:
            if s.name == f"{name}_bucket":
                out[float(s.labels["le"])] = s.value
    return out


def hist_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {le: after[le] - before.get(le, 0.0) for le in sorted(after)}


def hist_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket the rank falls in."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    total = buckets[les[-1]]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bucket: its bound is all we know
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return None


def share_within(buckets: dict[float, float], le: float) -> float | None:
    total = buckets.get(math.inf)
    return None if not total else buckets.get(le, 0.0) / total


def hist_summary(buckets: dict[float, float]) -> dict[str, Any]:
    return {
        "count": int(buckets.get(math.inf, 0)),
        "p50_s": rnd(hist_quantile(buckets, 0.5), 4),
        "p99_s": rnd(hist_quantile(buckets, 0.99), 4),
        "p999_s": rnd(hist_quantile(buckets, 0.999), 4),
        "share_within_1s": rnd(share_within(buckets, 1.0), 5),
        "share_within_0_1s": rnd(share_within(buckets, 0.1), 5),
        "buckets": {("+Inf" if math.isinf(k) else f"{k:g}"): int(v) for k, v in buckets.items()},
    }


# --- the peer: how late an idle process's timers fire on this machine right now ------------------


def timer_peer(out: str, period_s: float = 0.1) -> None:
    """Run until SIGTERM: an asyncio loop with nothing else to do sleeps to a fixed schedule and
    records how late each wake-up is, in the worker's own histogram buckets; writes them to
    ``out`` as JSON. Machine load alone makes timers late; the monitor's lag is compared to it."""
    from worker.metrics import PROBE_LAG_BUCKETS

    bounds = [*PROBE_LAG_BUCKETS, math.inf]
    counts = [0] * len(bounds)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + period_s
        while not stop:
            await asyncio.sleep(max(0.0, due - loop.time()))
            late = max(0.0, loop.time() - due)
            counts[next(i for i, b in enumerate(bounds) if late <= b)] += 1
            due = max(due + period_s, loop.time())

    asyncio.run(run())
    cumulative, total = {}, 0
    for b, c in zip(bounds, counts, strict=True):
        total += c
        cumulative["+Inf" if math.isinf(b) else repr(float(b))] = total
    Path(out).write_text(json.dumps(cumulative))


def read_peer(path: Path) -> dict[float, float]:
    raw = json.loads(path.read_text())
    return {(math.inf if k == "+Inf" else float(k)): float(v) for k, v in raw.items()}


# --- process sampling ---------------------------------------------------------------------------


class ProcSampler:
    """CPU seconds and RSS of the worker, its pods (child processes) and the dev server."""

    def __init__(self, worker_pid: int, server_pid: int | None) -> None:
        import psutil

        self.ps = psutil
        self.worker = psutil.Process(worker_pid)
        self.server = psutil.Process(server_pid) if server_pid else None
        self.samples: list[dict[str, Any]] = []

    def _cpu(self, procs) -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def _rss(self, procs) -> int:
        total = 0
        for p in procs:
            with contextlib.suppress(Exception):
                total += p.memory_info().rss
        return total

    def sample(self) -> dict[str, Any]:
        pods = self.worker.children(recursive=True)
        busy = self.ps.cpu_times()
        s = {
            "t": time.monotonic(),
            "worker_cpu_s": self._cpu([self.worker]),
            "worker_rss_mb": self._rss([self.worker]) / 2**20,
            "worker_threads": self.worker.num_threads(),
            "pods_cpu_s": self._cpu(pods),
            "pods_rss_mb": self._rss(pods) / 2**20,
            "pod_processes": len(pods),
            "server_cpu_s": self._cpu([self.server]) if self.server else None,
            "server_rss_mb": self._rss([self.server]) / 2**20 if self.server else None,
            "machine_busy_s": sum(busy) - busy.idle - getattr(busy, "iowait", 0.0),
            "load": loadavg(),
        }
        self.samples.append(s)
        return s


def cost_between(a: dict[str, Any], b: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    wall = b["t"] - a["t"]
    inside = [s for s in samples if a["t"] <= s["t"] <= b["t"]]

    def cores(key: str) -> float | None:
        if a.get(key) is None or b.get(key) is None or wall <= 0:
            return None
        return rnd((b[key] - a[key]) / wall, 3)

    loads = [s["load"][0] for s in inside if s.get("load")]
    return {
        "wall_s": rnd(wall, 1),
        "worker_cpu_cores": cores("worker_cpu_s"),  # 1.0 = one core busy the whole window
        "worker_rss_mb": {"start": rnd(a["worker_rss_mb"], 1), "end": rnd(b["worker_rss_mb"], 1),
                          "max": rnd(max(s["worker_rss_mb"] for s in inside), 1)},
        "worker_threads_max": max(s["worker_threads"] for s in inside),
        "pods_cpu_cores": cores("pods_cpu_s"),
        "pods_rss_mb_end": rnd(b["pods_rss_mb"], 1),
        "pod_processes_end": b["pod_processes"],
        "temporal_server_cpu_cores": cores("server_cpu_s"),
        "temporal_server_rss_mb_end": rnd(b["server_rss_mb"], 1) if b.get("server_rss_mb") else None,
        "machine_busy_cores": cores("machine_busy_s"),
        "load_average_1m": {"min": min(loads, default=None), "mean": rnd(statistics.fmean(loads), 2) if loads else None,
                            "max": max(loads, default=None), "samples": len(loads)},
    }


# --- the worker subprocess -------------------------------------------------------------------


class WorkerProcess:
    def __init__(self, settings, source_root: str, log_path: Path, extra_env: dict[str, str]) -> None:
        self.settings = settings
        self.source_root = source_root
        self.log_path = log_path
        self.extra_env = extra_env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
        env.update(
            HMS_TEMPORAL_ADDRESS=s.temporal_address,
            HMS_STATE_DIR=str(s.state_dir),
            HMS_TASK_QUEUE=s.task_queue,
            HMS_NODE=s.node,
            HMS_RUNTIME="process",
            HMS_METRICS_PORT=str(s.metrics_port),
            HMS_ROUTERS=",".join(s.routers),
            HMS_NODE_MAX_PODS=str(s.node_max_pods),
            PYTHONPATH=self.source_root,
            **self.extra_env,
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=self.source_root,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def log_digest(path: Path, limit: int = 12) -> dict[str, Any]:
    """Warnings and errors of the worker's log: counts by logger + message head, the commonest."""
    counts: dict[str, int] = {}
    n = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0, "Traceback": 0}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if "Traceback" in line:
                n["Traceback"] += 1
            parts = line.split(" ", 4)
            if len(parts) >= 5 and parts[2] in ("WARNING", "ERROR", "CRITICAL"):
                n[parts[2]] += 1
                key = f"{parts[2]} {parts[3]} {parts[4][:90]}"
                counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return {"counts": n, "top": [{"n": v, "line": k} for k, v in top]}


# --- pods as the runtime records them ----------------------------------------------------------


def pod_records(state_dir: Path, node: str) -> dict[str, dict[str, Any]]:
    out = {}
    for f in (state_dir / "pods" / node).glob("*.json"):
        with contextlib.suppress(Exception):
            rec = json.loads(f.read_text())
            out[rec["pod_id"]] = rec
    return out


async def answers(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return 200 <= r.status < 400
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


# --- the soak ----------------------------------------------------------------------------------


async def deploy_all(orch, names: list[str], args) -> dict[str, Any]:
    gate = asyncio.Semaphore(args.deploy_concurrency)
    took: dict[str, float] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()

    async def one(name: str) -> None:
        async with gate:
            t = time.perf_counter()
            spec = {"name": name, "image": args.image, "min_replicas": args.replicas, "max_replicas": args.replicas, "cpu_target": 60,
                    "health_interval_s": args.health_interval}
            try:
                await orch.deploy(spec, wait=True, timeout=args.deploy_timeout)
                took[name] = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - reported, and the soak goes on without it
                failed[name] = f"{type(e).__name__}: {e}"[:300]

    await asyncio.gather(*(one(n) for n in names))
    total = time.perf_counter() - t0
    xs = list(took.values())
    return {"services": len(names), "running": len(took), "failed": failed, "total_s": rnd(total, 2),
            "per_service_median_s": rnd(median(xs)), "per_service_p95_s": rnd(pct(xs, 0.95)),
            "per_service_max_s": rnd(max(xs, default=None)), "concurrency": args.deploy_concurrency}


async def kill_and_time(orch, state_dir: Path, node: str, name: str, victim: dict[str, Any], args,
                        session: aiohttp.ClientSession) -> dict[str, Any]:
    """SIGKILL the victim's process; time until a replacement answers and the service is whole."""
    before = set(pod_records(state_dir, node))
    t_wall = time.time()
    t0 = time.perf_counter()
    try:
        os.kill(victim["pid"], signal.SIGKILL)
    except ProcessLookupError:
        return {"service": name, "pod": victim["pod_id"], "skipped": "process already gone"}
    deadline = t0 + args.replace_timeout
    http_s = status_s = None
    new_port: int | None = None
    new_pod: str | None = None
    while time.perf_counter() < deadline and (http_s is None or status_s is None):
        tick = time.perf_counter()
        if http_s is None:
            if new_port is None:
                for pid_, rec in (await asyncio.to_thread(pod_records, state_dir, node)).items():
                    if pid_ not in before and rec.get("service") == name:
                        new_port, new_pod = rec["port"], pid_
                        break
            if new_port is not None and await answers(session, new_port):
                http_s = time.perf_counter() - t0
        if status_s is None:
            with contextlib.suppress(Exception):
                st = await orch.status(name, live=False)
                ready = [p for p in st.pods if p.ready]
                if (all(p.id != victim["pod_id"] for p in st.pods) and len(ready) >= args.replicas):
                    status_s = time.perf_counter() - t0
        await asyncio.sleep(max(0.0, args.poll - (time.perf_counter() - tick)))
    return {"service": name, "pod": victim["pod_id"], "killed_at": _dt.datetime.fromtimestamp(t_wall, _dt.UTC)
            .isoformat(timespec="milliseconds"), "replacement_pod": new_pod,
            "replacement_answers_s": rnd(http_s), "status_whole_s": rnd(status_s), "load": loadavg()}


async def history_events(client, workflow_id: str, t_from: float, t_to: float) -> dict[str, Any]:
    """Events of every run of ``workflow_id`` inside [t_from, t_to] (unix seconds)."""
    from temporalio.api.enums.v1 import EventType as ET

    n = total = runs = 0
    kinds: dict[str, int] = {}
    async for wf in client.list_workflows(f'WorkflowId = "{workflow_id}"'):
        runs += 1
        hist = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        for ev in hist.events:
            total += 1
            t = ev.event_time.ToDatetime(tzinfo=_dt.UTC).timestamp()
            if t_from <= t <= t_to:
                n += 1
                k = ET.Name(ev.event_type).removeprefix("EVENT_TYPE_")
                kinds[k] = kinds.get(k, 0) + 1
    return {"in_window": n, "all_runs_total": total, "runs": runs, "kinds": kinds}


async def children_events(client, parent_id: str, t_from: float, t_to: float) -> int:
    n = 0
    async for wf in client.list_workflows(f'WorkflowId STARTS_WITH "{parent_id}-"'):
        hist = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        for ev in hist.events:
            if t_from <= ev.event_time.ToDatetime(tzinfo=_dt.UTC).timestamp() <= t_to:
                n += 1
    return n


async def soak(args, source: dict[str, Any]) -> dict[str, Any]:
    from temporalio.common import SearchAttributeKey
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    from hms_mgmt import auth, constants
    from hms_mgmt.config import Settings
    from hms_mgmt.orchestrator import Orchestrator
    from hms_mgmt.runtimes.process import ImageCatalog
    from hms_mgmt.trust import TrustStore

    rng = random.Random(args.seed)
    out: dict[str, Any] = {}
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=pydantic_data_converter,
        search_attributes=[SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_SERVICE),
                           SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_PHASE)],
        dev_server_log_level="error", ip="127.0.0.1", ui=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix="hms-soak-"))
    state = tmp / "state"
    state.mkdir()
    tag = uuid.uuid4().hex[:8]
    auth.init_keys(state)
    settings = Settings(
        temporal_address=env.client.service_client.config.target_host, state_dir=state, runtime="process",
        task_queue=f"hms-soak-{tag}", node=f"s{tag}", metrics_port=free_port(),
        token=auth.issue_token(state, user="soak", role="ops_admin"),
        # Nobody listens there: each feed push is refused at once (no router in this benchmark).
        routers=["http://127.0.0.1:9"],
        node_max_pods=max(64, args.services * args.replicas + 2 * args.kills + 16),
    )
    TrustStore(state).sign(args.image, ImageCatalog(state).content_id(args.image), signer="bench")
    extra_env = {"HMS_WATCH_MAX_S": str(args.watch_max_s)} if args.watch_max_s else {}
    worker = WorkerProcess(settings, source["root"], tmp / "worker.log", extra_env)
    import psutil

    server_pid = next((p.pid for p in psutil.Process().children(recursive=True)
                       if "start-dev" in (p.cmdline() or [])), None)
    orch = Orchestrator(env.client, settings)
    names = [f"soak-{i:03d}" for i in range(args.services)]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(connector=connector)
    sampler_task: asyncio.Task[None] | None = None
    try:
        worker.start()
        port = settings.metrics_port
        for _ in range(300):
            with contextlib.suppress(Exception):
                await scrape(session, port)
                break
            if worker.proc and worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.proc.returncode}); see {worker.log_path}")
            await asyncio.sleep(0.2)
        sampler = ProcSampler(worker.proc.pid, server_pid)  # type: ignore[union-attr]
        sampler.sample()

        async def sample_forever() -> None:
            while True:
                await asyncio.sleep(SAMPLE_EVERY_S)
                await asyncio.to_thread(sampler.sample)

        sampler_task = asyncio.create_task(sample_forever())
        print(f"deploying {args.services} services x {args.replicas} pods ({args.image}), "
              f"{args.deploy_concurrency} at a time ...", flush=True)
        s_deploy = sampler.sample()
        out["deploy"] = await deploy_all(orch, names, args)
        running = [n for n in names if n not in out["deploy"]["failed"]]
        out["deploy"]["cost"] = cost_between(s_deploy, sampler.sample(), sampler.samples)
        print(f"  {out['deploy']['running']}/{args.services} Running in {out['deploy']['total_s']} s "
              f"(per service median {out['deploy']['per_service_median_s']} s); load {loadavg()}", flush=True)
        if out["deploy"]["failed"]:
            print(f"  failed: {dict(list(out['deploy']['failed'].items())[:5])}", flush=True)
        if not running:
            raise RuntimeError("no service is Running")

        # --- the steady window, with kills -----------------------------------------------------
        metrics_before = await scrape(session, port)
        peer_out = tmp / "timer-peer.json"
        peer = subprocess.Popen([sys.executable, __file__, "--timer-peer", str(peer_out)],
                                env={**os.environ, "PYTHONPATH": source["root"]})
        s_start = sampler.sample()
        t_start_wall = time.time()
        t_start = time.perf_counter()
        interval = args.health_interval
        young_s = max(10.0, 3 * interval) + 2.0
        lo, hi = young_s + 2, args.duration - min(args.replace_timeout * 0.5, 0.2 * args.duration)
        hi = max(hi, lo + 1)
        kill_at = sorted(rng.uniform(lo, hi) for _ in range(args.kills))
        print(f"steady window {args.duration:g} s; {args.kills} kills at t = "
              f"{', '.join(f'{k:.0f}' for k in kill_at)} s", flush=True)
        busy: set[str] = set()
        kill_tasks: list[asyncio.Task[dict[str, Any]]] = []
        for k, at in enumerate(kill_at):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t_start)))
            recs = await asyncio.to_thread(pod_records, state, settings.node)
            now = _dt.datetime.now(_dt.UTC)
            candidates = [r for r in recs.values() if r["service"] in running and r["service"] not in busy
                          and (now - _dt.datetime.fromisoformat(r["started_at"])).total_seconds() > young_s]
            if not candidates:
                print(f"  kill {k}: no ready pod old enough outside a running measurement; skipped", flush=True)
                continue
            victim = rng.choice(sorted(candidates, key=lambda r: r["pod_id"]))
            name = victim["service"]
            busy.add(name)

            async def measured(name: str = name, victim: dict[str, Any] = victim, k: int = k) -> dict[str, Any]:
                try:
                    r = await kill_and_time(orch, state, settings.node, name, victim, args, session)
                finally:
                    busy.discard(name)
                print(f"  kill {k}: {name}/{victim['pod_id'][:8]} -> replacement answers "
                      f"{r.get('replacement_answers_s')} s, status whole {r.get('status_whole_s')} s; "
                      f"load {r.get('load')}", flush=True)
                return r

            kill_tasks.append(asyncio.create_task(measured()))
        await asyncio.sleep(max(0.0, args.duration - (time.perf_counter() - t_start)))
        kills = list(await asyncio.gather(*kill_tasks))
        s_end = sampler.sample()
        t_end_wall = time.time()
        metrics_after = await scrape(session, port)
        peer.terminate()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(peer.wait, 10)
            out["peer_timer_lag"] = hist_summary(read_peer(peer_out))

        # --- figures ---------------------------------------------------------------------------
        lag = hist_delta(histogram(metrics_before, "hms_health_probe_lag_seconds"),
                         histogram(metrics_after, "hms_health_probe_lag_seconds"))
        dur = hist_delta(histogram(metrics_before, "hms_health_probe_duration_seconds"),
                         histogram(metrics_after, "hms_health_probe_duration_seconds"))
        out["probe_lag"] = hist_summary(lag)
        out["probe_duration"] = hist_summary(dur)
        window_s = t_end_wall - t_start_wall
        expected_pings = len(running) * args.replicas * window_s / interval
        out["probe_lag"]["expected_pings_approx"] = int(expected_pings)
        out["cost"] = cost_between(s_start, s_end, sampler.samples)
        measured_kills = [k for k in kills if "skipped" not in k]
        target_replace = 2 * interval + REPLACE_SLACK_S
        status_xs = [k["status_whole_s"] for k in measured_kills if k["status_whole_s"] is not None]
        http_xs = [k["replacement_answers_s"] for k in measured_kills if k["replacement_answers_s"] is not None]
        out["replacement"] = {
            "target_s": target_replace,
            "kills": len(measured_kills),
            "not_replaced_within_timeout": sum(1 for k in measured_kills if k["status_whole_s"] is None),
            "status_whole": {"median_s": rnd(median(status_xs)), "p95_s": rnd(pct(status_xs, 0.95)),
                             "max_s": rnd(max(status_xs, default=None))},
            "replacement_answers": {"median_s": rnd(median(http_xs)), "p95_s": rnd(pct(http_xs, 0.95)),
                                    "max_s": rnd(max(http_xs, default=None))},
            "runs": kills,
        }

        # History: a sample of never-killed services, and the killed ones with their heal children.
        killed = sorted({k["service"] for k in measured_kills})
        calm = [n for n in running if n not in killed]
        sample = sorted(rng.sample(calm, min(args.history_sample, len(calm))))
        hours = window_s / 3600

        async def hist_of(name: str, with_children: bool) -> dict[str, Any]:
            wid = constants.service_workflow_id(name)
            h = await history_events(env.client, wid, t_start_wall, t_end_wall)
            if with_children:
                h["children_in_window"] = await children_events(env.client, wid, t_start_wall, t_end_wall)
            return {"service": name, **h}

        calm_h = [await hist_of(n, False) for n in sample]
        killed_h = [await hist_of(n, True) for n in killed[: args.history_sample]]
        per_hour = [h["in_window"] / hours for h in calm_h]
        kills_of = {n: sum(1 for k in measured_kills if k["service"] == n) for n in killed}
        per_heal = [(h["in_window"] + h.get("children_in_window", 0)) / max(1, kills_of[h["service"]])
                    for h in killed_h]
        out["history"] = {
            "window_s": rnd(window_s, 1),
            "watch_max_s": args.watch_max_s or 1800.0,
            "note": ("a steady service's health monitor returns to its workflow only every watch_max_s; a "
                     "window shorter than that sees none of those round trips"),
            "calm_services": {"sampled": len(calm_h), "events_per_service_hour_median": rnd(median(per_hour), 1),
                              "events_per_service_hour_max": rnd(max(per_hour, default=None), 1),
                              "all_runs_total_events_median": median([h["all_runs_total"] for h in calm_h]),
                              "runs_median": median([h["runs"] for h in calm_h])},
            "killed_services": {"sampled": len(killed_h),
                                "events_per_heal_median": rnd(median(per_heal), 1),
                                "events_per_heal_max": rnd(max(per_heal, default=None), 1),
                                "note": "events in the window of the service workflow and its heal children, "
                                        "per pod killed: what one replacement adds to the books"},
            "samples": calm_h + killed_h,
        }

        # Everyone still whole at the end?
        final = []
        for n in running:
            with contextlib.suppress(Exception):
                final.append(await orch.status(n, live=False))
        out["end_state"] = {
            "services_answering": len(final),
            "phases": {p: sum(1 for s in final if s.phase == p) for p in sorted({s.phase for s in final})},
            "ready_pods": sum(s.ready_replicas for s in final),
            "desired_pods": sum(s.desired_replicas for s in final),
        }

        # --- teardown ----------------------------------------------------------------------------
        print("undeploying ...", flush=True)
        t_u = time.perf_counter()
        gate = asyncio.Semaphore(args.deploy_concurrency)

        async def down(n: str) -> bool:
            async with gate:
                try:
                    await orch.undeploy(n, timeout=120)
                    return True
                except Exception:  # noqa: BLE001
                    return False

        ok = await asyncio.gather(*(down(n) for n in running))
        out["undeploy"] = {"services": len(running), "ok": sum(ok), "total_s": rnd(time.perf_counter() - t_u, 2)}
        out["samples"] = [{k: (rnd(v, 2) if isinstance(v, float) else v) for k, v in s.items()}
                          for s in sampler.samples]
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
            with contextlib.suppress(BaseException):
                await sampler_task
        await session.close()
        out["worker_exit_code"] = await asyncio.to_thread(worker.stop)
        out["worker_log"] = log_digest(worker.log_path)
        # Pods outlive their worker by design: stop what this run's node left (its records only).
        left = pod_records(state, settings.node)
        for rec in left.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec["pid"], signal.SIGKILL)
        out["pods_left_after_undeploy"] = len(left)
        with contextlib.suppress(Exception):
            await env.shutdown()
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


def verdicts(out: dict[str, Any], args) -> dict[str, Any]:
    lag_p99 = out.get("probe_lag", {}).get("p99_s")
    peer_p99 = out.get("peer_timer_lag", {}).get("p99_s")
    rep = out.get("replacement", {})
    target_rep = rep.get("target_s", 2 * args.health_interval + REPLACE_SLACK_S)
    rep_max = rep.get("status_whole", {}).get("max_s")
    missing = rep.get("not_replaced_within_timeout", 0)
    lag_ok = lag_p99 is not None and lag_p99 <= TARGET_LAG_P99_S
    rep_ok = rep_max is not None and rep_max <= target_rep and not missing
    return {
        "probe_lag_p99": {"value_s": lag_p99, "target_s": TARGET_LAG_P99_S,
                          "ratio": rnd(lag_p99 / TARGET_LAG_P99_S) if lag_p99 is not None else None,
                          "peer_idle_timer_p99_s": peer_p99,
                          "ratio_to_peer": rnd(lag_p99 / peer_p99) if lag_p99 is not None and peer_p99 else None,
                          "pass": lag_ok},
        "replacement_max": {"value_s": rep_max, "target_s": target_rep,
                            "ratio": rnd(rep_max / target_rep) if rep_max is not None else None,
                            "not_replaced": missing, "pass": rep_ok},
        "pass": lag_ok and rep_ok,
    }


async def main(args) -> int:
    source = use_source(args.source)
    if source["root"] != str(Path(__file__).resolve().parents[1]):
        Path(source["root"]).chmod(0o755)  # a private temp dir: pods run as another user read the code there
    bench_run = Run(NAME)
    print(f"measuring product source: {args.source} (fingerprint {source['fingerprint']})", flush=True)
    out = await soak(args, source)
    v = verdicts(out, args)
    lag, rep, cost = out.get("probe_lag", {}), out.get("replacement", {}), out.get("cost", {})
    print()
    print_table(
        [
            ["health-probe lag p99 (s)", lag.get("p99_s"), TARGET_LAG_P99_S, v["probe_lag_p99"]["ratio"],
             "PASS" if v["probe_lag_p99"]["pass"] else "FAIL"],
            ["pod killed -> service whole, max (s)", rep.get("status_whole", {}).get("max_s"), rep.get("target_s"),
             v["replacement_max"]["ratio"], "PASS" if v["replacement_max"]["pass"] else "FAIL"],
        ],
        ["figure", "measured", "target", "x target", "verdict"],
    )
    peer = out.get("peer_timer_lag", {})
    print(f"  peer: an idle asyncio process's timer lateness, same machine, same window: p50 {peer.get('p50_s')} s, "
          f"p99 {peer.get('p99_s')} s ({peer.get('share_within_1s')} within 1 s); ours/peer p99 = "
          f"{v['probe_lag_p99']['ratio_to_peer']}")
    print(f"  probe lag: p50 {lag.get('p50_s')} s, {lag.get('count')} pings "
          f"(~{lag.get('expected_pings_approx')} expected), {lag.get('share_within_1s')} within 1 s")
    print(f"  replacement: {rep.get('kills')} kills, status whole median {rep.get('status_whole', {}).get('median_s')}"
          f" s, replacement answers median {rep.get('replacement_answers', {}).get('median_s')} s / max "
          f"{rep.get('replacement_answers', {}).get('max_s')} s")
    print(f"  worker: {cost.get('worker_cpu_cores')} cores CPU, RSS {cost.get('worker_rss_mb')} MB; pods "
          f"{cost.get('pods_cpu_cores')} cores, {cost.get('pods_rss_mb_end')} MB; Temporal dev server "
          f"{cost.get('temporal_server_cpu_cores')} cores; load (1 min) {cost.get('load_average_1m')}")
    h = out.get("history", {})
    print(f"  history: {h.get('calm_services', {}).get('events_per_service_hour_median')} events per service-hour"
          f" (calm, median of {h.get('calm_services', {}).get('sampled')}); one heal adds "
          f"{h.get('killed_services', {}).get('events_per_heal_median')} (service + heal child, median)")
    print(f"  end: {out.get('end_state')}; worker log {out.get('worker_log', {}).get('counts')}")
    print(f"\nverdict: {'PASS' if v['pass'] else 'FAIL'}")
    path = bench_run.finish({
        "what": "one worker supervising many process-pod services: health-probe lag, time to replace a killed "
                "pod, worker CPU/RSS, history events per service-hour",
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "peer": "absolute targets (probe lag p99 <= 1 s; replacement <= 2 x health_interval_s + 1.5 s); for the "
                "probe lag, context: the timer lateness of an idle asyncio process on the same machine in the same "
                "window (machine load alone)",
        "config": {"services": args.services, "replicas": args.replicas, "duration_s": args.duration,
                   "kills": args.kills, "health_interval_s": args.health_interval, "image": args.image,
                   "deploy_concurrency": args.deploy_concurrency, "seed": args.seed, "quick": args.quick,
                   "watch_max_s": args.watch_max_s or None, "router": "none (feed pushes refused at once)"},
        "verdicts": v,
        "pass": v["pass"],
        **out,
    })
    if bench_run.source_changed():
        print("WARNING: product sources changed on disk during the run")
    print(f"wrote {path}")
    return 0 if out.get("end_state") else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 services, 60 s, 4 kills (unless given)")
    ap.add_argument("--services", type=int, default=None, help="services (default 100; --quick 20)")
    ap.add_argument("--replicas", type=int, default=2, help="pods per service (default 2)")
    ap.add_argument("--duration", type=float, default=None, help="steady window, s (default 600; --quick 60)")
    ap.add_argument("--kills", type=int, default=None, help="pods SIGKILLed during the window (default 20; --quick 4)")
    ap.add_argument("--health-interval", type=float, default=5.0, help="health_interval_s of every service (5)")
    ap.add_argument("--history-sample", type=int, default=10, help="services whose histories are counted (10)")
    ap.add_argument("--deploy-concurrency", type=int, default=10, help="deploys in flight at once (10)")
    ap.add_argument("--deploy-timeout", type=float, default=600.0)
    ap.add_argument("--replace-timeout", type=float, default=60.0, help="give up on one replacement after this")
    ap.add_argument("--poll", type=float, default=0.1, help="replacement poll interval, s (0.1)")
    ap.add_argument("--watch-max-s", type=float, default=0.0, help="HMS_WATCH_MAX_S for the worker (default: "
                                                                     "the product's 1800)")
    ap.add_argument("--image", default=EXAMPLE_IMAGE)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--keep", action="store_true", help="keep the state directory (worker log, events)")
    ap.add_argument("--source", default="snapshot", help="snapshot (default), live, or a git ref")
    args = ap.parse_args(argv)
    args.services = args.services or (20 if args.quick else 100)
    args.duration = args.duration or (60.0 if args.quick else 600.0)
    args.kills = args.kills if args.kills is not None else (4 if args.quick else 20)
    return args


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--timer-peer":
        timer_peer(sys.argv[2])
        sys.exit(0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
