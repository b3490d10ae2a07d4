"""Write ``BENCHMARKS.md`` from the latest ``bench/results/*.json``: for every benchmark its
figures against its peer (or its absolute target), the verdicts, the command, when, at which
commit and under what machine load it ran. ``make bench`` runs it last.

    .venv/bin/python bench/report.py [--out BENCHMARKS.md]

Figures are copied from the JSON, never recomputed or edited here; a figure a result file does
not hold is shown as "-".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ORDER = ("deploy", "heal", "scale", "router", "rollout", "hostloss", "soak", "soak_ramp")

Row = list[Any]  # figure, ours, peer (or target basis), ratio, target, verdict


def get(d: Any, *path: str | int) -> Any:
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)  # type: ignore[arg-type]
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def ok(flag: Any) -> str:
    return "-" if flag is None else ("PASS" if flag else "FAIL")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v).replace("|", "\\|")


# --- one adapter per benchmark: its result file's own field names -----------------------------


def deploy_rows(d: dict[str, Any]) -> list[Row]:
    f = d.get("figures") or {}
    t = d.get("target_ratio")
    rows: list[Row] = [
        ["10 pods answer /health (s, median)", get(f, "ours_http", "median_s"), get(f, "peer_http", "median_s"),
         d.get("ratio_http", d.get("ratio")), f"<= {t}x", ok(d.get("pass"))],
    ]
    if "ours_status" in f:  # files from before the cold-script deploy benchmark
        rows.append(["status() shows 10 healthy (s)", get(f, "ours_status", "median_s"), get(f, "peer_http", "median_s"),
                     d.get("ratio_status"), "", ""])
    # The critical path of a cold script: each milestone's median time since the script was spawned.
    peer = {step["milestone"]: step["at_s"] for step in get(d, "critical_path", "peer") or []}
    for step in get(d, "critical_path", "ours") or []:
        rows.append([f"  path: {step['milestone']} (s since spawn; step)", step["at_s"], peer.get(step["milestone"]),
                     None, f"step {fmt(step['step_s'])} s", ""])
    return rows


def heal_rows(d: dict[str, Any]) -> list[Row]:
    a, b = d.get("a") or {}, d.get("b") or {}
    rows = [["(a) SIGKILL -> replacement answers (s, median)", get(a, "figures", "ours_replacement_http", "median_s"),
             get(a, "figures", "peer_docker_restart_http", "median_s"), a.get("ratio"),
             f"<= {a.get('target_ratio')}x", ok(a.get("pass"))]]
    for mode, f in (b.get("figures") or {}).items():
        rows.append([f"(b) {mode} pod -> replaced and removed (s, median)", get(f, "total", "median_s"),
                     f"floor {b.get('detection_floor_s')}", f.get("ratio_to_floor"), f"<= {b.get('target_s')} s",
                     ok(f.get("pass"))])
    return rows


def heal_path_lines(d: dict[str, Any]) -> list[str]:
    """(a)'s heal path step by step, and each activity's own cost on it (ms over the runs)."""
    path = get(d, "a", "heal_path") or {}
    steps, acts = path.get("steps_ms") or {}, path.get("activities_ms") or {}
    if not steps:
        return []
    lines = ["", f"Where the time of (a) goes, step by step ({path.get('n')} heals; ms; \"ends at\": the median "
             "seconds since the kill). Read from Docker's die event and the replacement container's created and "
             "started times, the service's and the heal's workflow histories (local activities included) and the "
             "poller (`bench/lib/healpath.py`).", "",
             "| step | what it spans | median ms | p95 ms | ends at (s) |", "|---|---|---|---|---|"]
    lines += [f"| {step} | {fmt(f.get('what'))} | {fmt(f.get('median_ms'))} | {fmt(f.get('p95_ms'))} "
              f"| {fmt(f.get('ends_at_s'))} |" for step, f in steps.items()]
    if acts:
        lines += ["", "Each activity on that path, scheduled -> completed:", "",
                  "| activity | median ms | p95 ms | n |", "|---|---|---|---|"]
        lines += [f"| {k} | {fmt(v.get('median_ms'))} | {fmt(v.get('p95_ms'))} | {fmt(v.get('n'))} |"
                  for k, v in acts.items()]
    return lines


def scale_rows(d: dict[str, Any]) -> list[Row]:
    f = d.get("figures") or {}
    return [
        ["scaling decisions for 2 -> 10 pods", get(f, "ours_decisions", "median"), get(f, "seed_decisions", "median"),
         None, f"<= {d.get('target_decisions')}", ok(d.get("pass"))],
        ["seconds to 10 ready (median)", get(f, "ours_status_10_ready_s", "median"), get(f, "seed_s", "median"),
         f.get("time_ratio_ours_over_seed"), "", ""],
    ]


def probe_figure(probe: Any) -> str | None:
    """The router probe's p99 with its unfinished count; ">=" when unfinished requests make it a lower bound."""
    if not isinstance(probe, dict) or probe.get("p99_ms") is None:
        return None
    bound = "" if probe.get("p99_exact") else ">= "
    return f"{bound}{fmt(probe['p99_ms'])} ({probe.get('unfinished')} of {probe.get('sent')} unfinished)"


