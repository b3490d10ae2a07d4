"""The governance policy *loader*: reads ``<state_dir>/governance.yaml``. The pure rule it
configures is ``hms_mgmt.policy.governance`` (kept apart so the workflow-side module stays free
of I/O)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from hms_mgmt.errors import ConfigError
from hms_mgmt.files import load_yaml_mapping
from hms_mgmt.policy.governance import GovernancePolicy

GOVERNANCE_FILE = "governance.yaml"


def load_governance_policy(state_dir: Path) -> GovernancePolicy:
    """``state_dir/governance.yaml`` if present, else the defaults; ConfigError names a bad field."""
    path = Path(state_dir) / GOVERNANCE_FILE
    raw = load_yaml_mapping(path, what="policy settings (such as 'max_replicas_without_approval: 10')")
    try:
        return GovernancePolicy.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        )
        raise ConfigError(f"{path}: invalid governance policy: {problems}") from e
