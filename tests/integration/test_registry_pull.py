"""Images reach a node by content: a Docker node that lacks the signed image pulls exactly that
content by digest from a registry (Debian's docker-registry, a real one), runs it by content id
whatever its local tag holds, and refuses the pod, naming why, when it cannot get it.

Real dockerd, real registry, real Temporal; `hms image sign` as an operator runs it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from conftest import (
    EXAMPLE_IMAGE,
    WorkerProcess,
    docker_required,
    eventually,
    make_settings,
    node_pods,
    require_docker,
    seed_spec,
    sweep_pods,
    terminate_running,
)
from temporalio.testing import WorkflowEnvironment
from test_cli import hms, ok

from hms_mgmt.config import Settings
from hms_mgmt.errors import ActivityErrorType, FailureKind
from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes.base import PodRuntimeError
from hms_mgmt.runtimes.docker import DockerRuntime
from hms_mgmt.testing import LocalRegistry, enrol_node_dir
from hms_mgmt.trust import TrustStore
from worker.main import HmsWorker


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    require_docker()
    if shutil.which("docker-registry") is None:
        why = "no docker-registry binary: apt-get install docker-registry (.ci/run does)"
        if docker_required():
            pytest.fail(why)
        pytest.skip(why)
    reg = LocalRegistry(tmp_path / "registry").start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def client(registry: LocalRegistry) -> Iterator[docker.DockerClient]:
    """The engine; afterwards, every image named after the test's registry is gone from it."""
    c = docker.from_env(timeout=120)
    try:
        yield c
    finally:
        for image in c.images.list():
            if any(r.startswith(f"{registry.address}/") for r in image.tags + image.attrs.get("RepoDigests", [])):
                with contextlib.suppress(docker.errors.APIError):
                    c.images.remove(image.id, force=True)
        c.close()


def unique_image(client: docker.DockerClient, ref: str) -> str:
    """The example image with a label of its own: content no other tag on this dockerd holds, so
    removing ``ref`` really removes it. Returns its content id."""
    dockerfile = f"FROM {EXAMPLE_IMAGE}\nLABEL hms.test.content={uuid.uuid4().hex}\n".encode()
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile), tag=ref, rm=True)
    return image.id