def router_rows(d: dict[str, Any]) -> list[Row]:
    r, res = d.get("ratios") or {}, d.get("results") or {}
    v = d.get("verdicts") or {}
    t = d.get("targets") or {}
    rows: list[Row] = [
        ["base req/s, builtin", get(res, "base", "builtin", "rps"), get(res, "base", "nginx", "rps"),
         r.get("base_builtin_vs_nginx"), f">= {t.get('base_builtin')}x", ok(v.get("base_builtin >= 0.5x nginx"))],
        ["base req/s, haproxy", get(res, "base", "haproxy", "rps"), get(res, "base", "nginx", "rps"),
         r.get("base_haproxy_vs_nginx"), f">= {t.get('base_haproxy')}x", ok(v.get("base_haproxy >= 0.9x nginx"))],
    ]
    if get(res, "fast", "nginx", "rps") is not None:
        rows += [[f"fast pods: req/s, {e}", get(res, "fast", e, "rps"), get(res, "fast", "nginx", "rps"),
                  r.get(f"fast_{e}_vs_nginx"), f">= {t.get(f'fast_{e}')}x",
                  ok(v.get(f"fast_{e} >= {t.get(f'fast_{e}')}x nginx"))] for e in ("builtin", "haproxy")]
    rows += [
        ["one slow pod: req/s, builtin", get(res, "slow", "builtin", "rps"), get(res, "slow", "nginx", "rps"),
         r.get("slow_builtin_vs_nginx"), f">= {t.get('slow_throughput')}x", ok(v.get("slow_builtin >= 1.5x nginx"))],
        ["one slow pod: req/s, haproxy", get(res, "slow", "haproxy", "rps"), get(res, "slow", "nginx", "rps"),
         r.get("slow_haproxy_vs_nginx"), f">= {t.get('slow_throughput')}x", ok(v.get("slow_haproxy >= 1.5x nginx"))],
    ]
    probed = get(res, "slow", "nginx", "probe") is not None  # files written before the probe: wrk's p99 only
    for engine in ("builtin", "haproxy"):
        if probed:
            rows.append([f"one slow pod: p99 ms, {engine} (probe, unfinished requests counted)",
                         probe_figure(get(res, "slow", engine, "probe")), probe_figure(get(res, "slow", "nginx", "probe")),
                         r.get(f"slow_probe_p99_{engine}_vs_nginx"), "< 1x", ok(v.get(f"slow_{engine} p99 < nginx"))])
        rows.append([f"one slow pod: p99 ms, {engine} (wrk, completed requests only)",
                     get(res, "slow", engine, "p99_ms"), get(res, "slow", "nginx", "p99_ms"),
                     r.get(f"slow_p99_{engine}_vs_nginx"), "" if probed else "< 1x",
                     "" if probed else ok(v.get(f"slow_{engine} p99 < nginx"))])
    for engine in ("builtin", "haproxy"):
        rows.append([f"pod killed under load: failed requests, {engine}", get(res, "kill", engine, "errors"),
                     get(res, "kill", "nginx", "errors"), None, "0", ok(v.get(f"kill_{engine} 0 errors"))])
    return rows


def rollout_rows(d: dict[str, Any]) -> list[Row]:
    m = d.get("median_s") or {}
    ratio, target = d.get("ratio_vs_start_first"), d.get("target")
    failed = d.get("failed_requests")
    return [
        ["rolling update of 4 pods (s, median)", m.get("ours"), m.get("swarm_start_first"), ratio, f"<= {target}x",
         ok(ratio is not None and target is not None and ratio <= target)],
        ["failed requests during the update", failed, None, None, "0", ok(None if failed is None else failed == 0)],
    ] + ([
        ["same, min_ready_s 0 vs Swarm's tasks all on v2 (no stability wait either side)", m.get("ours_min_ready_0"),
         m.get("swarm_start_first_converged"), d.get("ratio_min_ready_0_vs_start_first_converged"), "reported", ""],
    ] if m.get("ours_min_ready_0") is not None else [])


