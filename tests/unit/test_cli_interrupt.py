"""Ctrl-C ends a command's event loop (``hms_mgmt.cli.common._run``) whatever it lands on: one
the interpreter swallowed before the loop ran, a task that swallows its cancel, a thread that
never returns. Each case runs in its own process with a real SIGINT; on plain ``asyncio.run``
each of them ran on for good."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PRELUDE = """
import asyncio, os, signal, sys, threading, weakref
from hms_mgmt.cli import common  # sets the CLI's SIGINT handler, as `hms` does
common.INTERRUPT_GRACE_S = 0.5

def ctrl_c_soon():
    asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGINT)
"""

CASES = {
    # A KeyboardInterrupt raised in a weakref callback (as during an import, when a module lock
    # is freed) is printed as "Exception ignored" and dropped by the interpreter.
    "swallowed before the loop": """
        class Dropped: pass
        def callback(_): signal.raise_signal(signal.SIGINT)
        obj = Dropped(); ref = weakref.ref(obj, callback); del obj
        async def command():
            while True:
                await asyncio.sleep(0.1)
    """,
    "a task that swallows its cancel": """
        async def command():
            ctrl_c_soon()
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    pass
    """,
    "a thread that never returns": """
        async def command():
            ctrl_c_soon()
            await asyncio.to_thread(threading.Event().wait)
    """,
}


@pytest.mark.parametrize("case", list(CASES))
def test_ctrl_c_ends_the_command(case: str) -> None:
    script = PRELUDE + textwrap.dedent(CASES[case]) + textwrap.dedent("""
        try:
            common._run(command())
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """)
    # As from a terminal: Ctrl-C at its default (a test runner's worker may ignore SIGINT, and a
    # child inherits that).
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stderr
    # The interpreter prints the swallowed one ("Exception ignored"); nothing else is printed.
    assert "Traceback" not in result.stderr.split("KeyboardInterrupt")[-1], result.stderr
