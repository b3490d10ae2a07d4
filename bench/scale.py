"""Autoscaling benchmark: a CPU step that needs 2 -> 10 pods. How many scaling decisions, and
how many seconds from the step until 10 pods are ready; against the seed's rule (one pod per
tick) replayed on the CPU samples of the same run.

Ours. Deploy ``min_replicas=2, max_replicas=10, cpu_target=10, cpu_limit=0.5`` (docker) with a
short ``scale_interval_s`` (--interval, 2 s) so a run is short. Once the monitor watches both
pods and has taken idle samples, burn CPU on both pods at once (``POST /admin/cpu {"percent":
P}``; P is percent of *one core*, so the default P=45 is ~90 % of the 0.5-CPU limit: the
total load is ~2 x 90 % of a limit, ceil(180 / 10) = 18 pods, clamped to 10). t0 = the step.
Measured: scaling decisions (``scale_count`` in status, ScaleWorkflow executions
``svc-<name>-scale-<n>``), seconds until status() shows 10 ready pods and until 10 pods answer
``/health`` from outside, and the CPU samples the monitor took (its heartbeats, every sample
set it heartbeated after the step, plus the decision's samples from ``service.scaled`` in
``<state_dir>/events.jsonl``).

Peer: the seed's rule, per tick: mean CPU > target and pods < max -> add one; mean < target/2
and pods > min -> remove one. Replayed on the same samples: tick k sees the k-th CPU sample set
the monitor took after the step (from its heartbeats and the ``service.at_max`` /
``service.scaled`` events; the last one held when they run out: constant load), with the load
spread over the pods (per-pod mean = total CPU of the sample / pods the seed would run). Its
time = first post-step sample + (last acting tick - 1) x interval + one pod's start time
(measured: start_pod scheduled -> wait_pod_ready completed of the two initial pods, our own
workflows).
Also the default-interval projection (30 s ticks).

    .venv/bin/python bench/scale.py [--runs 5] [--interval 2] [--burn 45]

Target: 1 scaling decision. Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib import EXAMPLE_IMAGE  # noqa: E402
from bench.lib.history import activity_timeline  # noqa: E402
from bench.lib.poll import HealthPoller, poll_until  # noqa: E402
from bench.lib.ports import docker_client, docker_discoverer  # noqa: E402
from bench.lib.results import Run, loadavg, parse_common, parser, print_table, run_main  # noqa: E402
from bench.lib.source import use_source  # noqa: E402
from bench.lib.stack import grant_access, hms_stack, sweep_node, undeploy_and_sweep, watch_armed  # noqa: E402
from bench.lib.stats import median, rnd, summary  # noqa: E402

NAME = "scale"
TARGET_DECISIONS = 1
MIN_R, MAX_R, CPU_TARGET, CPU_LIMIT = 2, 10, 10, 0.5


# --- the seed's rule, replayed ------------------------------------------------------------


def seed_replay(totals: list[float], *, target: float, min_r: int, max_r: int, start: int,
                max_ticks: int = 500) -> list[dict[str, Any]]:
    """One decision per tick, the seed's rule, on per-pod mean = total / pods. Tick k uses
    ``totals[k]``, the last one once they run out. Returns one row per tick until max_r."""
    pods, ticks = start, []
    for k in range(max_ticks):
        if pods >= max_r:
            break
        total = totals[min(k, len(totals) - 1)]
        mean = total / pods
        action = 0
        if mean > target and pods < max_r:
            action = 1
        elif mean < target / 2 and pods > min_r:
            action = -1
        pods += action
        ticks.append({"tick": k + 1, "total_cpu": rnd(total, 1), "mean_cpu": rnd(mean, 1), "action": action,
                      "pods_after": pods})
        if action == 0 and k >= len(totals) - 1:
            break  # constant load and no action: it never gets there
    return ticks


# --- the monitor's samples, read from its heartbeats -----------------------------------------


class SampleRecorder:
    """Polls the service workflow's pending ``watch_pods`` heartbeat and keeps every distinct
    sample set (one per ``scale_interval_s``) with the time it was first seen; also polls
    status() for ready pods and scale_count."""

    def __init__(self, stack, name: str, interval_s: float = 0.25) -> None:
        self.stack, self.name, self.interval_s = stack, name, interval_s
        self.sets: list[dict[str, Any]] = []
        self.status: list[dict[str, Any]] = []
        self._last_key: tuple | None = None
        self._task: asyncio.Task | None = None
        self.t0 = time.perf_counter()

    async def _once(self) -> None:
        from hms_mgmt import constants
        from hms_mgmt.models import WatchHeartbeat

        handle = self.stack.client.get_workflow_handle(constants.service_workflow_id(self.name))
        desc = await handle.describe()
        now = time.perf_counter() - self.t0
        for pending in desc.raw_description.pending_activities:
            if pending.activity_type.name != "watch_pods" or not pending.heartbeat_details.payloads:
                continue
            (beat,) = await self.stack.client.data_converter.decode(pending.heartbeat_details.payloads[:1],
                                                                    [WatchHeartbeat])
            if not beat.samples:
                continue
            key = tuple(sorted((s.pod_id, s.cpu_percent) for s in beat.samples))
            if key != self._last_key:
                self._last_key = key
                vals = [s.cpu_percent for s in beat.samples if s.cpu_percent is not None]
                self.sets.append({"seen_s": rnd(now), "pods": len(beat.samples), "total_cpu": rnd(math.fsum(vals), 1),
                                  "samples": [s.cpu_percent for s in beat.samples]})
        st = await self.stack.orch.status(self.name, live=False)
        self.status.append({"t_s": rnd(now), "ready": st.ready_replicas, "desired": st.desired_replicas,
                            "phase": st.phase, "scale_count": st.scale_count})

    async def _loop(self) -> None:
        while True:
            tick = time.perf_counter()
            with contextlib.suppress(Exception):
                await self._once()
            await asyncio.sleep(max(0.0, self.interval_s - (time.perf_counter() - tick)))

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def post_step_samples(sets: list[dict[str, Any]], events: list[dict[str, Any]], t_step: float,
                      t_decision: float | None) -> list[dict[str, Any]]:
    """Every CPU sample set the monitor took after the step, in time order, from three views of
    it: its heartbeats (first-seen time, <= ~1.25 s late), and the ``service.at_max`` /
    ``service.scaled`` events (a sample the watch returned on, never heartbeated; ``at_max`` is
    emitted ~0.1 s after it, ``scaled`` once the scaling is done, so it is placed at the
    decision, ``t_decision``). The pre-step (idle) sample sets are skipped: a set counts once
    its total is above ``CPU_TARGET`` (a step of ~180 %). Duplicates (same pods, same total,
    within 1 s) are merged."""
    out: list[dict[str, Any]] = []
    for s in sets:
        out.append({"t_s": s["seen_s"], "pods": s["pods"], "total_cpu": s["total_cpu"], "from": "heartbeat"})
    for e in events:
        d = e.get("data") or {}
        if e["type"] == "service.scaled" and d.get("samples"):
            vals = [x["cpu_percent"] for x in d["samples"] if x.get("cpu_percent") is not None]
            t = e["t_s"] if t_decision is None else min(e["t_s"], t_decision - 0.02)
            out.append({"t_s": rnd(t), "pods": len(d["samples"]), "total_cpu": rnd(math.fsum(vals), 1),
                        "from": "service.scaled"})
        elif e["type"] == "service.at_max" and d.get("mean_cpu") is not None:
            m = re.search(r"across (\d+) ready pod", e.get("reason") or "")
            pods = int(m.group(1)) if m else MIN_R
            out.append({"t_s": e["t_s"], "pods": pods, "total_cpu": rnd(d["mean_cpu"] * pods, 1), "from": "service.at_max"})
    out.sort(key=lambda s: s["t_s"])
    merged: list[dict[str, Any]] = []
    for s in out:
        if s["t_s"] <= t_step or s["total_cpu"] is None:
            continue
        if not merged and s["total_cpu"] <= CPU_TARGET:
            continue
        if any(m["pods"] == s["pods"] and abs(m["total_cpu"] - s["total_cpu"]) < 0.15 and s["t_s"] - m["t_s"] < 1.0
               for m in merged):
            continue
        merged.append(s)
    return merged


def read_events(state_dir: Path, name: str, t0_wall: float) -> list[dict[str, Any]]:
    import datetime as dt

    path = state_dir / "events.jsonl"
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("service") != name:
                continue
            t = dt.datetime.fromisoformat(ev["time"].replace("Z", "+00:00")).timestamp()
            out.append({"type": ev["type"], "t_s": rnd(t - t0_wall), "reason": ev.get("reason"),
                        "data": ev.get("data", {})})
    return out


def pod_start_times(deploy_tl: dict[str, Any]) -> list[float]:
    """Per pod: start_pod scheduled -> ready. start_pod waits until the pod answers (older
    product versions had a separate wait_pod_ready activity: then they are paired in order)."""
    starts = sorted((a for a in deploy_tl["activities"] if a["type"] == "start_pod" and "completed" in a),
                    key=lambda a: a["scheduled"])
    waits = sorted((a for a in deploy_tl["activities"] if a["type"] == "wait_pod_ready" and "completed" in a),
                   key=lambda a: a["scheduled"])
    if not waits:
        return [a["completed"] - a["scheduled"] for a in starts]
    return [w["completed"] - s["scheduled"] for s, w in zip(starts, waits, strict=False)]


# --- one run ------------------------------------------------------------------------------------


async def deploy_idle(stack, name: str, args) -> dict[str, Any]:
    """Deploy at ``MIN_R`` pods and wait for the monitor to watch them and take idle samples."""
    from hms_mgmt import constants

    spec = {"name": name, "image": args.image, "min_replicas": MIN_R, "max_replicas": MAX_R,
            "cpu_target": CPU_TARGET, "cpu_limit": CPU_LIMIT, "scale_interval_s": args.interval}
    await stack.orch.deploy(spec, wait=True, timeout=args.timeout)
    st = await stack.orch.status(name)
    deploy_tl = await activity_timeline(stack.client, f"{constants.service_workflow_id(name)}-deploy-1")
    if not await watch_armed(stack, name, {p.id for p in st.pods}):
        raise RuntimeError(f"{name}: the monitor is not watching its pods")
    await asyncio.sleep(2 * args.interval + 0.5)  # idle samples first: the step is a step
    return {"endpoints": [p.endpoint for p in st.pods], "one_pod_start": median(pod_start_times(deploy_tl)),
            "load": loadavg(), "idle_scale_count": (await stack.orch.status(name, live=False)).scale_count}


async def step_and_wait(stack, name: str, endpoints: list[str], dclient, args, t0: float) -> dict[str, Any]:
    """Burn CPU on every pod at once (the step), then wait for ``MAX_R`` ready pods."""
    from hms_mgmt import constants

    async with aiohttp.ClientSession() as session:
        async def burn(ep: str) -> None:
            async with session.post(f"http://{ep}/admin/cpu", json={"percent": args.burn}) as resp:
                resp.raise_for_status()

        await asyncio.gather(*(burn(ep) for ep in endpoints))
    t_step = time.perf_counter() - t0

    async def ten_ready() -> bool:
        return (await stack.orch.status(name, live=False)).ready_replicas >= MAX_R

    labels = {constants.LABEL_SERVICE: name, constants.LABEL_NODE: stack.settings.node}
    t_status, http = await asyncio.gather(
        poll_until(ten_ready, t0=t0, interval_s=0.1, timeout_s=args.timeout),
        HealthPoller(interval_s=0.1).wait(docker_discoverer(dclient, labels), MAX_R, t0=t0, timeout_s=args.timeout),
    )
    if t_status is None:
        raise RuntimeError(f"{name}: never reached {MAX_R} ready pods")
    return {"t_step": t_step, "t_status": t_status, "http_s": http.elapsed_s}


async def scale_workflows(stack, name: str, scale_count: int, t0_wall: float) -> list[dict[str, Any]]:
    """The ScaleWorkflow executions of ``name``, with times since the step."""
    from hms_mgmt import constants

    wf = constants.service_workflow_id(name)
    out = []
    for n in range(1, scale_count + 1):
        with contextlib.suppress(Exception):
            tl = await activity_timeline(stack.client, f"{wf}-scale-{n}")
            w = tl["workflow"]
            out.append({
                "id": f"{wf}-scale-{n}",
                "started_s": rnd(w["started"] - t0_wall) if "started" in w else None,
                "closed_s": rnd(w["closed"] - t0_wall) if "closed" in w else None,
                "pods_started": sum(1 for a in tl["activities"] if a["type"] == "start_pod"),
                "pod_start_to_ready_s": [rnd(x) for x in sorted(pod_start_times(tl))],
            })
    return out


def seed_figures(samples: list[dict[str, Any]], interval: float, one_pod_start: float | None,
                 t_decision: float | None) -> dict[str, Any]:
    """The seed's rule replayed on our post-step samples, and which sample our decision used."""
    totals = [s["total_cpu"] for s in samples]
    ticks = seed_replay(totals, target=CPU_TARGET, min_r=MIN_R, max_r=MAX_R, start=MIN_R) if totals else []
    reached = bool(ticks) and ticks[-1]["pods_after"] >= MAX_R
    last_tick = next((t["tick"] for t in reversed(ticks) if t["action"] != 0), None)
    seed_s = t_tick1 = None
    if samples and last_tick is not None and reached and one_pod_start is not None:
        t_tick1 = samples[0]["t_s"]
        seed_s = t_tick1 + (last_tick - 1) * interval + one_pod_start
    # Which post-step sample did our decision act on (1 = the first that showed the step)?
    deciding = None if t_decision is None else sum(1 for s in samples if s["t_s"] <= t_decision + 0.05)
    seed = {"tick1_s": rnd(t_tick1), "totals_used": [rnd(x, 1) for x in totals], "ticks": ticks,
            "decisions": sum(1 for t in ticks if t["action"] != 0), "reached_max": reached, "seconds": rnd(seed_s)}
    return {"seed": seed, "ours_decided_on_sample": deciding}