def soak_rows(d: dict[str, Any]) -> list[Row]:
    v, cost, h = d.get("verdicts") or {}, d.get("cost") or {}, d.get("history") or {}
    lag = v.get("probe_lag_p99") or {}
    rows: list[Row] = [
        ["health-probe lag p99 (s); peer: idle process's timer lateness p99", lag.get("value_s"),
         lag.get("peer_idle_timer_p99_s"), lag.get("ratio"), f"<= {lag.get('target_s')} s", ok(lag.get("pass"))],
    ]
    whole = v.get("whole_again_p99")
    if whole is None:  # files from before the p99 target: the max against 2 x interval + 1.5 s
        rep = v.get("replacement_max") or {}
        rows.append(["pod killed -> service whole again, max (s)", rep.get("value_s"), None, rep.get("ratio"),
                     f"<= {rep.get('target_s')} s", ok(rep.get("pass"))])
    else:
        rows += [["pod killed -> service whole again, p99 (s)", whole.get("value_s"), None, whole.get("ratio"),
                  f"<= {whole.get('target_s')} s", ok(whole.get("pass"))],
                 ["  same, p50 / p95 / max (s); kills not replaced", f"{fmt(whole.get('p50_s'))} / "
                  f"{fmt(whole.get('p95_s'))} / {fmt(whole.get('max_s'))}; {fmt(whole.get('not_replaced'))}", None,
                  None, "reported", ""]]
    sq, pods = d.get("sqlite") or {}, get(d, "deploy", "pod_memory") or {}
    rows += [
        ["worker CPU (cores) / RSS max (MB)", f"{fmt(cost.get('worker_cpu_cores'))} / "
         f"{fmt(get(cost, 'worker_rss_mb', 'max'))}" + "".join(
             f"; {role} {fmt(w.get('cpu_cores'))} / {fmt(w.get('rss_mb_max'))}"
             for role, w in (cost.get("workers") or {}).items() if len(cost.get("workers") or {}) > 1),
         None, None, "reported", ""],
        ["pods: RSS / PSS per pod (MB); Temporal dev server CPU (cores) / RSS (MB)",
         f"{fmt(pods.get('rss_mb_mean'))} / {fmt(pods.get('pss_mb_mean'))}; {fmt(cost.get('temporal_server_cpu_cores'))}"
         f" / {fmt(cost.get('temporal_server_rss_mb_end'))}", None, None, "reported", ""],
        ["history events per service-hour (every service workflow and child on the queue)",
         get(h, "all_workflows", "events_per_service_hour"), None, None, "reported", ""],
        ["history events per service-hour (calm services, median)",
         get(h, "calm_services", "events_per_service_hour_median"), None, None, "reported", ""],
        ["history events one heal adds (service + heal child, median)",
         get(h, "killed_services", "events_per_heal_median"), None, None, "reported", ""],
    ]
    if sq:
        rows.append(["dev server's sqlite file: window start / end (MB); growth per service-hour (KB)",
                     f"{fmt(sq.get('start_mb'))} / {fmt(sq.get('end_mb'))}; {fmt(sq.get('growth_kb_per_service_hour'))}",
                     None, None, "reported", ""])
    return rows


RAMP_COLUMNS = (  # (header, key of a step)
    ("services", "services"), ("pods", "pods"), ("deploys failed", "deploys_failed"),
    ("deploy s per service (median / p95)", ("deploy_per_service_median_s", "deploy_per_service_p95_s")),
    ("deploy's pick_node ms (median / most attempts)", ("deploy_pick_node_median_ms", "deploy_pick_node_attempts_max")),
    ("probe lag p99 s", "probe_lag_p99_s"), ("kill -> whole p99 s", "whole_p99_s"), ("not replaced", "not_replaced"),
    ("heal's pick_node ms (median)", "heal_pick_node_median_ms"),
    ("worker CPU cores (all / busiest process)", ("worker_cpu_cores", "busiest_worker_cpu_cores")),
    ("worker RSS max MB", "worker_rss_mb_max"),
    ("worker open files", "worker_open_files_max"), ("sqlite MB", "sqlite_end_mb"), ("load (mean)", "load_mean"),
)


