"""What the CLI prints of text from outside: an event's reason and service can hold what a
refused caller sent (a request path, a query value), a status message what an approver wrote, a
log line what a pod wrote; a terminal acts on control sequences, and Rich on markup. They are
written out, so an operator sees them and nothing else happens: no escape is obeyed, no line
forged, no '[/]' crashes a command."""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import UTC, datetime

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from hms_mgmt.cli import commands, render
from hms_mgmt.cli.output import Format
from hms_mgmt.cli.output import render as render_as
from hms_mgmt.cli.progress import Bars, bars, status_line
from hms_mgmt.cli.render import shown
from hms_mgmt.cli.watch import event_line, status_view
from hms_mgmt.config import Settings
from hms_mgmt.events import Event
from hms_mgmt.logtext import LogFormatter
from hms_mgmt.models import Decision, NodeSpec, PendingApproval, ServiceSpec, ServiceStatus, WaitingFor
from hms_mgmt.nodes import NodeView


def test_an_events_control_sequences_are_printed_not_obeyed():
    ev = Event(type="access.denied", service="x\x1b]0;owned\x07", time=datetime(2026, 12, 5, tzinfo=UTC),
               reason="GET /api/services/\x1b[2J\x1b]52;c;cGF5bG9hZA==\x07/pods \x9b6n\nnext line")
    line = event_line(ev)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line), repr(line)
    assert "\\x1b[2J" in line and "\\x07" in line and "\\x0a" in line and "\\x9b" in line
    assert shown("Zahlung für hms-ach: 12,50 €") == "Zahlung für hms-ach: 12,50 €"  # printable text as it is


# --- every place the CLI prints a server's or a caller's free text -------------------------

ESC_TITLE = "\x1b]0;owned\x07"
BIDI_ETC = "\u202eevil\u202c \u2066x\u2069 \u2028next\u2029 \x7f \x85"


def _unsafe(text: str) -> list[str]:
    """The characters in ``text`` a terminal would act on (or that would start a line)."""
    return [c for c in text if ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0
            or 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069 or c in "\u2028\u2029"]


def _status(*, message: str = "", reason: str = "scaled", phase: str = "Rejected", **kw) -> ServiceStatus:
    spec = ServiceSpec(name="hms-ach", image="registry.gov/hms-ach:1.4", min_replicas=1, max_replicas=2,
                       cpu_target=60)
    d = Decision(at=datetime(2026, 12, 5, tzinfo=UTC), kind="heal", pod="11111111-2222-3333-4444-555555555555",
                 reason=reason)
    return ServiceStatus(name="hms-ach", phase=phase, revision=1, spec=spec, desired_replicas=1, ready_replicas=0,
                         workflow_id="svc-hms-ach", message=message, last_decisions=[d], web_ui_url="http://x/", **kw)


def test_bidi_overrides_line_separators_c1_and_del_are_written_out():
    assert shown(BIDI_ETC) == "\\u202eevil\\u202c \\u2066x\\u2069 \\u2028next\\u2029 \\x7f \\x85"
    assert not _unsafe(shown("".join(map(chr, range(0x2000, 0x2100))) + "\r\n\t\x1b\x9b"))


def test_json_output_is_ascii_so_c1_and_bidi_are_escaped_and_still_the_same_json():
    ev = Event(type="access.denied", service="-", reason="GET /x\x9b2J " + BIDI_ETC + " 12,50 €",
               data={"request_id": "\x9d0;t\x9c"})
    for text in (render_as(ev, Format.json, stream=True), render_as(ev, Format.json)):
        assert text.isascii(), text
        assert json.loads(text)["reason"] == ev.reason


def test_a_log_line_cannot_forge_another_or_drive_the_terminal():
    record = logging.LogRecord("hms_mgmt.events", logging.INFO, __file__, 1, "event %s %s: %s",
                               ("access.denied", "x\r\n00:00:00 INFO fake: " + ESC_TITLE + BIDI_ETC, "refused"), None)
    line = LogFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and not _unsafe(line), repr(line)
    assert "\\x0d\\x0a00:00:00 INFO fake: \\x1b]0;owned\\x07\\u202e" in line
    assert record.getMessage().count("\n") == 1  # the record itself is left as it is, for other handlers
    try:
        raise ValueError("bad\x1b[2J")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = LogFormatter("%(message)s").format(failed)
    assert text.startswith("failed\nTraceback") and "ValueError: bad\\x1b[2J" in text and not _unsafe(text)