async def run_once(stack, k: int, dclient, args) -> dict[str, Any]:
    name = f"bench-scale-{k}-{uuid.uuid4().hex[:4]}"
    rec = SampleRecorder(stack, name)
    try:
        idle = await deploy_idle(stack, name, args)
        t0_wall, t0 = time.time(), time.perf_counter()
        rec.start(t0)
        step = await step_and_wait(stack, name, idle["endpoints"], dclient, args, t0)
        await asyncio.sleep(args.observe)  # would a second decision follow?
        await rec.stop()
        final = await stack.orch.status(name, live=False)
        scale_wfs = await scale_workflows(stack, name, final.scale_count, t0_wall)
        events = [e for e in read_events(stack.settings.state_dir, name, t0_wall) if e["t_s"] >= -1]
    finally:
        await rec.stop()
        await undeploy_and_sweep(stack, dclient, name, timeout_s=90)
    t_decision = scale_wfs[0]["started_s"] if scale_wfs else None
    samples = post_step_samples(rec.sets, events, step["t_step"], t_decision)
    return {
        "service": name, "load_average": idle["load"], "step_request_s": rnd(step["t_step"]),
        "decisions": final.scale_count - idle["idle_scale_count"], "scale_count": final.scale_count,
        "scale_workflows": scale_wfs,
        "decision_reasons": [d.reason for d in final.last_decisions if d.kind == "scale"],
        "first_decision_s": t_decision, "status_10_ready_s": rnd(step["t_status"]),
        "http_10_answer_s": rnd(step["http_s"]), "one_pod_start_s": rnd(idle["one_pod_start"]),
        "events": [{k: v for k, v in e.items() if k != "data"} | {"data": e["data"]} for e in events],
        "sample_sets": rec.sets, "status_trace": rec.status, "post_step_samples": samples,
        **seed_figures(samples, args.interval, idle["one_pod_start"], t_decision),
    }


