"""Pods SIGKILLed one after another under steady GET load through the router (builtin engine):
not one request fails. Each kill waits until the router has all four pods ready again (the
service healed the last one), then the main process of a random pod dies at a random moment —
a pod that has run longer than the crash-loop window (10 s): one that dies younger counts toward
a crash loop, and its replacements rightly back off longer each time. Short run: 5 kills; ``HMS_CHAOS=full``: 50."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from chaos_helpers import COUNTS, chaos_rng, chaos_spec, converge, describe, kill_pod, report  # noqa: F401
from conftest import eventually

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))  # the router tests' fixtures
from router_helpers import LoadUnderway, routed  # noqa: E402, F401 - fixtures

REPLICAS = 4
STABLE_S = 11.0  # older than the service's crash-loop window: max(10 s, 3 x health_interval_s)


def age(pod) -> float:  # noqa: ANN001 - a PodStatus
    return (datetime.now(UTC) - pod.started_at).total_seconds() if pod.started_at else 0.0


async def settled_pods(orch, name: str):  # noqa: ANN001
    st = await orch.status(name, live=False)
    return st if any(p.ready and age(p) > STABLE_S for p in st.pods) else None


@pytest.mark.timeout(240 + 12 * COUNTS.pod_kills_under_load)
@pytest.mark.parametrize("engine", ["builtin"])
async def test_pod_kills_under_steady_load_fail_no_idempotent_request(routed, chaos_rng, capsys):
    rng = chaos_rng
    name = f"chaos-{routed.settings.node[1:7]}"
    spec = chaos_spec(name) | {"min_replicas": REPLICAS, "max_replicas": REPLICAS, "env": {}}
    await routed.orch.deploy(spec, wait=True, timeout=120)
    await routed.wait_pods(name, REPLICAS)
    started = time.monotonic()
    load = LoadUnderway(f"{routed.url}/{name}/", seconds=120 + 12 * COUNTS.pod_kills_under_load)
    killed = []
    try:
        for _ in range(COUNTS.pod_kills_under_load):
            await routed.wait_pods(name, REPLICAS, timeout=90)
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            st = await eventually(lambda: settled_pods(routed.orch, name), timeout=60, interval=0.5,
                                  what=f"a pod of {name} older than {STABLE_S:g}s")
            victim = rng.choice(sorted(p.id for p in st.pods if p.ready and age(p) > STABLE_S))
            if await asyncio.to_thread(kill_pod, routed.settings, victim):
                killed.append(victim)
            load.running("the kills did")
        await routed.wait_pods(name, REPLICAS, timeout=90)
        await asyncio.sleep(1.0)
    finally:
        result = await load.stop()
    took = time.monotonic() - started
    result.assert_all_ok()
    sts, bk = await converge(routed.orch, routed.settings, {name: (REPLICAS, None)}, timeout=60)
    assert bk and bk[0].clean(), f"books after the kills: {bk[0] if bk else None} ({describe(sts)})"
    report(f"pod kills under load (builtin router): {len(killed)} SIGKILLs in {took:.0f}s, {result.total} GETs "
           f"({result.total / took:.0f}/s, concurrency 8), {result.total - result.statuses[200]} failed; books clean",
           capsys)
    await routed.orch.undeploy(name, timeout=120)
