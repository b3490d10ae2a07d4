"""How long to wait before replacing a pod again.

Exponential backoff keeps a pod that dies at start from being restarted in a tight loop (the
seed's behaviour); the workflow keeps the failure count in its state.
"""

from __future__ import annotations


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
