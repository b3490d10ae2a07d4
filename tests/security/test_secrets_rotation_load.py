"""A secret rotated under load: `set_secret` with a new value rolls the service that names it
(surge, readiness, drain) while GETs flow through a real router, and not one of them fails; every
pod then reads the new value. Real Temporal, real process pods, the builtin router."""

from __future__ import annotations

import asyncio
import secrets as random
import sys
from pathlib import Path

import pytest
from conftest import eventually, seed_spec
from test_secrets_e2e import _pod_view

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))  # the router tests' fixtures
from router_helpers import routed, run_load  # noqa: E402, F401 - fixtures

FAST = {"health_interval_s": 1.0, "drain_s": 1.0, "min_ready_s": 0.5}
REPLICAS = 3

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("engine", ["builtin"])
async def test_a_rotation_under_load_loses_no_request_and_every_pod_reads_the_new_value(routed):  # noqa: F811
    orch = routed.orch
    old, new = random.token_hex(16).encode(), random.token_hex(16).encode()
    await orch.set_secret("bank-key", old)
    await orch.deploy(seed_spec(min_replicas=REPLICAS, max_replicas=REPLICAS, secrets=["bank-key"], **FAST),
                      wait=True, timeout=120)
    await routed.wait_pods("hms-ach", REPLICAS)
    before = {p.id for p in (await orch.status("hms-ach")).pods}
    assert all(_pod_view("process", pod, "bank-key")[0] == old for pod in before)

    stop = asyncio.Event()
    load = asyncio.ensure_future(run_load(f"{routed.url}/hms-ach/", concurrency=6, seconds=150,
                                          max_requests=1_000_000, stop=stop))
    try:
        await asyncio.sleep(1.0)
        info = await orch.set_secret("bank-key", new)
        assert (info.version, info.used_by) == (2, ["hms-ach"])

        async def rolled():
            st = await orch.status("hms-ach")
            done = st.phase == "Running" and st.ready_replicas == REPLICAS and len(st.pods) == REPLICAS \
                and all(p.revision == 2 and p.ready for p in st.pods)
            return st if done else None

        st = await eventually(rolled, timeout=150, what="the rollout onto bank-key v2")
        await routed.wait_pods("hms-ach", REPLICAS)
        await asyncio.sleep(0.5)
        assert not load.done(), "the load ended before the rollout did"
    finally:
        stop.set()
        g = await load
    assert g.total > 100 and g.statuses[200] == g.total, \
        f"{g.total - g.statuses[200]} of {g.total} GETs failed during the rotation: {g.failures[:5]}"
    after = {p.id for p in st.pods}
    assert not after & before  # every pod was replaced ...
    assert before & set(g.pods) and after & set(g.pods)  # ... while the load reached old and new pods
    for pod in after:
        assert _pod_view("process", pod, "bank-key")[0] == new
    assert [r.spec.secrets[0].version for r in await orch.rollout_history("hms-ach")][-2:] == [None, 2]  # v2 pinned
    await orch.undeploy("hms-ach", timeout=120)
