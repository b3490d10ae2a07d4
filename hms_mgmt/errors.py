"""One root exception with precise subclasses callers can catch, and the one place where a
failure travelling as data becomes an exception.

Two kinds of data travel, and both values are part of the wire protocol (recorded histories
hold them; never change a value, only add):

- :class:`FailureKind` — why a request or a service failed. Workflows raise
  ``ApplicationError(message, type=FailureKind.X)`` to the caller and keep it in
  ``ServiceStatus.failure``; the client turns it back into a class below with :func:`error_for`.
- :class:`ActivityErrorType` — the ``type`` of an activity's ``ApplicationError`` (and a pod
  runtime's :class:`PodRuntimeError`), which workflows match and list in retry policies.
  :func:`failure_kind_for` says which failure kind, if any, it becomes.

Nothing matches on message text.
"""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    """Why a request or a service failed, as data."""

    ACCESS_DENIED = "access_denied"
    APPROVAL_REJECTED = "approval_rejected"
    APPROVAL_TIMED_OUT = "approval_timed_out"
    IMAGE_UNTRUSTED = "image_untrusted"
    SPEC_MALFORMED = "spec_invalid"  # not a valid spec (or request) as data: a field is wrong
    SPEC_UNRUNNABLE = "invalid_spec"  # valid as data, but a node's runtime will not run it (runtime.check_spec)
    REFUSED = "refused"  # the request does not fit the service's state (wrong phase, out of range)
    CAPACITY = "capacity"
    CRASH_LOOP = "crash_loop"
    DEPLOY_FAILED = "deploy_failed"
    NOT_FOUND = "not_found"
    UNDEPLOYED = "undeployed"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"

    # The names before they said how the two spec failures differ (same values: aliases).
    SPEC_INVALID = "spec_invalid"
    INVALID_SPEC = "invalid_spec"


class ActivityErrorType(StrEnum):
    """The ``type`` of an activity's ``ApplicationError``: what a workflow matches and lists in
    ``RetryPolicy.non_retryable_error_types``. The values are CamelCase, unlike FailureKind's,
    because they are what histories have always recorded."""

    ACCESS_DENIED = "AccessDenied"
    GRANT_EXPIRED = "GrantExpired"  # a stop grant or start ticket that waited too long: ask for a fresh one
    IMAGE_UNTRUSTED = "ImageUntrusted"
    IMAGE_NOT_FOUND = "ImageNotFound"
    SPEC_UNRUNNABLE = "InvalidSpec"  # a node's runtime refuses the spec (or a pod id is no UUID)
    CAPACITY_UNAVAILABLE = "CapacityUnavailable"
    POD_EXITED = "PodExited"
    POD_NOT_READY = "PodNotReady"
    POD_NOT_FOUND = "PodNotFound"
    RUNTIME_FAILURE = "RuntimeFailure"


# Failures of a pod activity no retry will fix: the pod itself is bad. The caller decides
# (replace it, back off). For ``RetryPolicy(non_retryable_error_types=list(POD_FATAL))``.
POD_FATAL: tuple[ActivityErrorType, ...] = (
    ActivityErrorType.POD_EXITED,
    ActivityErrorType.POD_NOT_READY,
    ActivityErrorType.IMAGE_NOT_FOUND,
    ActivityErrorType.SPEC_UNRUNNABLE,
    ActivityErrorType.POD_NOT_FOUND,
    ActivityErrorType.IMAGE_UNTRUSTED,
)


class HmsError(Exception):
    """Root of every error the management layer raises to its callers."""

    kind: FailureKind | None = None


class SpecError(HmsError, ValueError):
    """A service spec (or another input) is malformed; the message names the field. The root of
    every spec failure: catching it catches :class:`SpecUnrunnable` too."""

    kind = FailureKind.SPEC_MALFORMED


class SpecUnrunnable(SpecError):
    """The spec is valid, but the runtime of a node it would run on refuses it (e.g. a process
    pod's ``command`` or an ``env`` name its image's signature does not cover); the message names
    the field. Permanent: the service fails at admission, no pod is tried."""

    kind = FailureKind.SPEC_UNRUNNABLE


SpecMalformed = SpecError
InvalidSpec = SpecUnrunnable  # its name before it said how it differs from SpecError


class AccessDenied(HmsError, PermissionError):
    """The caller's identity may not perform the action."""

    kind = FailureKind.ACCESS_DENIED


class GrantExpired(AccessDenied):
    """A signature of the control plane that was good for exactly this act, but is too old now."""


class ApprovalRejected(HmsError):
    """Governance rejected the deployment."""

    kind = FailureKind.APPROVAL_REJECTED


class ApprovalTimedOut(ApprovalRejected, TimeoutError):
    """Nobody decided within the approval timeout: the deployment is refused."""

    kind = FailureKind.APPROVAL_TIMED_OUT


class CapacityUnavailable(HmsError):
    """No node has room for the pods asked for."""

    kind = FailureKind.CAPACITY


