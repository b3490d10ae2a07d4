"""The builtin engine's processes, pure parts: how many, figures summed, pod views merged."""

from __future__ import annotations

import json

import pytest

from router.stats import TrafficStats
from router.workers import StatsBatch, absorb, merge_pods, process_count


def test_process_count_reads_the_env_and_refuses_nonsense(monkeypatch):
    monkeypatch.setenv("HMS_ROUTER_PROCS", "3")
    assert process_count() == 3
    monkeypatch.delenv("HMS_ROUTER_PROCS")
    assert process_count() >= 1
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("HMS_ROUTER_PROCS", bad)
        with pytest.raises(ValueError, match="HMS_ROUTER_PROCS"):
            process_count()


def test_a_workers_figures_land_in_the_primarys_once():
    batch = StatsBatch()
    batch.record("svc", "p1", 200, 0.002)
    batch.record("svc", "p2", 502, 0.010)
    batch.record_retry("svc", "connect")
    batch.record_ejection("svc", "p2")
    stats = TrafficStats("builtin")
    stats.record("svc", "p1", 200, 0.001)  # the primary's own request
    absorb(stats, json.loads(json.dumps(batch.take())))  # as it crosses the socket
    assert batch.take() == {"records": [], "retries": [], "ejections": []}  # taken once
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
