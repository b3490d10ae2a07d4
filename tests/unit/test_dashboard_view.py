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


def rollout(**kw):
    """A RolloutStatus; ``workflow_id`` (the rolling child's id) arrives with another branch, so a
    stand-in carries it where the model has no such field yet."""
    from types import SimpleNamespace

    from hms_mgmt.models import RolloutStatus

    fields = dict(from_revision=1, to_revision=2, state="completed", started_at=NOW)
    if "workflow_id" in kw and "workflow_id" not in RolloutStatus.model_fields:
        return SimpleNamespace(**fields, **kw)
    return RolloutStatus(**fields, **kw)


def test_the_deploy_link_follows_the_revision_to_its_child():
    from hms_mgmt.models import RevisionRecord

    base = "http://localhost:8233/namespaces/default/workflows/"
    spec = status().spec
    revisions = [RevisionRecord(revision=1, spec=spec, outcome="replaced"), RevisionRecord(revision=2, spec=spec)]
    first = service_view(status(revision=1, revisions=revisions[:1]))
    assert first["deploy_workflow_id"] == "svc-hms-ach-deploy-1" and first["deploy_url"] == base + "svc-hms-ach-deploy-1"
    assert first["revisions"][0]["workflow_url"] == base + "svc-hms-ach-deploy-1"
    # After a rolling update the child is svc-<name>-deploy-<rev>-<n>-<m>: never guessed as deploy-<rev>.
    rolled = status(revision=2, revisions=revisions).model_copy(
        update={"rollout": rollout(workflow_id="svc-hms-ach-deploy-2-0-3")})
    view = service_view(rolled)
    assert view["deploy_url"] == base + "svc-hms-ach-deploy-2-0-3"
    assert [r["workflow_id"] for r in view["revisions"]] == ["svc-hms-ach-deploy-1", "svc-hms-ach-deploy-2-0-3"]
    # A rollout that did not record its child: no link rather than a dead one.
    unknown = service_view(status(revision=2, revisions=revisions, rollout=rollout()))
    assert unknown["deploy_url"] is None and unknown["revisions"][1]["workflow_url"] is None
    # Nothing deployed yet: no link.
    for phase in ("Validating", "AwaitingApproval", "VerifyingImage", "Rejected"):
        assert service_view(status(phase=phase, pods=[]))["deploy_url"] is None
    assert service_view(status(phase="Failed", pods=[]))["deploy_url"] is None


def test_web_ui_links_come_from_the_viewers_settings_not_from_the_run(tmp_path):
    """A run's ``web_ui_url`` is the placement its starter wrote; anyone who reaches Temporal can
    start a run (refused, it still answers status) and point it at a page of their own."""
    import json

    from dashboard.server import Dashboard
    from hms_mgmt.cli.render import _web_ui_url
    from hms_mgmt.config import Settings

    settings = Settings(state_dir=tmp_path, web_ui_url="http://ui.example:8233")
    forged = status(web_ui_url="https://evil.example/hms-login")
    mine = "http://ui.example:8233/namespaces/default/workflows/svc-hms-ach"
    assert _web_ui_url(settings, forged) == mine
    board = Dashboard(None, settings)  # type: ignore[arg-type]
    board.services = [forged]
    view = json.loads(board._state_json())["services"][0]
    assert view["web_ui_url"] == mine and "evil" not in json.dumps(view)
