"""What ``hms events`` prints of an event's text: an event's reason and service can hold what a
refused caller sent (a request path, a query value), and a terminal acts on control sequences.
They are written out, so an operator following the events sees them and nothing else happens."""

from __future__ import annotations

from datetime import UTC, datetime

from hms_mgmt.cli.render import shown
from hms_mgmt.cli.watch import event_line
from hms_mgmt.events import Event


def test_an_events_control_sequences_are_printed_not_obeyed():
    ev = Event(type="access.denied", service="x\x1b]0;owned\x07", time=datetime(2026, 12, 5, tzinfo=UTC),
               reason="GET /api/services/\x1b[2J\x1b]52;c;cGF5bG9hZA==\x07/pods \x9b6n\nnext line")
    line = event_line(ev)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line), repr(line)
    assert "\\x1b[2J" in line and "\\x07" in line and "\\x0a" in line and "\\x9b" in line
    assert shown("Zahlung für hms-ach: 12,50 €") == "Zahlung für hms-ach: 12,50 €"  # printable text as it is
