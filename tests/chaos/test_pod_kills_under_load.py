"""Pods SIGKILLed one after another under steady GET load through the router (builtin engine):
not one request fails. Each kill waits until the router has all three pods ready again (the
service heals the last one first), then a random pod's main process dies at a random moment.
Short run: 5 kills; ``HMS_CHAOS=full``: 50."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from chaos_helpers import COUNTS, chaos_rng, chaos_spec, converge, describe, kill_pod, report  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))  # the router tests' fixtures
from router_helpers import routed, run_load  # noqa: E402, F401 - fixtures

REPLICAS = 3


@pytest.mark.timeout(240 + 12 * COUNTS.pod_kills_under_load)
@pytest.mark.parametrize("engine", ["builtin"])
async def test_pod_kills_under_steady_load_fail_no_idempotent_request(routed, chaos_rng, capsys):
    rng = chaos_rng
    name = f"chaos-{routed.settings.node[1:7]}"
    spec = chaos_spec(name) | {"min_replicas": REPLICAS, "max_replicas": REPLICAS, "env": {}}
    await routed.orch.deploy(spec, wait=True, timeout=120)
    await routed.wait_pods(name, REPLICAS)
    stop = asyncio.Event()
    started = time.monotonic()
    load = asyncio.ensure_future(run_load(f"{routed.url}/{name}/", concurrency=8,
                                          seconds=120 + 12 * COUNTS.pod_kills_under_load,
                                          max_requests=10_000_000, stop=stop))
    killed = []
    try:
        for _ in range(COUNTS.pod_kills_under_load):
            await routed.wait_pods(name, REPLICAS, timeout=90)
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            st = await routed.orch.status(name, live=False)
            ready = sorted(p.id for p in st.pods if p.ready)
            assert ready, describe({name: st})
            victim = rng.choice(ready)
            if await asyncio.to_thread(kill_pod, routed.settings, victim):
                killed.append(victim)
            assert not load.done(), "the load ended before the kills did"
        await routed.wait_pods(name, REPLICAS, timeout=90)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        result = await load
    took = time.monotonic() - started
    assert result.total > 0
    assert result.statuses[200] == result.total, \
        f"{result.total - result.statuses[200]} of {result.total} GETs failed: {result.failures[:5]}"
    sts, bk = await converge(routed.orch, routed.settings, {name: (REPLICAS, None)}, timeout=60)
    assert bk and bk[0].clean(), f"books after the kills: {bk[0] if bk else None} ({describe(sts)})"
    report(f"pod kills under load (builtin router): {len(killed)} SIGKILLs in {took:.0f}s, {result.total} GETs "
           f"({result.total / took:.0f}/s, concurrency 8), {result.total - result.statuses[200]} failed; books clean",
           capsys)
    await routed.orch.undeploy(name, timeout=120)
