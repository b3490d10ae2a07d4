"""The haproxy engine's reading of HAProxy's request log: under load HAProxy sends one line in k
and writes k in it; each line must count for k requests in ``/-/stats`` and ``/metrics``."""

from __future__ import annotations

from pathlib import Path

import pytest

import router.haproxy as haproxy
from hms_mgmt.config import Settings
from router.feed import EndpointTable
from router.policy import PodState
from router.stats import TrafficStats


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> haproxy.HAProxyEngine:
    monkeypatch.setattr(haproxy, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    e = haproxy.HAProxyEngine(Settings(state_dir=tmp_path), EndpointTable(), TrafficStats("haproxy"),
                              host="127.0.0.1", port=1, pool_size=2)
    be = e.backends[0]
    be.service = "svc"
    be.pods["pod-a"] = PodState(pod="pod-a", address="127.0.0.1:9001")
    return e


def metric(e: haproxy.HAProxyEngine, name: str, **labels: str) -> float:
    return e.stats.registry.get_sample_value(name, labels) or 0.0


def test_a_sampled_line_counts_for_the_requests_it_stands_for(engine):
    for _ in range(3):
        engine.on_log(b"be_0 pod-a 200 12 10 0 1")  # below the sampling rate: one line per request
    engine.on_log(b"be_0 pod-a 200 40 38 0 8")  # under load: this line stands for 8 requests
    engine.on_log(b"be_0 pod-a 502 15 -1 +1 4")  # 4 requests that failed after one retry each

    svc = engine.stats.summary()["services"]["svc"]
    assert svc["requests"] == 3 + 8 + 4 and svc["errors"] == 4 and svc["retries"] == 4
    assert metric(engine, "hms_router_requests_total", service="svc", pod="pod-a", code="200") == 11
    assert metric(engine, "hms_router_requests_total", service="svc", pod="pod-a", code="502") == 4
    assert metric(engine, "hms_router_request_duration_seconds_count", service="svc", pod="pod-a") == 15
    # The histogram takes a line's k requests in one step, in the bucket of its time (12, 15 and 40 ms).
    bucket = {le: metric(engine, "hms_router_request_duration_seconds_bucket", service="svc", pod="pod-a", le=le)
              for le in ("0.01", "0.025", "0.05")}
    assert bucket == {"0.01": 0, "0.025": 3 + 4, "0.05": 15}
    total = metric(engine, "hms_router_request_duration_seconds_sum", service="svc", pod="pod-a")
    assert total == pytest.approx(3 * 0.0125 + 8 * 0.0405 + 4 * 0.0155)
    assert metric(engine, "hms_router_retries_total", service="svc", reason="haproxy") == 4
    # The latency score takes each answered line once (the -1 of a failed one is no sample).
    assert sorted(engine.samples[("be_0", "pod-a")]) == [10.0, 10.0, 10.0, 38.0]


def test_lines_of_unknown_backends_or_garbage_are_ignored(engine):
    engine.on_log(b"be_1 pod-a 200 12 10 0 1")  # a backend no service holds
    engine.on_log(b"fe_router <NOSRV> 404 0 -1 0 1")  # unknown service, answered by the frontend
    engine.on_log(b"garbage")
    assert engine.stats.summary()["services"] == {}

