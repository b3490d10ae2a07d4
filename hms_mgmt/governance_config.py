"""The governance policy *loader*: reads ``<state_dir>/governance.yaml``. The pure rule it
configures is ``hms_mgmt.policy.governance`` (kept apart so the workflow-side module stays free
of I/O)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from hms_mgmt.errors import ConfigError
from hms_mgmt.policy.governance import GovernancePolicy

GOVERNANCE_FILE = "governance.yaml"


def load_governance_policy(state_dir: Path) -> GovernancePolicy:
    """``state_dir/governance.yaml`` if present, else the defaults; ConfigError names a bad field."""
    path = Path(state_dir) / GOVERNANCE_FILE
    if not path.exists():
        return GovernancePolicy()
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        return GovernancePolicy()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping such as 'max_replicas_without_approval: 10'")
    try:
        return GovernancePolicy.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        )
        raise ConfigError(f"{path}: invalid governance policy: {problems}") from e
