"""The builtin engine's processes, pure parts: how many, figures summed, pod views merged."""

from __future__ import annotations

import json
import os

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.errors import ConfigError
from router.stats import SAMPLES_PER_SECOND, TrafficStats
from router.workers import StatsBatch, absorb, merge_pods, process_count


def test_process_count_is_the_setting_else_one_per_cpu(tmp_path):
    assert process_count(Settings.from_env({"HMS_ROUTER_PROCS": "3", "HMS_STATE_DIR": str(tmp_path)})) == 3
    assert process_count(Settings.from_env({"HMS_STATE_DIR": str(tmp_path)})) == (os.cpu_count() or 1)
    with pytest.raises(ConfigError, match=r"router_procs \(HMS_ROUTER_PROCS\)"):
        Settings.from_env({"HMS_ROUTER_PROCS": "0", "HMS_STATE_DIR": str(tmp_path)})


def test_a_workers_figures_land_in_the_primarys_once():
    batch = StatsBatch()
    batch.record("svc", "p1", 200, 0.002)
    batch.record("svc", "p2", 502, 0.010)
    batch.record_retry("svc", "connect")
    batch.record_ejection("svc", "p2")
    stats = TrafficStats("builtin")
    stats.record("svc", "p1", 200, 0.001)  # the primary's own request
    absorb(stats, json.loads(json.dumps(batch.take())))  # as it crosses the socket
    assert batch.take() == {"series": [], "retries": [], "ejections": []}  # taken once
    svc = stats.summary()["services"]["svc"]
    assert (svc["requests"], svc["errors"], svc["retries"]) == (3, 1, 1)
    assert stats.requests.labels("svc", "p1", "200")._value.get() == 2
    assert stats.ejections.labels("svc", "p2")._value.get() == 1


def _info(state: str, outstanding: int, ejected: bool = False) -> dict:
    return {"address": "a", "state": state, "outstanding": outstanding, "latency_ms": 1.0, "ejected": ejected,
            "ejections": int(ejected)}


def test_a_pod_is_done_only_when_every_process_is_done_with_it():
    primary = {"p1": _info("draining", 0), "p2": _info("draining", 1)}
    worker = {"p1": _info("ready", 0), "p2": _info("draining", 2, ejected=True), "p3": _info("draining", 0)}
    merged = merge_pods([primary, worker])
    assert merged["p1"]["state"] == "ready"  # the worker still routes to it (its table lags)
    assert (merged["p2"]["outstanding"], merged["p2"]["ejected"], merged["p2"]["ejections"]) == (3, True, 1)
    assert merged["p3"] == _info("draining", 0)
    assert primary["p2"]["outstanding"] == 1  # the inputs are left as they were


def test_a_series_gives_the_figures_of_one_record_per_request():
    records = [("svc", "p1", 200, 0.002, 100.0), ("svc", "p1", 200, 0.3, 100.2), ("svc", "p2", 503, 0.04, 100.5),
               ("other", "p9", 200, 12.0, 101.0)]
    one, batched, batch = TrafficStats("builtin"), TrafficStats("builtin"), StatsBatch()
    for service, pod, status, seconds, now in records:
        one.record(service, pod, status, seconds, now=now)
        batch.record(service, pod, status, seconds, now=now)
    absorb(batched, json.loads(json.dumps(batch.take())))

    def samples(stats: TrafficStats) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in stats.registry.collect() for s in metric.samples if not s.name.endswith("_created")}

    assert samples(batched) == samples(one)
    assert batched.windows["svc"].buckets[100].latencies == one.windows["svc"].buckets[100].latencies


def test_a_busy_second_keeps_a_uniform_sample_of_its_latencies():
    stats = TrafficStats("builtin")
    n = 20 * SAMPLES_PER_SECOND
    stats.record_series("svc", "p1", 200, [i / n for i in range(n)], [7.5] * n)
    bucket = stats.windows["svc"].buckets[7]
    assert (bucket.requests, len(bucket.latencies)) == (n, SAMPLES_PER_SECOND)
    kept = sorted(bucket.latencies)
    assert 300 < kept[len(kept) // 2] < 700  # the median of 0..1000 ms, not the first or last 400 requests
