"""Losing a host, on separate hosts (issue 18, part 7): A runs the control plane and the router,
B and C joined and run a service's pods. B is unplugged under GET load through A's router (its
cable out, then every process on it killed): the service is whole again on C, and not one GET
failed. The default timing is used (a heartbeat every 2 s, Lost after 6 s); the time is logged,
not asserted (bench/hostloss.py measures it)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator

from .conftest import Network, hms_argv, sign_image, start_control, start_node, tails, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))  # the router tests' load
from router_helpers import LoadUnderway, run_load  # noqa: E402

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(300)]
log = logging.getLogger(__name__)

IMAGE = "registry.gov/hms-ach:1.4"
SERVICE = "hms-loss"
ROUTER_PORT = 8000
REPLICAS = 4


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return resp.status == 200
    except OSError:
        return False


async def whole_on(orch: Orchestrator, node: str) -> bool:
    st = await orch.status(SERVICE, live=False)
    ready = [p for p in st.pods if p.ready]
    return len(ready) == REPLICAS and all(p.node == node for p in ready)


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
async def test_b_unplugged_under_load_leaves_the_service_whole_on_c(network: Network, tmp_path: Path,
                                                                     engine: str) -> None:
    a, b, c = network.add_host("a"), network.add_host("b"), network.add_host("c")
    logs = [tmp_path / "a-up.log", tmp_path / "b-worker.log", tmp_path / "c-worker.log"]
    up = start_control(a, logs[0], logs=logs, extra=("--engine", engine))
    sign_image(a, IMAGE)
    workers = [up]
    for host, name, log_path in ((b, "b", logs[1]), (c, "c", logs[2])):
        workers.append(start_node(a, host, name, log_path, procs=workers, logs=logs))
    orch = await Orchestrator.connect(Settings.from_env(env={"HMS_STATE_DIR": str(a.state_dir)}))
    try:
        await orch.deploy({"name": SERVICE, "image": IMAGE, "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                           "cpu_target": 60, "health_interval_s": 1.0}, wait=True, timeout=120)
        st = await orch.status(SERVICE)
        assert sorted(p.node for p in st.pods) == ["b", "b", "c", "c"], [(p.id, p.node) for p in st.pods]
        url = f"http://{a.address}:{ROUTER_PORT}/{SERVICE}/"
        await asyncio.to_thread(wait_until, lambda: answers(url), timeout=30, what="A's router to have the service",
                                logs=logs)
        warm = await run_load(url, concurrency=4, seconds=3, max_requests=10_000)
        assert warm.total and warm.statuses[200] == warm.total, warm.failures[:5]
        assert len(warm.pods) == REPLICAS, warm.pods  # A's router reaches all four

        load = LoadUnderway(url)
        try:
            await asyncio.sleep(2.0)
            unplugged = time.monotonic()
            await asyncio.to_thread(b.unplug)
            deadline = time.monotonic() + 90
            while not await whole_on(orch, "c"):
                assert time.monotonic() < deadline, f"{SERVICE} never whole on c\n{tails(logs)}"
                await asyncio.sleep(0.2)
            took = time.monotonic() - unplugged
            await load.linger(2.0, "the service was whole")  # the router's table follows the feed
        finally:
            result = await load.stop()
        result.assert_all_ok()
        listed = a.run(hms_argv("nodes", "--json"), env=a.env())
        assert listed.returncode == 0, listed.stderr
        assert {n["spec"]["name"]: n["state"] for n in json.loads(listed.stdout)} == {"b": "Lost", "c": "Ready"}
        log.info("%s router: host b unplugged under load, whole again on c in %.1fs; %d GETs, 0 failed", engine, took,
                 result.total)
    except BaseException:
        print(tails(logs))  # shown with the failure
        raise
