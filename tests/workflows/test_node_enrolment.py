"""Only enrolled nodes (issue 18, part 3) against the real dev server: a host joins with a token
(`hms node join`, a real subprocess) and runs a node-only worker whose pods serve; an
unenrolled or forged registration, and a second key for a Ready node, are refused with
``access.denied``; `hms node remove` revokes a node and its pods are replaced elsewhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, eventually, seed_spec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import WorkflowUpdateFailedError

from hms_mgmt import constants, names, nodeid, tickets
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.wire import JoinAnswer, NodeRegistration, NodesOutput
from worker.main import HmsWorker
from worker.nodes import NodeAgent

pytestmark = [pytest.mark.parametrize("runtime_name", ["process"]), pytest.mark.timeout(240)]


def hms_cli(*args: str, state_dir: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HMS_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO), **env_vars}
    return subprocess.run([sys.executable, "-m", "hms_mgmt.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def denied(settings: Settings) -> list[str]:
    return [e.reason for e in read_events(settings.state_dir) if e.type == "access.denied"]


async def registry_nodes(client, settings: Settings) -> dict[str, object]:
    out: NodesOutput = await client.get_workflow_handle(constants.node_registry_id(settings.task_queue)).query(
        names.NR.NODES, result_type=NodesOutput)
    return {r.spec.name: r for r in out.nodes}


async def join(settings: Settings, node_dir: Path, name: str) -> Settings:
    """`hms node join-token` on the control host, `hms node join` on the new one (real CLI; on a
    thread, so this process's worker keeps answering meanwhile)."""
    made = await asyncio.to_thread(hms_cli, "--address", settings.temporal_address, "node", "join-token", "--ttl", "10m",
                   state_dir=settings.state_dir, HMS_TASK_QUEUE=settings.task_queue)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    joined = await asyncio.to_thread(hms_cli, "node", "join", token, "--name", name, "--address", "127.0.0.1", "--runtime", "process",
                     "--max-pods", "8", "--state-dir", str(node_dir), state_dir=node_dir)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    keys = sorted(p.name for p in (node_dir / "keys").iterdir())
    assert keys == ["control.pub", f"node-{name}.crt", f"node-{name}.pem"], keys  # no private key of the control plane
    return Settings.from_env(env={"HMS_STATE_DIR": str(node_dir)}, routers=settings.routers, metrics_port=0)


async def test_a_joined_node_serves_and_is_removed(temporal_env, hms: Orchestrator, settings: Settings, tmp_path):
    node_b = await join(settings, tmp_path / "b", "b")
    assert node_b.temporal_address == settings.temporal_address and node_b.task_queue == settings.task_queue
    assert nodeid.is_joined(node_b.state_dir)
    async with HmsWorker(temporal_env.client, node_b, control=False):
        nodes = await registry_nodes(temporal_env.client, settings)
        assert nodes["b"].state == "Ready" and nodes["b"].key_id  # type: ignore[attr-defined]
        await hms.deploy(seed_spec(min_replicas=2, max_replicas=4), wait=True, timeout=120)
        st = await hms.status("hms-ach")
        assert sorted(p.node for p in st.pods) == sorted(["b", settings.node]) and st.ready_replicas == 2

        removed = await asyncio.to_thread(hms_cli, "--address", settings.temporal_address, "node", "remove", "b", state_dir=settings.state_dir,
                          HMS_TASK_QUEUE=settings.task_queue)
        assert removed.returncode == 0, removed.stderr

        async def replaced() -> bool:
            s = await hms.status("hms-ach")
            return s.ready_replicas == 2 and all(p.node == settings.node for p in s.pods if p.ready)

        await eventually(replaced, timeout=90, what="b's pod replaced on the control host's node")
        nodes = await registry_nodes(temporal_env.client, settings)
        assert nodes["b"].removed and nodes["b"].state == "Lost"  # type: ignore[attr-defined]
        await asyncio.sleep(node_b.node_heartbeat_s + 1)  # its heartbeats are refused now
        assert (await registry_nodes(temporal_env.client, settings))["b"].state == "Lost"  # type: ignore[attr-defined]
        assert any("node b" in r and "removed" in r for r in denied(settings))
    await hms.undeploy("hms-ach")


async def test_unenrolled_forged_and_second_key_registrations_are_refused(temporal_env, hms: Orchestrator,
                                                                          settings: Settings, tmp_path):
    client = temporal_env.client
    local = (await registry_nodes(client, settings))[settings.node]

    def agent(spec_name: str, identity: nodeid.NodeIdentity | None) -> NodeAgent:
        spec = settings.this_node("process").model_copy(update={
            "name": spec_name, "task_queue": constants.node_task_queue(spec_name, settings.node_queue_prefix)})
        return NodeAgent(client, settings, spec, runtime=None, identity=identity)  # type: ignore[arg-type]

    # No certificate at all, and a self-made key.
    key = Ed25519PrivateKey.generate()
    with pytest.raises(AccessDenied):
        await agent("c", nodeid.NodeIdentity(node="c", key=key, cert="")).register()
    # A certificate signed by another control plane's key.
    other = tmp_path / "other"
    other.mkdir()
    tickets.ensure_control_key(other)
    forged = nodeid.enrol_key(other, node="c", address="127.0.0.1", public_key=nodeid.raw_public(key))
    with pytest.raises(AccessDenied):
        await agent("c", nodeid.NodeIdentity(node="c", key=key, cert=forged)).register()
    # A real certificate of the Ready local node, signed with another key.
    cert = nodeid.node_cert_path(settings.state_dir, settings.node).read_text().strip()
    with pytest.raises(AccessDenied):
        await agent(settings.node, nodeid.NodeIdentity(node=settings.node, key=key, cert=cert)).register()
    # A correct certificate and key, but a registration copied from before (its signature is replayed).
    real = agent(settings.node, nodeid.node_identity(settings.state_dir, settings.node, "127.0.0.1"))
    stale = real._signed("register")
    await asyncio.sleep(settings.node_heartbeat_s + 0.5)  # the worker's own heartbeat is newer now
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await client.get_workflow_handle(real.registry_id).execute_update(names.NR.REGISTER, stale)
    assert "replayed" in str(refused.value.cause)
    # The same through the join signal: answered refused, for the same reason.
    handle = client.get_workflow_handle(real.registry_id)
    await handle.signal(names.NR.JOIN, stale.model_copy(update={"request_id": "replayed-join"}))
    answer = await eventually(lambda: handle.query(names.NR.JOINED, "replayed-join", result_type=JoinAnswer | None),
                              timeout=30, what="the answer to the replayed join")
    assert "replayed" in answer.refused and answer.node is None
    # An unsigned heartbeat changes nothing either.
    await client.get_workflow_handle(real.registry_id).signal(
        names.NR.HEARTBEAT, NodeRegistration(spec=agent("c", None).spec))
    await asyncio.sleep(1.5)
    nodes = await registry_nodes(client, settings)
    assert sorted(nodes) == [settings.node] and nodes[settings.node].key_id == local.key_id  # type: ignore[attr-defined]
    await eventually(lambda: len(denied(settings)) >= 4, timeout=30, what="access.denied events")