# --- main ----------------------------------------------------------------------------------------


async def measure(stack, dclient, args, bench_run: Run) -> list[dict[str, Any]]:
    runs = []
    for k in range(args.runs):
        r = await run_once(stack, k, dclient, args)
        runs.append(r)
        print(f"run {k}: {r['decisions']} decision(s) {[w['id'].rsplit('-', 1)[-1] for w in r['scale_workflows']]}, "
              f"first at {r['first_decision_s']}s; 10 ready (status) {r['status_10_ready_s']}s, "
              f"10 answer {r['http_10_answer_s']}s | seed replay: {r['seed']['decisions']} decisions, "
              f"{r['seed']['seconds']}s (totals {r['seed']['totals_used'][:4]}...) | load {r['load_average']}",
              flush=True)
        if bench_run.source_changed():
            r["source_changed"] = True
            print("  WARNING: product sources changed on disk since the start", flush=True)
        await asyncio.sleep(args.settle)
    return runs


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    f = {
        "ours_decisions": summary(r["decisions"] for r in runs),
        "ours_first_decision_s": summary(r["first_decision_s"] for r in runs),
        "ours_status_10_ready_s": summary(r["status_10_ready_s"] for r in runs),
        "ours_http_10_answer_s": summary(r["http_10_answer_s"] for r in runs),
        # ScaleWorkflow started -> 10 ready in status: what a decision costs once taken.
        "ours_decision_to_10_ready_s": summary(r["status_10_ready_s"] - r["first_decision_s"] for r in runs
                                               if r["first_decision_s"] is not None
                                               and r["status_10_ready_s"] is not None),
        "seed_decisions": summary(r["seed"]["decisions"] for r in runs),
        "seed_s": summary(r["seed"]["seconds"] for r in runs),
        "one_pod_start_s": summary(r["one_pod_start_s"] for r in runs),
    }
    ours_s, seed_s = f["ours_status_10_ready_s"]["median"], f["seed_s"]["median"]
    f["time_ratio_ours_over_seed"] = rnd(ours_s / seed_s) if ours_s and seed_s else None
    f["ours_decided_on_post_step_sample"] = summary(r["ours_decided_on_sample"] for r in runs)
    f["runs_deciding_after_sample_2"] = sum(1 for r in runs if (r["ours_decided_on_sample"] or 0) > 2)
    return f


