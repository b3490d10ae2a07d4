"""Issue 18, parts 2-4 on separate hosts: host B joins host A's control plane with a token A
printed and serves pods at its own address; a worker on host C that did not join gets nothing;
B's state dir holds no private key of the control plane; an image revoked on A refuses a new pod
on B at once (B keeps no trust store: each start carries A's fresh stamp)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.errors import ScaleRefused
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator

from .conftest import (
    Network,
    hms_argv,
    join_host,
    pod_answering,
    sign_image,
    start_control,
    start_node,
    tails,
    wait_until,
)

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(300)]

IMAGE = "registry.gov/hms-ach:1.4"
SERVICE = "hms-join"
ROUTER_PORT = 8000



async def test_b_joins_with_a_token_c_does_not_and_a_revocation_on_a_stops_b(network: Network, tmp_path: Path) -> None:
    a, b, c = network.add_host("a"), network.add_host("b"), network.add_host("c")
    logs = [tmp_path / "a-up.log", tmp_path / "b-worker.log", tmp_path / "c-worker.log"]
    up = start_control(a, logs[0], logs=logs)
    sign_image(a, IMAGE)

    # B: `hms image sign` there refuses (no signing key) and makes none.
    refused = b.run(hms_argv("image", "sign", IMAGE, "--runtime", "process"), env=b.env())
    assert refused.returncode == 1 and "control host" in refused.stderr, refused.stderr
    assert not (b.state_dir / "keys" / "signing.pem").exists()
    printed = join_host(a, b, "b")
    assert "joined the control plane" in printed
    held = sorted(str(p.relative_to(b.state_dir)) for p in b.state_dir.rglob("*") if p.is_file())
    for secret in ("token.pem", "signing.pem", "control.pem"):
        assert not any(h.endswith(secret) for h in held), held
    assert "keys/node-b.pem" in held and "keys/node-b.crt" in held and "keys/control.pub" in held
    start_node(a, b, "b", logs[1], procs=[up], logs=logs, joined=True)

    # C never joined: its worker refuses to start (no certificate) and the registry never hears of it.
    worker_c = c.start(hms_argv("worker", "--node", "c", "--address", c.address, "--runtime", "process"),
                       env=c.env(HMS_TEMPORAL_ADDRESS=f"{a.address}:7233"), log=logs[2])
    assert worker_c.wait(60) != 0
    assert "has not joined" in logs[2].read_text(errors="replace")

    nodes = a.run(hms_argv("nodes", "--json"), env=a.env())
    assert nodes.returncode == 0, nodes.stderr
    assert [(n["spec"]["name"], n["spec"]["address"], n["state"]) for n in json.loads(nodes.stdout)] == [
        ("b", b.address, "Ready")]

    orch = await Orchestrator.connect(Settings.from_env(env={"HMS_STATE_DIR": str(a.state_dir)}))
    try:
        await orch.deploy({"name": SERVICE, "image": IMAGE, "min_replicas": 2, "max_replicas": 4, "cpu_target": 60},
                          wait=True, timeout=120)
        status = await orch.status(SERVICE)
        assert status.ready_replicas == 2 and {p.node for p in status.pods} == {"b"}
        assert all((p.endpoint or "").startswith(b.address + ":") for p in status.pods)
        pods = {p.id for p in status.pods}
        url = f"http://{a.address}:{ROUTER_PORT}/{SERVICE}/health"
        await asyncio.to_thread(wait_until, lambda: pod_answering(url) in pods, timeout=30,
                                what="A's router to reach B's pods", logs=logs)

        # Revoked on A: a new pod on B is refused at its start, though B was never told.
        revoked = a.run(hms_argv("image", "revoke", IMAGE), env=a.env())
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        # The control plane refuses the new pod's start stamp (or, had the stamp been issued just
        # before, the node refuses the start): either way no pod of the revoked image starts.
        try:
            await orch.scale(SERVICE, 3)
        except ScaleRefused as e:
            assert "not signed" in str(e) or "not trusted" in str(e), e
        else:
            def refused_start() -> bool:
                return any(e.type == "access.denied" and "not trusted now" in e.reason
                           for e in read_events(a.state_dir) if e.service == SERVICE)

            await asyncio.to_thread(wait_until, refused_start, timeout=60, what="the new pod refused", logs=logs)
        after = await orch.status(SERVICE)
        assert after.ready_replicas == 2 and {p.id for p in after.pods if p.ready} == pods
        assert pod_answering(url) in pods  # the running pods keep serving
    except BaseException:
        print(tails(logs))
        raise
    finally:
        await orch.undeploy(SERVICE, wait=True, timeout=60)
