"""`logs -f` across hosts: host A runs the control plane, host B a node; a client in a third
place (this root namespace) follows a pod on B. The lines come from B's log stream at B's
address (it listens nowhere else), a line the pod writes afterwards shows, and the stream ends
when the pod is gone."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator

from .conftest import Network, hms_argv, sign_image, start_control, start_node, tails
from .test_addresses import IMAGE, listeners

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(240)]

SERVICE = "hms-mh-logs"


async def test_follow_a_pod_on_another_host(network: Network, tmp_path: Path) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    log_a, log_b = tmp_path / "a-up.log", tmp_path / "b-worker.log"
    logs = [log_a, log_b]
    up = start_control(a, log_a, logs=logs)
    sign_image(a, IMAGE)
    start_node(a, b, "b", log_b, procs=[up], logs=logs)
    nodes = a.run(hms_argv("nodes", "--json"), env=a.env())
    (node,) = [n["spec"] for n in json.loads(nodes.stdout)]
    assert node["address"] == b.address and node["log_port"] > 0
    assert listeners(b, node["log_port"]) == {b.address}

    orch = await Orchestrator.connect(Settings.from_env(env={"HMS_STATE_DIR": str(a.state_dir)}))
    try:
        await orch.deploy({"name": SERVICE, "image": IMAGE, "min_replicas": 1, "max_replicas": 1, "cpu_target": 60},
                          wait=True, timeout=120)
        (pod,) = (await orch.status(SERVICE)).pods
        lines: list[str] = []

        async def follow() -> None:
            async for line in orch.follow_logs(SERVICE, pod.id, tail=5):
                lines.append(line)

        reading = asyncio.create_task(follow())
        marker = f"mh-{uuid.uuid4().hex[:8]}"

        def poked() -> bool:
            urllib.request.urlopen(f"http://{pod.endpoint}/?marker={marker}", timeout=5).read()
            return any(marker in line for line in lines)

        async def seen() -> None:
            for _ in range(30):
                if await asyncio.to_thread(poked):
                    return
                await asyncio.sleep(1)
            raise AssertionError(f"no line with {marker} from B's stream: {lines[-5:]}")

        await seen()
        final = await orch.undeploy(SERVICE, wait=True, timeout=60)
        assert final is not None and final.phase == "Stopped"
        await asyncio.wait_for(reading, 30)
        assert lines[-1].startswith(f"--- pod {pod.id} is gone"), lines[-3:]
    except BaseException:
        print(tails(logs))
        raise
