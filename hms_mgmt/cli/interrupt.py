"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is a weakref
callback or a ``__del__`` (an import frees its module lock in one), the interpreter prints
"Exception ignored" and goes on. Under load, with a command's imports still running, ``hms status
--watch`` then watched on for good. So the CLI's SIGINT handler also remembers the Ctrl-C, and the
command's event loop (:func:`hms_mgmt.cli.common._run`) ends on it, before or while it runs.
Only the standard library here: the handler is set before the CLI's heavy imports start.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading

interrupted = threading.Event()


def on_sigint(signum: int, frame: object) -> None:
    interrupted.set()
    raise KeyboardInterrupt


def catch_interrupts() -> None:
    """Make :func:`on_sigint` the SIGINT handler, unless someone else set one of their own; and
    ``kill -USR1`` prints where every thread of the command is (to stderr), for a command that
    seems stuck."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, on_sigint):
        signal.signal(signal.SIGINT, on_sigint)
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL and sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError, RuntimeError):  # no real stderr (a test runner's)
            faulthandler.register(signal.SIGUSR1, file=sys.stderr.fileno(), all_threads=True)
