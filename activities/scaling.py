"""The Auto-Scaler's round, shared by the per-service ``watch_cpu`` activity (and a node
watch that still autoscales on its own): the pure policy plus the rules for when a
recommendation is worth waking the workflow for."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from hms_mgmt.models import ServiceSpec
from hms_mgmt.policy.autoscale import AutoscaleDecision, AutoscaleInput, CpuSample, Recommendation, autoscale


class ScaleCheck:
    """One service's autoscaling rounds between two returns of its watch."""

    def __init__(self, spec: ServiceSpec, current: int, history: list[Recommendation], at_max_reported: bool) -> None:
        self.spec = spec
        self.current = current
        self.history = list(history)
        self.at_max_reported = at_max_reported
        self.up_once = False

    def check(self, samples: list[CpuSample], now: datetime | None = None
              ) -> tuple[Literal["scale", "at_max"], AutoscaleDecision] | None:
        """Run the policy on this round's samples; a reason to return, or None to keep watching."""
        spec = self.spec
        decision = autoscale(
            AutoscaleInput(
                current=self.current, samples=samples, min_replicas=spec.min_replicas,
                max_replicas=spec.max_replicas, cpu_target=spec.cpu_target,
                scale_down_window_s=spec.scale_down_window_s, history=self.history,
                now=now or datetime.now(UTC),
            )
        )
        self.history = decision.history
        # A step in load lands mid-interval, so the first sample after it sees part of it:
        # scale up once two samples in a row agree, sized by the latest, and the count is
        # reached in one decision instead of two.
        up = decision.desired > self.current
        if up and not self.up_once:
            self.up_once = True
        elif decision.desired != self.current:
            return "scale", decision
        else:
            self.up_once = False
        if decision.at_max and not self.at_max_reported and decision.desired == self.current:
            return "at_max", decision
        return None
