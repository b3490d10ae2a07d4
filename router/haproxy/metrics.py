"""What the engine shows: per-pod figures read from HAProxy's ``show stat`` for ``/metrics``,
and each pod's view (state, weight, latency, HAProxy's status) for ``/-/stats`` and drains."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router import policy
from router.haproxy.state import Backend

# (metric, help, ``show stat`` column), one series per service and pod
COUNTERS = (
    ("hms_haproxy_server_requests", "Requests HAProxy sent to each pod", "stot"),
    ("hms_haproxy_server_retries", "Connection retries per pod (wretr)", "wretr"),
    ("hms_haproxy_server_redispatches", "Requests redispatched to another pod", "wredis"),
    ("hms_haproxy_server_ejections", "Times a pod was marked down (failed checks or layer-7 errors)", "chkdown"),
    ("hms_haproxy_server_responses_5xx", "5xx answers per pod", "hrsp_5xx"),
    ("hms_haproxy_server_connections", "Connections HAProxy opened to each pod (connect)", "connect"),
    ("hms_haproxy_server_connection_reuses", "Requests sent over an already open connection (reuse)", "reuse"),
)
LABELS = ["service", "pod"]


def _number(row: dict[str, str], key: str) -> float:
    v = row.get(key) or "0"
    return float(v) if v.replace(".", "", 1).isdigit() else 0.0


class StatCollector:
    """``/metrics`` figures from the last ``show stat`` (refreshed before each scrape)."""

    def __init__(self, source: Callable[[], tuple[Sequence[Backend], list[dict[str, str]]]]) -> None:
        self.source = source  # () -> (the backends, the last ``show stat`` rows)

    def collect(self) -> Iterator[Metric]:
        backends, rows = self.source()
        counters = [(CounterMetricFamily(name, doc, labels=LABELS), column) for name, doc, column in COUNTERS]
        weight = GaugeMetricFamily("hms_haproxy_server_weight", "Weight set from the router's score", labels=LABELS)
        up = GaugeMetricFamily("hms_haproxy_server_up", "1 if HAProxy sends new requests to the pod", labels=LABELS)
        names = {b.name: b.service for b in backends if b.service}
        for row in rows:
            service = names.get(row.get("pxname", ""))
            if service is None:
                continue
            labels = [service, row.get("svname", "")]
            for family, column in counters:
                family.add_metric(labels, _number(row, column))
            weight.add_metric(labels, _number(row, "weight"))
            up.add_metric(labels, 1.0 if row.get("status") == "UP" else 0.0)
        yield from (family for family, _ in counters)
        yield from (weight, up)


def pods_info(be: Backend, rows: list[dict[str, str]], now: float) -> dict[str, Any]:
    """Each server of ``be``: address, state, weight sent, our latency, HAProxy's status and
    requests in flight (``scur``)."""
    floor = policy.best_latency(list(be.pods.values()))
    mine = {r.get("svname"): r for r in rows if r.get("pxname") == be.name}
    return {
        pod: {"address": srv.address, "state": srv.state, "weight": srv.weight,
              "latency_ms": round(policy.latency(be.pods[pod], now, floor), 2) if pod in be.pods else None,
              "haproxy_status": mine.get(pod, {}).get("status"), "outstanding": int(mine.get(pod, {}).get("scur") or 0)}
        for pod, srv in be.servers.items()
    }
