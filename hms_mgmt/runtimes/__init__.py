"""Pod drivers behind one interface: ``docker`` (Docker Engine) and ``process`` (local processes)."""

from __future__ import annotations

from pathlib import Path

from hms_mgmt.addresses import LOOPBACK
from hms_mgmt.events import EventSink
from hms_mgmt.runtimes.base import PodHandle, PodLaunch, PodLimits, PodRuntime, PodRuntimeError, check_pod_id

__all__ = ["PodHandle", "PodLaunch", "PodLimits", "PodRuntime", "PodRuntimeError", "check_pod_id", "make_runtime",
           "resolve_runtime_name"]


def resolve_runtime_name(setting: str) -> str:
    """``auto`` means docker when an engine answers, else process."""
    if setting in ("docker", "process"):
        return setting
    from hms_mgmt.runtimes.docker import docker_available

    return "docker" if docker_available() else "process"


def make_runtime(
    setting: str,
    *,
    node: str,
    state_dir: Path,
    docker_host: str | None = None,
    limits: PodLimits | None = None,
    events: EventSink | None = None,
    address: str = LOOPBACK,
) -> PodRuntime:
    """A node's runtime; ``docker_host`` (``unix:///...sock``, ``tcp://...``) talks to another engine;
    ``limits`` are what the node imposes on every pod (defaults: ``PodLimits()``); ``address`` is
    the node's address, where its pods publish or bind and which their endpoints name."""
    name = "docker" if docker_host and setting == "auto" else resolve_runtime_name(setting)
    if name == "docker":
        from hms_mgmt.runtimes.docker import DockerRuntime

        if docker_host:
            import docker

            return DockerRuntime(node, client=docker.DockerClient(base_url=docker_host, timeout=60), limits=limits,
                                 address=address)
        return DockerRuntime(node, limits=limits, address=address)
    from hms_mgmt.runtimes.process import ProcessRuntime

    return ProcessRuntime(node, state_dir, limits=limits, events=events, address=address)
