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

from hms_mgmt import constants, names
from hms_mgmt.events import read_events
from hms_mgmt.models import EndpointSet
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.wire import NodesOutput

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
    await asyncio.sleep(2.0)
    nodes: NodesOutput = await temporal_env.client.get_workflow_handle(registry).query(
        names.NR.NODES, result_type=NodesOutput)
    assert [r.spec.name for r in nodes.nodes] == [settings.node], nodes
    await eventually(lambda: len([r for r in denied(settings) if "evil" in r]) >= 2, timeout=30,
                     what="access.denied events for the forged registration and heartbeat")
