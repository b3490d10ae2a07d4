"""Where the time went: activity and workflow times read from a workflow's history."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any


async def activity_timeline(client, workflow_id: str) -> dict[str, Any]:
    """Scheduled/started/completed wall times (unix seconds) of each activity, plus the
    workflow's start/close, read from the history of ``workflow_id``."""
    from temporalio.api.enums.v1 import EventType as ET

    hist = await client.get_workflow_handle(workflow_id).fetch_history()
    acts: dict[int, dict[str, Any]] = {}
    marks: list[dict[str, Any]] = []
    wf: dict[str, float] = {}
    for ev in hist.events:
        t = ev.event_time.ToDatetime(tzinfo=_dt.UTC).timestamp()
        et = ev.event_type
        if et == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            wf["started"] = t
        elif et in (ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
                    ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
                    ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW):
            wf["closed"] = t
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            acts[ev.event_id] = {"type": a.activity_type.name, "scheduled": t}
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            a = ev.activity_task_started_event_attributes
            if a.scheduled_event_id in acts:
                acts[a.scheduled_event_id]["started"] = t
                acts[a.scheduled_event_id]["attempt"] = a.attempt
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            a = ev.activity_task_completed_event_attributes
            if a.scheduled_event_id in acts:
                acts[a.scheduled_event_id]["completed"] = t
        elif et in (ET.EVENT_TYPE_ACTIVITY_TASK_FAILED, ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT):
            sid = (ev.activity_task_failed_event_attributes.scheduled_event_id
                   if et == ET.EVENT_TYPE_ACTIVITY_TASK_FAILED
                   else ev.activity_task_timed_out_event_attributes.scheduled_event_id)
            if sid in acts:
                acts[sid]["completed"] = t
                acts[sid]["failed"] = True
        elif et == ET.EVENT_TYPE_MARKER_RECORDED:
            local = local_activity(ev.marker_recorded_event_attributes, t)
            if local is not None:
                acts[ev.event_id] = local
        else:
            name = ET.Name(et).removeprefix("EVENT_TYPE_")
            if name in ("WORKFLOW_TASK_SCHEDULED", "WORKFLOW_TASK_STARTED", "WORKFLOW_TASK_COMPLETED"):
                marks.append({"event": name, "t": t})
            elif name in ("START_CHILD_WORKFLOW_EXECUTION_INITIATED", "CHILD_WORKFLOW_EXECUTION_STARTED",
                          "CHILD_WORKFLOW_EXECUTION_COMPLETED", "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
                          "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED", "EXTERNAL_WORKFLOW_EXECUTION_SIGNALED",
                          "WORKFLOW_EXECUTION_SIGNALED"):
                entry: dict[str, Any] = {"event": name, "t": t}
                if name == "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES":
                    fields = ev.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
                    if "HmsPhase" in fields:
                        entry["phase"] = json.loads(fields["HmsPhase"].data or b'""')
                marks.append(entry)
    wfts = sum(1 for m in marks if m["event"] == "WORKFLOW_TASK_COMPLETED")
    return {"workflow": wf, "activities": list(acts.values()), "marks": marks,
            "events": len(hist.events), "workflow_tasks": wfts}


def _unix(value: Any) -> float | None:
    """A protobuf timestamp as JSON (RFC 3339 text or {seconds, nanos}) -> unix seconds."""
    if isinstance(value, dict):
        return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
    if isinstance(value, str):
        import re

        m = re.match(r"(.*?)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
        if m:
            tz = "+00:00" if m.group(3) == "Z" else m.group(3)
            return _dt.datetime.fromisoformat(f"{m.group(1)}{(m.group(2) or '.0')[:7]}{tz}").timestamp()
    return None


def local_activity(attrs: Any, recorded: float) -> dict[str, Any] | None:
    """A local activity's marker -> the same shape as an activity's entry (``local`` True):
    scheduled at its first attempt's schedule time (the worker's clock), completed when its
    result was recorded in history (the marker's own ``complete_time`` is the workflow's time
    plus the run time, not a wall-clock time)."""
    if attrs.marker_name != "core_local_activity" or "data" not in attrs.details:
        return None
    payloads = attrs.details["data"].payloads
    if not payloads:
        return None
    try:
        data = json.loads(payloads[0].data)
    except ValueError:
        return None
    scheduled = _unix(data.get("original_schedule_time"))
    if scheduled is None:
        return None
    return {"type": data.get("activity_type", "?"), "scheduled": min(scheduled, recorded), "started": scheduled,
            "completed": recorded, "attempt": data.get("attempt", 1), "local": True}
