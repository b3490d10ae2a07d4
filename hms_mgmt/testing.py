"""The test kit: what the tests, the benchmarks and the scripts start to run hms-mgmt locally
(after kopf's ``kopf.testing``).

- the dev-server launcher (:mod:`hms_mgmt.devserver`, re-exported): :func:`dev_environment`,
  :class:`DevServer`, :func:`free_port`, :func:`temporal_binary`;
- :func:`local_settings` — settings with a fresh task queue, node and state directory, so a run
  never sees anyone else's workflows or pods;
- :func:`local_stack` — a dev server, a control+node worker in this process and, optionally, a
  builtin router as a process of its own; everything stopped on exit;
- :class:`WorkerProcess` — ``python -m worker`` as a real subprocess, to kill and start again;
- :class:`LocalRegistry` — Debian's ``docker-registry`` on 127.0.0.1, to push to and pull by digest from;
- a TLS front for Temporal (:mod:`hms_mgmt.tlsfront`, re-exported): :func:`make_pki`, :class:`TlsFront`.

The worker is imported when a stack starts, not with this module: ``hms_mgmt`` itself does not
depend on ``worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hms_mgmt.config import TEMPORAL_TLS_SETTINGS, Settings, env_var
from hms_mgmt.devserver import (
    DevServer,
    dev_environment,
    dev_server_pids,
    end_process,
    free_port,
    port_open,
    require_program,
    start_listener,
    temporal_binary,
)
from hms_mgmt.tlsfront import Pki, TlsFront, make_pki

__all__ = [
    "DevServer",
    "LocalRegistry",
    "LocalStack",
    "Pki",
    "TlsFront",
    "WorkerProcess",
    "cancel_and_wait",
    "dev_environment",
    "dev_server_pids",
    "free_port",
    "kill_process_pod",
    "local_settings",
    "local_stack",
    "make_pki",
    "port_open",
    "temporal_binary",
]

REPO = Path(__file__).resolve().parents[1]


def local_settings(address: str, state_dir: Path, runtime: str, *, queue_prefix: str = "hms-control",
                   node_prefix: str = "n", **extra: Any) -> Settings:
    """Settings of one run: its own task queue and node (a random tag), its state dir (made)."""
    tag = uuid.uuid4().hex[:8]
    state_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"task_queue": f"{queue_prefix}-{tag}", "node": f"{node_prefix}{tag}",
                              "capacity_retry_max_s": 1.0, **extra}
    return Settings(temporal_address=address, state_dir=state_dir, runtime=runtime, **values)  # type: ignore[arg-type]


@dataclass
class LocalStack:
    env: Any  # temporalio.testing.WorkflowEnvironment
    client: Any  # temporalio.client.Client
    settings: Settings
    orch: Any  # hms_mgmt.orchestrator.Orchestrator
    worker: Any  # worker.main.HmsWorker
    router_url: str | None = None


@contextlib.asynccontextmanager
async def local_stack(runtime: str = "process", *, prefix: str = "hms-local", node_prefix: str = "n",
                      router_engine: str | None = None, **settings_extra: Any) -> AsyncIterator[LocalStack]:
    """A dev server, a control+node worker in this process for ``runtime`` and, with
    ``router_engine``, ``python -m router`` fed by it (as ``hms up`` starts one)."""
    from hms_mgmt.orchestrator import Orchestrator
    from worker.main import HmsWorker

    env = await dev_environment(ui=False)
    tmp = tempfile.TemporaryDirectory(prefix=f"{prefix}-")
    try:
        router_port = free_port() if router_engine else None
        if router_port is not None:
            settings_extra.setdefault("routers", [f"http://127.0.0.1:{router_port}"])
        settings = local_settings(env.client.service_client.config.target_host, Path(tmp.name) / "state", runtime,
                                  queue_prefix=prefix, node_prefix=node_prefix, **settings_extra)
        worker = HmsWorker(env.client, settings)
        async with worker, _router(settings, router_port, router_engine) as router_url:
            yield LocalStack(env=env, client=env.client, settings=settings, orch=Orchestrator(env.client, settings),
                             worker=worker, router_url=router_url)
    finally:
        with contextlib.suppress(Exception):
            await env.shutdown()
        tmp.cleanup()


@contextlib.asynccontextmanager
async def _router(settings: Settings, port: int | None, engine: str | None) -> AsyncIterator[str | None]:
    if port is None or engine is None:
        yield None
        return
    from router.server import RouterProcess

    router = RouterProcess(settings, port=port, engine=engine)
    router.start()
    try:
        await router.wait_ready(30)
        yield router.url
    finally:
        await asyncio.to_thread(router.stop)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` (a server a test runs in its own process) and wait until it has ended."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class WorkerProcess:
    """``python -m worker`` as a real subprocess (the code under ``source_root``), configured
    from ``settings`` through the environment, to kill with SIGKILL and start again."""

    def __init__(self, settings: Settings, log_path: Path, *, source_root: Path | str = REPO,
                 extra_env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.log_path = log_path
        self.source_root = str(source_root)
        self.extra_env = extra_env or {}
        self.args = list(args)  # e.g. ["--no-node"] (the control plane only) or ["--no-control"] (the node only)
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
        env.update(
            HMS_TEMPORAL_ADDRESS=s.temporal_address,
            HMS_STATE_DIR=str(s.state_dir),
            HMS_TASK_QUEUE=s.task_queue,
            HMS_NODE=s.node,
            HMS_RUNTIME=s.runtime,
            HMS_CAPACITY_RETRY_MAX_S=str(s.capacity_retry_max_s),
            HMS_NODE_MAX_PODS=str(s.node_max_pods),
            HMS_TOKEN=s.token or "",
            HMS_ROUTERS=",".join(s.routers),
            HMS_METRICS_PORT=str(s.metrics_port or 0),
            PYTHONPATH=self.source_root,
        )
        # The same Temporal connection as the settings' (TLS, API key).
        for field in TEMPORAL_TLS_SETTINGS:
            value = getattr(s, field)
            if value is not None:
                env[env_var(field)] = str(value).lower() if isinstance(value, bool) else value
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "worker", *self.args], env=self.env(), cwd=self.source_root,
                                         stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def kill_process_pod(settings: Settings, pod_id: str) -> None:
    """SIGKILL a process-runtime pod of ``settings``' node, as a crash would."""
    from hms_mgmt.runtimes import make_runtime

    rt = make_runtime("process", node=settings.node, state_dir=settings.state_dir)
    try:
        handle = rt.find(pod_id)
        assert handle is not None and handle.running, f"pod {pod_id} is not running"
        os.kill(int(handle.extra["pid"]), signal.SIGKILL)
    finally:
        rt.close()


