"""The router benchmark's pure parts: wrk's output parsed, and latency figures that count the
requests still unanswered when a run ends (wrk's own figures leave them out). Pure; < 1 s."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.router import (  # noqa: E402
    judge,
    latency_summary,
    littles_mean_ms,
    p99_below,
    parse_wrk,
    print_summary,
    shown,
)

# Debian wrk 4.1's output, one pod stalled: 128 requests completed, none of the stalled ones in a figure.
WRK_STALLED = """Running 8s test @ http://127.0.0.1:40001/bench-router/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    45.12ms    9.80ms  73.20ms   71.09%
    Req/Sec     8.00      3.10    20.00     80.00%
  Latency Distribution
     50%   43.89ms
     75%   47.10ms
     90%   48.98ms
     99%   54.46ms
  128 requests in 8.00s, 5.78MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 1
Requests/sec:     16.00
Transfer/sec:    739.84KB
"""


def test_parse_wrk_reads_rate_quantiles_mean_max_and_errors() -> None:
    r = parse_wrk(WRK_STALLED)
    assert (r["rps"], r["requests"]) == (16.0, 128)
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == (43.89, 48.98, 54.46)
    assert (r["mean_ms"], r["max_ms"]) == (45.12, 73.2)
    assert r["socket_errors_by_kind"] == {"connect": 0, "read": 2, "write": 0, "timeout": 3}
    assert (r["non_2xx"], r["socket_errors"], r["errors"]) == (1, 5, 6)
    assert parse_wrk(WRK_STALLED.replace("54.46ms", "1.20s"))["p99_ms"] == 1200.0


def test_unfinished_requests_raise_the_p99_that_completed_ones_alone_hide() -> None:
    done = [40.0 + i % 10 for i in range(200)]  # 200 fast answers, 40-49 ms
    alone = latency_summary(done, [])
    assert (alone["p99_ms"], alone["p99_exact"], alone["unfinished"]) == (49.0, True, 0)
    # 100 more parked behind a stalled pod, cut after 1-7.9 s of waiting: a third of the requests.
    cut = [1000.0 + 69 * i for i in range(100)]
    s = latency_summary(done, cut)
    assert (s["sent"], s["completed"], s["unfinished"]) == (300, 200, 100)
    assert (s["p50_ms"], s["p50_exact"]) == (47.0, True)  # rank 150 of 300: still a completed request
    assert (s["p99_ms"], s["p99_exact"]) == (1000.0 + 69 * 96, False)  # rank 297: an unfinished one, a lower bound
    assert (s["max_ms"], s["max_exact"]) == (1000.0 + 69 * 99, False)
    assert shown(s, "p99") == ">=7624" and shown(s, "p50") == "47"


def test_a_request_cut_early_makes_even_a_completed_quantile_a_lower_bound() -> None:
    # One request cut after 30 ms could have taken longer than the 60 ms p99: not exact.
    s = latency_summary([10.0] * 196 + [60.0] * 3, [30.0])
    assert (s["p99_ms"], s["p99_exact"]) == (60.0, False)
    assert latency_summary([], []) == {"sent": 0, "completed": 0, "unfinished": 0}


def test_p99_below_needs_ours_exact_and_lower() -> None:
    nginx = latency_summary([44.0] * 200, [7000.0] * 100)  # ">= 7000"
    assert p99_below(latency_summary([160.0] * 300, []), nginx)
    assert not p99_below(latency_summary([8000.0] * 300, []), nginx)
    # ours below nginx's number but itself only a lower bound: not shown to be below
    assert not p99_below(latency_summary([40.0] * 200, [500.0] * 100), nginx)
    assert not p99_below({}, nginx)


def test_littles_law_mean_is_connections_over_throughput() -> None:
    assert littles_mean_ms(64, 16.0) == 4000.0  # 64 connections, 16 completed a second: 4 s each on average
    assert littles_mean_ms(64, 1340.0) == 47.8
    assert littles_mean_ms(64, None) is None and littles_mean_ms(64, 0.0) is None


def _run(rps: float, wrk_p99: float, done: list[float], cut: list[float], errors: int = 0) -> dict:
    return {"rps": rps, "p50_ms": 44.0, "p99_ms": wrk_p99, "errors": errors,
            "littles_mean_ms": littles_mean_ms(64, rps),
            "probe": dict(latency_summary(done, cut), rate=40.0, errors=0)}


def test_a_full_runs_slow_p99_verdicts_rest_on_the_probe_and_both_p99s_are_printed(capsys) -> None:
    fast = _run(1500.0, 50.0, [45.0] * 300, [])
    base_rounds = {p: [fast] * 3 for p in ("direct", "builtin", "haproxy", "nginx", "haproxy-rr")}
    # The figures measured with one pod stalled: nginx's wrk p99 of its 128 completed requests
    # is the smallest, its probe shows a third of the requests unanswered for seconds.
    slow = {"builtin": _run(1340.0, 170.0, [60.0] * 295 + [180.0] * 5, []),
            "haproxy": _run(1300.0, 130.0, [48.0] * 300, []),
            "nginx": _run(16.0, 54.46, [7.0] * 200, [500.0 + 25 * i for i in range(100)]),
            "haproxy-rr": _run(16.0, 50.0, [7.0] * 200, [500.0 + 25 * i for i in range(100)])}
    kill = {p: _run(1500.0, 60.0, [45.0] * 300, [], errors=int(p == "haproxy-rr") * 96) for p in slow}
    results = {"base": {p: runs[1] for p, runs in base_rounds.items()}, "slow": slow, "kill": kill}
    ratios, verdicts, _ = judge(results, base_rounds)
    assert ratios["slow_p99_builtin_vs_nginx"] == 3.122  # wrk alone: builtin 3x worse than nginx
    assert verdicts["slow_builtin p99 < nginx"] and verdicts["slow_haproxy p99 < nginx"]
    assert ratios["slow_probe_p99_builtin_vs_nginx"] == round(180.0 / 2900.0, 3)
    assert all(verdicts.values())
    # A slow pod the engine does not steer around shows in its probe p99, and the verdict fails.
    slow["builtin"] = _run(1340.0, 170.0, [60.0] * 200, [400.0 + 20 * i for i in range(100)])
    ratios, verdicts, base_ratio = judge(results, base_rounds)
    assert not verdicts["slow_builtin p99 < nginx"]
    print_summary(results, base_ratio, ratios, verdicts, 40.0)
    out = capsys.readouterr().out
    assert "FAIL  slow_builtin p99 < nginx" in out and "PASS  slow_haproxy p99 < nginx" in out
    assert ">=2900" in out and "100/300" in out and "4000.0" in out  # nginx: probe p99, unfinished, C/rps
    assert "wrk, completed only: builtin 3.122" in out


def test_the_fast_phase_is_judged_per_round_against_nginx(capsys) -> None:
    base = _run(1500.0, 50.0, [45.0] * 300, [])
    base_rounds = {p: [base] * 3 for p in ("direct", "builtin", "haproxy", "nginx", "haproxy-rr")}
    nginx = [_run(r, 20.0, [5.0] * 300, []) for r in (15000.0, 9000.0, 12000.0)]
    fast_rounds = {"direct": [], "nginx": nginx, "haproxy-rr": nginx,
                   "haproxy": [_run(r, 20.0, [5.0] * 300, []) for r in (15500.0, 8000.0, 12500.0)],
                   "builtin": [_run(r, 30.0, [9.0] * 300, []) for r in (6000.0, 4000.0, 6500.0)]}
    ok = {p: _run(1500.0, 50.0, [45.0] * 300, []) for p in ("builtin", "haproxy", "nginx", "haproxy-rr")}
    results = {"base": {p: runs[1] for p, runs in base_rounds.items()},
               "fast": {p: runs[1] for p, runs in fast_rounds.items() if runs}, "slow": ok, "kill": ok}
    ratios, verdicts, base_ratio = judge(results, base_rounds, fast_rounds)
    # per round: haproxy 1.033, 0.889, 1.042 -> median 1.033; builtin 0.4, 0.444, 0.542 -> 0.444
    assert ratios["fast_haproxy_vs_nginx"] == 1.033 and ratios["fast_builtin_vs_nginx"] == 0.444
    assert verdicts["fast_haproxy >= 1.0x nginx"] and not verdicts["fast_builtin >= 0.5x nginx"]
    print_summary(results, base_ratio, ratios, verdicts, 40.0)
    assert "FAIL  fast_builtin >= 0.5x nginx" in capsys.readouterr().out
    # Without a fast phase (an older run, or --phases without it) there is no fast verdict.
    assert not any(k.startswith("fast") for k in judge(results, base_rounds)[1])
