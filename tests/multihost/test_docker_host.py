"""Issue 18, parts 5 and 10 on separate hosts: a Docker node on host D, with a dockerd of its own,
gets the signed image from a registry on host A by digest, and its containers answer at D's
address through A's router.

The image is built and pushed from D's engine (a build host, as an operator's CI would be), signed
on A (`hms image sign` reads its digest through that engine), then removed from D: D holds no copy
until a pod needs one, and then runs exactly the signed content, though another image sits under
the signed tag on D."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator

from .conftest import (
    Network,
    pod_answering,
    sign_image,
    start_control,
    start_node,
    tails,
    wait_until,
)
from .dockerhost import start_dockerd, start_registry, why_no_docker

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(300)]

BASE = "registry.gov/hms-ach:1.4"  # built by scripts/build_images.sh on this machine's engine
IMPOSTOR = "registry.gov/hms-notify:1.0"
SERVICE = "hms-dock"
ROUTER_PORT = 8000



def load_into(engine, image: str) -> None:
    """Copy ``image`` from this machine's engine into ``engine`` (no registry is reachable here)."""
    saved = subprocess.run(["docker", "save", image], capture_output=True, check=True, timeout=120).stdout
    loaded = engine.docker("load", stdin=saved)
    assert loaded.returncode == 0, loaded.stderr


async def test_a_docker_host_pulls_the_signed_content_by_digest_and_serves_at_its_address(
        network: Network, tmp_path: Path) -> None:
    why = why_no_docker()
    if why or subprocess.run(["docker", "image", "inspect", BASE, IMPOSTOR], capture_output=True).returncode != 0:
        pytest.skip(why or f"{BASE} and {IMPOSTOR} are not built (make images)")
    a, d = network.add_host("a"), network.add_host("d")
    logs = [tmp_path / n for n in ("a-up.log", "registry.log", "dockerd.log", "d-worker.log")]
    up = start_control(a, logs[0], logs=logs)
    registry = start_registry(a, tmp_path / "registry", logs[1])
    engine = start_dockerd(d, tmp_path / "docker-d", logs[2], insecure_registries=[registry])
    try:
        image = f"{registry}/hms-ach:1.4"
        await asyncio.to_thread(load_into, engine, BASE)
        assert engine.docker("tag", BASE, image).returncode == 0
        pushed = engine.docker("push", image)
        assert pushed.returncode == 0, pushed.stderr
        signed = sign_image(a, image, runtime="docker", DOCKER_HOST=engine.docker_host)
        assert f"digest {registry}/hms-ach@sha256:" in signed, signed
        content_id = json.loads(engine.docker("inspect", image).stdout)[0]["Id"]
        assert engine.docker("rmi", image, BASE).returncode == 0  # D holds no copy now
        # ... but an impostor under the signed tag: never run, whatever the tag says on D.
        await asyncio.to_thread(load_into, engine, IMPOSTOR)
        assert engine.docker("tag", IMPOSTOR, image).returncode == 0

        start_node(a, d, "d", logs[3], procs=[up], logs=logs, runtime="docker",
                   env=d.env(DOCKER_HOST=engine.docker_host))

        orch = await Orchestrator.connect(Settings.from_env(env={"HMS_STATE_DIR": str(a.state_dir)}))
        await orch.deploy({"name": SERVICE, "image": image, "min_replicas": 2, "max_replicas": 2, "cpu_target": 60},
                          wait=True, timeout=180)
        status = await orch.status(SERVICE)
        assert status.ready_replicas == 2 and {p.node for p in status.pods} == {"d"}
        assert all((p.endpoint or "").startswith(d.address + ":") for p in status.pods), status.pods
        # D's engine pulled exactly the signed content, and its containers run that content.
        held = json.loads(engine.docker("image", "inspect", content_id).stdout)[0]
        assert any(ref.startswith(f"{registry}/hms-ach@sha256:") for ref in held["RepoDigests"]), held["RepoDigests"]
        running = engine.docker("ps", "--filter", f"label=hms.service={SERVICE}", "--format", "{{.ID}}")
        ids = running.stdout.decode().split()
        assert len(ids) == 2, running
        for cid in ids:
            assert json.loads(engine.docker("inspect", cid).stdout)[0]["Image"] == content_id

        pods = {p.id for p in status.pods}
        url = f"http://{a.address}:{ROUTER_PORT}/{SERVICE}/health"
        await asyncio.to_thread(wait_until, lambda: pod_answering(url) in pods, timeout=30,
                                what="A's router to reach D's containers", logs=logs)
        answers = {await asyncio.to_thread(pod_answering, url) for _ in range(20)}
        assert answers <= pods, answers

        final = await orch.undeploy(SERVICE, wait=True, timeout=90)
        assert final is not None and final.phase == "Stopped"
    except BaseException:
        print(tails(logs))
        raise
    finally:
        d.stop()
        engine.close()
