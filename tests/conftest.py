"""One real Temporal dev server for the whole run; a fresh task queue, node and state
directory per test, so tests never see each other's workflows or pods."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from hms_mgmt import auth, testing
from hms_mgmt.config import Settings
from hms_mgmt.errors import HmsError
from hms_mgmt.models import ServiceStatus
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes import make_runtime
from hms_mgmt.testing import WorkerProcess
from hms_mgmt.trust import TrustStore
from worker.main import HmsWorker

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = "registry.gov/hms-ach:1.4"
CRASHLOOP_IMAGE = "registry.gov/hms-crashloop:1.0"
V2_IMAGE = "registry.gov/hms-ach:1.5"  # the next release of hms-ach (answers version 1.5)


def temporal_binary() -> str:
    try:
        return testing.temporal_binary()
    except HmsError as e:
        pytest.fail(f"{e} (make test does it)")


def docker_required() -> bool:
    return os.environ.get("HMS_REQUIRE_DOCKER") == "1"


def docker_ready() -> str | None:
    """None when Docker tests can run, else why not."""
    from hms_mgmt.runtimes.docker import docker_available

    if not docker_available():
        return "no Docker Engine answers"
    import docker

    client = docker.from_env()
    try:
        client.images.get(EXAMPLE_IMAGE)
    except Exception:  # noqa: BLE001
        return f"image {EXAMPLE_IMAGE} is missing: run `make images`"
    finally:
        client.close()
    return None


def require_docker() -> None:
    why = docker_ready()
    if why is None:
        return
    if docker_required():
        pytest.fail(f"HMS_REQUIRE_DOCKER=1 but {why}")
    pytest.skip(why)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    temporal_binary()
    env = await testing.dev_environment()
    try:
        yield env
    finally:
        await env.shutdown()


def temporal_address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@pytest.fixture(params=["process", "docker"])
def runtime_name(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        require_docker()
    return request.param


@pytest.fixture
def process_only() -> str:
    return "process"


def make_settings(
    env: WorkflowEnvironment, state_dir: Path, runtime: str, *, trusted: bool = True, **extra: object
) -> Settings:
    """Settings for one test: its own queues, node and state dir, an ops_admin identity
    ("alice"), and — unless ``trusted=False`` — the example images signed in its trust store."""
    state_dir.mkdir(parents=True, exist_ok=True)
    auth.init_keys(state_dir)
    values: dict[str, object] = {
        "token": auth.issue_token(state_dir, user="alice", role="ops_admin"),
        # Nobody's router or metrics port: a test that wants them says so (a running `make demo`
        # owns 8000 and 9464 and would refuse or collide with a test's feed and metrics).
        "routers": ["http://127.0.0.1:9"],
        "metrics_port": 0,
    }
    values.update(extra)
    s = testing.local_settings(temporal_address(env), state_dir, runtime, **values)
    if trusted:
        sign_images(s, EXAMPLE_IMAGE, CRASHLOOP_IMAGE, V2_IMAGE)
    return s


def sign_images(s: Settings, *images: str) -> None:
    rt = make_runtime(s.runtime, node=s.node, state_dir=s.state_dir)
    try:
        for image in images:
            TrustStore(s.state_dir).sign(image, rt.content_id(image), signer="test-release")
    finally:
        rt.close()


def as_user(s: Settings, user: str, role: str) -> Settings:
    """The same settings with another identity's token."""
    return s.model_copy(update={"token": auth.issue_token(s.state_dir, user=user, role=role)})


@pytest.fixture
def settings(temporal_env: WorkflowEnvironment, tmp_path: Path, runtime_name: str) -> Iterator[Settings]:
    s = make_settings(temporal_env, tmp_path / "state", runtime_name)
    yield s
    sweep_pods(s)


def sweep_pods(s: Settings) -> list[str]:
    """Remove every pod of the test's node; returns what was left (a leak, if any)."""
    rt = make_runtime(s.runtime, node=s.node, state_dir=s.state_dir)
    try:
        left = [h.pod_id for h in rt.list()]
        for pod_id in left:
            rt.stop(pod_id, 0)
        return left
    finally:
        rt.close()


def node_pods(s: Settings, service: str | None = None):
    rt = make_runtime(s.runtime, node=s.node, state_dir=s.state_dir)
    try:
        return rt.list(service)
    finally:
        rt.close()


@pytest_asyncio.fixture(loop_scope="session")
async def hms(temporal_env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Orchestrator]:
    """A worker in this process (control + node) and a client, against the real server."""
    try:
        async with HmsWorker(temporal_env.client, settings):
            yield Orchestrator(temporal_env.client, settings)
    finally:
        await terminate_running(temporal_env, settings)


@pytest_asyncio.fixture(loop_scope="session")
async def docker_node(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings for a Docker node whose trust store signs nothing yet (the test signs what it runs);
    afterwards no service workflow (a failed test's) and no pod of it is left for the next test."""
    s = make_settings(temporal_env, tmp_path / "state", "docker", trusted=False)
    try:
        yield s
    finally:
        await terminate_running(temporal_env, s)
        sweep_pods(s)


async def terminate_running(env: WorkflowEnvironment, s: Settings) -> None:
    """A failed test must not leave a service workflow that the next test's deploy would find."""
    query = f'ExecutionStatus = "Running" AND TaskQueue = "{s.task_queue}"'
    async for wf in env.client.list_workflows(query):
        try:
            await env.client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate("test teardown")
        except Exception:  # noqa: BLE001 - already gone
            pass


def seed_spec(**overrides: object) -> dict[str, object]:
    """The seed's dict literal, unchanged, plus test overrides."""
    spec: dict[str, object] = {
        "name": "hms-ach",
        "image": EXAMPLE_IMAGE,
        "min_replicas": 2,
        "max_replicas": 10,
        "cpu_target": 60,
    }
    spec.update(overrides)
    return spec


@contextlib.asynccontextmanager
async def worker_process(env: WorkflowEnvironment, s: Settings, log_path: Path) -> AsyncIterator[WorkerProcess]:
    """``python -m worker`` for ``s`` while the block runs; then its workflows and pods are gone."""
    worker = WorkerProcess(s, log_path)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        await terminate_running(env, s)
        sweep_pods(s)


async def eventually(predicate, *, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Await until ``predicate()`` (sync or async) returns truthy; return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


async def wait_phase(orch: Orchestrator, name: str, phases: set[str], *, timeout: float = 60.0) -> ServiceStatus:
    """Poll ``status()`` until the phase is one of ``phases`` (tests watch intermediate phases
    such as VerifyingImage or Degraded; the library itself waits with updates, not polls)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await orch.status(name, live=False)
        if last.phase in phases:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} not {'/'.join(sorted(phases))} after {timeout:g}s (last: {last.phase if last else None})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``chaos_full`` belong to the full chaos run only (``make chaos``,
    ``HMS_CHAOS=full``); elsewhere they are deselected rather than skipped, so that a skip under
    ``HMS_REQUIRE_DOCKER=1`` always means something is missing."""
    if os.environ.get("HMS_CHAOS", "").strip().lower() == "full":
        return
    later = [item for item in items if item.get_closest_marker("chaos_full")]
    if later:
        config.hook.pytest_deselected(items=later)
        items[:] = [item for item in items if not item.get_closest_marker("chaos_full")]


def wait_healthy(endpoint: str | None, timeout: float = 20.0) -> None:
    """Until a pod at ``endpoint`` answers ``/health`` with 200 (blocking)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{endpoint} not healthy after {timeout:g}s")
