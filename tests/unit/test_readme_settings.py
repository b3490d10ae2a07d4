"""README's settings table lists every setting, with config.py's default, and every other HMS_*
variable README names is one config.py knows is no setting (so it is not warned of as a typo)."""

from __future__ import annotations

import re
from pathlib import Path

from hms_mgmt.config import NOT_SETTINGS, Settings, env_var

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
TABLE = README[README.index("## Configuration"):README.index("## Runtimes")]
ROWS = [line for line in TABLE.splitlines() if line.startswith("| `HMS_")]
FIELDS = {env_var(f): f for f in Settings.model_fields}


def test_every_setting_has_a_row_and_every_row_is_a_setting() -> None:
    listed = {v for row in ROWS for v in re.findall(r"`(HMS_[A-Z0-9_]+)`", row.split(" | ")[0])}
    assert sorted(set(FIELDS) - listed) == []
    assert sorted(listed - set(FIELDS)) == []


def test_the_table_shows_config_py_defaults() -> None:
    checked = 0
    for row in ROWS:
        names, default = (cell.strip() for cell in row.strip("|").split(" | ")[:2])
        variables = re.findall(r"`(HMS_[A-Z0-9_]+)`", names)
        values = re.findall(r"`([^`]*)`", default)
        if len(values) != len(variables):
            continue
        for var, shown in zip(variables, values, strict=True):
            info = Settings.model_fields[FIELDS[var]]
            value = info.default
            if info.default_factory is not None or value is None or not isinstance(value, str | int | float):
                continue
            if isinstance(value, bool):
                assert shown == str(value).lower(), var
            elif isinstance(value, int | float):
                assert float(shown) == value, var
            else:
                assert shown == value, var
            checked += 1
    assert checked >= 20


def test_other_hms_variables_named_in_readme_are_known_not_to_be_settings() -> None:
    named = set(re.findall(r"\b(HMS_[A-Z0-9_]*[A-Z0-9])\b(?!_)", README))
    assert sorted(named - set(FIELDS) - NOT_SETTINGS) == []
