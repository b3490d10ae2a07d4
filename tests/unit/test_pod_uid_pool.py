"""The per-pod uid leases (``hms_mgmt/runtimes/uids.py``) in a directory of the test's own: unique,
round-robin, given back only by their pod, and a lease whose pod is gone is taken again, never one
whose pod is on record or whose worker is mid-start. And the settings that bound the range."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.errors import ConfigError
from hms_mgmt.runtimes import PodRuntimeError
from hms_mgmt.runtimes import uids as uids_mod
from hms_mgmt.runtimes.uids import UidPool

BASE = 1_950_000_000


@pytest.fixture
def pool(tmp_path: Path) -> UidPool:
    return UidPool(BASE, 3, tmp_path / "leases")


def rec(tmp_path: Path, name: str, uid: int | None = None) -> Path:
    path = tmp_path / f"{name}.json"
    if uid is not None:
        path.write_text(json.dumps({"pod_id": name, "uid": uid}))
    return path


def test_uids_are_unique_round_robin_and_given_back_only_by_their_pod(pool: UidPool, tmp_path: Path) -> None:
    a = pool.take("a", rec(tmp_path, "a"))
    b = pool.take("b", rec(tmp_path, "b"))
    assert (a, b) == (BASE, BASE + 1)
    assert not pool.release(a, "b", rec(tmp_path, "b"))  # not b's to give back
    assert pool.holds(a, "a", rec(tmp_path, "a"))
    assert pool.release(a, "a", rec(tmp_path, "a"))
    assert pool.take("c", rec(tmp_path, "c")) == BASE + 2  # round-robin: the freed uid waits its turn
    assert pool.take("d", rec(tmp_path, "d")) == BASE
    with pytest.raises(PodRuntimeError, match=r"no free pod uid.*pod_uid_base, pod_uid_count"):
        pool.take("e", rec(tmp_path, "e"))


def test_a_lease_whose_pod_is_gone_is_taken_again(pool: UidPool, tmp_path: Path) -> None:
    on_record = pool.take("kept", rec(tmp_path, "kept", BASE))  # its record names the uid
    mid_start = pool.take("starting", rec(tmp_path, "starting"))  # no record yet; its worker (us) lives
    dead = subprocess.Popen(["true"])
    dead.wait()
    (pool.directory / str(BASE + 2)).write_text(json.dumps(
        {"pod_id": "gone", "record": str(rec(tmp_path, "gone")), "at": time.time(),
         "worker": {"pid": dead.pid, "start": "1"}}))  # a worker killed before it wrote the record
    assert pool.take("new", rec(tmp_path, "new")) == BASE + 2
    assert pool.holds(BASE + 2, "new", rec(tmp_path, "new"))
    with pytest.raises(PodRuntimeError, match="pod_uid_count"):
        pool.take("more", rec(tmp_path, "more"))
    assert pool.holds(on_record, "kept", rec(tmp_path, "kept", BASE))
    assert pool.holds(mid_start, "starting", rec(tmp_path, "starting"))


def test_a_lease_older_than_the_grace_without_record_is_taken_again(pool: UidPool, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in "abc":
        pool.take(name, rec(tmp_path, name))
    monkeypatch.setattr(uids_mod, "LEASE_GRACE_S", -1.0)
    assert pool.take("d", rec(tmp_path, "d")) == BASE


@pytest.mark.skipif(os.geteuid() != 0, reason="a process of another uid needs root")
def test_a_uid_some_process_has_is_neither_taken_nor_given_back(pool: UidPool, tmp_path: Path) -> None:
    squatter = subprocess.Popen(["sleep", "30"], user=BASE, group=BASE, extra_groups=[])
    try:
        assert pool.take("a", rec(tmp_path, "a")) == BASE + 1  # BASE runs a process: not free
        (pool.directory / str(BASE)).write_text(json.dumps({"pod_id": "x", "record": str(rec(tmp_path, "x"))}))
        assert not pool.release(BASE, "x", rec(tmp_path, "x"))  # a process of it is left: the lease stays
        assert (pool.directory / str(BASE)).exists()
    finally:
        squatter.kill()
        squatter.wait()
    assert pool.release(BASE, "x", rec(tmp_path, "x"))


def test_the_range_must_lie_above_16_bit_ids_and_below_2_to_the_31() -> None:
    assert Settings().pod_uid_base == 1_900_000_000 and Settings().pod_uid_count == 65_536
    assert Settings().pod_limits().uid_base == 1_900_000_000
    with pytest.raises(ConfigError, match="pod_uid_base"):
        Settings(pod_uid_base=1000)
    with pytest.raises(ConfigError, match=r"pod_uid_base \+ pod_uid_count"):
        Settings(pod_uid_base=2_147_000_000, pod_uid_count=1_000_000)
    with pytest.raises(ConfigError, match="pod_uid_count"):
        Settings(pod_uid_count=0)
    with pytest.raises(PodRuntimeError, match="pod_uid_base"):
        UidPool(100, 10)


def test_a_range_over_an_account_is_refused(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid  # 65534: below what the setting allows, so set by hand
    overlapping = UidPool(65_536, 1, tmp_path / "leases")
    overlapping.base, overlapping.count = nobody, 65_536 - nobody + 1
    with pytest.raises(PodRuntimeError, match="overlap the accounts"):
        overlapping.take("a", rec(tmp_path, "a"))
    assert UidPool(65_536, 1, tmp_path / "leases").take("a", rec(tmp_path, "a")) == 65_536
