"""Errors: one root, the wire values of failure kinds and activity error types never change, and
each maps in one place."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from hms_mgmt import errors
from hms_mgmt.errors import (
    POD_FATAL,
    ActivityErrorType,
    FailureKind,
    HmsError,
    InvalidSpec,
    PodRuntimeError,
    SpecError,
    SpecUnrunnable,
    error_for,
    failure_kind_for,
)

ROOT = Path(__file__).resolve().parents[2]

# Recorded histories and ServiceStatus.failure hold these values: they are the protocol.
FAILURE_KIND_VALUES = {
    "access_denied", "approval_rejected", "approval_timed_out", "image_untrusted", "spec_invalid", "invalid_spec",
    "refused", "capacity", "crash_loop", "deploy_failed", "not_found", "undeployed", "rolled_back", "superseded",
}
ACTIVITY_ERROR_VALUES = {
    "AccessDenied", "ImageUntrusted", "ImageNotFound", "InvalidSpec", "CapacityUnavailable", "PodExited",
    "PodNotReady", "PodNotFound", "RuntimeFailure", "GrantExpired",
}


def test_wire_values_are_unchanged() -> None:
    assert {k.value for k in FailureKind} == FAILURE_KIND_VALUES
    assert {t.value for t in ActivityErrorType} == ACTIVITY_ERROR_VALUES
    assert [str(t) for t in POD_FATAL] == ["PodExited", "PodNotReady", "ImageNotFound", "InvalidSpec", "PodNotFound",
                                          "ImageUntrusted"]


def test_the_two_spec_failures_keep_their_old_names_as_aliases() -> None:
    assert FailureKind.SPEC_INVALID is FailureKind.SPEC_MALFORMED and FailureKind.SPEC_MALFORMED == "spec_invalid"
    assert FailureKind.INVALID_SPEC is FailureKind.SPEC_UNRUNNABLE and FailureKind.SPEC_UNRUNNABLE == "invalid_spec"
    assert InvalidSpec is SpecUnrunnable and issubclass(SpecUnrunnable, SpecError)
    assert type(error_for("spec_invalid", "x")) is SpecError
    assert type(error_for("invalid_spec", "x")) is SpecUnrunnable


@pytest.mark.parametrize("kind", list(FailureKind))
def test_every_failure_kind_maps_to_a_class_of_that_kind(kind: FailureKind) -> None:
    err = error_for(kind, "m")
    assert err.kind == kind and str(err) == "m"


def test_an_unknown_kind_is_still_an_hms_error() -> None:
    assert type(error_for("no-such-kind", "m")) is HmsError and type(error_for(None, "m")) is HmsError


@pytest.mark.parametrize("t", list(ActivityErrorType))
def test_every_activity_error_type_has_a_mapping(t: ActivityErrorType) -> None:
    kind = failure_kind_for(t)
    assert kind is None or isinstance(kind, FailureKind)
    assert failure_kind_for(str(t.value)) == kind


def test_activity_error_mapping() -> None:
    assert failure_kind_for("InvalidSpec") == FailureKind.SPEC_UNRUNNABLE
    assert failure_kind_for("AccessDenied") == FailureKind.ACCESS_DENIED
    assert failure_kind_for("CapacityUnavailable") == FailureKind.CAPACITY
    assert failure_kind_for("PodExited") is None and failure_kind_for("Unknown") is None and failure_kind_for(None) is None


def test_pod_runtime_error_is_an_hms_error_with_its_activity_type() -> None:
    e = PodRuntimeError("bad", error_type=ActivityErrorType.SPEC_UNRUNNABLE)
    assert isinstance(e, HmsError) and e.error_type == "InvalidSpec" and e.kind == FailureKind.SPEC_UNRUNNABLE
    assert PodRuntimeError("x").error_type == ActivityErrorType.RUNTIME_FAILURE and PodRuntimeError("x").kind is None
    from hms_mgmt.runtimes import PodRuntimeError as via_runtimes
    assert via_runtimes is PodRuntimeError


def test_every_exception_the_project_defines_is_an_hms_error() -> None:
    """Grep-like: a class deriving from a builtin exception, outside errors.py, is a stray root.
    (Private control-flow exceptions, named with a leading underscore, are not errors callers see.)"""
    strays = []
    for pkg in ("hms_mgmt", "activities", "router", "dashboard", "worker", "workflows"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                    if bases & {"Exception", "BaseException", "RuntimeError", "ValueError", "LookupError"}:
                        strays.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert [s for s in strays if not s.startswith("hms_mgmt/errors.py:")] == []
    for name, obj in inspect.getmembers(errors, inspect.isclass):
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__:
            assert issubclass(obj, HmsError), name
