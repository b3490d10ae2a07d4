"""Settings: keyword arguments > HMS_* environment > <state_dir>/config.yaml > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_mgmt import constants
from hms_mgmt.config import Settings, default_node_name, env_var
from hms_mgmt.errors import ConfigError


def env_for(state_dir: Path, **variables: str) -> dict[str, str]:
    return {"HMS_STATE_DIR": str(state_dir), **variables}


def test_defaults(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path))
    assert s.state_dir == tmp_path
    assert s.temporal_address == constants.DEFAULT_TEMPORAL_ADDRESS
    assert s.runtime == "auto" and s.node == default_node_name() and s.token is None
    assert s.node_task_queue() == constants.node_task_queue(default_node_name())


def test_default_state_dir_is_in_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({}).state_dir == tmp_path / ".hms"


def test_env_over_yaml_over_default(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("namespace: from-yaml\nnode: yaml-node\nnode_max_pods: 3\n")
    s = Settings.from_env(env_for(tmp_path, HMS_NODE="env-node"))
    assert s.node == "env-node"  # environment beats the file
    assert s.namespace == "from-yaml"  # the file beats the default
    assert s.node_max_pods == 3
    assert s.watch_max_s == 1800.0  # the default where nobody says otherwise


def test_keyword_arguments_beat_everything(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("node: yaml-node\n")
    s = Settings.from_env(env_for(tmp_path, HMS_NODE="env-node"), node="flag-node", runtime=None)
    assert s.node == "flag-node"
    assert s.runtime == "auto"  # None means "flag not given"


def test_state_dir_argument_chooses_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "config.yaml").write_text("namespace: a\n")
    (tmp_path / "b" / "config.yaml").write_text("namespace: b\n")
    s = Settings.from_env(env_for(tmp_path / "a"), state_dir=tmp_path / "b")
    assert s.state_dir == tmp_path / "b" and s.namespace == "b"


def test_variables_with_other_names(tmp_path: Path) -> None:
    s = Settings.from_env(
        env_for(
            tmp_path,
            HMS_TEMPORAL_TLS_CERT="c.pem",
            HMS_TEMPORAL_TLS_KEY="k.pem",
            HMS_TEMPORAL_TLS_CA="ca.pem",
            HMS_TEMPORAL_API_KEY="secret",
            HMS_TEMPORAL_ADDRESS="cloud:7233",
            HMS_CAPACITY_RETRY_MAX_S="2.5",
            HMS_HISTORY_THRESHOLD="100",
            HMS_ROUTER_PORT="9000",
        )
    )
    assert (s.tls_cert, s.tls_key, s.tls_ca, s.api_key) == ("c.pem", "k.pem", "ca.pem", "secret")
    assert s.temporal_address == "cloud:7233"
    assert (s.capacity_retry_max_s, s.history_threshold, s.router_port) == (2.5, 100, 9000)
    assert env_var("tls_cert") == "HMS_TEMPORAL_TLS_CERT" and env_var("node") == "HMS_NODE"


def test_yaml_and_arguments_use_field_names(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("tls_cert: from-yaml.pem\napi_key: k\n")
    s = Settings.from_env(env_for(tmp_path))
    assert s.tls_cert == "from-yaml.pem" and s.api_key == "k"
    assert Settings(state_dir=tmp_path, tls_ca="ca.pem").tls_ca == "ca.pem"


def test_unrelated_variables_are_ignored(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path, TLS_CERT="no", HMS_REQUIRE_DOCKER="1", HMS_TOKEN=""))
    assert s.tls_cert is None and s.token is None  # an empty variable means unset


def test_constructor_reads_the_real_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HMS_NAMESPACE", "from-env")
    assert Settings().namespace == "from-env"
    assert Settings.from_env().state_dir == tmp_path


@pytest.mark.parametrize(
    ("variables", "yaml", "field"),
    [
        ({"HMS_NODE_MAX_PODS": "lots"}, "", "node_max_pods"),
        ({"HMS_RUNTIME": "k8s"}, "", "runtime"),
        ({}, "watch_max_s: soon\n", "watch_max_s"),
        ({"HMS_TEMPORAL_API_KEY": ""}, "api_key: [1]\n", "api_key"),
        ({}, "nod: x\n", "nod"),
    ],
)
def test_bad_value_names_the_field(tmp_path: Path, variables: dict[str, str], yaml: str, field: str) -> None:
    (tmp_path / "config.yaml").write_text(yaml)
    with pytest.raises(ConfigError, match=field):
        Settings.from_env(env_for(tmp_path, **variables))


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("- not\n- a mapping\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        Settings.from_env(env_for(tmp_path))
    (tmp_path / "config.yaml").write_text(f"state_dir: {tmp_path}\n")
    with pytest.raises(ConfigError, match="state_dir"):
        Settings.from_env(env_for(tmp_path))


def test_reload_keeps_overrides_and_sees_the_file_change(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path, HMS_NAMESPACE="ns"), node="mine")
    assert s.nodes == []
    s.write_config(nodes=[{"name": "other", "cpu": 2, "memory_mb": 1024}], node="ignored")
    again = s.reload()
    assert again.node == "mine"  # the override still wins over the file
    assert again.namespace == "ns"  # the same environment
    assert [n.name for n in again.node_specs()] == ["other"]
    assert again.node_specs()[0].task_queue == constants.node_task_queue("other")


def test_write_config_merges_and_is_private(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path / "new"))
    s.write_config(token="t1")
    path = s.write_config(namespace="ns1")
    assert Settings.from_env(env_for(tmp_path / "new")).token == "t1"
    assert (path.stat().st_mode & 0o777) == 0o600


def test_routers_are_a_comma_list_defaulting_to_the_local_router(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path, HMS_ROUTERS="http://a:8000, http://b:8000"))
    assert s.routers == ["http://a:8000", "http://b:8000"]
    s = Settings.from_env(env_for(tmp_path, HMS_ROUTER_PORT="9001"))
    assert s.routers == ["http://127.0.0.1:9001"]


def test_a_lost_host_is_noticed_within_the_default_grace(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(tmp_path))
    assert (s.node_heartbeat_s, s.node_lost_after_s) == (2.0, 6.0)
    longer = Settings.from_env({**env_for(tmp_path), "HMS_NODE_LOST_AFTER_S": "40", "HMS_NODE_HEARTBEAT_S": "5"})
    assert (longer.node_heartbeat_s, longer.node_lost_after_s) == (5.0, 40.0)
    with pytest.raises(ConfigError, match="node_lost_after_s"):
        Settings.from_env({**env_for(tmp_path), "HMS_NODE_LOST_AFTER_S": "3"})  # under two heartbeats
