"""How long to wait before replacing a pod again, and when a service counts as crash-looping.

Exponential backoff keeps a pod that dies at start from being restarted in a tight loop (the
seed's behaviour); the tracker is a plain value the workflow keeps in its state.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


def backoff_delay(failures: int, *, initial_s: float, max_s: float, factor: float = 2.0) -> float:
    """Seconds to wait after ``failures`` consecutive failures: none before the first, then
    ``initial_s * factor ** (failures - 1)``, never more than ``max_s``."""
    if initial_s < 0 or max_s < 0 or factor < 1:
        raise ValueError("backoff needs initial_s >= 0, max_s >= 0 and factor >= 1")
    if failures <= 0:
        return 0.0
    try:
        delay = initial_s * factor ** (failures - 1)
    except OverflowError:
        # Thousands of failures: the growth passed any float long ago.
        return float(max_s)
    return float(min(delay, max_s))


class CrashLoop(BaseModel):
    """Consecutive failures of a service's replacement pods; methods return a new tracker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(default=0, ge=0)
    last_failure_at: datetime | None = None

    def record_failure(self, now: datetime) -> CrashLoop:
        """A pod failed (crashed, or never got ready): one more failure in the row."""
        return CrashLoop(failures=self.failures + 1, last_failure_at=now)

    def record_success(self, now: datetime) -> CrashLoop:
        """A pod became ready: the loop is broken, the next failure starts from the initial delay.

        ``now`` is taken for symmetry with ``record_failure``; a reset keeps no time.
        """
        del now
        return CrashLoop()

    def delay(self, initial_s: float, max_s: float) -> float:
        """Seconds to wait before the next replacement."""
        return backoff_delay(self.failures, initial_s=initial_s, max_s=max_s)

    def degraded(self, threshold: int = 2) -> bool:
        """True when replacements keep failing, so the service should say ``Degraded``."""
        return self.failures >= threshold
