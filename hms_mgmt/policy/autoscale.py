"""How many pods a service should run: proportional autoscaling like the Kubernetes HPA.

``autoscale`` is pure: the workflow passes pods, CPU samples, spec bounds, the time and the
recommendations of earlier rounds, and stores the returned history for the next round. Same
input, same answer, so the workflow can re-check a monitor's recommendation before acting.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A pod whose sample is missing counts as this busy when the load points down, so a pod we
# cannot see never justifies removing capacity.
_MISSING_ON_SCALE_DOWN = 100.0
# ceil() of a product like 2 * (300 / 60) may land a hair above an integer; that noise must
# not cost a pod.
_CEIL_SLACK = 1e-9


class CpuSample(BaseModel):
    """One pod's CPU reading, in percent of its CPU limit; ``None`` when it could not be read."""

    model_config = ConfigDict(extra="forbid")

    pod_id: str
    cpu_percent: float | None = Field(ge=0, allow_inf_nan=False)
    ready: bool = True


class Recommendation(BaseModel):
    """One round's recommendation, remembered for the scale-down stabilisation window."""

    model_config = ConfigDict(extra="forbid")

    at: datetime
    replicas: int = Field(ge=0)


class AutoscaleInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current: int = Field(ge=0, description="pods that exist now, ready or not")
    samples: list[CpuSample]
    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=0)
    cpu_target: int = Field(ge=1, le=100, description="percent of a pod's CPU limit")
    tolerance: float = Field(default=0.1, ge=0, allow_inf_nan=False)
    scale_down_window_s: float = Field(default=300.0, ge=0, allow_inf_nan=False)
    history: list[Recommendation] = Field(default_factory=list)
    now: datetime

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleInput:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class AutoscaleDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desired: int = Field(description="what to scale to now; == current means no change")
    recommended: int = Field(description="this round's recommendation, clamped, before stabilisation")
    mean_cpu: float | None = Field(description="the utilisation the decision used")
    reason: str
    at_max: bool = Field(description="the load needs more than max_replicas")
    history: list[Recommendation] = Field(
        description="recommendations still inside the window, this round's last; pass back next round"
    )


def autoscale(inp: AutoscaleInput) -> AutoscaleDecision:
    """Decide the replica count for this round.

    ``ceil(summed CPU / cpu_target)`` -- which is ``ceil(current * mean_cpu / cpu_target)``
    when every pod is ready and reports -- with no change within ``tolerance``, clamped to
    [min_replicas, max_replicas]. Pods that are not ready are left out of the average (their
    CPU during start-up says nothing about load) and, on a scale-up, count as idle pods, so
    pods already starting are not asked for twice. Missing samples count against the
    direction of the change (0 % up, 100 % down); if that flips or cancels it, nothing
    changes. A scale-down takes the highest recommendation of the window, so a short dip
    does not remove pods that the next spike needs again; a scale-up applies at once.
    """
    current = inp.current
    raw, mean_cpu, why = _recommend(inp)
    at_max = mean_cpu is not None and raw > inp.max_replicas
    recommended = _clamp(raw, inp.min_replicas, inp.max_replicas)

    history = _window(inp.history, inp.now, inp.scale_down_window_s)
    history.append(Recommendation(at=inp.now, replicas=recommended))

    if recommended >= current:
        stabilised = recommended
    else:
        stabilised = min(current, max(r.replicas for r in history))
    # History from before a spec change may sit outside today's bounds.
    desired = _clamp(stabilised, inp.min_replicas, inp.max_replicas)

    reason = why
    if raw != current:
        reason += f" -> {raw} pod{_s(raw)}"
    elif raw == recommended:
        reason += f": keeping {current} pod{_s(current)}"
    else:
        reason += f"; {current} pod{_s(current)} now"
    if raw > inp.max_replicas:
        reason += f", capped at max_replicas {inp.max_replicas}"
    elif raw < inp.min_replicas:
        reason += f", raised to min_replicas {inp.min_replicas}"
    if desired > recommended:
        reason += f", held at {desired} by the {inp.scale_down_window_s:g}s scale-down window"
    return AutoscaleDecision(
        desired=desired,
        recommended=recommended,
        mean_cpu=mean_cpu,
        reason=reason,
        at_max=at_max,
        history=_compact(history),
    )


def _recommend(inp: AutoscaleInput) -> tuple[int, float | None, str]:
    """This round's unclamped recommendation, the mean it used and why, from the samples alone."""
    current = inp.current
    target = float(inp.cpu_target)
    values = [s.cpu_percent for s in inp.samples if s.ready and s.cpu_percent is not None]
    # Pods the caller counted but sent no sample for are as unknown as a ``None`` sample.
    missing = sum(1 for s in inp.samples if s.ready and s.cpu_percent is None) + max(0, current - len(inp.samples))
    unready = sum(1 for s in inp.samples if not s.ready)

    if not values:
        return current, None, "no CPU samples from ready pods"

    total = math.fsum(values)
    mean = total / len(values)
    ratio = mean / target
    what = f"mean CPU {_pct(mean)}% of target {inp.cpu_target}% across {len(values)} ready pod{_s(len(values))}"
    if abs(ratio - 1.0) <= inp.tolerance:
        return current, mean, f"{what} is within tolerance {_pct(inp.tolerance * 100)}%"

    if ratio > 1.0:
        if missing or unready:
            uncounted = missing + unready
            mean = total / (len(values) + uncounted)
            what += f", {_pct(mean)}% counting {uncounted} unready or unsampled as idle"
            if mean / target <= 1.0 + inp.tolerance:
                return current, mean, what + ", not enough to scale up"
        return max(current, _ceil(total / target)), mean, what

    if missing:
        total += _MISSING_ON_SCALE_DOWN * missing
        mean = total / (len(values) + missing)
        what += f", {_pct(mean)}% counting {missing} unsampled as busy"
        if mean / target >= 1.0 - inp.tolerance:
            return current, mean, what + ", not enough to scale down"
    return min(current, _ceil(total / target)), mean, what


def _window(history: list[Recommendation], now: datetime, window_s: float) -> list[Recommendation]:
    """The recommendations in (now - window, now], oldest first."""
    since = now - timedelta(seconds=window_s)
    return sorted((r for r in history if since < r.at <= now), key=lambda r: r.at)


def _compact(history: list[Recommendation]) -> list[Recommendation]:
    """Drop entries a later, at-least-as-high one outlives: they can never be the window's
    maximum again, and the history stays small however often the workflow asks."""
    kept: list[Recommendation] = []
    for rec in reversed(history):
        if not kept or rec.replicas > kept[-1].replicas:
            kept.append(rec)
    kept.reverse()
    return kept


def _clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, n))


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _CEIL_SLACK))


def _pct(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _s(n: int) -> str:
    return "" if n == 1 else "s"
