"""One root exception with precise subclasses callers can catch."""

from __future__ import annotations


class HmsError(Exception):
    """Root of every error the management layer raises to its callers."""


class SpecError(HmsError, ValueError):
    """A service spec (or another input) is invalid; the message names the field."""


class AccessDenied(HmsError, PermissionError):
    """The caller's identity may not perform the action."""


class ApprovalRejected(HmsError):
    """Governance rejected the deployment, or the approval timed out."""


class CapacityUnavailable(HmsError):
    """No node has room for the pods asked for."""


class ImageUntrusted(HmsError):
    """The image is not marked signed and safe (or changed since it was signed)."""


class ServiceNotFound(HmsError, LookupError):
    """No running service of that name."""


class SpecConflict(HmsError):
    """A service of that name already runs with a different spec."""


class ConfigError(HmsError):
    """The configuration (environment or config file) is invalid."""


class ScaleRefused(HmsError, ValueError):
    """A manual scale was refused (outside [min_replicas, max_replicas], or not running)."""
