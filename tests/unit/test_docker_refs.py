"""Which repository an image reference names (to find its repo digest after a push)."""

from __future__ import annotations

import pytest

from hms_mgmt.runtimes.docker import _repository


@pytest.mark.parametrize(("ref", "repo"), [
    ("127.0.0.1:5000/hms-ach:1.4", "127.0.0.1:5000/hms-ach"),
    ("127.0.0.1:5000/team/hms-ach", "127.0.0.1:5000/team/hms-ach"),
    ("127.0.0.1:5000/hms-ach@sha256:" + "a" * 64, "127.0.0.1:5000/hms-ach"),
    ("registry.gov/hms-ach:1.4", "registry.gov/hms-ach"),
    ("hms-ach:1.4", "hms-ach"),
    ("hms-ach", "hms-ach"),
])
def test_repository_of_a_reference(ref: str, repo: str) -> None:
    assert _repository(ref) == repo
