"""Self-healing benchmark: how long a service is without an answering pod after its pod dies
or hangs, against Docker's own in-place recovery, measured in the same run.

(a) crash. SIGKILL of a pod's main process (``os.kill(State.Pid, SIGKILL)``: a crash, not a
    ``docker kill``, which Docker treats as a manual stop). t0 = the kill.
    ours   seconds until a *replacement* pod of the service (a container labelled
           ``hms.service=<name>`` that was not there before the kill) answers ``/health``;
           also when ``status()`` shows a ready replacement and when the dead container is gone.
    peer   ``docker run -d --restart=always`` of the same image; seconds until it answers
           ``/health`` again (Docker restarts it in place; its host port may change, so the
           endpoint is re-discovered by label every round).
    Both sides: the same poller (discover by label + GET /health every --poll s, 0.05 s),
    pods older than --min-age (12 s) when killed (a pod dying young counts toward
    crash-loop backoff in hms-mgmt, and Docker's restart delay also grows for containers
    that ran < 10 s), pairs alternate which side goes first. Target: ours/peer <= 1.26x.
(b) hung pod. spec ``health_interval_s=1, health_failures=2``; ``POST /admin/health
    {"failing": true}`` (mode ``failing``) or ``POST /admin/hang`` (mode ``hang``) on the pod.
    t0 = just before that POST. Seconds until a replacement answers ``/health`` AND the bad
    pod's container is removed. Compared with the detection floor ``health_failures x
    health_interval_s``; target <= floor + 1.5 s.

A builtin router runs beside the worker (a process of its own), as ``hms up`` starts one: a bad
pod is drained out of it before it stops, and stops once the router has nothing in flight to it
(``--no-router``: the full ``drain_s``, 2 s from the heal's start, is waited).

    .venv/bin/python bench/heal.py [--runs 5] [--warmup 1] [--b-modes failing,hang] [--no-router]

Prints a table with both ratios and pass/fail, writes bench/results/heal.json (per-run figures,
where our time goes from the HealWorkflow history, load averages per run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib import EXAMPLE_IMAGE  # noqa: E402
from bench.lib.healpath import activity_costs, docker_marks, step_table, steps_ms, workflow_marks  # noqa: E402
from bench.lib.history import activity_timeline  # noqa: E402
from bench.lib.poll import http_status, poll_until  # noqa: E402
from bench.lib.ports import docker_client, label_filter, remove_containers, running_endpoints  # noqa: E402
from bench.lib.results import Run, loadavg, parse_common, parser, print_table, run_main, verdict  # noqa: E402
from bench.lib.source import use_source  # noqa: E402
from bench.lib.stack import grant_access, hms_stack, require_image, sweep_node, undeploy_and_sweep, watch_armed  # noqa: E402
from bench.lib.stats import median, rnd, summary  # noqa: E402

NAME = "heal"
TARGET_A = 1.26  # ours / Docker restart policy
SLACK_B = 1.5  # seconds over the detection floor
PEER_LABEL = "bench.heal"
POLL_S = 0.05


# --- the one poller both sides use ---------------------------------------------------------


async def _probe(session: aiohttp.ClientSession, endpoint: str, path: str, timeout_s: float) -> bool:
    return await http_status(session, endpoint, path, timeout_s) == 200


async def first_answer(dclient, labels: dict[str, str], *, t0: float, exclude_ids: set[str] = frozenset(),
                       interval_s: float = POLL_S, timeout_s: float = 120.0, path: str = "/health",
                       probe_timeout_s: float = 1.0) -> dict[str, Any]:
    """Every ``interval_s``: list the running containers with ``labels`` (minus ``exclude_ids``)
    and GET ``path`` on each; return when one answers 200. Times are seconds since ``t0``."""
    out: dict[str, Any] = {"elapsed_s": None, "first_seen_s": None, "container": None, "rounds": 0}
    deadline = time.perf_counter() + timeout_s
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while time.perf_counter() < deadline:
            tick = time.perf_counter()
            out["rounds"] += 1
            found = await asyncio.to_thread(running_endpoints, dclient, labels, exclude_ids)
            if found and out["first_seen_s"] is None:
                out["first_seen_s"] = time.perf_counter() - t0
            if found:
                oks = await asyncio.gather(*(_probe(session, ep, path, probe_timeout_s) for _, ep in found))
                for (cid, ep), ok in zip(found, oks, strict=True):
                    if ok:
                        out.update(elapsed_s=time.perf_counter() - t0, container=cid[:12], endpoint=ep)
                        return out
            await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - tick)))
    return out


def kill9(dclient, container_id: str) -> tuple[int, float, float]:
    """SIGKILL the container's main process; returns (pid, perf_counter t0, wall t0)."""
    ct = dclient.containers.get(container_id)
    pid = ct.attrs["State"]["Pid"]
    if not pid:
        raise RuntimeError(f"container {container_id[:12]} has no running process")
    t0_wall = time.time()
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    return pid, t0, t0_wall


