"""``stamp_start`` and ``stamp_round`` make the trust rule's caller check, as ``start_ticket``
does: a trust stamp is signed only for the service's own workflow (or its child) on our control
queue, as the server records the calling run; anyone else gets a refusal and an
``access.denied`` event naming their run, whatever ticket they hold."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.enrolment import NodeTrustActivities
from hms_mgmt import names, nodeid, tickets
from hms_mgmt.config import Settings
from hms_mgmt.events import EventSink
from hms_mgmt.models import ServiceSpec
from hms_mgmt.trust import TrustStore
from hms_mgmt.wire import PodPlace, RoundGrantsInput, StampInput

POD = "3f1b2a10-0000-4000-8000-000000000001"
IMAGE_ID = "sha256:" + "ab" * 32


class _Client:
    """What the server records about each run: (workflow id, run id) -> (type, task queue, parent)."""

    def __init__(self, runs: dict[tuple[str, str], tuple[str, str, tuple[str, str] | None]]) -> None:
        self.runs = runs

    def get_workflow_handle(self, workflow_id: str, run_id: str | None = None) -> SimpleNamespace:
        wtype, queue, parent = self.runs[(workflow_id, run_id or "")]

        async def describe() -> SimpleNamespace:
            extended = SimpleNamespace(HasField=lambda _field: False)
            return SimpleNamespace(id=workflow_id, run_id=run_id, workflow_type=wtype, task_queue=queue,
                                   parent_id=parent[0] if parent else None,
                                   parent_run_id=parent[1] if parent else None,
                                   raw_description=SimpleNamespace(workflow_extended_info=extended))

        return SimpleNamespace(describe=describe)


@pytest.fixture
def control(tmp_path: Path) -> tuple[Settings, ServiceSpec, str]:
    tickets.ensure_control_key(tmp_path)
    nodeid.node_identity(tmp_path, "n1", "127.0.0.1")
    settings = Settings.from_env({}, state_dir=tmp_path)
    spec = ServiceSpec(name="pay", image="x/pay:1", min_replicas=1, max_replicas=1, cpu_target=50)
    TrustStore(tmp_path).sign(spec.image, IMAGE_ID, signer="alice")
    ticket = tickets.issue(tmp_path, service="pay", revision=1, spec=spec, image_id=IMAGE_ID)
    return settings, spec, ticket


def _run(settings: Settings, client: _Client, workflow_id: str, run_id: str, fn_name: str, inp: object) -> object:
    env = ActivityEnvironment(client=client)  # type: ignore[arg-type]
    env.info = dataclasses.replace(env.info, workflow_id=workflow_id, workflow_run_id=run_id)
    acts = NodeTrustActivities(lambda: settings, EventSink(settings.state_dir))
    return asyncio.run(env.run(getattr(acts, fn_name), inp))


def _denied(state: Path) -> list[dict[str, object]]:
    path = state / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in events if e["type"] == "access.denied"]


def _inputs(spec: ServiceSpec, ticket: str) -> dict[str, object]:
    common = {"service": "pay", "revision": 1, "spec": spec, "image_id": IMAGE_ID, "ticket": ticket}
    return {"stamp_start": StampInput(**common, pod_id=POD, node="n1"),
            "stamp_round": RoundGrantsInput(**common, pods=[PodPlace(pod_id=POD, node="n1")])}


@pytest.mark.parametrize("fn_name", ["stamp_start", "stamp_round"])
def test_an_outsiders_run_gets_no_trust_stamp(control, fn_name: str) -> None:
    settings, spec, ticket = control
    # Their own workflow, named like the service's child, on their own queue; and a run of ours
    # (on our queue) that is no workflow of this service.
    client = _Client({("svc-pay-deploy-x", "r1"): (names.DEPLOY_WORKFLOW, "outsider-q", ("svc-pay", "s1")),
                      ("svc-pay", "s1"): (names.SERVICE_WORKFLOW, settings.task_queue, None),
                      ("svc-other", "o1"): (names.SERVICE_WORKFLOW, settings.task_queue, None)})
    for wid, run in (("svc-pay-deploy-x", "r1"), ("svc-other", "o1")):
        with pytest.raises(ApplicationError, match="trust stamp refused: .*not a workflow of service pay") as refused:
            _run(settings, client, wid, run, fn_name, _inputs(spec, ticket)[fn_name])
        assert refused.value.type == "AccessDenied" and refused.value.non_retryable
    refusals = _denied(settings.state_dir)
    assert {e["data"]["workflow"] for e in refusals} == {"svc-pay-deploy-x", "svc-other"}
    assert all(e["data"]["pod"] == POD and e["service"] == "pay" for e in refusals)


@pytest.mark.parametrize("fn_name", ["stamp_start", "stamp_round"])
def test_the_services_own_workflow_and_its_child_get_their_stamps(control, fn_name: str) -> None:
    settings, spec, ticket = control
    client = _Client({("svc-pay", "s1"): (names.SERVICE_WORKFLOW, settings.task_queue, None),
                      ("svc-pay-heal-1", "h1"): (names.HEAL_WORKFLOW, settings.task_queue, ("svc-pay", "s1"))})
    for wid, run in (("svc-pay", "s1"), ("svc-pay-heal-1", "h1")):
        out = _run(settings, client, wid, run, fn_name, _inputs(spec, ticket)[fn_name])
        stamp = out.stamp if fn_name == "stamp_start" else out.grants[0]  # type: ignore[attr-defined]
        assert tickets.open_claims(settings.state_dir, stamp, "trust stamp")["pod"] == POD
    assert not _denied(settings.state_dir)
