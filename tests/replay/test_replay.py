"""Every recorded history (tests/replay/histories/, made by scripts/record_histories.py from real
runs: deploy, heal, crash loop, scale, approval, continue-as-new, rollouts, the NodeRegistry,
secrets) replays on today's workflow code with no non-determinism error.

A failure here means a workflow change would break executions that are running now: the worker
would fail their workflow tasks after an upgrade. Guard an intentional change with
``workflow.patched("why")`` (old histories take the old branch, new runs the new one), keep the
old histories, and record new ones beside them. No server is needed: the Replayer runs the
workflow code against the stored events alone.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, WorkflowReplayResult

from workflows import ALL_WORKFLOWS, MessageGuard

HISTORIES = Path(__file__).parent / "histories"
# What the recorder must keep covered; a scenario dropped by mistake fails here.
SCENARIOS = {"deploy", "heal", "crashloop", "scale", "approval", "continue_as_new", "rollout", "registry",
             "secrets", "capacity"}


def load(path: Path) -> WorkflowHistory:
    data = json.loads(path.read_text())
    return WorkflowHistory.from_json(data["workflow_id"], data)


def history_files() -> list[Path]:
    """``histories/<set>/<scenario>/*.json``: one set per recording, older sets kept while runs
    of that code may still be in flight (they show the ``workflow.patched`` branches replay)."""
    return sorted(HISTORIES.glob("*/*/*.json"))


def test_every_scenario_and_workflow_type_is_recorded():
    files = history_files()
    assert {f.parent.name for f in files} == SCENARIOS
    newest = max(f.parent.parent.name for f in files)
    assert {f.parent.name for f in files if f.parent.parent.name == newest} == SCENARIOS, \
        f"the newest set ({newest}) must record every scenario"
    types = set()
    continued = 0
    for f in files:
        first = load(f).events[0].workflow_execution_started_event_attributes
        types.add(first.workflow_type.name)
        continued += bool(first.continued_execution_run_id)
    assert types == {w.__name__ for w in ALL_WORKFLOWS}
    assert continued >= 2, "no run that began from a continue-as-new (ServiceWorkflow and NodeRegistry)"


async def test_recorded_histories_replay_without_nondeterminism():
    files = history_files()
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter,
                        interceptors=[MessageGuard()])

    async def histories() -> AsyncIterator[WorkflowHistory]:
        for f in files:
            yield load(f)

    failures = {}
    # One replay worker for all of them (a worker per history costs ~0.5 s each).
    async with replayer.workflow_replay_iterator(histories()) as results:
        async for f, result in _zip(files, results):
            if result.replay_failure is not None:
                failures[f"{f.parent.name}/{f.name}"] = repr(result.replay_failure)
    assert not failures, "histories that no longer replay:\n" + "\n".join(f"{k}: {v}" for k, v in failures.items())


async def _zip(files: list[Path], results: AsyncIterator[WorkflowReplayResult]
               ) -> AsyncIterator[tuple[Path, WorkflowReplayResult]]:
    for f in files:
        yield f, await anext(results)


@pytest.mark.parametrize("path", history_files()[:1], ids=lambda p: p.parent.name)
async def test_a_tampered_history_fails_replay(path: Path):
    """The check is live: a history whose first command changed type does not replay."""
    data = json.loads(path.read_text())
    for ev in data["events"]:
        if ev["eventType"] in ("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED", "EventTypeActivityTaskScheduled"):
            ev["activityTaskScheduledEventAttributes"]["activityType"]["name"] = "not_an_activity_we_call"
            break
    else:
        pytest.fail(f"{path.name} schedules no activity")
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter,
                        interceptors=[MessageGuard()])
    result = await replayer.replay_workflow(WorkflowHistory.from_json(data["workflow_id"], data),
                                            raise_on_replay_failure=False)
    assert result.replay_failure is not None
