"""One root exception with precise subclasses callers can catch, and the one place where a
failure kind (carried as data in workflow failures and in ``ServiceStatus.failure``) becomes
an exception.

Workflows raise ``ApplicationError(message, type=FailureKind.X)``; the client turns that type
back into the class below with :func:`error_for`. Nothing matches on message text.
"""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    """Why a request or a service failed, as data."""

    ACCESS_DENIED = "access_denied"
    APPROVAL_REJECTED = "approval_rejected"
    APPROVAL_TIMED_OUT = "approval_timed_out"
    IMAGE_UNTRUSTED = "image_untrusted"
    SPEC_INVALID = "spec_invalid"
    INVALID_SPEC = "invalid_spec"  # valid as data, but a node's runtime will not run it (runtime.check_spec)
    REFUSED = "refused"  # the request does not fit the service's state (wrong phase, out of range)
    CAPACITY = "capacity"
    CRASH_LOOP = "crash_loop"
    DEPLOY_FAILED = "deploy_failed"
    NOT_FOUND = "not_found"
    UNDEPLOYED = "undeployed"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"


class HmsError(Exception):
    """Root of every error the management layer raises to its callers."""

    kind: FailureKind | None = None


class SpecError(HmsError, ValueError):
    """A service spec (or another input) is invalid; the message names the field."""

    kind = FailureKind.SPEC_INVALID


class InvalidSpec(SpecError):
    """The spec is valid, but the runtime of a node it would run on refuses it (e.g. a process
    pod's ``command`` or an ``env`` name its image's signature does not cover); the message names
    the field. Permanent: the service fails at admission, no pod is tried."""

    kind = FailureKind.INVALID_SPEC


class AccessDenied(HmsError, PermissionError):
    """The caller's identity may not perform the action."""

    kind = FailureKind.ACCESS_DENIED


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


_BY_KIND: dict[FailureKind, type[HmsError]] = {
    FailureKind.ACCESS_DENIED: AccessDenied,
    FailureKind.APPROVAL_REJECTED: ApprovalRejected,
    FailureKind.APPROVAL_TIMED_OUT: ApprovalTimedOut,
    FailureKind.IMAGE_UNTRUSTED: ImageUntrusted,
    FailureKind.SPEC_INVALID: SpecError,
    FailureKind.INVALID_SPEC: InvalidSpec,
    FailureKind.REFUSED: RequestRefused,
    FailureKind.CAPACITY: CapacityUnavailable,
    FailureKind.CRASH_LOOP: CrashLooping,
    FailureKind.DEPLOY_FAILED: DeployFailed,
    FailureKind.NOT_FOUND: ServiceNotFound,
    FailureKind.UNDEPLOYED: ServiceUndeployed,
    FailureKind.ROLLED_BACK: RolloutFailed,
    FailureKind.SUPERSEDED: RolloutSuperseded,
}


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
