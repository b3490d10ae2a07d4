"""Chaos helpers: seeded randomness, run sizes, and the books check (pods the workflows report
against the process table and the Docker containers carrying the test's labels).

``HMS_CHAOS=full`` selects the full counts (``make chaos``); without it each test runs a short,
cheap version. ``HMS_CHAOS_SEED=N`` replays a run: every test prints the seed it used.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import EXAMPLE_IMAGE, node_pods, seed_spec
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from hms_mgmt import constants as c
from hms_mgmt.config import Settings
from hms_mgmt.errors import HmsError
from hms_mgmt.models import ServiceStatus
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes import make_runtime
from workflows import ALL_WORKFLOWS, MessageGuard

FULL = os.environ.get("HMS_CHAOS", "").strip().lower() == "full"


@dataclass(frozen=True)
class Counts:
    worker_kills: int
    worker_services: int
    pod_kills_under_load: int
    docker_restarts: int


SHORT = Counts(worker_kills=3, worker_services=1, pod_kills_under_load=5, docker_restarts=1)
FULL_COUNTS = Counts(worker_kills=20, worker_services=3, pod_kills_under_load=50, docker_restarts=2)
COUNTS = FULL_COUNTS if FULL else SHORT


@pytest.fixture
def chaos_rng(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> random.Random:
    """A ``random.Random`` seeded from ``HMS_CHAOS_SEED`` or fresh; the seed is printed (also
    under output capture) and kept in the test's report properties."""
    raw = os.environ.get("HMS_CHAOS_SEED", "").strip()
    seed = int(raw) if raw else secrets.randbelow(2**31)
    request.node.user_properties.append(("chaos_seed", seed))
    with capsys.disabled():
        print(f"\n[chaos] {request.node.name}: seed {seed} ({'full' if FULL else 'short'} run; "
              f"replay with HMS_CHAOS_SEED={seed})", flush=True)
    return random.Random(seed)


def report(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A figure of the run, printed whatever the capture setting (for RELIABILITY.md)."""
    with capsys.disabled():
        print(f"[chaos] {line}", flush=True)


MAX_REPLICAS = 4


def chaos_spec(name: str, image: str = EXAMPLE_IMAGE) -> dict[str, object]:
    # Pods take a second to answer, so kills land mid-start; no autoscaling decision interferes
    # (idle pods under cpu_target, and any scale-down held for an hour).
    return seed_spec(name=name, image=image, max_replicas=MAX_REPLICAS, cpu_target=90, health_interval_s=1.0,
                     scale_interval_s=5.0, scale_down_window_s=3600, drain_s=0.5, min_ready_s=0.5, stop_grace_s=2,
                     env={"HMS_STARTUP_DELAY_S": "1"})


# --- the books --------------------------------------------------------------------------------


@dataclass
class Books:
    """One service: what its workflow reports, and what really runs."""

    service: str
    desired: int
    workflow: list[str]  # pod ids in status().pods (a pod listed twice is a duplicate)
    running: list[str]  # running pods the node's runtime lists (process records / labelled containers)
    exited: list[str]  # pods the runtime still has but that do not run
    table: Counter[str] = field(default_factory=Counter)  # pod id -> live processes / containers carrying it

    @property
    def orphans(self) -> set[str]:
        """Pods that run but that no workflow has on its books."""
        return (set(self.running) | {p for p, n in self.table.items() if n}) - set(self.workflow)

    @property
    def duplicates(self) -> list[str]:
        """A pod id booked twice, a pod id with two live processes/containers, or more running
        pods of the service than it wants."""
        dup = [p for p, n in Counter(self.workflow).items() if n > 1]
        dup += [p for p, n in self.table.items() if n > 1]
        extra = len(set(self.running) | set(self.table)) - self.desired
        return dup + ([f"+{extra} over desired"] if extra > 0 else [])

    @property
    def missing(self) -> set[str]:
        """Booked pods that do not run."""
        return set(self.workflow) - set(self.running)

    def clean(self) -> bool:
        return not (self.orphans or self.duplicates or self.missing or self.exited)

    def __str__(self) -> str:
        return (f"{self.service}: desired {self.desired}, booked {len(self.workflow)}, running {len(self.running)}, "
                f"orphans {sorted(self.orphans)}, duplicates {self.duplicates}, missing {sorted(self.missing)}, "
                f"exited leftovers {self.exited}")


def process_table(services: set[str]) -> dict[str, Counter[str]]:
    """Live pod processes of ``services`` in the process table, by service and pod id: a pod's
    main process leads its own session and carries HMS_SERVICE / HMS_POD_ID in its environment."""
    out: dict[str, Counter[str]] = {s: Counter() for s in services}
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) != proc.pid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except (psutil.Error, ProcessLookupError, PermissionError, OSError):
            continue
        service = env.get("HMS_SERVICE")
        if service in out and env.get("HMS_POD_ID"):
            out[service][env["HMS_POD_ID"]] += 1
    return out


def container_table(settings: Settings, services: set[str]) -> dict[str, Counter[str]]:
    """Running containers carrying this test's node label, by service and pod id."""
    import docker

    client = docker.DockerClient(base_url=settings.docker_host) if settings.docker_host else docker.from_env()
    out: dict[str, Counter[str]] = {s: Counter() for s in services}
    try:
        for ct in client.containers.list(filters={"label": [f"{c.LABEL_NODE}={settings.node}"]},
                                         ignore_removed=True):
            labels = ct.labels or {}
            if labels.get(c.LABEL_SERVICE) in out:
                out[labels[c.LABEL_SERVICE]][labels.get(c.LABEL_POD, "?")] += 1
    finally:
        client.close()
    return out


def runtime_pods(settings: Settings):
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir,
                      docker_host=settings.docker_host)
    try:
        return rt.list()
    finally:
        rt.close()