def projection(f: dict[str, Any]) -> dict[str, Any]:
    """Both sides at the default 30 s interval, from this run's figures."""
    d30 = 30.0
    seed_n = f["seed_decisions"]["median"] or 8
    act = f["ours_decision_to_10_ready_s"]["median"] or 0
    return {
        "interval_s": d30,
        "convention": "worst phase: the step lands just after a tick, so the first sample is a full interval "
                      "later; subtract interval/2 for the expected phase",
        "seed_decisions": seed_n,
        "seed_s": rnd(seed_n * d30 + (f["one_pod_start_s"]["median"] or 0)),
        "seed_s_ticks_only": rnd(seed_n * d30),
        "ours_decisions": f["ours_decisions"]["median"],
        "ours_decided_on_sample": f["ours_decided_on_post_step_sample"]["median"],
        "ours_s": rnd((f["ours_decided_on_post_step_sample"]["median"] or 2) * d30 + act),
        "ours_s_if_second_sample": rnd(2 * d30 + act),
        "ours_s_note": "the post-step sample our decision acted on (measured median; 2 = one to see the step, "
                       "one to confirm) x 30 s + the measured decision-to-10-ready time",
    }


def report(f: dict[str, Any], proj: dict[str, Any], runs: list[dict[str, Any]], args, passed: bool) -> None:
    od, sd, os_, ss = f["ours_decisions"], f["seed_decisions"], f["ours_status_10_ready_s"], f["seed_s"]
    print(f"\nCPU step needing {MIN_R} -> {MAX_R} pods (cpu_target {CPU_TARGET}%, cpu_limit {CPU_LIMIT}, burn "
          f"{args.burn}% of a core per pod), scale_interval_s={args.interval:g}, {len(runs)} runs")
    print_table(
        [["ours (proportional)", od["median"], od["max"], f["ours_first_decision_s"]["median"], os_["median"],
          os_["max"], f["ours_http_10_answer_s"]["median"]],
         ["seed rule (replayed on our samples)", sd["median"], sd["max"], None, ss["median"], ss["max"], None]],
        ["side", "decisions", "max", "1st decision s", "10 ready s (med)", "max s", "10 answer s"],
    )
    pod_start = f["one_pod_start_s"]["median"]
    print(f"one pod start (measured, median): {pod_start}s; decision -> 10 ready: "
          f"{f['ours_decision_to_10_ready_s']['median']}s; our decision acted on post-step sample "
          f"#{[r['ours_decided_on_sample'] for r in runs]} (2 expected: see the step, confirm it)")
    ratio = f["time_ratio_ours_over_seed"]
    print(f"time ratio ours/seed = {ratio:.2f}x" if ratio else "time ratio: n/a")
    print(f"default interval projection (30 s ticks): seed {proj['seed_decisions']} decisions ~ "
          f"{proj['seed_s_ticks_only']:g}s (+{pod_start}s pod start); ours "
          f"{proj['ours_decisions']} decision ~ {proj['ours_s']:g}s "
          f"({proj['ours_s_if_second_sample']:g}s when it acts on the 2nd sample)")
    print(f"target: {TARGET_DECISIONS} decision: {'PASS' if passed else 'FAIL'} (max over runs {od['max']})")


