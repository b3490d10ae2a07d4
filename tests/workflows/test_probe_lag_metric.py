"""The health monitor counts every ping it sends, with how late it was and how long it took, on
the worker's /metrics: what bench/soak.py reads at scale. Real server, worker, process pod; ~15 s."""

from __future__ import annotations

import asyncio
import urllib.request

from conftest import eventually, make_settings, seed_spec, sweep_pods, terminate_running
from prometheus_client.parser import text_string_to_metric_families

from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import free_port
from worker.main import HmsWorker


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels
            or set(s.labels) == {"le"} and s.labels["le"] == "+Inf"}


async def test_every_ping_is_counted_with_its_lag_and_duration(temporal_env, tmp_path):
    port = free_port()
    settings = make_settings(temporal_env, tmp_path / "state", "process", metrics_port=port)
    try:
        async with HmsWorker(temporal_env.client, settings, metrics=True):
            hms = Orchestrator(temporal_env.client, settings)
            await hms.deploy(seed_spec(min_replicas=2, max_replicas=2, health_interval_s=1), wait=True, timeout=60)

            async def pings() -> float:
                return (await asyncio.to_thread(scrape, port)).get("hms_health_probe_lag_seconds_count", 0.0)

            first = await eventually(pings, timeout=30, what="a counted ping")
            await asyncio.sleep(4)
            m = await asyncio.to_thread(scrape, port)
            # Two pods pinged each second: at least 2 x 2 more pings in 4 s, allowing a slow round.
            assert m["hms_health_probe_lag_seconds_count"] >= first + 4
            assert m["hms_health_probe_duration_seconds_count"] == m["hms_health_probe_lag_seconds_count"]
            assert m["hms_health_probe_lag_seconds_bucket"] == m["hms_health_probe_lag_seconds_count"]
            assert 0 <= m["hms_health_probe_lag_seconds_sum"]
            await hms.undeploy("hms-ach")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
