"""BENCHMARKS.md is generated from the result files as they are, and the soak's probe-lag
quantiles are read from the worker's histogram the way Prometheus reads them. Pure; < 1 s."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.soak import hist_delta, hist_quantile, share_within  # noqa: E402


def render(tmp_path: Path, results: Path) -> str:
    """BENCHMARKS.md as bench/report.py writes it from the result files in ``results``."""
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    return out.read_text()


def test_quantiles_interpolate_inside_the_bucket_and_share_within_is_exact() -> None:
    before = {0.1: 10.0, 1.0: 10.0, 2.0: 10.0, math.inf: 10.0}
    after = {0.1: 60.0, 1.0: 108.0, 2.0: 110.0, math.inf: 110.0}  # window: 50 <= 0.1 s, 48 in (0.1, 1], 2 in (1, 2]
    window = hist_delta(before, after)
    assert window[math.inf] == 100
    assert hist_quantile(window, 0.5) == 0.1
    assert math.isclose(hist_quantile(window, 0.99), 1.5)  # rank 99 of 100 is halfway into (1, 2]
    assert share_within(window, 1.0) == 0.98
    assert hist_quantile({math.inf: 0.0}, 0.99) is None


def test_report_copies_figures_verdicts_and_marks_what_a_file_lacks(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "deploy.json").write_text(json.dumps({
        "timestamp": "2026-01-02T03:04:05+00:00", "git_commit": "abc123def4567890", "argv": ["--runs", "3"],
        "load_average_before": [1.5, 1, 1], "load_average_after": [2.5, 1, 1], "target_ratio": 1.3, "ratio": 1.27,
        "ratio_http": 1.27, "pass": True, "figures": {"ours_http": {"median_s": 2.26}, "peer_http": {"median_s": 1.78}},
    }))
    (results / "soak.json").write_text(json.dumps({
        "timestamp": "2026-01-02T04:00:00+00:00", "git_commit": "fedcba9876543210+dirty", "argv": ["--quick"],
        "verdicts": {"probe_lag_p99": {"value_s": 1.4, "target_s": 1.0, "ratio": 1.4, "pass": False},
                     "replacement_max": {"value_s": 3.0, "target_s": 11.5, "ratio": 0.261, "pass": True}},
        "cost": {"load_average_1m": {"min": 3.0, "max": 9.0, "mean": 5.0}},
    }))
    (results / "mystery.json").write_text(json.dumps({"ratio": 0.5, "target": 1.0, "pass": True}))
    text = render(tmp_path, results)
    assert "| [deploy](#deploy) | PASS | 2026-01-02 03:04 | `abc123def456` | before 1.5, after 2.5 |" in text
    assert "| 10 pods answer /health (s, median) | 2.26 | 1.78 | 1.27 | <= 1.3x | PASS |" in text
    assert "Command: `.venv/bin/python bench/deploy.py --runs 3`" in text
    assert "| [soak](#soak) | FAIL (1 of 2) |" in text and "during 3.0–9.0 (mean 5.0)" in text
    assert "`fedcba987654+dirty`" in text
    # Figures the soak file does not hold are "-", never made up.
    assert "| worker CPU (cores) / RSS max (MB) | - / - |" in text
    assert "| [mystery](#mystery) | PASS |" in text


def test_router_slow_p99_verdict_row_is_the_probes_with_wrks_beside_it(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    slow = {
        "builtin": {"rps": 1340.0, "p99_ms": 170.0, "errors": 0,
                    "probe": {"sent": 300, "unfinished": 0, "p99_ms": 181.0, "p99_exact": True}},
        "nginx": {"rps": 16.0, "p99_ms": 54.46, "errors": 0,
                  "probe": {"sent": 300, "unfinished": 98, "p99_ms": 7600.0, "p99_exact": False}},
    }
    (results / "router.json").write_text(json.dumps({
        "results": {"slow": slow}, "targets": {"slow_throughput": 1.5},
        "ratios": {"slow_probe_p99_builtin_vs_nginx": 0.024, "slow_p99_builtin_vs_nginx": 3.12},
        "verdicts": {"slow_builtin p99 < nginx": True},
    }))
    text = render(tmp_path, results)
    assert ("| one slow pod: p99 ms, builtin (probe, unfinished requests counted) | 181 (0 of 300 unfinished) | "
            ">= 7,600 (98 of 300 unfinished) | 0.024 | < 1x | PASS |") in text
    # wrk's p99 of completed requests is shown, but carries no verdict.
    assert "| one slow pod: p99 ms, builtin (wrk, completed requests only) | 170 | 54.5 | 3.12 |  |  |" in text


def test_ramp_names_the_first_figure_to_miss_its_target_at_the_smallest_size() -> None:
    from bench.soak import first_to_break, spread

    ok_step = {"services": 100, "pods": 200, "deploys_failed": 0, "probe_lag_p99_s": 0.1, "whole_p99_s": 2.0,
               "not_replaced": 0, "worker_cpu_cores": 0.3}
    late = {**ok_step, "services": 300, "pods": 600, "probe_lag_p99_s": 1.4, "whole_p99_s": 6.0}
    worse = {**late, "services": 500, "pods": 1000, "deploys_failed": 3}
    assert first_to_break([ok_step]) is None
    # At 300 both the lag and kill -> whole miss: the lag is named (targets are checked in a fixed order).
    assert first_to_break([ok_step, late, worse]) == {"figure": "probe lag p99 (s)", "services": 300, "pods": 600,
                                                      "value": 1.4, "target": 1.0}
    assert first_to_break([ok_step, {**ok_step, "services": 200, "whole_p99_s": None}]) is None  # no kills: no verdict
    # Fewer than 100 kills: nearest rank makes the p99 the worst one.
    assert spread([1.0, 2.0, 9.0]) == {"median_s": 2.0, "p95_s": 9.0, "p99_s": 9.0, "max_s": 9.0}


def test_report_renders_the_soak_p99_sqlite_and_the_ramp_table(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "soak.json").write_text(json.dumps({
        "verdicts": {"probe_lag_p99": {"value_s": 0.2, "target_s": 1.0, "ratio": 0.2, "pass": True},
                     "whole_again_p99": {"value_s": 6.5, "target_s": 5.0, "ratio": 1.3, "p50_s": 1.5, "p95_s": 4.0,
                                         "max_s": 6.5, "not_replaced": 0, "pass": False}},
        "sqlite": {"start_mb": 12.5, "end_mb": 20.0, "growth_kb_per_service_hour": 153.6},
        "history": {"all_workflows": {"events_per_service_hour": 42.0}},
    }))
    (results / "soak_ramp.json").write_text(json.dumps({
        "steps": [{"services": 100, "pods": 200, "deploys_failed": 0, "deploy_per_service_median_s": 2.0,
                   "deploy_per_service_p95_s": 3.0, "probe_lag_p99_s": 0.1},
                  {"services": 200, "pods": 400, "deploys_failed": 0, "probe_lag_p99_s": 1.2}],
        "first_to_break": {"figure": "probe lag p99 (s)", "services": 200, "pods": 400, "value": 1.2, "target": 1.0},
        "argv": ["--ramp", "100,200"],
    }))
    text = render(tmp_path, results)
    assert "| pod killed -> service whole again, p99 (s) | 6.5 | - | 1.3 | <= 5.0 s | FAIL |" in text
    assert "|   same, p50 / p95 / max (s); kills not replaced | 1.5 / 4 / 6.5; 0 |" in text
    assert "| dev server's sqlite file: window start / end (MB); growth per service-hour (KB) | 12.5 / 20; 154 |" in text
    assert "| history events per service-hour (every service workflow and child on the queue) | 42 |" in text
    assert "| 100 | 200 | 0 | 2 / 3 | - / - | 0.1 |" in text
    assert "First to miss its target: **probe lag p99 (s)** = 1.2 (target <= 1) at **200 services** (400 pods)." in text
    assert "| [soak_ramp](#soak_ramp) | FAIL (1 of 1) |" in text
    assert "Command: `.venv/bin/python bench/soak.py --ramp 100,200`" in text


def test_heal_section_carries_the_heal_path_step_by_step(tmp_path: Path) -> None:
    from bench.lib.healpath import local_ends, step_table, steps_ms

    # Two heals' milestones (s since the kill); the local pick_node ends when the grants are scheduled.
    acts = local_ends([{"type": "pick_node", "scheduled": 10.0, "completed": 10.05, "local": True},
                       {"type": "stamp_start", "scheduled": 10.02, "completed": 10.05, "local": True},
                       {"type": "start_ticket", "scheduled": 10.0201, "completed": 10.05, "local": True}])
    assert [round(a["completed"], 4) for a in acts] == [10.02, 10.05, 10.05]
    runs = [{"at_s": {"kill": 0.0, "die_event": 0.04, "watch_returned": 0.05, "http": 0.4, "container_started": 0.3},
             "activities_ms": {"pick_node": [12.0]}},
            {"at_s": {"kill": 0.0, "die_event": 0.06, "watch_returned": 0.08}, "activities_ms": {"pick_node": [14.0]}}]
    for r in runs:
        r["steps_ms"] = steps_ms(r["at_s"])
    table = step_table(runs)
    assert table["exit event"]["median_ms"] == 50.0 and table["exit event"]["n"] == 2
    assert table["first answer"] == {"what": table["first answer"]["what"], "median_ms": 100.0, "p95_ms": 100.0,
                                     "n": 1, "ends_at_s": 0.4}
    results = tmp_path / "results"
    results.mkdir()
    (results / "heal.json").write_text(json.dumps({
        "timestamp": "2026-01-02T03:04:05+00:00", "git_commit": "abc123def4567890", "argv": [],
        "a": {"ratio": 1.1, "target_ratio": 1.26, "pass": True,
              "figures": {"ours_replacement_http": {"median_s": 0.5}, "peer_docker_restart_http": {"median_s": 0.45}},
              "heal_path": {"n": 2, "steps_ms": table, "activities_ms": {"pick_node": {"median_ms": 13.0, "p95_ms": 14.0,
                                                                                      "n": 2}}}},
    }))
    text = render(tmp_path, results)
    assert "| exit event | SIGKILL -> Docker's die event | 50 | 60 | 0.05 |" in text
    assert "| pick_node | 13 | 14 | 2 |" in text
