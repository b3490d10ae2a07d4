"""Pods of a node with an address other than 127.0.0.1 (issue 18, part 1), against real runtimes:
a process pod binds there, a container publishes there, the endpoint says so, and the node's
health probe reaches it there (the pod became ready). 127.0.0.2 is this host too (all of
127.0.0.0/8 is loopback), so nothing leaves the machine."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from conftest import make_settings, node_pods, seed_spec, sweep_pods

from hms_mgmt.devserver import port_open
from hms_mgmt.orchestrator import Orchestrator

ADDRESS = "127.0.0.2"


@pytest.fixture
def settings(temporal_env, tmp_path, runtime_name):
    s = make_settings(temporal_env, tmp_path / "state", runtime_name, node_address=ADDRESS)
    yield s
    sweep_pods(s)


def get_pod_header(url: str) -> str | None:
    with urllib.request.urlopen(url, timeout=2.0) as resp:
        return resp.headers.get("X-HMS-Pod")


async def test_pods_publish_and_bind_on_the_node_address(hms: Orchestrator, settings):
    await hms.deploy(seed_spec(name="hms-addr", min_replicas=2), wait=True, timeout=120)
    status = await hms.status("hms-addr")
    assert status.ready_replicas == 2  # ready: the node's probe reached each pod at its endpoint
    for pod in status.pods:
        host, _, port = pod.endpoint.rpartition(":")
        assert host == ADDRESS, pod.endpoint
        assert await asyncio.to_thread(get_pod_header, f"http://{pod.endpoint}/health") == pod.id
        # Only on the node's address: not on the loopback's 127.0.0.1 at the same port.
        assert not await asyncio.to_thread(port_open, "127.0.0.1", int(port), 1.0)
    handles = node_pods(settings, "hms-addr")
    assert sorted(h.endpoint or "" for h in handles) == sorted(p.endpoint or "" for p in status.pods)
    if settings.runtime == "docker":
        import docker

        client = docker.from_env()
        try:
            for h in handles:
                ports = client.containers.get(h.extra["container_id"]).attrs["NetworkSettings"]["Ports"]
                assert {b["HostIp"] for bindings in ports.values() if bindings for b in bindings} == {ADDRESS}
        finally:
            client.close()
    final = await hms.undeploy("hms-addr")
    assert final is not None and final.phase == "Stopped"
