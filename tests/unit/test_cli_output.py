"""The CLI's renderers for scripts: -o json|yaml, JSON Lines, plain progress lines with their
heartbeat, what a wait says, --type filters and exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from hms_mgmt.cli.common import Exit, exit_code
from hms_mgmt.cli.output import Format, chosen, render
from hms_mgmt.cli.progress import Lines, doing, status_line, wait_text
from hms_mgmt.cli.watch import change_key
from hms_mgmt.errors import (
    AccessDenied,
    ApprovalRejected,
    ApprovalTimedOut,
    DeployFailed,
    HmsError,
    ImageUntrusted,
    ScaleRefused,
    ServiceNotFound,
    SpecError,
)
from hms_mgmt.events import Event, type_matches
from hms_mgmt.models import PodStatus, ServiceSpec, ServiceStatus, WaitingFor

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def status(**kw) -> ServiceStatus:
    spec = ServiceSpec(name="hms-ach", image="registry.gov/hms-ach:1.4", min_replicas=2, max_replicas=10,
                       cpu_target=60)
    values = dict(name="hms-ach", phase="Deploying", revision=1, spec=spec, desired_replicas=2, ready_replicas=0,
                  workflow_id="svc-hms-ach")
    values.update(kw)
    return ServiceStatus(**values)


SIGN = WaitingFor(kind="image_signature", reason="image registry.gov/hms-ach:1.4 to be signed", since=NOW,
                  until=NOW + timedelta(seconds=60), command="hms image sign registry.gov/hms-ach:1.4")


@pytest.mark.parametrize("fmt", [Format.json, Format.yaml])
def test_json_and_yaml_parse_back_into_the_models(fmt):
    statuses = [status(waiting_for=SIGN), status(name="hms-frm", phase="Running", ready_replicas=2)]
    text = render(statuses, fmt)
    doc = json.loads(text) if fmt is Format.json else yaml.safe_load(text)
    assert [ServiceStatus.model_validate(d) for d in doc] == statuses


def test_a_stream_is_one_json_object_a_line():
    events = [Event(type="pod.started", service="hms-ach", reason="ready\non two lines", time=NOW),
              Event(type="image.awaiting_signature", service="hms-ach", reason="sign it", data={"a": [1]})]
    lines = [render(ev, Format.json, stream=True) for ev in events]
    assert all("\n" not in line for line in lines)
    assert [Event.model_validate_json(line) for line in lines] == events
    assert render(events[0], Format.yaml, stream=True).startswith("---\n")


def test_the_older_json_flag_is_an_alias():
    assert chosen(Format.table, as_json=True) is Format.json
    assert chosen(Format.yaml) is Format.yaml


def test_a_wait_names_what_ends_it():
    text = wait_text(SIGN)
    assert text.startswith("waiting for image signature: image registry.gov/hms-ach:1.4 to be signed")
    assert "run `hms image sign registry.gov/hms-ach:1.4`" in text and "until " in text
    assert doing(status(waiting_for=SIGN)) == text
    assert doing(status(phase="Failed", message="image untrusted")) == "image untrusted"
    assert doing(status(phase="Running", ready_replicas=2)) == ""


def test_a_plain_line_has_time_service_phase_and_reason():
    line = status_line(status(phase="AwaitingApproval", waiting_for=WaitingFor(
        kind="approval", reason="a gov_approver to decide", command="hms approve hms-ach")), NOW)
    assert "hms-ach  AwaitingApproval  0/2 ready  waiting for approval: a gov_approver to decide" in line
    assert line.endswith("run `hms approve hms-ach`")
    assert "(still, 30s)" in status_line(status(), NOW, still_s=30)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_print_each_change_once_and_a_heartbeat_while_waiting():
    printed: list[str] = []
    clock = Clock()
    view = Lines(echo=printed.append, heartbeat_s=10, clock=clock, now=lambda: NOW)
    view.silent("hms-ach", "no service named 'hms-ach'")  # no status yet: said at once
    view.silent("hms-ach", "still none")  # ... and not again within the heartbeat
    assert len(printed) == 1 and "waiting for its workflow to answer" in printed[0]
    view.update(status(phase="VerifyingImage", waiting_for=SIGN))
    clock.t = 5
    view.update(status(phase="VerifyingImage", waiting_for=SIGN))  # nothing new, not yet due
    assert len(printed) == 2
    clock.t = 10
    view.update(status(phase="VerifyingImage", waiting_for=SIGN))  # nothing new for 10 s: a heartbeat
    assert len(printed) == 3 and "(still, 10s)" in printed[2] and "hms image sign" in printed[2]
    clock.t = 11
    view.update(status(ready_replicas=1))
    view.update(status(ready_replicas=1))
    assert len(printed) == 4 and "Deploying  1/2 ready" in printed[3]
    view.note("hms-ach", "image.awaiting_signature  run `hms image sign x`")
    assert printed[4].endswith("hms-ach  image.awaiting_signature  run `hms image sign x`")


def test_a_watch_ignores_cpu_samples_but_not_health():
    pod = PodStatus(id="p1", node="local", health="healthy", ready=True, cpu_percent=10)
    base = change_key(status(pods=[pod]))
    assert change_key(status(pods=[pod.model_copy(update={"cpu_percent": 90})])) == base
    assert change_key(status(pods=[pod.model_copy(update={"health": "unhealthy"})])) != base
    assert change_key(status(pods=[pod], waiting_for=SIGN)) != base


@pytest.mark.parametrize(("event_type", "wanted", "match"), [
    ("pod.started", [], True),
    ("pod.started", ["pod.started"], True),
    ("pod.started", ["pod."], True),
    ("pod.started", ["pod.*"], True),
    ("pod.started", ["pod"], False),
    ("podcast.started", ["pod."], False),
    ("image.awaiting_signature", ["pod.", "image.awaiting_signature"], True),
])
def test_type_filter(event_type, wanted, match):
    assert type_matches(event_type, wanted) is match


@pytest.mark.parametrize(("error", "code"), [
    (SpecError("bad"), Exit.INVALID),
    (AccessDenied("no"), Exit.REFUSED),
    (ApprovalRejected("no"), Exit.REFUSED),
    (ImageUntrusted("no"), Exit.REFUSED),
    (ScaleRefused("out of range"), Exit.REFUSED),
    (ApprovalTimedOut("late"), Exit.TIMED_OUT),
    (TimeoutError("late"), Exit.TIMED_OUT),
    (ServiceNotFound("none"), Exit.NOT_FOUND),
    (DeployFailed("crashed"), Exit.ERROR),
    (HmsError("other"), Exit.ERROR),
])
def test_exit_codes(error, code):
    assert exit_code(error) is code