class ImageUntrusted(HmsError):
    """The image is not marked signed and safe (or changed since it was signed)."""

    kind = FailureKind.IMAGE_UNTRUSTED


class ServiceNotFound(HmsError, LookupError):
    """No running service of that name."""

    kind = FailureKind.NOT_FOUND


class ConfigError(HmsError):
    """The configuration (environment or config file) is invalid."""


class RequestRefused(HmsError, ValueError):
    """The request does not fit the service's current state (for example, approving a service
    that is not awaiting approval)."""

    kind = FailureKind.REFUSED


class ScaleRefused(RequestRefused):
    """A manual scale was refused (outside [min_replicas, max_replicas], or not running)."""


class CrashLooping(HmsError):
    """The service's pods keep failing: it is Degraded and backing off between replacements."""

    kind = FailureKind.CRASH_LOOP


class DeployFailed(HmsError):
    """The rollout could not bring any pod up."""

    kind = FailureKind.DEPLOY_FAILED


class ServiceUndeployed(HmsError):
    """The service was undeployed while the caller waited for it."""

    kind = FailureKind.UNDEPLOYED


class RolloutFailed(HmsError):
    """A rolling update did not complete: its pods never became ready or crash-looped, and the
    service rolled back to the previous revision."""

    kind = FailureKind.ROLLED_BACK


class RolloutSuperseded(HmsError):
    """A newer update replaced this one before it finished."""

    kind = FailureKind.SUPERSEDED


class PodRuntimeError(HmsError):
    """A pod runtime failure that retrying will not fix (bad image, unknown catalog entry, a
    spec the runtime refuses). ``error_type`` is the activity error type it travels as."""

    def __init__(self, message: str, *, error_type: ActivityErrorType = ActivityErrorType.RUNTIME_FAILURE) -> None:
        super().__init__(message)
        self.error_type = ActivityErrorType(error_type)
        self.kind = failure_kind_for(self.error_type)


_BY_KIND: dict[FailureKind, type[HmsError]] = {
    FailureKind.ACCESS_DENIED: AccessDenied,
    FailureKind.APPROVAL_REJECTED: ApprovalRejected,
    FailureKind.APPROVAL_TIMED_OUT: ApprovalTimedOut,
    FailureKind.IMAGE_UNTRUSTED: ImageUntrusted,
    FailureKind.SPEC_MALFORMED: SpecError,
    FailureKind.SPEC_UNRUNNABLE: SpecUnrunnable,
    FailureKind.REFUSED: RequestRefused,
    FailureKind.CAPACITY: CapacityUnavailable,
    FailureKind.CRASH_LOOP: CrashLooping,
    FailureKind.DEPLOY_FAILED: DeployFailed,
    FailureKind.NOT_FOUND: ServiceNotFound,
    FailureKind.UNDEPLOYED: ServiceUndeployed,
    FailureKind.ROLLED_BACK: RolloutFailed,
    FailureKind.SUPERSEDED: RolloutSuperseded,
}

# The failure kind an activity error becomes where a workflow reports it (None: the workflow
# handles it itself, e.g. a pod that exited is replaced).
_KIND_OF_ACTIVITY_ERROR: dict[ActivityErrorType, FailureKind | None] = {
    ActivityErrorType.ACCESS_DENIED: FailureKind.ACCESS_DENIED,
    ActivityErrorType.GRANT_EXPIRED: FailureKind.ACCESS_DENIED,
    ActivityErrorType.IMAGE_UNTRUSTED: FailureKind.IMAGE_UNTRUSTED,
    ActivityErrorType.IMAGE_NOT_FOUND: None,
    ActivityErrorType.SPEC_UNRUNNABLE: FailureKind.SPEC_UNRUNNABLE,
    ActivityErrorType.CAPACITY_UNAVAILABLE: FailureKind.CAPACITY,
    ActivityErrorType.POD_EXITED: None,
    ActivityErrorType.POD_NOT_READY: None,
    ActivityErrorType.POD_NOT_FOUND: None,
    ActivityErrorType.RUNTIME_FAILURE: None,
}


def failure_kind_for(error_type: ActivityErrorType | str | None) -> FailureKind | None:
    """The failure kind an activity error type stands for; None when it has none (or is not ours)."""
    try:
        return _KIND_OF_ACTIVITY_ERROR[ActivityErrorType(error_type)] if error_type is not None else None
    except ValueError:
        return None


def error_for(kind: FailureKind | str | None, message: str, *, refine: type[HmsError] | None = None) -> HmsError:
    """The exception for a failure kind. ``refine`` picks a subclass of the mapped class
    (``ScaleRefused`` for a refused scale), so callers can be more precise, never less."""
    try:
        cls = _BY_KIND[FailureKind(kind)] if kind is not None else HmsError
    except ValueError:
        cls = HmsError
    if refine is not None and issubclass(refine, cls):
        cls = refine
    return cls(message)
