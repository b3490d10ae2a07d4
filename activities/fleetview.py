"""What the Scheduler knows of the other services' pods, without asking every service on every
placement.

Asking each running service for its status is one query per service: at 500 services a heal's
``pick_node`` spent seconds reading the fleet, and placements waited behind each other. The
view keeps one read of every service for ``fresh_s`` and adds the placements this worker made
and assumes them (as Kubernetes' scheduler assumes a pod it bound until its informer sees it):
a service is counted with at least as many pods on a node as this worker placed there, until a
read shows them or ``assume_s`` has passed (a start that failed). An older read is refreshed in the background while placements go on with it (and
their bookings); one older than ``max_age_s``, or a caller that asks for ``fresh`` (a placement
that found no room, so a refusal is never made on old news), waits for a new read. A heal
(``stale_ok``) never waits on age alone: it replaces a pod the view still counts. A read nobody
waits for uses ``read_behind`` (fewer queries in flight), so it does not crowd out the control
worker's workflow tasks: at 500 services a read is 500 status queries, each a workflow task.

A pod stopped since the read still counts until the next one: the view errs towards "full".
The placement and its booking happen with no ``await`` between them, so placements at the same
moment see each other.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hms_mgmt.models import ServiceStatus

Statuses = list[tuple[str, ServiceStatus]]  # (service workflow id, its status)
Key = tuple[str, str]  # (service, node)


@dataclass
class Assumed:
    """Pods of one service this worker placed on one node: at least ``count`` there from ``at``."""

    count: int
    at: float
    cpu: float
    memory_mb: int


@dataclass
class _Read:
    began: float
    statuses: Statuses
    took: float = 0.0


def pods_by_key(statuses: list[ServiceStatus]) -> Counter[Key]:
    """How many live pods each service has on each node, as read."""
    return Counter((st.spec.name, p.node) for st in statuses for p in st.pods if p.health != "exited")


@dataclass
class FleetView:
    read: Callable[[], Awaitable[Statuses]]
    read_behind: Callable[[], Awaitable[Statuses]] | None = None  # the same read, paced (None: ``read``)
    fresh_s: float = 2.0
    max_age_s: float = 30.0
    assume_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _last: _Read | None = None
    _inflight: asyncio.Future[_Read] | None = None
    _inflight_began: float = 0.0
    _assumed: dict[Key, Assumed] = field(default_factory=dict)

    async def services(self, *, fresh: bool = False, stale_ok: bool = False) -> Statuses:
        """Every running service's status, from a read at most ``max_age_s`` old (``fresh``: one
        begun after this call; ``stale_ok``: any read, however old). A read is fresh for
        ``fresh_s``, or five times as long as it took (at 500 services a read is 500 queries:
        the fleet is not read over and over)."""
        now = self.clock()
        last = self._last
        too_old = last is None or (not stale_ok and now - last.began > max(self.max_age_s, 10 * last.took))
        if fresh or too_old:
            last = await asyncio.shield(self._refresh(now if fresh else None, urgent=True))
        elif last is not None and now - last.began > max(self.fresh_s, 5 * last.took):
            self._refresh(None, urgent=False)  # in the background; this caller goes on with the last read
        assert last is not None
        return last.statuses

    def assumed(self, seen: Counter[Key], exclude: str) -> list[tuple[str, int, float, int]]:
        """The pods placed here that ``seen`` does not show yet: (node, how many, cpu, memory)
        each, for every service but ``exclude``. Shown or too old, an assumption is dropped."""
        now, out = self.clock(), []
        for key, a in list(self._assumed.items()):
            if now - a.at > self.assume_s or seen[key] >= a.count:
                del self._assumed[key]
            elif key[0] != exclude:
                out.append((key[1], a.count - seen[key], a.cpu, a.memory_mb))
        return out

    def book(self, service: str, nodes: list[str], seen: Counter[Key], cpu: float, memory_mb: int) -> None:
        """``nodes`` were just picked for pods of ``service``; ``seen`` is the count it picked on."""
        for node, n in Counter(nodes).items():
            key = (service, node)
            a = self._assumed.get(key)
            base = max(seen[key], a.count if a else 0)
            self._assumed[key] = Assumed(base + n, self.clock(), cpu, memory_mb)

    def _refresh(self, not_before: float | None, *, urgent: bool) -> asyncio.Future[_Read]:
        """The read in flight, or a new one (``urgent``: a caller waits for it). ``not_before``:
        only a read that began at or after it will do (a caller that needs news newer than its
        own question)."""
        fut = self._inflight
        if fut is not None and (not_before is None or self._inflight_began >= not_before):
            return fut
        self._inflight_began = self.clock()
        read = self.read if urgent or self.read_behind is None else self.read_behind
        fut = asyncio.ensure_future(self._do_read(self._inflight_began, read))
        self._inflight = fut
        fut.add_done_callback(self._done)
        return fut

    async def _do_read(self, began: float, read: Callable[[], Awaitable[Statuses]]) -> _Read:
        statuses = await read()
        return _Read(began, statuses, self.clock() - began)

    def _done(self, fut: asyncio.Future[_Read]) -> None:
        if self._inflight is fut:
            self._inflight = None
        if fut.cancelled() or fut.exception() is not None:
            return
        got = fut.result()
        if self._last is None or got.began >= self._last.began:
            self._last = got
