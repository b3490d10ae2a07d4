"""A node's address (issue 18, part 1): the setting, its validation, and where it goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hms_mgmt.addresses import check_address, host_port
from hms_mgmt.config import Settings
from hms_mgmt.errors import ConfigError
from hms_mgmt.models import NodeSpec


def env_for(state_dir: Path, **variables: str) -> dict[str, str]:
    return {"HMS_STATE_DIR": str(state_dir), **variables}


def test_default_is_loopback_on_one_host(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path))
    assert s.node_address == "127.0.0.1"
    assert s.this_node().address == "127.0.0.1"
    assert NodeSpec(name="a", task_queue="q").address == "127.0.0.1"


def test_env_file_and_flag(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("node_address: 10.77.0.9\n")
    assert Settings.from_env(env_for(tmp_path)).this_node().address == "10.77.0.9"
    s = Settings.from_env(env_for(tmp_path, HMS_NODE_ADDRESS="10.77.0.3"))
    assert s.this_node().address == "10.77.0.3"  # the environment beats the file
    s = Settings.from_env(env_for(tmp_path, HMS_NODE_ADDRESS="10.77.0.3"), node_address="10.77.0.4")
    assert s.this_node().address == "10.77.0.4"  # `hms worker --address` beats both
    assert s.reload().this_node().address == "10.77.0.4"  # and is kept when the worker re-reads


@pytest.mark.parametrize("bad", ["hostb", "10.77.0", "10.77.0.300", "0.0.0.0", "::", "224.0.0.1", "10.0.0.1:80", ""])
def test_not_an_address_to_dial_names_the_setting(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"node_address \(HMS_NODE_ADDRESS\)"):
        Settings.from_env(env_for(tmp_path), node_address=bad)
    if bad:  # HMS_NODE_ADDRESS= (empty) means unset
        with pytest.raises(ConfigError, match="HMS_NODE_ADDRESS"):
            Settings.from_env(env_for(tmp_path, HMS_NODE_ADDRESS=bad))


def test_a_node_in_config_yaml_is_checked_too(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("nodes:\n  - {name: b, address: 10.77.0.3}\n  - {name: c}\n")
    specs = {n.name: n.address for n in Settings.from_env(env_for(tmp_path)).node_specs()}
    assert specs == {"b": "10.77.0.3", "c": "127.0.0.1"}
    with pytest.raises(ValidationError, match="not an IP address"):
        NodeSpec(name="b", task_queue="q", address="node-b.local")


def test_canonical_form_and_endpoints() -> None:
    assert check_address(" 10.77.0.3 ") == "10.77.0.3"
    assert check_address("[FD00::5]") == "fd00::5"
    assert host_port("10.77.0.3", 8080) == "10.77.0.3:8080"
    assert host_port("fd00::5", 8080) == "[fd00::5]:8080"