def enrol_node_dir(control_state: Path, node_state: Path, node: str, address: str = "127.0.0.1") -> None:
    """What ``hms node join`` leaves in a node's state directory, made directly (tests running a
    second node in one process): its key, its certificate signed by ``control_state``'s key, and
    that key's public half."""
    from hms_mgmt import nodeid, tickets
    from hms_mgmt.files import atomic_write

    tickets.ensure_control_key(control_state)
    key = nodeid.ensure_node_key(node_state, node)
    cert = nodeid.enrol_key(control_state, node=node, address=address, public_key=nodeid.raw_public(key))
    atomic_write(node_state / "keys" / tickets.PUBLIC_FILE, nodeid.control_public_pem(control_state), mode=0o644)
    atomic_write(nodeid.node_cert_path(node_state, node), cert + "\n", mode=0o644)


class LocalRegistry:
    """Debian's ``docker-registry`` (distribution 2.8) as a process of our own on ``host``
    (127.0.0.1 by default), with its config and storage in ``root``. dockerd takes plain HTTP
    from 127.0.0.0/8 registries; another address needs ``--insecure-registry ADDR:PORT``."""

    def __init__(self, root: Path, port: int | None = None, *, host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.host = host
        self.port = port or free_port()
        self.address = f"{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> LocalRegistry:
        binary = require_program("docker-registry", "docker-registry")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(f"version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: "
                          f"{self.root / 'data'}}}\nhttp:\n  addr: {self.address}\n")
        log = self.root / "registry.log"
        self.proc, listening = start_listener([binary, "serve", str(config)], log, self.host, self.port, timeout)
        if not listening:
            self.stop()
            raise RuntimeError(f"docker-registry did not listen on {self.address}: see {log}")
        return self

    def stop(self) -> None:
        end_process(self.proc, 10)


async def activity_results(client: Any, task_queue: str, activity: str, result_type: type) -> list[Any]:
    """Every completed ``activity``'s result in the histories of the workflows on ``task_queue``
    (what a rollout's drains or a service's feed pushes answered, as Temporal recorded them)."""
    out: list[Any] = []
    async for wf in client.list_workflows(f'TaskQueue = "{task_queue}"'):
        scheduled: dict[int, str] = {}
        async for ev in client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history_events():
            if ev.HasField("activity_task_scheduled_event_attributes"):
                scheduled[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
            elif ev.HasField("activity_task_completed_event_attributes"):
                done = ev.activity_task_completed_event_attributes
                if scheduled.get(done.scheduled_event_id) == activity:
                    out.extend(await client.data_converter.decode(done.result.payloads, [result_type]))
    return out
