"""The one duration formatter."""

from __future__ import annotations

import pytest

from hms_mgmt.durations import format_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (59, "59s"),
        (60, "1m"),
        (125, "2m 5s"),
        (3600, "1h"),
        (3660, "1h 1m"),
        (3661, "1h 1m"),
        (86400, "1d"),
        (90000, "1d 1h"),
        (30 * 86400 - 5, "29d 23h"),
        (-120, "2m"),
    ],
)
def test_two_largest_units(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