def ramp_table(d: dict[str, Any]) -> str:
    """Every size of a ramp in one table, and the first figure to miss its target."""
    lines = ["| " + " | ".join(h for h, _ in RAMP_COLUMNS) + " |", "|" + "---|" * len(RAMP_COLUMNS)]
    for step in d.get("steps") or []:
        cells = [" / ".join(fmt(step.get(k)) for k in key) if isinstance(key, tuple) else fmt(step.get(key))
                 for _, key in RAMP_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    broke, steps = d.get("first_to_break"), d.get("steps") or []
    if broke:
        lines += ["", f"First to miss its target: **{broke['figure']}** = {fmt(broke['value'])} (target <= "
                      f"{fmt(broke['target'])}) at **{broke['services']} services** ({broke['pods']} pods)."]
    elif steps:
        lines += ["", f"Nothing missed its target, up to {steps[-1]['services']} services."]
    return "\n".join(lines)


def soak_ramp_rows(d: dict[str, Any]) -> list[Row]:
    broke = d.get("first_to_break")
    return [["first figure to miss its target", f"{broke['figure']} at {broke['services']} services" if broke else
             "none", None, None, "per size, below", ok(None if not d.get("steps") else broke is None)]]


def hostloss_rows(d: dict[str, Any]) -> list[Row]:
    f, t = d.get("figures") or {}, d.get("target_whole_s")
    worst = get(f, "whole_s", "max_s")
    rows = [
        ["power loss -> node Lost (s, median)", get(f, "lost_s", "median_s"), None, None, "reported", ""],
        ["power loss -> service whole again (s, median)", get(f, "whole_s", "median_s"), None, None, "", ""],
        ["power loss -> service whole again (s, max)", worst, None, None, f"<= {t} s",
         ok(None if worst is None or t is None else worst <= t)],
    ]
    for engine in ("builtin", "haproxy"):
        failed = f.get(f"{engine}_failed")
        rows.append([f"failed GETs through the {engine} engine", f"{fmt(failed)} of {fmt(f.get(f'{engine}_requests'))}",
                     None, None, "0", ok(None if failed is None else failed == 0)])
    return rows


ADAPTERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "deploy": deploy_rows, "heal": heal_rows, "scale": scale_rows, "router": router_rows, "rollout": rollout_rows,
    "hostloss": hostloss_rows, "soak": soak_rows, "soak_ramp": soak_ramp_rows,
}
EXTRAS: dict[str, Callable[[dict[str, Any]], str]] = {"soak_ramp": ramp_table}
# Tables a benchmark's section adds below its figures.
DETAILS: dict[str, Callable[[dict[str, Any]], list[str]]] = {"heal": heal_path_lines}
PEERS = {
    "deploy": "10 parallel `docker run` + the same /health poller",
    "heal": "(a) Docker `--restart=always`; (b) the detection floor health_failures x health_interval_s",
    "scale": "the seed's one-pod-per-tick rule replayed on the same CPU samples",
    "router": "Debian nginx round-robin (and a hand-configured HAProxy)",
    "rollout": "`docker service update --update-order start-first` (Swarm)",
    "hostloss": "absolute targets: the service whole again within 15 s of a host's power loss (Kubernetes: NotReady "
                "after 40 s, pods evicted after 5 min by default), 0 failed GETs",
    "soak": "absolute targets (the ratio column is measured / target); the probe lag's context is an idle "
            "asyncio process's timer lateness on the same machine in the same window",
    "soak_ramp": "the soak's targets at each size (probe lag p99 <= 1 s, kill -> whole again p99 <= 5 s, every "
                 "deploy and replacement done, the busiest worker process's CPU <= 0.9 core), services deployed in "
                 "steps",
}


def generic_rows(d: dict[str, Any]) -> list[Row]:
    return [["ratio", None, None, d.get("ratio"), d.get("target", d.get("target_ratio")), ok(d.get("pass"))]]


def stamp(d: dict[str, Any]) -> str:
    t = d.get("timestamp")
    return str(t)[:16].replace("T", " ") if t else "-"


SCRIPTS = {"soak_ramp": "soak"}  # result files a benchmark writes under another name


def command(name: str, d: dict[str, Any]) -> str:
    script = f".venv/bin/python bench/{SCRIPTS.get(name, name)}.py"
    argv = d.get("argv")
    if isinstance(argv, list):
        return " ".join([script, *argv])
    return f"{script} (arguments not recorded)"


def load_text(d: dict[str, Any]) -> str:
    parts = []
    if d.get("load_average_before"):
        parts.append(f"before {d['load_average_before'][0]}")
    during = get(d, "cost", "load_average_1m")
    if isinstance(during, dict) and during.get("mean") is not None:
        parts.append(f"during {during.get('min')}–{during.get('max')} (mean {during.get('mean')})")
    if d.get("load_average_after"):
        parts.append(f"after {d['load_average_after'][0]}")
    return ", ".join(parts) or "-"


