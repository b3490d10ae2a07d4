"""MessageGuard: a signal or update whose arguments are not what its handler takes never reaches it.

Temporal hands a handler whatever arrived: no argument at all (``temporal workflow signal --name
node_lost`` without ``--input``), two where it takes one (then the SDK decodes them untyped, as
plain dicts), or a payload in another encoding (``--input-meta encoding=binary/plain``) as
``bytes``. The handler then raised on it — inside the workflow task, which failed and was retried
for ever: one message from anyone who reaches Temporal wedged the service's workflow. Well-formed
JSON of the wrong shape is already refused by the pydantic converter; this catches the rest.

A malformed signal is dropped (a warning in the worker's log, as the SDK does for a signal it
cannot decode); a malformed update is rejected with a ``spec_invalid`` error naming the argument.
Registered on every worker that runs our workflows (``worker.main``) and on the replayer.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    HandleSignalInput,
    HandleUpdateInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

SPEC_INVALID = "spec_invalid"  # hms_mgmt.errors.FailureKind.SPEC_MALFORMED: the client raises SpecError


class MessageGuard(Interceptor):
    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _GuardedInbound


class _GuardedInbound(WorkflowInboundInterceptor):
    async def handle_signal(self, input: HandleSignalInput) -> None:
        problem = mismatch("signal", input.signal, input.args)
        if problem:
            workflow.logger.warning("dropped the %s signal: %s", input.signal, problem)
            return
        await super().handle_signal(input)

    def handle_update_validator(self, input: HandleUpdateInput) -> None:
        _check_update(input)
        super().handle_update_validator(input)

    async def handle_update_handler(self, input: HandleUpdateInput) -> Any:
        _check_update(input)  # an update without a validator is checked here (it fails, typed)
        return await super().handle_update_handler(input)


def _check_update(input: HandleUpdateInput) -> None:
    problem = mismatch("update", input.update, input.args)
    if problem:
        raise ApplicationError(f"update {input.update}: {problem}", type=SPEC_INVALID, non_retryable=True)


def mismatch(kind: str, name: str, args: typing.Sequence[Any]) -> str | None:
    """Why ``args`` do not fit the parameters of the current workflow's ``kind`` ("signal" or
    "update") handler ``name``, or None when they do (or it has no such named handler)."""
    # The SDK's own record of the handlers (what it decodes arguments by): the handlers it
    # hands out are closures that hide their parameters.
    defn = workflow._Definition.from_class(type(workflow.instance()))
    handler = (defn.signals if kind == "signal" else defn.updates).get(name) if defn else None
    if handler is None or handler.name is None:
        return None
    required, accepted = _parameters(handler.fn, 1 if handler.is_method else 0)
    if not required <= len(args) <= len(accepted):
        wanted = str(required) if required == len(accepted) else f"{required} to {len(accepted)}"
        return f"takes {wanted} argument(s), got {len(args)}"
    for i, (arg, (name, classes)) in enumerate(zip(args, accepted, strict=False)):
        if classes and not isinstance(arg, classes):
            expected = " or ".join(c.__name__ for c in classes)
            return f"argument {i + 1} ({name}) must be {expected}, got {type(arg).__name__}"
    return None


@functools.cache
def _parameters(fn: Callable[..., Any], bound: int) -> tuple[int, list[tuple[str, tuple[type, ...]]]]:
    """(how many are required, [(name, classes an argument must be one of)]), bound ones left out."""
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][bound:]
    required = sum(1 for p in params if p.default is p.empty)
    return required, [(p.name, _classes(hints.get(p.name, Any))) for p in params]


def _classes(hint: Any) -> tuple[type, ...]:
    """The runtime classes a value of ``hint`` is an instance of; () means "do not check"."""
    if hint is None or hint is type(None):
        return (type(None),)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_classes(a) for a in typing.get_args(hint)]
        return () if any(not p for p in parts) else tuple(c for p in parts for c in p)
    if origin is not None:
        return (origin,) if isinstance(origin, type) else ()
    return (hint,) if isinstance(hint, type) and hint is not object else ()