def container_age_s(dclient, container_id: str) -> float:
    started = dclient.containers.get(container_id).attrs["State"]["StartedAt"]
    # docker gives nanoseconds: "2024-01-01T00:00:00.123456789Z"
    base, _, frac = started.rstrip("Z").partition(".")
    t = _dt.datetime.fromisoformat(base).replace(tzinfo=_dt.UTC).timestamp() + float(f"0.{frac or '0'}")
    return time.time() - t


async def wait_age(dclient, container_ids: list[str], min_age_s: float) -> None:
    ages = [await asyncio.to_thread(container_age_s, dclient, cid) for cid in container_ids]
    wait = min_age_s - min(ages)
    if wait > 0:
        await asyncio.sleep(wait)


def min_age(args, health_interval_s: float) -> float:
    """Past the product's "died young" threshold (crash-loop backoff) and Docker's 10 s."""
    return args.min_age if args.min_age is not None else max(10.0, 3 * health_interval_s) + 2.0


# --- ours ------------------------------------------------------------------------------------


async def deploy_ours(stack, name: str, dclient, args, **spec_extra: Any) -> tuple[Any, list[str]]:
    """Deploy ``args.replicas`` pods; returns (status, container ids)."""
    from hms_mgmt import constants

    spec = {"name": name, "image": args.image, "min_replicas": args.replicas, "max_replicas": args.replicas,
            "cpu_target": 60, **spec_extra}
    await stack.orch.deploy(spec, wait=True, timeout=args.timeout)
    st = await stack.orch.status(name)
    cids = [c["Id"] for c in dclient.api.containers(
        filters=label_filter({constants.LABEL_SERVICE: name, constants.LABEL_NODE: stack.settings.node}))]
    return st, cids