def payload(f: dict[str, Any], proj: dict[str, Any], runs: list[dict[str, Any]], args, passed: bool,
            access: dict[str, Any]) -> dict[str, Any]:
    return {
        "what": f"CPU step needing {MIN_R}->{MAX_R} pods: scaling decisions and seconds until {MAX_R} ready, ours vs "
                "the seed's one-pod-per-tick rule replayed on the same CPU samples",
        "spec": {"image": args.image, "min_replicas": MIN_R, "max_replicas": MAX_R, "cpu_target": CPU_TARGET,
                 "cpu_limit": CPU_LIMIT, "scale_interval_s": args.interval, "health_interval_s": 5.0,
                 "scale_down_window_s": 300.0},
        "burn_percent_of_a_core": args.burn,
        "burn_percent_of_limit_nominal": rnd(args.burn / CPU_LIMIT, 1),
        "runs": args.runs, "observe_after_ready_s": args.observe, "access": access,
        "target_decisions": TARGET_DECISIONS, "pass": passed, "figures": f,
        "seed_rule": "per tick: mean CPU > target and pods < max -> +1; elif mean < target/2 and pods > min -> -1; "
                     "mean = total CPU of the tick's sample / the seed's pods; tick k = the k-th CPU sample the monitor "
                     "took after the step (heartbeats + service.at_max/service.scaled events), the last one held; "
                     "time = first post-step sample + (last acting tick - 1) x interval + one pod start",
        "default_interval_projection": proj,
        "runs_detail": runs,
    }


