"""Text that came from outside, made safe to show on a terminal or in a log line.

An event's reason and service can hold what a refused caller sent, a status message what an
approver wrote, a log line what a pod wrote: :func:`shown` writes their control characters out,
and :class:`LogFormatter` keeps each log message one line with them written out, in every
process of ours that logs to a terminal (the CLI, the worker, the router).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# C0 and C1 control characters and DEL, as ``\xNN``; bidi overrides and isolates and the line
# and paragraph separators, as ``\uNNNN``: text that came from outside (an event's reason and
# service can hold what a refused caller sent, a status message what an approver wrote, a log
# line what a pod wrote) cannot move the cursor, clear the screen, retitle the window, write the
# clipboard, start a line of its own or read backwards on an operator's terminal.
_CONTROLS = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}


def shown(text: str) -> str:
    """``text`` with its control characters written out (see :data:`_CONTROLS`)."""
    return text.translate(_CONTROLS)


class LogFormatter(logging.Formatter):
    """Log lines for a terminal: a message is one line, its control characters written out
    (:func:`~hms_mgmt.cli.render.shown`). A message may quote what a caller sent with no token (a
    refused request's path, a query value): it can neither forge a log line of its own nor drive
    the operator's terminal. A traceback keeps its lines; each is escaped alike."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        escaped = logging.makeLogRecord(record.__dict__)
        escaped.message = shown(record.message)
        return super().formatMessage(escaped)

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return _lines_shown(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _lines_shown(super().formatStack(stack_info))


def _lines_shown(text: str) -> str:
    return "\n".join(shown(line) for line in text.split("\n"))


def setup_logging(level: int, *, datefmt: str | None = None) -> None:
    """A plain handler on stderr with :class:`LogFormatter`. Plain: workflow code logs from
    inside Temporal's sandbox, where a handler that imports lazily (as Rich's does) fails."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
