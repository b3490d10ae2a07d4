"""What the dashboard sends to every page: no secrets from the spec, and the right Web UI links."""

from __future__ import annotations

from datetime import UTC, datetime

from dashboard.server import service_view
from hms_mgmt.models import Decision, PodStatus, ServiceSpec, ServiceStatus

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def status(**kw) -> ServiceStatus:
    spec = ServiceSpec(name="hms-ach", image="registry.gov/hms-ach:1.4", min_replicas=2, max_replicas=10,
                       cpu_target=60, env={"DB_PASSWORD": "hunter2"}, command=["serve", "--secret=s3"])
    values = dict(name="hms-ach", phase="Running", revision=3, spec=spec, desired_replicas=2, ready_replicas=2,
                  workflow_id="svc-hms-ach", web_ui_url="http://localhost:8233/namespaces/default/workflows/svc-hms-ach",
                  pods=[PodStatus(id="p1", node="local", health="healthy", ready=True, cpu_percent=12.5)])
    values.update(kw)
    return ServiceStatus(**values)


def test_the_spec_env_and_command_never_leave_the_server():
    text = repr(service_view(status()))
    assert "hunter2" not in text and "DB_PASSWORD" not in text and "s3" not in text
    view = service_view(status())
    assert view["image"] == "registry.gov/hms-ach:1.4" and view["pods"][0]["cpu_percent"] == 12.5


def test_decisions_link_their_child_workflows():
    decisions = [
        Decision(at=NOW, kind="scale", reason="cpu", from_replicas=2, to_replicas=4),
        Decision(at=NOW, kind="heal", reason="exited", pod="abc"),
        Decision(at=NOW, kind="scale", reason="cpu", from_replicas=4, to_replicas=2),
        Decision(at=NOW, kind="degraded", reason="crash loop"),
    ]
    view = service_view(status(last_decisions=decisions, scale_count=7))
    base = "http://localhost:8233/namespaces/default/workflows/"
    assert [d["workflow_url"] for d in view["decisions"]] == [
        base + "svc-hms-ach-scale-6", base + "svc-hms-ach-heal-abc", base + "svc-hms-ach-scale-7", None]
    assert view["deploy_url"] == base + "svc-hms-ach-deploy-3"
    assert service_view(status(web_ui_url=None))["deploy_url"] is None


def test_router_stats_merge_across_routers_in_either_format():
    from dashboard.server import merge_router_stats

    merged = merge_router_stats([
        {"hms-ach": {"requests_per_s": 30.0, "error_rate": 0.1, "p50_ms": 2.0, "p99_ms": 10.0,
                     "pods": {"p1": {"state": "ready", "outstanding": 1, "latency_ms": 2.5, "address": "x"}}}},
        {"hms-ach": {"rps": 10.0, "error_rate": 0.0, "p50_ms": 3.0, "p99_ms": None}, "bad": "not a dict"},
    ])
    ach = merged["hms-ach"]
    assert ach["rps"] == 40.0 and abs(ach["error_rate"] - 0.075) < 1e-9
    assert ach["p50_ms"] == 3.0 and ach["p99_ms"] == 10.0  # the worst router's figure
    assert ach["pods"] == {"p1": {"state": "ready", "outstanding": 1, "latency_ms": 2.5}}
    assert "bad" not in merged
