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
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib import EXAMPLE_IMAGE, REPO  # noqa: E402
from bench.lib.cpu import proc_cpu, proc_rss  # noqa: E402
from bench.lib.results import Run, add_source_arg, loadavg, print_table, run_main  # noqa: E402
from bench.lib.source import use_source  # noqa: E402
from bench.lib.stats import median, pct, rnd  # noqa: E402

NAME = "soak"
TARGET_LAG_P99_S = 1.0
REPLACE_SLACK_S = 1.5  # replacement target: 2 x health_interval_s + this
SAMPLE_EVERY_S = 5.0


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

    def sample(self) -> dict[str, Any]:
        pods = self.worker.children(recursive=True)
        busy = self.ps.cpu_times()
        s = {
            "t": time.monotonic(),
            "worker_cpu_s": proc_cpu([self.worker]),
            "worker_rss_mb": proc_rss([self.worker]) / 2**20,
            "worker_threads": self.worker.num_threads(),
            "pods_cpu_s": proc_cpu(pods),
            "pods_rss_mb": proc_rss(pods) / 2**20,
            "pod_processes": len(pods),
            "server_cpu_s": proc_cpu([self.server]) if self.server else None,
            "server_rss_mb": proc_rss([self.server]) / 2**20 if self.server else None,
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


class Soak:
    """One soak: a dev server, a worker process, ``--services`` services; ``out`` collects the figures."""

    def __init__(self, args, source: dict[str, Any]) -> None:
        self.args, self.source = args, source
        self.rng = random.Random(args.seed)
        self.out: dict[str, Any] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="hms-soak-"))
        self.state = self.tmp / "state"
        self.names = [f"soak-{i:03d}" for i in range(args.services)]
        self.running: list[str] = []
        self.sampler: ProcSampler | None = None
        self._sampling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The dev server, the settings and trust, the worker process, the sampler."""
        from hms_mgmt import auth
        from hms_mgmt.orchestrator import Orchestrator
        from hms_mgmt.runtimes.process import ImageCatalog
        from hms_mgmt.testing import WorkerProcess, dev_environment, dev_server_pids, free_port, local_settings
        from hms_mgmt.trust import TrustStore

        args = self.args
        self.env = await dev_environment(ui=False)
        self.state.mkdir()
        auth.init_keys(self.state)
        self.settings = local_settings(
            self.env.client.service_client.config.target_host, self.state, "process", queue_prefix="hms-soak",
            node_prefix="s", metrics_port=free_port(), token=auth.issue_token(self.state, user="soak", role="ops_admin"),
            # Nobody listens there: each feed push is refused at once (no router in this benchmark).
            routers=["http://127.0.0.1:9"], node_max_pods=max(64, args.services * args.replicas + 2 * args.kills + 16),
            capacity_retry_max_s=30.0)
        TrustStore(self.state).sign(args.image, ImageCatalog(self.state).content_id(args.image), signer="bench")
        extra_env = {"HMS_WATCH_MAX_S": str(args.watch_max_s)} if args.watch_max_s else {}
        self.worker = WorkerProcess(self.settings, self.tmp / "worker.log", source_root=self.source["root"],
                                    extra_env=extra_env)
        self.orch = Orchestrator(self.env.client, self.settings)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        self.worker.start()
        await self._wait_metrics()
        self.sampler = ProcSampler(self.worker.proc.pid, next(iter(dev_server_pids()), None))  # type: ignore[union-attr]
        self.sampler.sample()
        self._sampling = asyncio.create_task(self._sample_forever())

    async def _wait_metrics(self) -> None:
        proc = self.worker.proc
        for _ in range(300):
            with contextlib.suppress(Exception):
                await scrape(self.session, self.settings.metrics_port)
                return
            if proc and proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({proc.returncode}); see {self.worker.log_path}")
            await asyncio.sleep(0.2)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            await asyncio.to_thread(self.sampler.sample)  # type: ignore[union-attr]

    async def deploy(self) -> None:
        args, sampler = self.args, self.sampler
        assert sampler is not None
        print(f"deploying {args.services} services x {args.replicas} pods ({args.image}), "
              f"{args.deploy_concurrency} at a time ...", flush=True)
        s_deploy = sampler.sample()
        d = self.out["deploy"] = await deploy_all(self.orch, self.names, args)
        self.running = [n for n in self.names if n not in d["failed"]]
        d["cost"] = cost_between(s_deploy, sampler.sample(), sampler.samples)
        print(f"  {d['running']}/{args.services} Running in {d['total_s']} s "
              f"(per service median {d['per_service_median_s']} s); load {loadavg()}", flush=True)
        if d["failed"]:
            print(f"  failed: {dict(list(d['failed'].items())[:5])}", flush=True)
        if not self.running:
            raise RuntimeError("no service is Running")

    async def steady_window(self) -> None:
        """``--duration`` seconds with ``--kills`` pods killed; the worker's metrics and the
        machine's idle-timer peer at both ends."""
        port = self.settings.metrics_port
        metrics_before = await scrape(self.session, port)
        peer_out = self.tmp / "timer-peer.json"
        peer = subprocess.Popen([sys.executable, __file__, "--timer-peer", str(peer_out)],
                                env={**os.environ, "PYTHONPATH": self.source["root"]})
        s_start = self.sampler.sample()  # type: ignore[union-attr]
        self.t_start_wall = time.time()
        kills = await self._kills(time.perf_counter())
        s_end = self.sampler.sample()  # type: ignore[union-attr]
        self.t_end_wall = time.time()
        metrics_after = await scrape(self.session, port)
        peer.terminate()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(peer.wait, 10)
            self.out["peer_timer_lag"] = hist_summary(read_peer(peer_out))
        self._probe_figures(metrics_before, metrics_after)
        self.out["cost"] = cost_between(s_start, s_end, self.sampler.samples)  # type: ignore[union-attr]
        self.kills = [k for k in kills if "skipped" not in k]
        self.out["replacement"] = replacement_figures(self.kills, kills, 2 * self.args.health_interval + REPLACE_SLACK_S)

    def _kill_times(self) -> tuple[list[float], float]:
        args = self.args
        young_s = max(10.0, 3 * args.health_interval) + 2.0
        lo, hi = young_s + 2, args.duration - min(args.replace_timeout * 0.5, 0.2 * args.duration)
        return sorted(self.rng.uniform(lo, max(hi, lo + 1)) for _ in range(args.kills)), young_s

    async def _kills(self, t_start: float) -> list[dict[str, Any]]:
        args = self.args
        kill_at, young_s = self._kill_times()
        print(f"steady window {args.duration:g} s; {args.kills} kills at t = "
              f"{', '.join(f'{k:.0f}' for k in kill_at)} s", flush=True)
        busy: set[str] = set()
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        for k, at in enumerate(kill_at):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t_start)))
            victim = await self._victim(busy, young_s)
            if victim is None:
                print(f"  kill {k}: no ready pod old enough outside a running measurement; skipped", flush=True)
                continue
            busy.add(victim["service"])
            tasks.append(asyncio.create_task(self._measured_kill(k, victim, busy)))
        await asyncio.sleep(max(0.0, args.duration - (time.perf_counter() - t_start)))
        return list(await asyncio.gather(*tasks))

    async def _victim(self, busy: set[str], young_s: float) -> dict[str, Any] | None:
        recs = await asyncio.to_thread(pod_records, self.state, self.settings.node)
        now = _dt.datetime.now(_dt.UTC)
        candidates = [r for r in recs.values() if r["service"] in self.running and r["service"] not in busy
                      and (now - _dt.datetime.fromisoformat(r["started_at"])).total_seconds() > young_s]
        return self.rng.choice(sorted(candidates, key=lambda r: r["pod_id"])) if candidates else None

    async def _measured_kill(self, k: int, victim: dict[str, Any], busy: set[str]) -> dict[str, Any]:
        name = victim["service"]
        try:
            r = await kill_and_time(self.orch, self.state, self.settings.node, name, victim, self.args, self.session)
        finally:
            busy.discard(name)
        print(f"  kill {k}: {name}/{victim['pod_id'][:8]} -> replacement answers "
              f"{r.get('replacement_answers_s')} s, status whole {r.get('status_whole_s')} s; "
              f"load {r.get('load')}", flush=True)
        return r

    def _probe_figures(self, before: str, after: str) -> None:
        for key, metric in (("probe_lag", "hms_health_probe_lag_seconds"),
                            ("probe_duration", "hms_health_probe_duration_seconds")):
            self.out[key] = hist_summary(hist_delta(histogram(before, metric), histogram(after, metric)))
        window_s = self.t_end_wall - self.t_start_wall
        expected = len(self.running) * self.args.replicas * window_s / self.args.health_interval
        self.out["probe_lag"]["expected_pings_approx"] = int(expected)

    async def history(self) -> None:
        """History events: a sample of never-killed services, and the killed ones with their heal children."""
        killed = sorted({k["service"] for k in self.kills})
        calm = [n for n in self.running if n not in killed]
        sample = sorted(self.rng.sample(calm, min(self.args.history_sample, len(calm))))
        calm_h = [await self._history_of(n, False) for n in sample]
        killed_h = [await self._history_of(n, True) for n in killed[: self.args.history_sample]]
        kills_of = {n: sum(1 for k in self.kills if k["service"] == n) for n in killed}
        self.out["history"] = history_figures(calm_h, killed_h, kills_of, self.t_end_wall - self.t_start_wall,
                                              self.args.watch_max_s)

    async def _history_of(self, name: str, with_children: bool) -> dict[str, Any]:
        from hms_mgmt import constants

        wid = constants.service_workflow_id(name)
        client, t0, t1 = self.env.client, self.t_start_wall, self.t_end_wall
        h = await history_events(client, wid, t0, t1)
        if with_children:
            h["children_in_window"] = await children_events(client, wid, t0, t1)
        return {"service": name, **h}

    async def end_state(self) -> None:
        """Everyone still whole at the end?"""
        final = []
        for n in self.running:
            with contextlib.suppress(Exception):
                final.append(await self.orch.status(n, live=False))
        self.out["end_state"] = {
            "services_answering": len(final),
            "phases": {p: sum(1 for s in final if s.phase == p) for p in sorted({s.phase for s in final})},
            "ready_pods": sum(s.ready_replicas for s in final),
            "desired_pods": sum(s.desired_replicas for s in final),
        }

    async def undeploy(self) -> None:
        print("undeploying ...", flush=True)
        t_u = time.perf_counter()
        gate = asyncio.Semaphore(self.args.deploy_concurrency)

        async def down(n: str) -> bool:
            async with gate:
                try:
                    await self.orch.undeploy(n, timeout=120)
                    return True
                except Exception:  # noqa: BLE001
                    return False

        ok = await asyncio.gather(*(down(n) for n in self.running))
        self.out["undeploy"] = {"services": len(self.running), "ok": sum(ok),
                                "total_s": rnd(time.perf_counter() - t_u, 2)}
        self.out["samples"] = [{k: (rnd(v, 2) if isinstance(v, float) else v) for k, v in s.items()}
                               for s in self.sampler.samples]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
            with contextlib.suppress(BaseException):
                await self._sampling
        if hasattr(self, "session"):
            await self.session.close()
        if hasattr(self, "worker"):
            self.out["worker_exit_code"] = await asyncio.to_thread(self.worker.stop, 60.0)
            self.out["worker_log"] = log_digest(self.worker.log_path)
        if hasattr(self, "settings"):
            # Pods outlive their worker by design: stop what this run's node left (its records only).
            left = pod_records(self.state, self.settings.node)
            for rec in left.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(rec["pid"], signal.SIGKILL)
            self.out["pods_left_after_undeploy"] = len(left)
        if hasattr(self, "env"):
            with contextlib.suppress(Exception):
                await self.env.shutdown()
        if self.args.keep:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def replacement_figures(measured: list[dict[str, Any]], kills: list[dict[str, Any]], target: float) -> dict[str, Any]:
    status_xs = [k["status_whole_s"] for k in measured if k["status_whole_s"] is not None]
    http_xs = [k["replacement_answers_s"] for k in measured if k["replacement_answers_s"] is not None]
    return {
        "target_s": target,
        "kills": len(measured),
        "not_replaced_within_timeout": sum(1 for k in measured if k["status_whole_s"] is None),
        "status_whole": {"median_s": rnd(median(status_xs)), "p95_s": rnd(pct(status_xs, 0.95)),
                         "max_s": rnd(max(status_xs, default=None))},
        "replacement_answers": {"median_s": rnd(median(http_xs)), "p95_s": rnd(pct(http_xs, 0.95)),
                                "max_s": rnd(max(http_xs, default=None))},
        "runs": kills,
    }