async def heal_breakdown(stack, name: str, old_pod: str, t0_wall: float) -> dict[str, Any] | None:
    from hms_mgmt import constants

    try:
        heal = await activity_timeline(stack.client, f"{constants.service_workflow_id(name)}-heal-{old_pod}")
    except Exception:  # noqa: BLE001
        return None
    acts = heal["activities"]
    timers: list[float] = []
    crash_count = None
    with contextlib.suppress(Exception):
        import json

        from temporalio.api.enums.v1 import EventType as ET

        hist = await stack.client.get_workflow_handle(
            f"{constants.service_workflow_id(name)}-heal-{old_pod}").fetch_history()
        for ev in hist.events:
            if ev.event_type == ET.EVENT_TYPE_TIMER_STARTED:
                timers.append(ev.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds())
            elif ev.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                payload = ev.workflow_execution_started_event_attributes.input.payloads[0]
                crash_count = json.loads(payload.data).get("crash_count")

    def span(kind: str) -> list[float] | None:
        xs = [a for a in acts if a["type"] == kind and "completed" in a]
        if not xs:
            return None
        a = xs[-1]
        return [rnd(a["scheduled"] - t0_wall), rnd(a["completed"] - t0_wall)]

    # In the service workflow: the watch that saw it return -> events emitted -> heal child started.
    svc_part: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        svc = await activity_timeline(stack.client, constants.service_workflow_id(name))
        init = next(m["t"] for m in svc["marks"] if m["event"] == "START_CHILD_WORKFLOW_EXECUTION_INITIATED"
                    and m["t"] >= t0_wall)
        watch_done = max(a["completed"] for a in svc["activities"] if a["type"] == "watch_pods"
                         and "completed" in a and t0_wall <= a["completed"] <= init)
        emits = [a for a in svc["activities"] if a["type"] == "emit_event" and watch_done <= a["scheduled"] <= init]
        svc_part = {
            "watch_returned_s": rnd(watch_done - t0_wall),
            "emits_before_heal": len(emits),
            "emits_before_heal_s": rnd(sum(a["completed"] - a["scheduled"] for a in emits if "completed" in a)),
            "heal_child_initiated_s": rnd(init - t0_wall),
        }
    return {
        **svc_part,
        "heal_workflow_started_s": rnd(heal["workflow"].get("started", t0_wall) - t0_wall),
        "pick_node_s": span("pick_node"),
        "start_pod_s": span("start_pod"),
        "wait_pod_ready_s": span("wait_pod_ready"),
        "stop_pod_s": span("stop_pod"),
        "heal_workflow_closed_s": rnd(heal["workflow"]["closed"] - t0_wall) if "closed" in heal["workflow"] else None,
        "heal_events": heal["events"],
        "backoff_timers_s": timers,
        "crash_count_at_heal": crash_count,
    }


async def measure_ours_crash(stack, name: str, st, cids: list[str], dclient, args) -> dict[str, Any]:
    from hms_mgmt import constants

    labels = {constants.LABEL_SERVICE: name, constants.LABEL_NODE: stack.settings.node}
    if not await watch_armed(stack, name, {p.id for p in st.pods}):
        raise RuntimeError(f"{name}: no watch_pods activity is watching {[p.id for p in st.pods]}")
    victim = st.pods[0]
    victim_cid = next(c["Id"] for c in dclient.api.containers(
        filters=label_filter({constants.LABEL_POD: victim.id})))
    before = set(cids)
    age = await asyncio.to_thread(container_age_s, dclient, victim_cid)
    load = loadavg()
    pid, t0, t0_wall = await asyncio.to_thread(kill9, dclient, victim_cid)

    async def status_replaced() -> bool:
        s = await stack.orch.status(name, live=False)
        return any(p.ready and p.id != victim.id for p in s.pods) and all(p.id != victim.id for p in s.pods)

    async def removed() -> bool:
        return not await asyncio.to_thread(dclient.api.containers, all=True,
                                           filters=label_filter({constants.LABEL_POD: victim.id}))

    http, t_status, t_removed = await asyncio.gather(
        first_answer(dclient, labels, t0=t0, exclude_ids=before, interval_s=args.poll, timeout_s=args.timeout),
        poll_until(status_replaced, t0=t0, interval_s=args.status_poll, timeout_s=args.timeout),
        poll_until(removed, t0=t0, interval_s=args.status_poll, timeout_s=args.timeout),
    )
    if http["elapsed_s"] is None:
        raise RuntimeError(f"{name}: no replacement answered /health within {args.timeout}s")
    return {
        "service": name,
        "killed_pod": victim.id,
        "killed_pid": pid,
        "pod_age_at_kill_s": rnd(age, 1),
        "http_s": rnd(http["elapsed_s"]),
        "replacement_container_seen_s": rnd(http["first_seen_s"]),
        "status_replaced_s": rnd(t_status),
        "dead_container_removed_s": rnd(t_removed),
        "load_average": load,
        "breakdown": await heal_breakdown(stack, name, victim.id, t0_wall),
        "path": await heal_path(stack, dclient, name, victim.id, victim_cid, http, t0_wall),
    }


