"""The YAML-mapping loader and the atomic writer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hms_mgmt.errors import ConfigError
from hms_mgmt.files import atomic_write, load_yaml_mapping


def test_mapping_is_returned(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nb: [x, y]\n")
    assert load_yaml_mapping(path, what="settings") == {"a": 1, "b": ["x", "y"]}


@pytest.mark.parametrize("content", [None, "", "# only a comment\n", "~\n"])
def test_absent_or_empty_is_an_empty_mapping(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "x.yaml"
    if content is not None:
        path.write_text(content)
    assert load_yaml_mapping(path, what="settings") == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [("- a\n- b\n", "expected a mapping of settings, got a list"), ("a: [\n", "not valid YAML"), ("42\n", "got a int")],
)
def test_bad_file_names_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_yaml_mapping(path, what="settings")
    assert str(path) in str(e.value)


def test_unreadable_path_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="dir.yaml"):
        load_yaml_mapping(tmp_path / "dir.yaml", what="settings")


def test_atomic_write_str_and_bytes_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert atomic_write(path, "hello")
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert atomic_write(path, b"\x00bytes", mode=0o644)
    assert path.read_bytes() == b"\x00bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["f"]  # no temp file left behind


def test_atomic_write_without_replace_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    assert atomic_write(path, "first", replace=False)
    assert not atomic_write(path, "second", replace=False)
    assert path.read_text() == "first"
    assert os.listdir(tmp_path) == ["key"]


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_text("old")

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]
