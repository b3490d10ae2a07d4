"""What every command shares: the app object, error handling, settings, the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any, TypeVar

import typer
from temporalio.exceptions import TemporalError
from temporalio.service import RPCError

from hms_mgmt import auth
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


def _run(coro: Awaitable[T]) -> T:
    # Every client made here uses hms_mgmt.connection's runtime, which its atexit hook drops
    # before the interpreter finalizes: a command exits cleanly with no os._exit.
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _connect(settings: Settings | None = None) -> Orchestrator:
    return await Orchestrator.connect(settings or _settings())


def _setup_logging(level: int) -> None:
    # A plain handler: workflow code logs from inside Temporal's sandbox, where a handler that
    # imports lazily (as Rich's does) fails and floods the terminal with import errors.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


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
