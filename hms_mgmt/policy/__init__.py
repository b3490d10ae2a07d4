"""Pure decisions: plain values in, plain values out; no I/O, clock, randomness, Temporal or Docker.

Workflows import these inside their sandbox, so every module here keeps import-time work trivial.
"""

from __future__ import annotations

from hms_mgmt.policy.autoscale import (
    AutoscaleDecision,
    AutoscaleInput,
    CpuSample,
    Recommendation,
    autoscale,
)
from hms_mgmt.policy.backoff import backoff_delay
from hms_mgmt.policy.scheduler import NodeUsage, PlacementRequest, node_fits, pick_nodes

__all__ = [
    "AutoscaleDecision",
    "AutoscaleInput",
    "CpuSample",
    "NodeUsage",
    "PlacementRequest",
    "Recommendation",
    "autoscale",
    "backoff_delay",
    "node_fits",
    "pick_nodes",
]
