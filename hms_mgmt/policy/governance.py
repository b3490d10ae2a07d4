"""Governance policy: which specs must wait for a human approval before any pod starts.

Pure (no I/O, no clock): ServiceWorkflow calls ``evaluate`` deterministically; the policy itself
is loaded outside the workflow by ``hms_mgmt.governance_config.load_governance_policy``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hms_mgmt.models import ServiceSpec

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


def max_cpus(spec: ServiceSpec) -> float:
    """The most CPU the service can claim at full scale."""
    return spec.max_replicas * (spec.cpu_limit if spec.cpu_limit is not None else DEFAULT_POD_CPUS)


def evaluate(spec: ServiceSpec, policy: GovernancePolicy) -> GovernanceVerdict:
    """Check a spec against the policy; deterministic, so safe inside a workflow."""
    reasons: list[str] = []
    limit = policy.max_replicas_without_approval
    if spec.max_replicas > limit:
        reasons.append(f"max_replicas {spec.max_replicas} exceeds the limit of {limit} without approval")
    if policy.cpu_budget is not None:
        total = max_cpus(spec)
        if total > policy.cpu_budget + _EPSILON:
            cpu = spec.cpu_limit if spec.cpu_limit is not None else DEFAULT_POD_CPUS
            default = "" if spec.cpu_limit is not None else " (default)"
            reasons.append(
                f"up to {total:g} CPUs (max_replicas {spec.max_replicas} x cpu_limit {cpu:g}{default}) "
                f"exceeds the CPU budget of {policy.cpu_budget:g} without approval"
            )
    return GovernanceVerdict(needs_approval=bool(reasons), reasons=reasons)
