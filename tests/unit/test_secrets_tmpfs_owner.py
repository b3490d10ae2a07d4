"""The secrets tmpfs root and each pod's directory must be this process's own: /dev/shm is
world-writable, and a directory another user made first would let them swap a pod's files."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from hms_mgmt import secrets as store
from hms_mgmt.errors import PodRuntimeError

FILES = [store.SecretFile(name="a", file="a", version=1, value=b"v")]


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    where = tmp_path / "hms-secrets"
    monkeypatch.setattr(store, "TMPFS_ROOT", where)
    monkeypatch.setattr(store, "_on_tmpfs", lambda p: True)
    return where


def _write() -> Path:
    return store.write_pod_files(str(uuid.uuid4()), FILES, uid=os.getuid(), gid=os.getgid())


def test_own_root_is_used(root: Path) -> None:
    where = _write()
    assert where.parent == root and (where / "a").read_bytes() == b"v"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_root_owned_by_another_user_is_refused(root: Path) -> None:
    root.mkdir(mode=0o777)
    os.chmod(root, 0o711)
    os.chown(root, 65534, 65534)
    with pytest.raises(PodRuntimeError, match=r"hms-secrets is owned by uid 65534"):
        _write()
    assert list(root.iterdir()) == []


def test_root_symlink_is_refused(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o711)
    root.symlink_to(elsewhere)
    with pytest.raises(PodRuntimeError, match=r"hms-secrets is a symlink"):
        _write()
    assert list(elsewhere.iterdir()) == []


def test_root_writable_by_others_is_refused(root: Path) -> None:
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(PodRuntimeError, match=r"writable by its group or other users \(mode 777\)"):
        _write()


def test_pod_dir_checked_too(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = Path.mkdir

    def foreign_mkdir(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        real_mkdir(self, mode=mode, parents=parents, exist_ok=exist_ok)
        if self.parent == root:
            os.chmod(self, 0o777)  # as if another user's directory had taken its place

    monkeypatch.setattr(Path, "mkdir", foreign_mkdir)
    with pytest.raises(PodRuntimeError, match=r"writable by its group or other users"):
        _write()