async def push_and_sign(client: docker.DockerClient, s: Settings, ref: str) -> tuple[str, str]:
    """Build, push, `hms image sign`, then remove it from this node: (content id, repo digest)."""
    content_id = await asyncio.to_thread(unique_image, client, ref)
    repo, _, tag = ref.rpartition(":")
    await asyncio.to_thread(client.images.push, repo, tag=tag)
    out = ok(await hms("image", "sign", ref, "--runtime", "docker", env=WorkerProcess(s, Path("/dev/null")).env()))
    record = TrustStore(s.state_dir).get(ref)
    assert record is not None and record.content_id == content_id
    assert record.repo_digest.startswith(f"{repo}@sha256:") and f"digest {record.repo_digest}" in out
    await asyncio.to_thread(client.images.remove, ref, force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(content_id)
    return content_id, record.repo_digest


def container_image(client: docker.DockerClient, pod_id: str) -> str:
    (container,) = client.containers.list(filters={"label": f"hms.pod={pod_id}"})
    return container.attrs["Image"]


async def test_a_node_without_the_image_pulls_the_signed_content_by_digest_never_the_tag(
        temporal_env: WorkflowEnvironment, docker_node: Settings, registry: LocalRegistry, client):
    ref = f"{registry.address}/hms-ach-{uuid.uuid4().hex[:8]}:1.4"
    content_id, digest = await push_and_sign(client, docker_node, ref)
    # An impostor under the signed tag on this node: other content, same name.
    impostor = await asyncio.to_thread(unique_image, client, ref)
    assert impostor != content_id
    async with HmsWorker(temporal_env.client, docker_node):
        orch = Orchestrator(temporal_env.client, docker_node)
        await orch.deploy(seed_spec(image=ref, min_replicas=1, max_replicas=1), wait=True, timeout=120)
        status = await orch.status("hms-ach")
        assert status.phase == "Running" and status.ready_replicas == 1 and status.image_id == content_id
        pod = status.pods[0]
        assert container_image(client, pod.id) == content_id  # the signed content, pulled by digest
        assert client.images.get(digest).id == content_id
        assert client.images.get(ref).id == impostor  # the tag was never used, nor moved
        await orch.undeploy("hms-ach")


async def test_a_node_that_cannot_get_the_content_refuses_the_pod_and_says_why(
        temporal_env: WorkflowEnvironment, docker_node: Settings, registry: LocalRegistry, client):
    ref = f"{registry.address}/hms-ach-{uuid.uuid4().hex[:8]}:1.4"
    content_id, digest = await push_and_sign(client, docker_node, ref)
    impostor = await asyncio.to_thread(unique_image, client, ref)  # the tag here holds other content
    registry.stop()
    async with HmsWorker(temporal_env.client, docker_node):
        orch = Orchestrator(temporal_env.client, docker_node)
        await orch.deploy(seed_spec(image=ref, min_replicas=1, max_replicas=1), wait=True, timeout=120)

        async def refused():
            status = await orch.status("hms-ach")
            return status if status.phase == "Degraded" and status.failure is not None else None

        status = await eventually(refused, timeout=60, what="the service Degraded by the refused pod")
        assert status.ready_replicas == 0 and status.failure.kind == FailureKind.CRASH_LOOP
        assert "ImageNotFound" in status.failure.message and f"cannot be pulled from {digest}" in status.failure.message
        assert node_pods(docker_node) == []  # not the impostor, not anything
        events = [e for e in read_events(docker_node.state_dir, service="hms-ach") if e.type == "image.unavailable"]
        assert events and digest in events[0].reason and events[0].data["content_id"] == content_id

        # The registry back: the next heal pulls the signed content and runs it.
        registry.start()
        status = await eventually(lambda: _ready(orch), timeout=120, what="a pod of the signed content")
        ready = next(p for p in status.pods if p.ready)
        assert container_image(client, ready.id) == content_id
        assert client.images.get(ref).id == impostor  # the tag here was neither run nor moved
        await orch.undeploy("hms-ach")


async def _ready(orch: Orchestrator):
    status = await orch.status("hms-ach")
    return status if status.ready_replicas == 1 else None


async def test_a_joined_node_without_a_trust_store_gets_the_signed_content_too(
        temporal_env: WorkflowEnvironment, tmp_path: Path, registry: LocalRegistry, client):
    """Node b joined (no trust store, no control key): it pulls the tag once at admission only to
    say what it holds; its pod runs the content the control plane stamped, by id."""
    a = make_settings(temporal_env, tmp_path / "a", "docker", trusted=False)
    b = make_settings(temporal_env, tmp_path / "b", "docker", trusted=False,
                      docker_host=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    b = b.model_copy(update={"task_queue": a.task_queue, "node": f"{a.node}-b"})
    ref = f"{registry.address}/hms-ach-{uuid.uuid4().hex[:8]}:1.4"
    content_id, digest = await push_and_sign(client, a, ref)
    enrol_node_dir(a.state_dir, b.state_dir, b.node, b.node_address)
    try:
        async with HmsWorker(temporal_env.client, a), HmsWorker(temporal_env.client, b, control=False):
            orch = Orchestrator(temporal_env.client, a)
            await orch.deploy(seed_spec(image=ref, min_replicas=2, max_replicas=2), wait=True, timeout=120)
            status = await orch.status("hms-ach")
            assert status.ready_replicas == 2 and {p.node for p in status.pods} == {a.node, b.node}
            assert status.image_id == content_id
            assert {container_image(client, p.id) for p in status.pods} == {content_id}
            await orch.undeploy("hms-ach")
    finally:
        await terminate_running(temporal_env, a)
        sweep_pods(a)
        sweep_pods(b)


def pushed(client: docker.DockerClient, runtime: DockerRuntime, ref: str) -> tuple[str, str]:
    """Build and push unique content, then drop it here: (content id, repo digest)."""
    content_id = unique_image(client, ref)
    repo, _, tag = ref.rpartition(":")
    client.images.push(repo, tag=tag)
    digest = runtime.repo_digest(ref)
    client.images.remove(ref, force=True)
    return content_id, digest


def test_the_runtime_keeps_a_pull_only_if_it_is_the_signed_content(registry: LocalRegistry, client):
    """A digest that names other content (a record for another image, a registry mix-up) is
    refused and leaves nothing behind; content signed with no digest cannot be fetched at all."""
    runtime = DockerRuntime(f"n{uuid.uuid4().hex[:6]}", docker.from_env(timeout=120))
    try:
        wanted, _ = pushed(client, runtime, f"{registry.address}/want-{uuid.uuid4().hex[:8]}:1")
        _, other_digest = pushed(client, runtime, f"{registry.address}/other-{uuid.uuid4().hex[:8]}:1")
        with pytest.raises(PodRuntimeError, match="not the signed") as wrong:
            runtime.fetch(wanted, other_digest)
        assert wrong.value.error_type == ActivityErrorType.IMAGE_UNTRUSTED
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(other_digest)  # not kept
        with pytest.raises(PodRuntimeError, match="no registry digest") as nowhere:
            runtime.fetch(wanted, "")
        assert nowhere.value.error_type == ActivityErrorType.IMAGE_NOT_FOUND
    finally:
        runtime.close()
