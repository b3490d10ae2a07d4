"""The control path's latency budget: each control step's median and p95 (ms, activity
scheduled -> completed, local activities included) as read from the workflow histories of a
``bench/deploy.py`` run, against the budget recorded in ``bench/budget.json``.

    .venv/bin/python bench/budget.py check    # exit 1 if a step's median grew > 50 % over its budget
    .venv/bin/python bench/budget.py record   # the last deploy run's figures become the budget

``make bench-budget`` runs a short deploy benchmark, then ``check``. Budgets hold on the machine
they were recorded on (its load is in the file): record again after moving to another one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` puts bench/ first

from bench.lib import REPO  # noqa: E402

RESULTS = REPO / "bench" / "results" / "deploy.json"
BUDGET = REPO / "bench" / "budget.json"
SLACK = 0.5  # a step fails when its median is more than this much over its budget
# Control steps of a deploy, as activity types (the histories' names), and what they are.
STEPS = {
    "authorize": "authorize the request proof",
    "check_governance": "governance policy",
    "verify_image": "image signed and safe, on each node",
    "issue_ticket": "the revision's admission ticket",
    "pick_node": "placement (the Scheduler; a local activity in a first rollout: until its workflow task "
                 "completes, after the round's grants)",
    "stamp_round": "per round of pod starts: the trust stamps, every pod at once",
    "start_tickets": "per round of pod starts: the start tickets, every pod at once",
    "start_pod": "per pod: container create + start + first answer on its node",
    "publish_endpoints": "feed push to the routers",
}


def measured(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steps = results.get("control_steps_ms") or {}
    return {k: steps[k] for k in STEPS if k in steps}


def check(budget: dict[str, Any], results: dict[str, Any], slack: float = SLACK) -> list[tuple[str, Any, Any, bool]]:
    """(step, budget median, measured median, ok) for each budgeted step; a step that was not
    measured fails (a renamed or dropped step must be recorded again on purpose)."""
    now = measured(results)
    rows = []
    for step, b in budget["steps"].items():
        m = (now.get(step) or {}).get("median_ms")
        ok = m is not None and m <= b["median_ms"] * (1 + slack)
        rows.append((step, b["median_ms"], m, ok))
    return rows


def record(results: dict[str, Any]) -> dict[str, Any]:
    return {
        "what": "control steps of bench/deploy.py, ms from activity scheduled to completed (median, p95)",
        "git_commit": results.get("git_commit"), "timestamp": results.get("timestamp"),
        "load_average_before": results.get("load_average_before"),
        "load_average_after": results.get("load_average_after"),
        "steps": {k: {"median_ms": v["median_ms"], "p95_ms": v["p95_ms"], "n": v["n"], "what": STEPS[k]}
                  for k, v in measured(results).items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("check", "record"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--budget", type=Path, default=BUDGET)
    ap.add_argument("--slack", type=float, default=SLACK, help="allowed growth of a median (default 0.5 = 50 %%)")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    if args.action == "record":
        args.budget.write_text(json.dumps(record(results), indent=2) + "\n")
        print(f"recorded {len(measured(results))} steps in {args.budget}")
        return 0
    rows = check(json.loads(args.budget.read_text()), results, args.slack)
    print(f"{'step':<20} {'budget ms':>10} {'now ms':>10}  verdict (median <= budget x {1 + args.slack:g})")
    for step, b, m, ok in rows:
        print(f"{step:<20} {b:>10} {m if m is not None else '-':>10}  {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