async def heal_path(stack, dclient, name: str, old_pod: str, dead_cid: str, http: dict[str, Any],
                    t0_wall: float) -> dict[str, Any] | None:
    """The heal path's milestones (s since the kill) and steps (ms): bench/lib/healpath.py."""
    from hms_mgmt import constants

    try:
        service_wf = constants.service_workflow_id(name)
        marks, costs = await workflow_marks(stack.client, service_wf, f"{service_wf}-heal-{old_pod}", t0_wall)
        marks.update(await asyncio.to_thread(docker_marks, dclient, dead_cid, http.get("container"), t0_wall))
    except Exception as e:  # noqa: BLE001 - a figure we could not read is reported missing, not fatal
        print(f"  (heal path of {name} not read: {e})", flush=True)
        return None
    at = {k: rnd(v - t0_wall) for k, v in marks.items()}
    at.update(kill=0.0, http=rnd(http["elapsed_s"]))
    return {"at_s": dict(sorted(at.items(), key=lambda kv: kv[1])), "steps_ms": steps_ms(at), "activities_ms": costs}


# --- peer: docker run --restart=always -------------------------------------------------------


def peer_start(dclient, image: str, run_label: str) -> str:
    ct = dclient.containers.run(
        image,
        detach=True,
        ports={"8080/tcp": ("127.0.0.1", None)},
        labels={PEER_LABEL: "1", f"{PEER_LABEL}.run": run_label},
        environment={"PORT": "8080"},
        restart_policy={"Name": "always"},
    )
    return ct.id


async def wait_answering(dclient, labels: dict[str, str], timeout_s: float) -> None:
    r = await first_answer(dclient, labels, t0=time.perf_counter(), timeout_s=timeout_s)
    if r["elapsed_s"] is None:
        raise RuntimeError(f"containers {labels} never answered /health")


async def measure_peer(dclient, cid: str, run_label: str, args) -> dict[str, Any]:
    labels = {PEER_LABEL: "1", f"{PEER_LABEL}.run": run_label}
    age = await asyncio.to_thread(container_age_s, dclient, cid)
    restarts_before = (await asyncio.to_thread(dclient.api.inspect_container, cid))["RestartCount"]
    load = loadavg()
    pid, t0, _ = await asyncio.to_thread(kill9, dclient, cid)
    http = await first_answer(dclient, labels, t0=t0, interval_s=args.poll, timeout_s=args.timeout)
    info = await asyncio.to_thread(dclient.api.inspect_container, cid)
    if http["elapsed_s"] is None:
        raise RuntimeError(f"peer {cid[:12]} did not answer /health again within {args.timeout}s")
    if info["RestartCount"] != restarts_before + 1 or info["State"]["Pid"] == pid:
        raise RuntimeError(f"peer {cid[:12]}: unexpected restart state {info['RestartCount']} / pid {pid}")
    return {
        "container": cid[:12],
        "killed_pid": pid,
        "pod_age_at_kill_s": rnd(age, 1),
        "http_s": rnd(http["elapsed_s"]),
        "container_running_again_seen_s": rnd(http["first_seen_s"]),
        "restart_count": info["RestartCount"],
        "load_average": load,
    }


# --- (a) one pair ------------------------------------------------------------------------------


async def run_pair(stack, k: int, dclient, args) -> tuple[dict[str, Any], dict[str, Any]]:
    name = f"bench-heal-a{k}-{uuid.uuid4().hex[:4]}"
    run_label = f"a{k}-{uuid.uuid4().hex[:6]}"
    # Set both up, let both age past --min-age together, then measure one after the other.
    peer_cid = await asyncio.to_thread(peer_start, dclient, args.image, run_label)
    try:
        st, cids = await deploy_ours(stack, name, dclient, args)
        await wait_answering(dclient, {PEER_LABEL: "1", f"{PEER_LABEL}.run": run_label}, args.timeout)
        await wait_age(dclient, [*cids, peer_cid], min_age(args, 5.0))
        ours_first = k % 2 == 0
        if ours_first:
            r = await measure_ours_crash(stack, name, st, cids, dclient, args)
            await asyncio.sleep(args.settle)
            p = await measure_peer(dclient, peer_cid, run_label, args)
        else:
            p = await measure_peer(dclient, peer_cid, run_label, args)
            await asyncio.sleep(args.settle)
            r = await measure_ours_crash(stack, name, st, cids, dclient, args)
        r["order"] = p["order"] = "ours first" if ours_first else "peer first"
    finally:
        await asyncio.to_thread(remove_containers, dclient, {f"{PEER_LABEL}.run": run_label})
        await undeploy_and_sweep(stack, dclient, name)
    return r, p


