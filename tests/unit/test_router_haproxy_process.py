"""Where the haproxy engine keeps the files HAProxy's configuration and Runtime API name."""

from __future__ import annotations

from pathlib import Path

from router.haproxy.process import PLAIN_PATH, HAProxyProcess


def test_paths_in_a_plain_state_dir_stay_there():
    d = Path("/home/ops/.hms/router/haproxy-8000")  # nothing is created before start
    p = HAProxyProcess(d)
    assert p.map_path.parent == p.socket_path.parent == p.config_path.parent == d


def test_a_state_dir_with_a_space_or_a_separator_or_too_long_puts_them_in_a_private_temp_dir(tmp_path: Path):
    for d in (tmp_path / "my state" / "x", tmp_path / "a;b", tmp_path / ("x" * 90)):
        p = HAProxyProcess(d)
        assert PLAIN_PATH.fullmatch(str(p.map_path)) and PLAIN_PATH.fullmatch(str(p.socket_path))
        assert len(str(p.socket_path)) <= 100 and p.map_path.parent == p.socket_path.parent != d
        assert p.config_path.parent == d