async def main(args) -> int:
    use_source(args.source)
    bench_run = Run(NAME)
    bench_run.announce(args.source)
    dclient = docker_client()
    node = None
    try:
        async with hms_stack("docker") as stack:
            node = stack.settings.node
            access = grant_access(stack, [args.image])
            runs = await measure(stack, dclient, args, bench_run)
    finally:
        sweep_node(dclient, node)
        dclient.close()
    f = figures(runs)
    proj = projection(f)
    passed = f["ours_decisions"]["max"] is not None and f["ours_decisions"]["max"] <= TARGET_DECISIONS
    report(f, proj, runs, args, passed)
    bench_run.done(payload(f, proj, runs, args, passed, access))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--runs", type=int, default=5, help="runs (default 5)")
    ap.add_argument("--interval", type=float, default=2.0, help="scale_interval_s of the spec (default 2)")
    ap.add_argument("--burn", type=float, default=45.0,
                    help="CPU burn per pod, percent of ONE core (default 45 = ~90%% of the 0.5-CPU limit)")
    ap.add_argument("--observe", type=float, default=10.0, help="keep watching after 10 ready (default 10 s)")
    ap.add_argument("--settle", type=float, default=1.0)
    return parse_common(ap, argv, timeout_s=120.0, image=EXAMPLE_IMAGE)


if __name__ == "__main__":
    run_main(main, parse_args())