# --- (b) one hung pod --------------------------------------------------------------------------


async def run_hung(stack, k: int, mode: str, dclient, args) -> dict[str, Any]:
    from hms_mgmt import constants

    name = f"bench-heal-b{k}-{uuid.uuid4().hex[:4]}"
    interval, failures = args.b_interval, args.b_failures
    try:
        st, cids = await deploy_ours(stack, name, dclient, args, health_interval_s=interval, health_failures=failures)
        await wait_age(dclient, cids, min_age(args, args.b_interval))
        if not await watch_armed(stack, name, {p.id for p in st.pods}):
            raise RuntimeError(f"{name}: no watch_pods activity is watching its pods")
        victim = st.pods[0]
        labels = {constants.LABEL_SERVICE: name, constants.LABEL_NODE: stack.settings.node}
        before = set(cids)
        load = loadavg()
        url = f"http://{victim.endpoint}/admin/{'health' if mode == 'failing' else 'hang'}"
        body = {"failing": True} if mode == "failing" else {}
        t0_wall = time.time()
        t0 = time.perf_counter()
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
            resp.raise_for_status()
        t_switched = time.perf_counter() - t0

        async def removed() -> bool:
            return not await asyncio.to_thread(dclient.api.containers, all=True,
                                               filters=label_filter({constants.LABEL_POD: victim.id}))

        async def status_replaced() -> bool:
            s = await stack.orch.status(name, live=False)
            return any(p.ready and p.id != victim.id for p in s.pods) and all(p.id != victim.id for p in s.pods)

        http, t_removed, t_status = await asyncio.gather(
            first_answer(dclient, labels, t0=t0, exclude_ids=before, interval_s=args.poll, timeout_s=args.timeout),
            poll_until(removed, t0=t0, interval_s=args.poll, timeout_s=args.timeout),
            poll_until(status_replaced, t0=t0, interval_s=args.status_poll, timeout_s=args.timeout),
        )
        if http["elapsed_s"] is None or t_removed is None:
            raise RuntimeError(f"{name}: hung pod not replaced/removed within {args.timeout}s: {http} {t_removed}")
        total = max(http["elapsed_s"], t_removed)
        return {
            "service": name,
            "mode": mode,
            "bad_pod": victim.id,
            "switch_request_s": rnd(t_switched),
            "replacement_http_s": rnd(http["elapsed_s"]),
            "bad_pod_removed_s": rnd(t_removed),
            "status_replaced_s": rnd(t_status),
            "total_s": rnd(total),
            "load_average": load,
            "breakdown": await heal_breakdown(stack, name, victim.id, t0_wall),
        }
    finally:
        await undeploy_and_sweep(stack, dclient, name)


# --- main ----------------------------------------------------------------------------------------


