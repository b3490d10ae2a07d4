"""Autoscaling on CPU against the real dev server and real pods: one proportional decision up,
a stabilised way down, the max bound, and manual scale through a validated update."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request

import pytest
from conftest import eventually, node_pods, seed_spec

from hms_mgmt.errors import ScaleRefused
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator


def burn(endpoint: str, percent: int) -> None:
    req = urllib.request.Request(f"http://{endpoint}/admin/cpu", data=json.dumps({"percent": percent}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def scaled_events(settings):
    return [e for e in read_events(settings.state_dir) if e.type == "service.scaled"]


def scale_spec(runtime: str, **kw):
    # Docker pods get a CPU limit (0.5), so a 90 % burn is ~100 % of the limit; process pods
    # are measured against one core.
    extra = {"cpu_limit": 0.5} if runtime == "docker" else {}
    return seed_spec(scale_interval_s=1.0, health_interval_s=1.0, scale_down_window_s=8.0, **extra, **kw)


@pytest.mark.serial
async def test_cpu_step_scales_in_one_decision_then_back_after_the_window(hms: Orchestrator, settings):
    await hms.deploy(scale_spec(settings.runtime, cpu_target=30), wait=True, timeout=120)
    pods = (await hms.status("hms-ach")).pods
    await asyncio.gather(*(asyncio.to_thread(burn, p.endpoint, 90) for p in pods))

    up = await eventually(lambda: scaled_events(settings), timeout=60, what="a scale-up")
    assert up[0].data["from_replicas"] == 2
    target = up[0].data["to_replicas"]
    samples = [s["cpu_percent"] for s in up[0].data["samples"] if s["cpu_percent"] is not None]
    assert target == min(10, math.ceil(2 * (sum(samples) / len(samples)) / 30 - 1e-9)), (target, samples)
    assert target >= 4, "a 3x load step needs at least 4 pods"
    st = await eventually(lambda: _ready(hms, target), timeout=90, what=f"{target} ready pods")
    assert st.desired_replicas == target and len(node_pods(settings, "hms-ach")) == target
    assert st.last_decisions[-1].kind == "scale" and st.last_decisions[-1].to_replicas == target
    scale_wf = hms.client.get_workflow_handle("svc-hms-ach-scale-1")
    assert (await (await scale_wf.describe()).static_summary()).startswith(f"2 -> {target} pods")

    await asyncio.gather(*(asyncio.to_thread(burn, p.endpoint, 0) for p in pods))
    load_off = time.monotonic()
    await asyncio.sleep(4)  # half the window: no scale-down yet
    st = await hms.status("hms-ach")
    assert st.desired_replicas == target and len(scaled_events(settings)) == 1

    st = await eventually(lambda: _ready(hms, 2), timeout=90, what="back to min_replicas")
    assert time.monotonic() - load_off >= 8.0 - 2 * 1.0, "scaled down before the stabilisation window"
    events = scaled_events(settings)
    assert [(e.data["from_replicas"], e.data["to_replicas"]) for e in events] == [(2, target), (target, 2)]
    assert len(node_pods(settings, "hms-ach")) == 2
    await hms.undeploy("hms-ach")


async def _ready(hms: Orchestrator, n: int):
    st = await hms.status("hms-ach")
    return st if st.phase == "Running" and st.ready_replicas == n and len(st.pods) == n else None


async def test_never_above_max_replicas(hms: Orchestrator, settings):
    await hms.deploy(scale_spec(settings.runtime, cpu_target=10, max_replicas=3), wait=True, timeout=120)
    pods = (await hms.status("hms-ach")).pods
    await asyncio.gather(*(asyncio.to_thread(burn, p.endpoint, 90) for p in pods))
    await eventually(lambda: _ready(hms, 3), timeout=90, what="max_replicas pods")
    at_max = await eventually(
        lambda: [e for e in read_events(settings.state_dir) if e.type == "service.at_max"], timeout=60,
        what="service.at_max",
    )
    assert at_max[0].data["max_replicas"] == 3
    await asyncio.sleep(3)
    st = await hms.status("hms-ach")
    assert st.desired_replicas == 3 and len(node_pods(settings, "hms-ach")) == 3
    await asyncio.gather(*(asyncio.to_thread(burn, p.endpoint, 0) for p in pods))
    await hms.undeploy("hms-ach")


async def test_manual_scale_is_validated_and_applied(hms: Orchestrator, settings):
    await hms.deploy(scale_spec(settings.runtime, min_replicas=1, max_replicas=4, cpu_target=90), wait=True,
                     timeout=120)
    for bad in (0, 5, 20):
        with pytest.raises(ScaleRefused, match=r"outside \[min_replicas 1, max_replicas 4\]"):
            await hms.scale("hms-ach", bad)
    assert (await hms.status("hms-ach")).desired_replicas == 1
    assert len(node_pods(settings, "hms-ach")) == 1

    st = await hms.scale("hms-ach", 3, reason="expected rush at 09:00")
    assert st.desired_replicas == 3 and st.ready_replicas == 3
    assert st.last_decisions[-1].reason == "expected rush at 09:00"
    assert len(node_pods(settings, "hms-ach")) == 3
    # Idle pods: the autoscaler brings it back to min_replicas, but only after the window.
    await asyncio.sleep(3)
    assert (await hms.status("hms-ach")).desired_replicas == 3
    await eventually(lambda: _ready(hms, 1), timeout=60, what="autoscaler back to 1")
    await hms.undeploy("hms-ach")