def books(settings: Settings, statuses: dict[str, ServiceStatus]) -> list[Books]:
    handles = runtime_pods(settings)
    names = set(statuses)
    table = (process_table(names) if settings.runtime == "process" else container_table(settings, names))
    out = []
    for name, st in sorted(statuses.items()):
        mine = [h for h in handles if h.service == name]
        out.append(Books(service=name, desired=st.desired_replicas, workflow=[p.id for p in st.pods],
                         running=[h.pod_id for h in mine if h.running],
                         exited=[h.pod_id for h in mine if not h.running], table=table[name]))
    return out


async def statuses(orch: Orchestrator, names: list[str]) -> dict[str, ServiceStatus] | None:
    """Every service's status, or None while a query cannot be answered (no worker yet)."""
    out = {}
    for name in names:
        try:
            out[name] = await asyncio.wait_for(orch.status(name, live=False), 10)
        except (HmsError, TimeoutError, Exception):  # noqa: BLE001 - a worker or server on its way back
            return None
    return out


def settled(st: ServiceStatus, *, replicas: int, image: str | None = None) -> bool:
    """The workflow's own view: Running at the wanted size, every pod ready on the current
    revision (and that revision runs ``image`` when given)."""
    return (st.phase == "Running" and st.desired_replicas == replicas and len(st.pods) == replicas
            and all(p.ready and p.revision == st.revision for p in st.pods)
            and (image is None or st.spec.image == image))


async def converge(orch: Orchestrator, settings: Settings, want: dict[str, tuple[int, str | None]], *,
                   timeout: float) -> tuple[dict[str, ServiceStatus], list[Books]]:
    """Wait until every service is settled at its wanted (replicas, image) and its books are
    clean; returns the last statuses and books (the caller asserts on them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: tuple[dict[str, ServiceStatus], list[Books]] = ({}, [])
    while loop.time() < deadline:
        sts = await statuses(orch, list(want))
        if sts is not None:
            ok = all(settled(sts[n], replicas=r, image=img) for n, (r, img) in want.items())
            bk = await asyncio.to_thread(books, settings, sts)
            last = (sts, bk)
            if ok and all(b.clean() for b in bk):
                return last
        await asyncio.sleep(1.0)
    return last


def describe(sts: dict[str, ServiceStatus]) -> str:
    return "; ".join(f"{n}: {s.phase} rev {s.revision} {s.spec.image} desired {s.desired_replicas} "
                     f"pods {[(p.id[:8], p.revision, p.ready, p.health) for p in s.pods]}"
                     for n, s in sorted(sts.items()))


def kill_pod(settings: Settings, pod_id: str) -> bool:
    """SIGKILL a pod's main process, as a crash would. False when it no longer runs."""
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir,
                      docker_host=settings.docker_host)
    try:
        handle = rt.find(pod_id)
        if handle is None or not handle.running:
            return False
        if settings.runtime == "process":
            pid = int(handle.extra["pid"])
        else:
            pid = int(rt.client.containers.get(handle.extra["container_id"]).attrs["State"]["Pid"])
        if pid <= 0:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    finally:
        rt.close()


def leftover_pods(settings: Settings, names: set[str]) -> list[str]:
    return [h.pod_id for h in node_pods(settings) if h.service in names]


async def replay_failures(client: Client, settings: Settings, keep: Path) -> dict[str, str]:
    """Every workflow run on this test's control queue, replayed from its whole history as a
    restarted worker replays it; the ones that fail, with the error (their history is written
    to ``keep`` for ``tests/replay``). A run the worker's sticky cache kept going can hide a
    non-determinism that the next worker restart would hit."""
    histories = []
    async for wf in client.list_workflows(f'TaskQueue = "{settings.task_queue}"'):
        histories.append(await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history())
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter,
                        interceptors=[MessageGuard()])
    failures = {}
    for history in histories:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        if result.replay_failure is not None:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{history.workflow_id}.json").write_text(history.to_json())
            failures[history.workflow_id] = repr(result.replay_failure)
    return failures