def med_breakdown(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median over runs of the critical path of a heal, seconds since t0."""
    keys: dict[str, list[float]] = {}
    for r in rows:
        b = r.get("breakdown") or {}
        for k in ("watch_returned_s", "emits_before_heal_s", "heal_child_initiated_s", "heal_workflow_started_s",
                  "heal_workflow_closed_s"):
            if b.get(k) is not None:
                keys.setdefault(k, []).append(b[k])
        for k in ("pick_node_s", "start_pod_s", "wait_pod_ready_s", "stop_pod_s"):
            if b.get(k):
                keys.setdefault(f"{k[:-2]}_scheduled_s", []).append(b[k][0])
                keys.setdefault(f"{k[:-2]}_completed_s", []).append(b[k][1])
    order = ["watch_returned_s", "emits_before_heal_s", "heal_child_initiated_s", "heal_workflow_started_s", "pick_node_scheduled_s", "pick_node_completed_s", "start_pod_scheduled_s",
             "start_pod_completed_s", "wait_pod_ready_scheduled_s", "wait_pod_ready_completed_s",
             "stop_pod_scheduled_s", "stop_pod_completed_s", "heal_workflow_closed_s"]
    return {k: rnd(median(keys[k])) for k in order if k in keys}



async def measure_a(stack, dclient, args, bench_run: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(a): alternating pairs, SIGKILL of ours and of Docker's; the warm-ups dropped."""
    ours: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    for k in range(0 if args.skip_a else args.warmup + args.runs):
        tag = "" if k >= args.warmup else " (warm-up, not counted)"
        r, p = await run_pair(stack, k, dclient, args)
        print(f"(a) pair {k}{tag} [{r['order']}]: ours replacement answers {r['http_s']:.3f}s "
              f"(status {r['status_replaced_s']}, dead removed {r['dead_container_removed_s']}) | "
              f"docker restart answers {p['http_s']:.3f}s | load {r['load_average']}", flush=True)
        if bench_run.source_changed():
            r["source_changed"] = True
            print("  WARNING: product sources changed on disk since the start", flush=True)
        if k >= args.warmup:
            ours.append(r)
            peer.append(p)
        await asyncio.sleep(args.settle)
    return ours, peer


async def measure_b(stack, dclient, args, modes: list[str]) -> list[dict[str, Any]]:
    """(b): each mode once per run, the order reversed every other run."""
    hung: list[dict[str, Any]] = []
    for k in range(args.runs if modes else 0):
        for j, mode in enumerate(modes if k % 2 == 0 else list(reversed(modes))):
            h = await run_hung(stack, k * len(modes) + j, mode, dclient, args)
            print(f"(b) run {k} {mode}: replacement answers {h['replacement_http_s']:.3f}s, bad pod removed "
                  f"{h['bad_pod_removed_s']:.3f}s -> {h['total_s']:.3f}s | load {h['load_average']}", flush=True)
            hung.append(h)
            await asyncio.sleep(args.settle)
    return hung


def figures_a(ours: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, Any]:
    fig = {
        "ours_replacement_http": summary([r["http_s"] for r in ours], "_s"),
        "ours_status_replaced": summary([r["status_replaced_s"] for r in ours], "_s"),
        "ours_dead_container_removed": summary([r["dead_container_removed_s"] for r in ours], "_s"),
        "peer_docker_restart_http": summary([p["http_s"] for p in peer], "_s"),
    }
    peer_med = fig["peer_docker_restart_http"]["median_s"]
    ours_med = fig["ours_replacement_http"]["median_s"]
    return {"figures": fig, "ratio": ours_med / peer_med if ours_med is not None and peer_med else None}


def figures_b(hung: list[dict[str, Any]], modes: list[str], floor_b: float) -> dict[str, Any]:
    fig_b: dict[str, Any] = {}
    for mode in modes:
        rows = [h for h in hung if h["mode"] == mode]
        med = median([h["total_s"] for h in rows])
        fig_b[mode] = {
            "total": summary([h["total_s"] for h in rows], "_s"),
            "replacement_http": summary([h["replacement_http_s"] for h in rows], "_s"),
            "bad_pod_removed": summary([h["bad_pod_removed_s"] for h in rows], "_s"),
            "status_replaced": summary([h["status_replaced_s"] for h in rows], "_s"),
            "ratio_to_floor": rnd(med / floor_b) if med is not None else None,
            "over_floor_s": rnd(med - floor_b) if med is not None else None,
            "pass": med is not None and med <= floor_b + SLACK_B,
            "breakdown_median_s": med_breakdown(rows),
        }
    return fig_b


def report_a(a: dict[str, Any], ours: list[dict[str, Any]], args) -> None:
    fig = a["figures"]
    print(f"(a) SIGKILL -> a pod answers /health again, {len(ours)} pairs (alternating), poll {args.poll:g}s")
    rows = [("ours: replacement answers /health", "ours_replacement_http", a["ratio"]),
            ("ours: status() shows replacement ready", "ours_status_replaced", None),
            ("ours: dead container removed", "ours_dead_container_removed", None),
            ("peer: docker --restart=always", "peer_docker_restart_http", 1.0)]
    print_table([[label, fig[k]["median_s"], fig[k]["max_s"], x] for label, k, x in rows],
                ["side", "median s", "max s", "x peer"])
    print("  where our time goes (median, s since kill):", med_breakdown(ours))
    report_path(ours)


def heal_path_summary(ours: list[dict[str, Any]]) -> dict[str, Any]:
    """Each step of the heal path (ms, median and p95 over the runs) and each activity's cost."""
    paths = [r["path"] for r in ours if r.get("path")]
    return {"steps_ms": step_table(paths), "activities_ms": activity_costs(paths), "n": len(paths)}


def report_path(ours: list[dict[str, Any]]) -> None:
    summary_ = heal_path_summary(ours)
    print("  the heal path, step by step (ms; ends at: median s since the kill):")
    print_table([[step, f["median_ms"], f["p95_ms"], f["ends_at_s"]] for step, f in summary_["steps_ms"].items()],
                ["step", "median ms", "p95 ms", "ends at s"])
    print("  activities (scheduled -> completed, ms):",
          {k: v["median_ms"] for k, v in summary_["activities_ms"].items()})


def report_b(fig_b: dict[str, Any], args, floor_b: float) -> None:
    print(f"\n(b) hung pod -> replacement answers and bad pod removed; health_interval_s={args.b_interval:g}, "
          f"health_failures={args.b_failures}: floor {floor_b:g}s, target <= {floor_b + SLACK_B:g}s")
    print_table(
        [[mode, f["total"]["median_s"], f["total"]["max_s"], f["replacement_http"]["median_s"],
          f["bad_pod_removed"]["median_s"], f["ratio_to_floor"], "PASS" if f["pass"] else "FAIL"]
         for mode, f in fig_b.items()],
        ["mode", "median s", "max s", "repl. answers", "bad removed", "x floor", "verdict"],
    )
    for mode, f in fig_b.items():
        print(f"  where the time goes ({mode}, median, s since switch):", f["breakdown_median_s"])


def verdict_lines(ratio_a: float | None, fig_b: dict[str, Any], floor_b: float) -> list[str]:
    lines = []
    if ratio_a is not None:
        lines.append(f"(a) ratio ours/peer = {ratio_a:.2f}x, target <= {TARGET_A}x: {verdict(ratio_a, TARGET_A)}")
    for mode, f in fig_b.items():
        lines.append(f"(b/{mode}) {f['total']['median_s']}s = {f['ratio_to_floor']}x floor {floor_b:g}s, "
                     f"target <= {floor_b + SLACK_B:g}s: {'PASS' if f['pass'] else 'FAIL'}")
    return lines


def payload(a: dict[str, Any], fig_b: dict[str, Any], runs: dict[str, list[dict[str, Any]]], args,
            modes: list[str], access: dict[str, Any]) -> dict[str, Any]:
    floor_b = args.b_failures * args.b_interval
    return {
        "what": "(a) seconds from SIGKILL of a pod's main process to a pod answering /health again, ours "
                "(replacement pod) vs Docker --restart=always (in place); (b) seconds from a pod turning "
                "unhealthy/hung to a replacement answering /health and the bad pod removed, vs "
                "health_failures x health_interval_s",
        "image": args.image, "replicas": args.replicas, "runs": args.runs, "warmup_pairs": args.warmup,
        "poll_interval_s": args.poll, "status_poll_interval_s": args.status_poll,
        "min_pod_age_s": {"a": min_age(args, 5.0), "b": min_age(args, args.b_interval)},
        "access": access,
        "router": "builtin, a process of its own" if not args.no_router else None,
        "a": {
            "spec": {"health_interval_s": 5.0, "health_failures": 2, "min_replicas": args.replicas,
                     "max_replicas": args.replicas},
            "peer_description": "docker run -d --restart=always (docker SDK), same image, SIGKILL of State.Pid; "
                                "same poller (label discovery + GET /health every poll interval)",
            "target_ratio": TARGET_A, "ratio": rnd(a["ratio"]),
            "pass": a["ratio"] is not None and a["ratio"] <= TARGET_A,
            "figures": a["figures"], "breakdown_median_s": med_breakdown(runs["ours"]),
            "heal_path": heal_path_summary(runs["ours"]),
            "ours": runs["ours"], "peer": runs["peer"],
        },
        "b": {
            "spec": {"health_interval_s": args.b_interval, "health_failures": args.b_failures, "stop_grace_s": 10.0},
            "detection_floor_s": floor_b, "target_s": floor_b + SLACK_B,
            "headline_mode": modes[0] if modes else None,
            "figures": fig_b, "runs": runs["hung"],
        },
    }


async def main(args) -> int:
    use_source(args.source)
    bench_run = Run(NAME)
    bench_run.announce(args.source)
    dclient = docker_client()
    if not require_image(dclient, args.image):
        return 2
    modes = [m for m in args.b_modes.split(",") if m]
    node = None
    # Without a router, the worker still names one, where nobody listens: no drain is confirmed.
    from bench.lib import ports

    edge = {"routers": [f"http://127.0.0.1:{ports.free_port()}"]} if args.no_router else {"router_engine": "builtin"}
    try:
        async with hms_stack("docker", **edge) as stack:
            node = stack.settings.node
            access = grant_access(stack, [args.image])
            remove_containers(dclient, {PEER_LABEL: "1"})
            ours, peer = await measure_a(stack, dclient, args, bench_run)
            hung = await measure_b(stack, dclient, args, modes)
    finally:
        sweep_node(dclient, node, {PEER_LABEL: "1"})
        dclient.close()
    floor_b = args.b_failures * args.b_interval
    a, fig_b = figures_a(ours, peer), figures_b(hung, modes, floor_b)
    print()
    if ours:
        report_a(a, ours, args)
    if hung:
        report_b(fig_b, args, floor_b)
    print("\n" + "\n".join(verdict_lines(a["ratio"], fig_b, floor_b)))
    bench_run.done(payload(a, fig_b, {"ours": ours, "peer": peer, "hung": hung}, args, modes, access))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--runs", type=int, default=5, help="counted pairs for (a), runs per mode for (b) (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted (a) pairs first (default 1)")
    ap.add_argument("--replicas", type=int, default=1, help="pods of the service under test (default 1)")
    ap.add_argument("--poll", type=float, default=POLL_S, help="outside /health poll interval, both sides (0.05)")
    ap.add_argument("--status-poll", type=float, default=0.25, help="status()/removal poll for secondary figures")
    ap.add_argument("--min-age", type=float, default=None,
                    help="pods live this long before the kill (default: max(10, 3 x health_interval_s) + 2 s, "
                         "i.e. past hms-mgmt's 'died young' threshold: 17 s in (a), 12 s in (b))")
    ap.add_argument("--b-modes", default="failing,hang", help="(b) modes, first is the headline ('' to skip)")
    ap.add_argument("--b-interval", type=float, default=1.0, help="(b) health_interval_s (default 1)")
    ap.add_argument("--b-failures", type=int, default=2, help="(b) health_failures (default 2)")
    ap.add_argument("--skip-a", action="store_true", help="only run (b)")
    ap.add_argument("--no-router", action="store_true",
                    help="no router beside the worker: a drain is never confirmed, so a bad pod is "
                         "stopped only drain_s after its heal began")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between measurements (default 1 s)")
    return parse_common(ap, argv, timeout_s=90.0, image=EXAMPLE_IMAGE)


if __name__ == "__main__":
    run_main(main, parse_args())
