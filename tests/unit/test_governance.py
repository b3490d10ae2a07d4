"""Governance policy: when a spec must wait for approval, and loading the policy file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_mgmt.errors import ConfigError
from hms_mgmt.governance_config import load_governance_policy
from hms_mgmt.models import ServiceSpec
from hms_mgmt.policy.governance import GovernancePolicy, GovernanceVerdict, evaluate


def spec(**overrides) -> ServiceSpec:
    values = {"name": "hms-ach", "image": "registry.gov/hms-ach:1.4", "min_replicas": 2, "max_replicas": 10, "cpu_target": 70}
    values.update(overrides)
    return ServiceSpec(**values)


def test_ten_replicas_need_no_approval() -> None:
    verdict = evaluate(spec(max_replicas=10), GovernancePolicy())
    assert verdict == GovernanceVerdict(needs_approval=False, reasons=[])


def test_eleven_replicas_need_approval() -> None:
    verdict = evaluate(spec(max_replicas=11), GovernancePolicy())
    assert verdict.needs_approval
    assert verdict.reasons == ["max_replicas 11 exceeds the limit of 10 without approval"]


def test_custom_limit() -> None:
    verdict = evaluate(spec(max_replicas=12), GovernancePolicy(max_replicas_without_approval=12))
    assert not verdict.needs_approval
    verdict = evaluate(spec(max_replicas=12), GovernancePolicy(max_replicas_without_approval=5))
    assert verdict.reasons == ["max_replicas 12 exceeds the limit of 5 without approval"]


def test_cpu_budget_with_default_cpu_limit() -> None:
    policy = GovernancePolicy(cpu_budget=8)
    assert not evaluate(spec(max_replicas=8), policy).needs_approval
    verdict = evaluate(spec(max_replicas=9), policy)
    assert verdict.needs_approval
    assert verdict.reasons == [
        "up to 9 CPUs (max_replicas 9 x cpu_limit 1 (default)) exceeds the CPU budget of 8 without approval"
    ]


def test_cpu_budget_with_cpu_limit() -> None:
    policy = GovernancePolicy(cpu_budget=4)
    assert not evaluate(spec(max_replicas=8, cpu_limit=0.5), policy).needs_approval
    verdict = evaluate(spec(max_replicas=10, cpu_limit=0.5), policy)
    assert verdict.reasons == [
        "up to 5 CPUs (max_replicas 10 x cpu_limit 0.5) exceeds the CPU budget of 4 without approval"
    ]
    # floating point: 3 x 0.1 fits a 0.3 budget
    assert not evaluate(spec(min_replicas=1, max_replicas=3, cpu_limit=0.1), GovernancePolicy(cpu_budget=0.3)).needs_approval


def test_both_reasons_reported() -> None:
    verdict = evaluate(spec(max_replicas=12, cpu_limit=2), GovernancePolicy(cpu_budget=16))
    assert verdict.needs_approval
    assert len(verdict.reasons) == 2
    assert verdict.reasons[0].startswith("max_replicas 12 exceeds the limit of 10")
    assert "24 CPUs" in verdict.reasons[1]


def test_no_cpu_budget_means_no_cpu_check() -> None:
    assert not evaluate(spec(max_replicas=10, cpu_limit=64), GovernancePolicy()).needs_approval


def test_policy_module_is_pure() -> None:
    import hms_mgmt.policy.governance as mod

    source = Path(mod.__file__).read_text()
    for forbidden in ("import os", "open(", "datetime.now", "time.time", "import yaml", "pathlib"):
        assert forbidden not in source


# --- loader ---------------------------------------------------------------------------


def test_load_defaults_when_absent(tmp_path: Path) -> None:
    assert load_governance_policy(tmp_path) == GovernancePolicy()


def test_load_empty_file_is_defaults(tmp_path: Path) -> None:
    (tmp_path / "governance.yaml").write_text("")
    assert load_governance_policy(tmp_path) == GovernancePolicy()


def test_load_custom_policy(tmp_path: Path) -> None:
    (tmp_path / "governance.yaml").write_text(
        "max_replicas_without_approval: 4\ncpu_budget: 6.5\napproval_timeout_s: 600\n"
    )
    policy = load_governance_policy(tmp_path)
    assert policy == GovernancePolicy(max_replicas_without_approval=4, cpu_budget=6.5, approval_timeout_s=600)
    assert evaluate(spec(min_replicas=1, max_replicas=5), policy).needs_approval


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("max_replicas_without_approval: lots\n", "max_replicas_without_approval"),
        ("cpu_budget: -1\n", "cpu_budget"),
        ("approval_timeout_s: 0\n", "approval_timeout_s"),
        ("max_replica: 3\n", "max_replica"),
    ],
)
def test_load_bad_field_is_named(tmp_path: Path, content: str, field: str) -> None:
    (tmp_path / "governance.yaml").write_text(content)
    with pytest.raises(ConfigError, match=field) as e:
        load_governance_policy(tmp_path)
    assert "governance.yaml" in str(e.value)


@pytest.mark.parametrize(("content", "message"), [("- 1\n", "expected a mapping"), ("a: [\n", "not valid YAML")])
def test_load_bad_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "governance.yaml").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_governance_policy(tmp_path)
