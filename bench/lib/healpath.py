"""Where one heal's time goes: milestones of the heal path after a pod's death, in seconds since
the kill, read from Docker (the die event, the replacement container's own created/started
times), the service's and the heal's workflow histories (activities, local ones included) and
the outside poller; and each step between two milestones in milliseconds.

``STEPS`` names each step, in the order a heal takes them, and what it spans; a step whose
milestones a run lacks is left out of that run. Steps overlap where the work does: with the
placement and the grants as local activities, "heal first task" holds both.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from bench.lib.history import activity_timeline
from bench.lib.stats import median, pct, rnd

# (step, what it spans, from milestone, to milestone); milestones are keys of the marks read below.
STEPS: list[tuple[str, str, str, str]] = [
    ("exit event", "SIGKILL -> Docker's die event", "kill", "die_event"),
    ("watch returns", "die event -> watch_pods returned with the exit (node worker)", "die_event", "watch_returned"),
    ("service reacts", "-> the service workflow started the heal child (its task)", "watch_returned", "heal_initiated"),
    ("heal child start", "-> HealWorkflow started (server)", "heal_initiated", "heal_started"),
    ("heal task pickup", "-> the control worker took the heal's first task", "heal_started", "heal_task.started"),
    ("heal first task", "-> that task completed: placement and grants when local, up to start_pod",
     "heal_task.started", "heal_task.completed"),
    ("pick_node", "the Scheduler: caller check, node table, other services' pods", "pick_node.scheduled",
     "pick_node.completed"),
    ("grants (stamp + ticket)", "trust stamp and start ticket, side by side -> start_pod scheduled",
     "pick_node.completed", "start_pod.scheduled"),
    ("pod task pickup", "start_pod taken by the node, ticket and stamp checked -> container created",
     "start_pod.scheduled", "container_created"),
    ("container start", "created -> started (Docker)", "container_created", "container_started"),
    ("first answer", "started -> the poller's first 200 from /health", "container_started", "http"),
    ("start_pod returns", "-> start_pod completed (the node saw it answer)", "http", "start_pod.completed"),
    ("report check", "the node's signed report on the replacement checked", "check_pod_report.scheduled",
     "check_pod_report.completed"),
    ("feed push", "publish_endpoints with the replacement, to the routers", "publish_endpoints.scheduled",
     "publish_endpoints.completed"),
]
# Activities whose own cost (scheduled -> completed, ms) is recorded per heal.
COSTED = ("watch_pods", "emit_event", "pick_node", "stamp_start", "start_ticket", "start_pod", "check_pod_report",
          "publish_endpoints", "stop_grant", "stop_pod")


def docker_time(value: str) -> float | None:
    """Docker's RFC 3339 time with nanoseconds -> unix seconds."""
    m = re.match(r"(.*?)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value or "")
    if not m or value.startswith("0001"):
        return None
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return _dt.datetime.fromisoformat(f"{m.group(1)}{(m.group(2) or '.0')[:7]}{tz}").timestamp()


def docker_marks(dclient: Any, dead_id: str, replacement_id: str | None, t0_wall: float) -> dict[str, float]:
    """The dead container's ``die`` event and the replacement's created/started times (unix s)."""
    out: dict[str, float] = {}
    events = dclient.events(since=int(t0_wall) - 1, until=int(t0_wall) + 30, decode=True,
                            filters={"container": dead_id, "event": "die"})
    try:
        for ev in events:
            if ev.get("timeNano", 0) / 1e9 >= t0_wall - 0.001:
                out["die_event"] = ev["timeNano"] / 1e9
                break
    finally:
        events.close()
    if replacement_id:
        attrs = dclient.api.inspect_container(replacement_id)
        for key, value in (("container_created", attrs["Created"]), ("container_started", attrs["State"]["StartedAt"])):
            t = docker_time(value)
            if t is not None:
                out[key] = t
    return out


def local_ends(acts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Local activities with the end the worker saw: their marker is written only when the
    workflow task completes (every local activity of one task at the same time), so one
    followed by another step ends, at the latest, when the workflow scheduled that step (steps
    scheduled together with it, within a millisecond, run beside it: the trust stamp and the
    start ticket)."""
    out = []
    for a in acts:
        if a.get("local") and "completed" in a:
            nxt = [b["scheduled"] for b in acts if b is not a and a["scheduled"] + 0.001 < b["scheduled"] < a["completed"]]
            if nxt:
                a = {**a, "completed": min(nxt)}
        out.append(a)
    return out


def _first(acts: list[dict[str, Any]], kind: str, after: float) -> dict[str, Any] | None:
    xs = sorted((a for a in acts if a["type"] == kind and "completed" in a and a["scheduled"] >= after),
                key=lambda a: a["scheduled"])
    return xs[0] if xs else None


async def workflow_marks(client: Any, service_wf: str, heal_wf: str, t0_wall: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Milestones (unix s) from the service's and the heal's histories, and each costed
    activity's scheduled -> completed (ms) in the heal path."""
    svc = await activity_timeline(client, service_wf)
    heal = await activity_timeline(client, heal_wf)
    heal["activities"] = local_ends(heal["activities"])
    marks: dict[str, float] = {}
    init = next((m["t"] for m in svc["marks"] if m["event"] == "START_CHILD_WORKFLOW_EXECUTION_INITIATED"
                 and m["t"] >= t0_wall), None)
    if init is not None:
        marks["heal_initiated"] = init
        watched = [a["completed"] for a in svc["activities"] if a["type"] == "watch_pods" and "completed" in a
                   and t0_wall <= a["completed"] <= init]
        if watched:
            marks["watch_returned"] = max(watched)
    if "started" in heal["workflow"]:
        marks["heal_started"] = heal["workflow"]["started"]
    for event, key in (("WORKFLOW_TASK_STARTED", "heal_task.started"), ("WORKFLOW_TASK_COMPLETED", "heal_task.completed")):
        t = next((m["t"] for m in heal["marks"] if m["event"] == event), None)
        if t is not None:
            marks[key] = t
    for kind in ("pick_node", "start_pod"):
        a = _first(heal["activities"], kind, t0_wall)
        if a is not None:
            marks[f"{kind}.scheduled"], marks[f"{kind}.completed"] = a["scheduled"], a["completed"]
    after = marks.get("start_pod.completed", t0_wall)
    for kind in ("check_pod_report", "publish_endpoints"):
        a = _first(svc["activities"], kind, after - 0.001)
        if a is not None:
            marks[f"{kind}.scheduled"], marks[f"{kind}.completed"] = a["scheduled"], a["completed"]
    costs: dict[str, list[float]] = {}
    for a in [*svc["activities"], *heal["activities"]]:
        if a["type"] in COSTED and "completed" in a and a["scheduled"] >= t0_wall - 0.001:
            costs.setdefault(a["type"], []).append(round((a["completed"] - a["scheduled"]) * 1000, 1))
    return marks, costs


def steps_ms(at: dict[str, float]) -> dict[str, float]:
    """Each step's milliseconds from its milestones (s since the kill)."""
    return {step: round((at[b] - at[a]) * 1000, 1) for step, _, a, b in STEPS if a in at and b in at}


def step_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per step over the runs: median and p95 ms, and the median milestone it ends at (s since kill)."""
    out: dict[str, dict[str, Any]] = {}
    for step, what, _, end in STEPS:
        xs = [r["steps_ms"][step] for r in rows if step in (r.get("steps_ms") or {})]
        ends = [r["at_s"][end] for r in rows if end in (r.get("at_s") or {})]
        if xs:
            out[step] = {"what": what, "median_ms": rnd(median(xs), 1), "p95_ms": rnd(pct(xs, 0.95), 1), "n": len(xs),
                         "ends_at_s": rnd(median(ends))}
    return out


def activity_costs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per activity type over the runs: median and p95 ms from scheduled to completed."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        for kind, xs in (r.get("activities_ms") or {}).items():
            acc.setdefault(kind, []).extend(xs)
    return {k: {"median_ms": rnd(median(v), 1), "p95_ms": rnd(pct(v, 0.95), 1), "n": len(v)}
            for k, v in sorted(acc.items())}
