"""Issue 19, attacks 2 and 5, tried the way an outsider would: with the Temporal CLI against the
test's dev server, no hms token, no node key. Neither a forged ``pod_reported`` signal during a
scale nor a ``register`` update / ``heartbeat`` signal to the NodeRegistry changes anything, and
each refusal leaves an ``access.denied`` event."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from conftest import eventually, seed_spec, temporal_binary
from temporalio import activity
from temporalio.worker import Worker

from hms_mgmt import constants, names
from hms_mgmt.events import read_events
from hms_mgmt.models import EndpointSet, NodeSpec
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.wire import JoinAnswer, NodeRegistryInput, NodesOutput, RegistrySettings
from workflows.nodes import NodeRegistry

pytestmark = [pytest.mark.parametrize("runtime_name", ["process"]), pytest.mark.timeout(180)]

ATTACKER = "10.66.66.66:6666"


def temporal(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([temporal_binary(), *args, "--address", settings.temporal_address],
                          capture_output=True, text=True, timeout=60)


def denied(settings) -> list[str]:
    return [e.reason for e in read_events(settings.state_dir) if e.type == "access.denied"]


async def test_a_forged_pod_report_during_a_scale_redirects_nothing(temporal_env, hms: Orchestrator, settings):
    await hms.deploy(seed_spec(min_replicas=2, max_replicas=6), wait=True, timeout=120)
    before = await hms.status("hms-ach")
    victim = before.pods[0]
    forged = {"id": victim.id, "node": victim.node, "endpoint": ATTACKER, "revision": victim.revision,
              "image": victim.image, "ready": True, "health": "healthy"}
    scaling = asyncio.ensure_future(hms.scale("hms-ach", 5))
    sent = 0
    for _ in range(20):  # while the scale runs, as often as the CLI can
        out = await asyncio.to_thread(temporal, settings, "workflow", "signal", "--workflow-id", "svc-hms-ach",
                                      "--name", names.S.POD_REPORTED, "--input", json.dumps(forged))
        assert out.returncode == 0, out.stderr
        sent += 1
        if scaling.done() and (await hms.status("hms-ach")).phase != "Scaling":
            break
    await scaling
    await eventually(lambda: _ready(hms, 5), timeout=60, what="the scale to 5")
    after = await hms.status("hms-ach")
    table: EndpointSet = await temporal_env.client.get_workflow_handle("svc-hms-ach").query(
        names.Q.ENDPOINTS, result_type=EndpointSet)
    assert ATTACKER not in json.dumps(table.model_dump(mode="json")), table
    assert all(p.endpoint != ATTACKER for p in after.pods), after.pods
    assert next(p for p in after.pods if p.id == victim.id).endpoint == victim.endpoint
    # Refused by the signature check itself (not only ignored because no scale was running then).
    await eventually(lambda: any("pod_reported" in r and "no signature by node" in r for r in denied(settings)),
                     timeout=30, what="an access.denied event for the forged report's missing signature")
    await hms.undeploy("hms-ach")


async def _ready(hms: Orchestrator, n: int) -> bool:
    st = await hms.status("hms-ach")
    return st.ready_replicas >= n and st.phase == "Running"


async def test_nobody_registers_a_node_with_the_cli(temporal_env, hms: Orchestrator, settings):
    registry = constants.node_registry_id(settings.task_queue)
    evil = {"spec": {"name": "evil", "task_queue": "hms-node-evil", "address": "10.66.66.66", "cpu": 512,
                     "memory_mb": 1 << 20, "max_pods": 1000}, "worker": "attacker"}
    out = await asyncio.to_thread(temporal, settings, "workflow", "update", "execute", "--workflow-id", registry,
                                  "--name", names.NR.REGISTER, "--input", json.dumps(evil))
    assert out.returncode != 0, out.stdout  # refused, to the caller
    out = await asyncio.to_thread(temporal, settings, "workflow", "signal", "--workflow-id", registry,
                                  "--name", names.NR.HEARTBEAT, "--input", json.dumps(evil))
    assert out.returncode == 0, out.stderr  # a signal is delivered; it must change nothing
    out = await asyncio.to_thread(temporal, settings, "workflow", "signal", "--workflow-id", registry,
                                  "--name", names.NR.JOIN, "--input", json.dumps({**evil, "request_id": "evil-join"}))
    assert out.returncode == 0, out.stderr  # the join signal too: checked, then answered refused
    answer = await eventually(lambda: temporal_env.client.get_workflow_handle(registry).query(
        names.NR.JOINED, "evil-join", result_type=JoinAnswer | None), timeout=30, what="the evil join's answer")
    assert answer.refused and answer.node is None, answer
    nodes: NodesOutput = await temporal_env.client.get_workflow_handle(registry).query(
        names.NR.NODES, result_type=NodesOutput)
    assert [r.spec.name for r in nodes.nodes] == [settings.node], nodes
    # (the join's refusal has the register update's reason: the control worker writes it once a while)
    await eventually(lambda: len([r for r in denied(settings) if "evil" in r]) >= 2, timeout=30,
                     what="access.denied events for the forged registration, heartbeat and join")


async def test_a_registry_an_outsider_runs_on_their_own_queue_is_not_believed(temporal_env, hms: Orchestrator,
                                                                             settings):
    """The outsider terminates the NodeRegistry and starts one under its id on a queue of their
    own, whose worker (theirs) answers that a huge node "evil" is Ready. Placement does not
    believe it: it falls back to the configured nodes, and the read is an ``access.denied`` event."""
    registry = constants.node_registry_id(settings.task_queue)
    await temporal_env.client.get_workflow_handle(registry).terminate("outsider")
    evil_queue = f"evil-{settings.node}"
    evil = NodeSpec(name="evil", task_queue="hms-node-evil", address="10.66.66.66", cpu=512, memory_mb=1 << 20,
                    max_pods=1000)

    @activity.defn(name="registry_settings")
    async def their_settings() -> RegistrySettings:
        return RegistrySettings(seed=[evil], lost_after_s=3e7)

    async with Worker(temporal_env.client, task_queue=evil_queue, workflows=[NodeRegistry],
                      activities=[their_settings]):
        await temporal_env.client.start_workflow(
            NodeRegistry.run, NodeRegistryInput(control_task_queue=evil_queue), id=registry, task_queue=evil_queue)
        theirs = await eventually(lambda: _names(temporal_env, registry), timeout=30, what="their registry answers")
        assert theirs == ["evil"]
        await hms.deploy(seed_spec(min_replicas=2, max_replicas=2), wait=True, timeout=120)
        assert {p.node for p in (await hms.status("hms-ach")).pods} == {settings.node}
    await eventually(lambda: any("not this control plane's registry" in r for r in denied(settings)), timeout=30,
                     what="an access.denied event for the impostor registry")


async def _names(temporal_env, registry: str) -> list[str]:
    out = await temporal_env.client.get_workflow_handle(registry).query(names.NR.NODES, result_type=NodesOutput)
    return [r.spec.name for r in out.nodes]