def history_figures(calm_h: list[dict[str, Any]], killed_h: list[dict[str, Any]], kills_of: dict[str, int],
                    window_s: float, watch_max_s: float) -> dict[str, Any]:
    per_hour = [h["in_window"] / (window_s / 3600) for h in calm_h]
    per_heal = [(h["in_window"] + h.get("children_in_window", 0)) / max(1, kills_of[h["service"]])
                for h in killed_h]
    return {
        "window_s": rnd(window_s, 1),
        "watch_max_s": watch_max_s or 1800.0,
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


async def soak(args, source: dict[str, Any]) -> dict[str, Any]:
    run = Soak(args, source)
    try:
        await run.start()
        await run.deploy()
        await run.steady_window()
        await run.history()
        await run.end_state()
        await run.undeploy()
    finally:
        await run.stop()
    return run.out


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
    if source["root"] != str(REPO):
        Path(source["root"]).chmod(0o755)  # a private temp dir: pods run as another user read the code there
    bench_run = Run(NAME)
    bench_run.announce(args.source)
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
    bench_run.done({
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
    add_source_arg(ap)
    args = ap.parse_args(argv)
    args.services = args.services or (20 if args.quick else 100)
    args.duration = args.duration or (60.0 if args.quick else 600.0)
    args.kills = args.kills if args.kills is not None else (4 if args.quick else 20)
    return args


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--timer-peer":
        timer_peer(sys.argv[2])
        sys.exit(0)
    run_main(main, parse_args())
