"""The one health poller both sides of a benchmark use, and a generic poll-until."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

DEFAULT_POLL_S = 0.1  # one interval for every poller on both sides of every benchmark


async def http_status(session: aiohttp.ClientSession, endpoint: str, path: str, timeout_s: float) -> int | None:
    """The status of ``GET http://<endpoint><path>`` (redirects not followed), None if no answer."""
    try:
        async with session.get(f"http://{endpoint}{path}", allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


@dataclass
class PollResult:
    ok: bool
    elapsed_s: float | None  # seconds from the caller's t0 to the round where the Nth endpoint answered
    first_seen_s: dict[str, float] = field(default_factory=dict)  # endpoint -> first discovered
    healthy_s: dict[str, float] = field(default_factory=dict)  # endpoint -> first healthy answer
    rounds: int = 0


class HealthPoller:
    """Fixed-interval poller. Each round: discover endpoints (until ``n`` are known), probe
    every known endpoint that has not answered yet, in parallel; stop once ``n`` answered."""

    def __init__(self, *, interval_s: float = DEFAULT_POLL_S, path: str = "/health", timeout_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.path = path
        self.timeout_s = timeout_s

    async def _probe(self, session: aiohttp.ClientSession, endpoint: str) -> bool:
        status = await http_status(session, endpoint, self.path, self.timeout_s)
        return status is not None and 200 <= status < 400

    async def wait(
        self,
        discover: Callable[[], Awaitable[list[str]]],
        n: int,
        *,
        t0: float,
        timeout_s: float = 120.0,
    ) -> PollResult:
        """``t0`` is a ``time.perf_counter()`` value; times in the result are relative to it."""
        res = PollResult(ok=False, elapsed_s=None)
        deadline = time.perf_counter() + timeout_s
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.perf_counter() < deadline:
                tick = time.perf_counter()
                res.rounds += 1
                if len(res.first_seen_s) < n:
                    for ep in await discover():
                        res.first_seen_s.setdefault(ep, time.perf_counter() - t0)
                pending = [ep for ep in res.first_seen_s if ep not in res.healthy_s]
                if pending:
                    answers = await asyncio.gather(*(self._probe(session, ep) for ep in pending))
                    now = time.perf_counter() - t0
                    for ep, ok in zip(pending, answers, strict=True):
                        if ok:
                            res.healthy_s[ep] = now
                if len(res.healthy_s) >= n:
                    res.ok = True
                    res.elapsed_s = max(sorted(res.healthy_s.values())[:n])
                    return res
                await asyncio.sleep(max(0.0, self.interval_s - (time.perf_counter() - tick)))
        return res


async def poll_until(
    check: Callable[[], Awaitable[bool]], *, t0: float, interval_s: float = DEFAULT_POLL_S, timeout_s: float = 120.0
) -> float | None:
    """Call ``check()`` every ``interval_s`` until true; seconds since ``t0`` (perf_counter), or None."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        tick = time.perf_counter()
        with contextlib.suppress(Exception):
            if await check():
                return time.perf_counter() - t0
        await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - tick)))
    return None
