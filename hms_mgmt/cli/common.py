"""What every command shares: the app object, error handling, settings, the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from enum import IntEnum
from typing import Any, TypeVar

import typer
from temporalio.exceptions import TemporalError
from temporalio.service import RPCError

from hms_mgmt import auth
from hms_mgmt.cli import interrupt
from hms_mgmt.cli.render import _fail
from hms_mgmt.config import Settings
from hms_mgmt.errors import (
    AccessDenied,
    ApprovalRejected,
    HmsError,
    ImageUntrusted,
    RequestRefused,
    ServiceNotFound,
    SpecError,
)
from hms_mgmt.logtext import setup_logging
from hms_mgmt.orchestrator import Orchestrator

T = TypeVar("T")


app = typer.Typer(
    name="hms",
    help="Deploy, watch and operate HMS micro-services on Temporal.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold tokens
    rich_markup_mode=None,
)


class Exit(IntEnum):
    """The exit codes scripts can tell apart (README: "Scripting")."""

    DONE = 0
    ERROR = 1  # anything else: Temporal unreachable, a deploy that failed, a pod runtime error
    INVALID = 2  # invalid input: a bad spec or option (the usage errors' code too)
    REFUSED = 3  # access denied, governance rejected, image untrusted, a request refused
    NOT_FOUND = 4  # no such service (or pod, record)
    TIMED_OUT = 5  # waited longer than --timeout (or an approval's timeout)


_EXIT_FOR: list[tuple[type[BaseException], Exit]] = [
    (SpecError, Exit.INVALID),
    (TimeoutError, Exit.TIMED_OUT),  # before ApprovalRejected: ApprovalTimedOut is both
    ((AccessDenied, ApprovalRejected, ImageUntrusted, RequestRefused), Exit.REFUSED),  # type: ignore[list-item]
    (ServiceNotFound, Exit.NOT_FOUND),
]


def exit_code(e: BaseException) -> Exit:
    return next((code for kinds, code in _EXIT_FOR if isinstance(e, kinds)), Exit.ERROR)


def _cli_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """User errors become one red line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from hms_mgmt.runtimes.base import PodRuntimeError

        interrupt.catch_interrupts()
        try:
            return fn(*args, **kwargs)
        except (HmsError, PodRuntimeError, TimeoutError) as e:
            raise _fail(str(e) or "timed out", exit_code(e)) from None
        except RPCError as e:
            raise _fail(f"Temporal: {e.message}", 1) from None
        except TemporalError as e:
            raise _fail(f"Temporal: {e}", 1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `hms events | head`: the reader is gone, which is not an error.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
            raise typer.Exit(0) from None
        finally:
            interrupt.interrupted.clear()  # this command's Ctrl-C, answered

    return wrapper


# The command line's settings: the global options (--state-dir, --address), and what `hms up`
# learns (the dev server's address). Every command builds its Settings from these, on top of
# the environment and config.yaml; nothing is written to os.environ.
_cli_overrides: dict[str, Any] = {}


def _set_cli_overrides(**values: Any) -> None:
    """Start a command line over: the main callback calls this once per invocation."""
    _cli_overrides.clear()
    _add_cli_overrides(**values)


def _add_cli_overrides(**values: Any) -> None:
    _cli_overrides.update({k: v for k, v in values.items() if v is not None})


def _settings(**overrides: Any) -> Settings:
    """Settings for this command: the command line's overrides, then ``overrides``, on top of the
    environment and config.yaml. ``settings.reload()`` keeps both."""
    return Settings.from_env(**{**_cli_overrides, **overrides})


INTERRUPT_GRACE_S = 5.0  # how long a command has to unwind after Ctrl-C before its loop is left


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, except on Ctrl-C (:mod:`hms_mgmt.cli.interrupt`, also one that came before
    the loop ran and was swallowed): the command's task is cancelled and has ``INTERRUPT_GRACE_S``
    to unwind, then KeyboardInterrupt — whatever swallowed the cancel, and whatever thread is
    still blocked (none is waited for). A command that sets its own SIGINT handler on the loop
    (`hms up`, the worker, the dashboard) replaces this one."""
    # Every client made here uses hms_mgmt.connection's runtime, which its atexit hook drops
    # before the interpreter finalizes: a command exits cleanly with no os._exit.
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(coro)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    executor = _DaemonThreads()
    loop.set_default_executor(executor)
    stop = asyncio.Event()
    try:
        main = loop.create_task(coro)
        loop.add_signal_handler(signal.SIGINT, lambda: (interrupt.interrupted.set(), stop.set()))
        if interrupt.interrupted.is_set():
            stop.set()
        loop.run_until_complete(_until_done_or_interrupted(main, stop))
        if stop.is_set():
            raise KeyboardInterrupt
        return main.result()
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
        interrupt.catch_interrupts()
        _close_loop(loop, executor)


class _DaemonThreads(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor (``to_thread``): a daemon thread per call, so one still blocked
    when the command ends holds neither the loop's clean-up nor the interpreter's exit."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def work() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - the caller's to raise
                    future.set_exception(e)

        threading.Thread(target=work, name="hms-cli-thread", daemon=True).start()
        return future


async def _until_done_or_interrupted(main: asyncio.Task[Any], stop: asyncio.Event) -> None:
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not main.done():
            main.cancel()
            await asyncio.wait({main}, timeout=INTERRUPT_GRACE_S)
    finally:
        stopping.cancel()


def _close_loop(loop: asyncio.AbstractEventLoop, executor: _DaemonThreads) -> None:
    """``asyncio.run``'s clean-up, each step bounded: a task that ignores its cancel, an async
    generator that hangs in its ``finally``, a thread blocked in ``to_thread`` are left behind."""
    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=INTERRUPT_GRACE_S))
        gens = loop.create_task(loop.shutdown_asyncgens())
        loop.run_until_complete(asyncio.wait({gens}, timeout=INTERRUPT_GRACE_S))
    finally:
        executor.shutdown(wait=False)
        asyncio.set_event_loop(None)
        loop.close()


async def _connect(settings: Settings | None = None) -> Orchestrator:
    return await Orchestrator.connect(settings or _settings())


def _setup_logging(level: int) -> None:
    setup_logging(level, datefmt="%H:%M:%S")


def _quiet_temporal_core() -> None:
    """Only errors from the SDK's Rust core: a demo interrupted mid-rollout would otherwise print
    warnings about activities that finished after their workflow was cancelled (expected then)."""
    from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

    from hms_mgmt import connection

    telemetry = TelemetryConfig(logging=LoggingConfig(filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")))
    connection.set_runtime(Runtime(telemetry=telemetry))


def _signer(settings: Settings) -> str:
    """Who signs: the configured identity if it verifies, else the login name."""
    try:
        return auth.verify_token(settings.token, state_dir=settings.state_dir).user
    except HmsError:
        return os.environ.get("USER") or "operator"


# --- the local stack: `hms up` and `hms demo` ----------------------------------------------
