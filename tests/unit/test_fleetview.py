"""The Scheduler's view of the fleet: one read serves placements for a while, the pods placed
are assumed until a read shows them, and a caller that needs news waits for a read begun after
it asked."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from activities.fleetview import FleetView


class Fleet:
    """A fake fleet read: counts reads, returns the generation it was at when the read began."""

    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    def clock(self) -> float:
        return self.now

    async def read(self):
        self.reads += 1
        generation = self.reads
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("frontend unavailable")
        return [(f"svc-gen{generation}", None)]


def view(fleet: Fleet) -> FleetView:
    return FleetView(fleet.read, fresh_s=2.0, max_age_s=30.0, clock=fleet.clock)


async def test_placements_close_together_share_one_read() -> None:
    fleet = Fleet()
    v = view(fleet)
    for _ in range(5):
        statuses = await v.services()
        fleet.now += 0.3
    assert fleet.reads == 1
    assert statuses == [("svc-gen1", None)]


def test_a_pod_placed_counts_until_a_read_shows_it_or_it_is_too_old() -> None:
    fleet = Fleet()
    v = view(fleet)
    seen = Counter({("a", "n1"): 1})
    v.book("a", ["n1", "n1", "n2"], seen, 0.5, 128)
    assert sorted(v.assumed(seen, exclude="b")) == [("n1", 2, 0.5, 128), ("n2", 1, 0.5, 128)]
    assert v.assumed(seen, exclude="a") == []  # a service's own pods come from its own record
    v.book("a", ["n2"], seen, 0.5, 128)  # a second placement on what the first assumed
    assert ("n2", 2, 0.5, 128) in v.assumed(seen, exclude="b")
    shown = Counter({("a", "n1"): 3, ("a", "n2"): 1})  # the read shows n1's two, one of n2's
    assert v.assumed(shown, exclude="b") == [("n2", 1, 0.5, 128)]
    fleet.now += 61  # a start that failed is not assumed for ever
    assert v.assumed(shown, exclude="b") == []


async def test_an_old_read_is_refreshed_behind_the_caller() -> None:
    fleet = Fleet()
    v = view(fleet)
    await v.services()
    fleet.now += 5  # older than fresh_s, younger than max_age_s
    fleet.gate = asyncio.Event()
    statuses = await asyncio.wait_for(v.services(), 1)  # not held up by the read in flight
    assert statuses == [("svc-gen1", None)] and fleet.reads == 2
    fleet.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    statuses = await v.services()
    assert statuses == [("svc-gen2", None)] and fleet.reads == 2


async def test_a_read_older_than_max_age_or_a_fresh_ask_waits_for_news() -> None:
    fleet = Fleet()
    v = view(fleet)
    await v.services()
    fleet.now += 31
    statuses = await v.services()
    assert statuses == [("svc-gen2", None)]
    fleet.now += 0.1
    statuses = await v.services(fresh=True)
    assert statuses == [("svc-gen3", None)]


async def test_a_failed_read_reaches_the_waiting_caller_and_the_next_call_reads_again() -> None:
    fleet = Fleet()
    v = view(fleet)
    fleet.fail = True
    with pytest.raises(RuntimeError, match="frontend unavailable"):
        await v.services()
    fleet.fail = False
    statuses = await v.services()
    assert statuses == [("svc-gen2", None)]


async def test_a_slow_read_is_kept_fresh_for_five_times_its_length() -> None:
    fleet = Fleet()
    v = view(fleet)
    real_read = fleet.read

    async def slow_read():
        fleet.now += 3.0  # the read itself took 3 s (a large fleet)
        return await real_read()

    v.read = slow_read
    await v.services()
    fleet.now += 10  # past fresh_s (2 s), within 5 x 3 s of the read's start
    await v.services()
    assert fleet.reads == 1
    fleet.now += 6  # 19 s after the read began: refreshed behind the caller
    await v.services()
    await asyncio.sleep(0)
    assert fleet.reads == 2


async def test_a_heal_goes_on_with_a_read_however_old_and_refreshes_it_behind() -> None:
    fleet = Fleet()
    v = view(fleet)
    await v.services()
    fleet.now += 300  # far past max_age_s: a placement would wait for news, a heal does not
    fleet.gate = asyncio.Event()
    statuses = await asyncio.wait_for(v.services(stale_ok=True), 1)
    assert statuses == [("svc-gen1", None)] and fleet.reads == 2  # the refresh is on its way
    fleet.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await v.services() == [("svc-gen2", None)]


async def test_a_refresh_nobody_waits_for_is_the_paced_read() -> None:
    fleet = Fleet()
    behind: list[float] = []

    async def paced():
        behind.append(fleet.now)
        return await fleet.read()

    v = FleetView(fleet.read, read_behind=paced, fresh_s=2.0, max_age_s=30.0, clock=fleet.clock)
    await v.services()  # the first read: its caller waits
    assert behind == []
    fleet.now += 5
    await v.services()  # past fresh_s: refreshed behind the caller
    await asyncio.sleep(0)
    assert behind == [105.0]
    fleet.now += 0.1
    await v.services(fresh=True)  # a caller waits again: the full-speed read
    assert behind == [105.0] and fleet.reads == 3