def test_a_decision_reason_or_message_with_markup_or_escapes_is_shown_as_text_on_any_console():
    st = _status(message=f"rejected by bob (policy\n2026-01-01 hms-frm Running{ESC_TITLE})",
                 reason="exited ([bold red]CRITICAL[/] [link=https://evil.example]runbook[/link] x [/] y)",
                 waiting_for=WaitingFor(kind="approval", reason=f"a gov_approver {ESC_TITLE}", command="hms approve x"),
                 pending_approval=PendingApproval(requested_by="eve\x1b[2J", requested_at=datetime(2026, 12, 5, tzinfo=UTC),
                                                  reason="[/]\u202e", spec_hash="x", invalid_attempts=["\x9b6n"]))
    settings = Settings.from_env(state_dir="/nonexistent-hms-test")
    for markup in (True, False):  # the CLI's consoles have no markup; the view must not need that
        buf = io.StringIO()
        Console(file=buf, width=400, markup=markup, color_system=None).print(status_view(settings, [st], "hms-ach"))
        text = buf.getvalue()
        assert "[bold red]CRITICAL[/] [link=https://evil.example]runbook[/link] x [/] y" in text
        assert "policy\\x0a2026-01-01" in text and "\\x1b]0;owned\\x07" in text and not _unsafe(text), repr(text)
    line = status_line(st, datetime(2026, 12, 5, tzinfo=UTC))
    assert not _unsafe(line) and "a gov_approver \\x1b]0;owned\\x07" in line
    line = status_line(st.model_copy(update={"waiting_for": None}), datetime(2026, 12, 5, tzinfo=UTC))
    assert "\n" not in line and not _unsafe(line) and "policy\\x0a2026" in line


def test_the_progress_bars_show_a_message_with_markup_as_text():
    buf = io.StringIO()
    progress = bars(Console(file=buf, force_terminal=True, width=200))
    with progress:
        task = progress.add_task("hms-ach", total=1, service="hms-ach[/]", phase="starting")
        Bars(progress, {"hms-ach": task}).update(_status(message="rejected by bob ([/] [link=https://e]d[/link])"))
    assert "rejected by bob ([/] [link=https://e]d[/link])" in buf.getvalue()


@pytest.fixture
def printed(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    for console in (render.out, render.err):  # _file: undone, the console follows sys.stdout/stderr again
        monkeypatch.setattr(console, "_file", buf)
        monkeypatch.setattr(console, "_width", 240)  # whole cells, whatever terminal the tests run in
    return buf


def test_a_node_label_with_markup_does_not_crash_hms_nodes(printed: io.StringIO):
    assert not render.out._markup and not render.err._markup
    commands._nodes_table([NodeView(spec=NodeSpec(name="n1", task_queue="q", labels={"zone": "a[/]", "l": "[link=x]y"}),
                                    state="Ready")])
    assert "zone=a[/]" in printed.getvalue() and "l=[link=x]y" in printed.getvalue()


def test_an_error_message_is_shown_and_its_later_lines_indented(printed: io.StringIO):
    render._fail(f"rejected by bob (x [/]\nerror: forged{ESC_TITLE})", 1)
    assert printed.getvalue().rstrip("\n").split("\n") == ["error: rejected by bob (x [/]",
                                                           "  error: forged\\x1b]0;owned\\x07)"]


class _Orch:
    lines = ["1234abcd@node-1 | GET / 200\x1b]0;owned\x07", "1234abcd@node-1 | \u202eevil \x9b2J [/]"]

    async def logs(self, service: str, pod: str | None, tail: int) -> list[str]:
        return self.lines

    async def follow_logs(self, service: str, pod: str | None, tail: int):
        for line in self.lines:
            yield line


@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_hms_logs_escapes_what_a_pod_wrote_after_its_prefix_unless_raw(monkeypatch, follow):
    async def connect(settings=None):
        return _Orch()

    monkeypatch.setattr(commands, "_connect", connect)
    app = typer.Typer()
    app.command()(commands.logs)
    shown_out = CliRunner().invoke(app, ["hms-ach", *follow])
    assert shown_out.exit_code == 0, shown_out.output
    assert shown_out.output.splitlines() == ["1234abcd@node-1 | GET / 200\\x1b]0;owned\\x07",
                                             "1234abcd@node-1 | \\u202eevil \\x9b2J [/]"]
    raw = CliRunner().invoke(app, ["hms-ach", "--raw", *follow])
    assert raw.exit_code == 0 and raw.output.splitlines() == _Orch.lines