def verdict_of(rows: list[Row]) -> str:
    vs = [r[5] for r in rows if r[5] in ("PASS", "FAIL")]
    if not vs:
        return "-"
    return "PASS" if all(v == "PASS" for v in vs) else f"FAIL ({vs.count('FAIL')} of {len(vs)})"


def budget_section(budget: dict[str, Any], deploy: dict[str, Any] | None) -> str:
    """The control path's latency budget (``bench/budget.json``) beside the latest deploy run's
    medians; ``make bench-budget`` fails when one is more than 50 % over."""
    now = (deploy or {}).get("control_steps_ms") or {}
    lines = ["## control-path latency budget", "",
             "Each control step of a deploy, ms from activity scheduled to completed (local activities: to their "
             "result in history), read from the workflow histories of `bench/deploy.py`. `make bench-budget` "
             "fails when a step's median is more than 50 % over its budget.", "",
             "| step | what | budget median ms | budget p95 ms | latest median ms | verdict |", "|---|---|---|---|---|---|"]
    for step, b in (budget.get("steps") or {}).items():
        m = get(now, step, "median_ms")
        lines.append(f"| {step} | {b.get('what', '')} | {fmt(b.get('median_ms'))} | {fmt(b.get('p95_ms'))} | {fmt(m)} "
                     f"| {ok(m is not None and m <= b['median_ms'] * 1.5)} |")
    lines += ["", f"Budget recorded from the deploy run at commit `{budget.get('git_commit')}`, "
              f"load before {(budget.get('load_average_before') or ['-'])[0]}, "
              f"after {(budget.get('load_average_after') or ['-'])[0]}"]
    amended = budget.get("amended") or {}
    if amended:
        lines[-1] += (f"; {', '.join(amended.get('steps') or [])} recorded again at commit "
                      f"`{amended.get('git_commit')}`, load before {(amended.get('load_average_before') or ['-'])[0]}: "
                      f"{amended.get('why', '')}")
    return "\n".join(lines)


def render(results: dict[str, dict[str, Any]], budget: dict[str, Any] | None = None) -> str:
    names = [n for n in ORDER if n in results] + sorted(n for n in results if n not in ORDER)
    cpu = next((get(d, "machine", "cpu_count") for d in results.values() if get(d, "machine", "cpu_count")), None)
    out = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py` from the latest `bench/results/*.json` (`make bench` runs it last; "
        "`make soak` too). Do not edit by hand: run the benchmark again.",
        "",
        "Each benchmark measures hms-mgmt against a named peer in the same run (the soak against absolute "
        "targets) on a shared "
        f"{cpu or '?'}-core machine; the load average says how busy it was. Compare ratios, not seconds, across "
        "runs. What each one measures: `bench/README.md`.",
        "",
        "| benchmark | verdict | date (UTC) | commit | load (1 min) |",
        "|---|---|---|---|---|",
    ]
    sections = []
    for name in names:
        d = results[name]
        try:
            rows = ADAPTERS.get(name, generic_rows)(d)
        except Exception as e:  # noqa: BLE001 - an unexpected file shape is shown, not fatal
            rows = [[f"unreadable result ({type(e).__name__}: {e})", None, None, None, None, "-"]]
        commit = (d.get("git_commit") or "-")
        out.append(f"| [{name}](#{name}) | {verdict_of(rows)} | {stamp(d)} | `{commit[:12]}"
                   f"{'+dirty' if commit.endswith('+dirty') else ''}` | {load_text(d)} |")
        sec = [f"## {name}", "", f"Peer: {PEERS.get(name, '-')}.", "",
               "| figure | ours | peer | ratio | target | verdict |", "|---|---|---|---|---|---|"]
        sec += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
        if name in EXTRAS:
            sec += ["", EXTRAS[name](d)]
        with contextlib.suppress(Exception):  # an unexpected shape leaves the details out, not the section
            sec += DETAILS.get(name, lambda _: [])(d)
        sec += ["", f"Command: `{command(name, d)}`  ", f"Run: {stamp(d)}, commit `{commit}`, "
                f"load {load_text(d)}"]
        if d.get("source_changed_during_run"):
            sec.append("  \n**The product sources changed on disk during this run: its figures mix code versions.**")
        sections.append("\n".join(sec))
    if budget:
        sections.append(budget_section(budget, results.get("deploy")))
    return "\n".join(out) + "\n\n" + "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--budget", type=Path, default=REPO / "bench" / "budget.json")
    args = ap.parse_args(argv)
    results = {}
    for f in sorted(args.results.glob("*.json")):
        try:
            results[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
    budget = json.loads(args.budget.read_text()) if args.budget.is_file() else None
    args.out.write_text(render(results, budget))
    print(f"wrote {args.out} ({len(results)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
