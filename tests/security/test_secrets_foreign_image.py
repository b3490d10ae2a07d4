"""A foreign image (not built by the project: Debian's rootfs and a shell command, nothing of
ours inside) gets its secret the way a Swarm task does: ``/run/secrets/NAME`` on a tmpfs, 0400,
owned by the image's user, and serves what it reads there. Real dockerd, real Temporal."""

from __future__ import annotations

import asyncio
import io
import json
import secrets as random
import uuid
from collections.abc import Iterator

import aiohttp
import docker
import pytest
from conftest import require_docker, seed_spec, sign_images, wait_phase
from temporalio.testing import WorkflowEnvironment
from test_secrets_e2e import _assert_absent, _pod_view

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator
from worker.main import HmsWorker

BASE = "hms-base:bookworm"  # the plain Debian rootfs the example images start from
# A shell that serves /run/secrets as it finds it: no hms code, no knowledge of where a value comes from.
COMMAND = 'exec python3 -m http.server "$PORT" --directory /run/secrets'


@pytest.fixture
def foreign_image() -> Iterator[str]:
    require_docker()
    client = docker.from_env(timeout=120)
    ref = f"foreign-{uuid.uuid4().hex[:8]}:1"
    dockerfile = f"FROM {BASE}\nCMD {json.dumps(['sh', '-c', COMMAND])}\n".encode()
    client.images.build(fileobj=io.BytesIO(dockerfile), tag=ref, rm=True)
    try:
        yield ref
    finally:
        client.images.remove(ref, force=True)
        client.close()


async def test_a_foreign_image_reads_its_secret_at_run_secrets(temporal_env: WorkflowEnvironment, docker_node: Settings,
                                                               foreign_image: str):
    sign_images(docker_node, foreign_image)
    value = random.token_hex(16).encode()
    orch = Orchestrator(temporal_env.client, docker_node)
    await orch.set_secret("bank-key", value)
    async with HmsWorker(temporal_env.client, docker_node):
        await orch.deploy(seed_spec(image=foreign_image, min_replicas=1, max_replicas=1, health_path="/",
                                  secrets=["bank-key"]))
        pod = (await wait_phase(orch, "hms-ach", {"Running"}, timeout=120)).pods[0]
        async with aiohttp.ClientSession() as http, http.get(f"http://{pod.endpoint}/bank-key") as resp:
            assert resp.status == 200 and await resp.read() == value  # what the image itself read
        content, mode, uid, env, inspect = await asyncio.to_thread(_pod_view, "docker", pod.id, "bank-key")
        assert (content, mode, uid) == (value, 0o400, 0)  # the image's user (root here) owns it, read-only
        _assert_absent(value, "the pod's environment", env)
        _assert_absent(value, "docker inspect", inspect)
        await orch.undeploy("hms-ach")
