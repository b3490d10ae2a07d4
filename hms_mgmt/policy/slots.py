"""Time slots, the pure clock: when a slot starts and ends, whether it is on now, and which of
several slots sets the bounds.

A slot's ``start`` and ``end`` are both 5-field cron expressions (a slot that comes back, like
KEDA's cron scaler) or both ISO-8601 instants (a one-off). Cron is read in the slot's time zone
with ``croniter``. A slot is *on* when its latest start is later than its latest end, both at or
before ``now``. Where slots overlap, the one with the highest floor (``min_replicas``) wins, then
the highest ceiling, then the name: one slot's bounds apply, never a blend.

No I/O and no clock: ``now`` is an input, so the workflow calls this with ``workflow.now()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

Edge = Literal["start", "end"]
EDGES: tuple[Edge, Edge] = ("start", "end")
_TICK = timedelta(microseconds=1)
# How early an edge may arrive and still count (a schedule fires at its time; the check runs after it).
EDGE_TOLERANCE_S = 60.0


class SlotLike(Protocol):
    """What the clock needs of a slot (``hms_mgmt.models.TimeSlot`` is one)."""

    name: str
    start: str
    end: str
    timezone: str
    min_replicas: int
    max_replicas: int | None


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError naming it when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'UTC' or 'Europe/Paris')") from None


def check_zone(name: str) -> str:
    zone(name)
    return name


def is_cron(text: str) -> bool:
    return len(text.split()) == 5 and croniter.is_valid(text)


def instant(text: str, tz: str) -> datetime | None:
    """``text`` as an aware instant (a naive one is read in ``tz``), or None if it is not one."""
    if is_cron(text) or not any(c.isdigit() for c in text[:4]):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=zone(tz))


def check_edge(text: str, tz: str = "UTC") -> str:
    """``text`` unchanged when it is a 5-field cron expression or an ISO-8601 instant."""
    if is_cron(text) or instant(text, tz) is not None:
        return text
    raise ValueError(f"{text!r} is neither a 5-field cron expression ('0 8 * * 1-5') nor an ISO-8601 "
                     "instant ('2026-12-24T08:00:00+01:00')")


def check_slot(start: str, end: str, tz: str) -> None:
    """Both edges of one kind; a one-off ends after it starts; a recurring one ends at other times."""
    first, last = instant(start, tz), instant(end, tz)
    if (first is None) != (last is None):
        raise ValueError("start and end must both be cron expressions or both be instants")
    if first is not None and last is not None and last <= first:
        raise ValueError(f"end ({end}) is not after start ({start})")
    if first is None and start.split() == end.split():
        raise ValueError("start and end are the same cron expression: the slot would never be on")


def last_edge(text: str, tz: str, now: datetime) -> datetime | None:
    """The latest time at or before ``now`` that ``text`` names (None: never yet)."""
    at = instant(text, tz)
    if at is not None:
        return at if at <= now else None
    return croniter(text, now.astimezone(zone(tz)) + _TICK).get_prev(datetime)


def next_edge(text: str, tz: str, now: datetime) -> datetime | None:
    """The first time after ``now`` that ``text`` names (None: a one-off already past)."""
    at = instant(text, tz)
    if at is not None:
        return at if at > now else None
    return croniter(text, now.astimezone(zone(tz))).get_next(datetime)


def is_on(slot: SlotLike, now: datetime) -> bool:
    """Started, and not ended since."""
    started = last_edge(slot.start, slot.timezone, now)
    ended = last_edge(slot.end, slot.timezone, now)
    return started is not None and (ended is None or started > ended)


def edge_on_time(slot: SlotLike, edge: str, now: datetime, tolerance_s: float = EDGE_TOLERANCE_S) -> bool:
    """Whether the clock agrees with an edge that arrives at ``now``: a start while the slot is on
    (or comes on within ``tolerance_s``), an end while it is off (or goes off within it). A
    schedule triggered out of its time by anyone who reaches Temporal carries a genuine grant;
    only the clock tells that it is not the slot's time."""
    later = now + timedelta(seconds=tolerance_s)
    if edge == "start":
        return is_on(slot, now) or is_on(slot, later)
    return not is_on(slot, now) or not is_on(slot, later)


def next_edges(slot: SlotLike, now: datetime) -> tuple[datetime | None, datetime | None]:
    """(next start, next end) after ``now``, in UTC."""
    def utc(t: datetime | None) -> datetime | None:
        return None if t is None else t.astimezone(UTC)
    return (utc(next_edge(slot.start, slot.timezone, now)), utc(next_edge(slot.end, slot.timezone, now)))


def slot_bounds(slot: SlotLike, spec_max: int) -> tuple[int, int]:
    """The slot's (min, max); without a max of its own, at least the spec's."""
    top = slot.max_replicas if slot.max_replicas is not None else max(slot.min_replicas, spec_max)
    return slot.min_replicas, top


def winner(slots: Iterable[SlotLike], spec_max: int) -> SlotLike | None:
    """Of the slots on, the one whose bounds apply: the highest floor wins, then the highest
    ceiling, then the first name."""
    on = sorted(slots, key=lambda s: s.name)
    return max(on, key=lambda s: slot_bounds(s, spec_max), default=None) if on else None


def on_now(slots: Sequence[SlotLike], now: datetime) -> list[str]:
    """The names of the slots on at ``now`` (by the clock alone: what a deploy starts from)."""
    return [s.name for s in slots if is_on(s, now)]


def is_landing(bounds: tuple[int, int]) -> bool:
    """0/0: every pod stops, the service stays."""
    return bounds == (0, 0)


def clamp(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])
