"""The latency budget's verdict (bench/budget.py): pure logic over result files."""

from __future__ import annotations

from bench import budget


def _results(**medians: float) -> dict:
    return {"control_steps_ms": {k: {"n": 3, "median_ms": v, "p95_ms": v * 2} for k, v in medians.items()},
            "git_commit": "abc", "load_average_before": [1.0, 1.0, 1.0]}


def test_a_step_over_half_again_its_budget_fails_and_others_pass() -> None:
    rec = budget.record(_results(authorize=10.0, pick_node=40.0, emit_event=5.0))
    assert set(rec["steps"]) == {"authorize", "pick_node"}  # only the control steps are budgeted
    rows = {step: ok for step, _, _, ok in budget.check(rec, _results(authorize=15.0, pick_node=61.0))}
    assert rows == {"authorize": True, "pick_node": False}


def test_a_step_no_longer_measured_fails() -> None:
    rec = budget.record(_results(authorize=10.0, issue_ticket=8.0))
    rows = {step: ok for step, _, _, ok in budget.check(rec, _results(authorize=9.0))}
    assert rows == {"authorize": True, "issue_ticket": False}


def test_main_exit_code(tmp_path) -> None:
    import json

    res, bud = tmp_path / "deploy.json", tmp_path / "budget.json"
    res.write_text(json.dumps(_results(authorize=10.0)))
    assert budget.main(["record", "--results", str(res), "--budget", str(bud)]) == 0
    assert budget.main(["check", "--results", str(res), "--budget", str(bud)]) == 0
    res.write_text(json.dumps(_results(authorize=16.0)))
    assert budget.main(["check", "--results", str(res), "--budget", str(bud)]) == 1
