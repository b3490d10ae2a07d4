"""Governance policy: which specs must wait for a human approval before any pod starts.

Pure (no I/O, no clock): ServiceWorkflow calls ``evaluate`` deterministically; the policy itself
is loaded outside the workflow by ``hms_mgmt.governance_config.load_governance_policy``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hms_mgmt.models import ServiceSpec
from hms_mgmt.policy.slots import slot_bounds

# A pod with no cpu_limit is counted as one CPU against the budget.
DEFAULT_POD_CPUS = 1.0
# Floating-point slack so that e.g. 3 x 0.1 CPUs fits a 0.3 budget.
_EPSILON = 1e-9


class GovernancePolicy(BaseModel):
    """Limits above which a deployment needs an approval (``state_dir/governance.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    max_replicas_without_approval: int = Field(default=10, ge=0)
    # Total CPUs (max_replicas x cpu_limit, cpu_limit defaulting to 1.0) above which approval is needed.
    cpu_budget: float | None = Field(default=None, gt=0)
    approval_timeout_s: float = Field(default=86400.0, gt=0)


class GovernanceVerdict(BaseModel):
    """Whether a spec must wait for approval, and every reason why (shown to the approver)."""

    needs_approval: bool
    reasons: list[str] = Field(default_factory=list)


def max_cpus(spec: ServiceSpec, replicas: int | None = None) -> float:
    """The most CPU the service can claim at full scale (``replicas``: a time slot's ceiling)."""
    top = spec.max_replicas if replicas is None else replicas
    return top * (spec.cpu_limit if spec.cpu_limit is not None else DEFAULT_POD_CPUS)


def _ceilings(spec: ServiceSpec) -> list[tuple[str, int]]:
    """Every replica ceiling the spec can reach, named by its field: the spec's, then each time
    slot's (its bounds replace the spec's while it is on, so they need the same approval)."""
    out = [("max_replicas", spec.max_replicas)]
    for i, slot in enumerate(spec.time_slots):
        out.append((f"time_slots[{i}] ({slot.name}) max_replicas", slot_bounds(slot, spec.max_replicas)[1]))
    return out


def evaluate(spec: ServiceSpec, policy: GovernancePolicy) -> GovernanceVerdict:
    """Check a spec against the policy; deterministic, so safe inside a workflow."""
    reasons: list[str] = []
    limit = policy.max_replicas_without_approval
    for field, top in _ceilings(spec):
        if top > limit:
            reasons.append(f"{field} {top} exceeds the limit of {limit} without approval")
    if policy.cpu_budget is not None:
        cpu = spec.cpu_limit if spec.cpu_limit is not None else DEFAULT_POD_CPUS
        default = "" if spec.cpu_limit is not None else " (default)"
        for field, top in _ceilings(spec):
            total = max_cpus(spec, top)
            if total > policy.cpu_budget + _EPSILON:
                reasons.append(
                    f"up to {total:g} CPUs ({field} {top} x cpu_limit {cpu:g}{default}) "
                    f"exceeds the CPU budget of {policy.cpu_budget:g} without approval"
                )
    return GovernanceVerdict(needs_approval=bool(reasons), reasons=reasons)
