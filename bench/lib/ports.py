"""Ports: a free one on 127.0.0.1 (:func:`free_port`, the test kit's), and the host ports of
the containers a benchmark labelled, for discovery and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def __getattr__(name: str) -> Any:
    # The kit is product code: imported on first use, after use_source() chose which.
    if name == "free_port":
        from hms_mgmt.testing import free_port

        return free_port
    raise AttributeError(name)


def docker_client(timeout: int = 60, pool: int = 32):
    import docker

    return docker.DockerClient.from_env(timeout=timeout, max_pool_size=pool)


def label_filter(labels: dict[str, str]) -> dict[str, list[str]]:
    return {"label": [f"{k}={v}" for k, v in labels.items()]}


def docker_endpoints_sync(client, labels: dict[str, str], private_port: int = 8080) -> list[str]:
    """Host endpoints ("127.0.0.1:PORT") of the running containers carrying ``labels``;
    one ``GET /containers/json`` (no per-container inspect)."""
    found = (_host_endpoint(ct, private_port) for ct in client.api.containers(filters=label_filter(labels)))
    return [ep for ep in found if ep]


def docker_discoverer(client, labels: dict[str, str], private_port: int = 8080) -> Callable[[], Awaitable[list[str]]]:
    async def discover() -> list[str]:
        return await asyncio.to_thread(docker_endpoints_sync, client, labels, private_port)

    return discover


def remove_containers(client, labels: dict[str, str], *, threads: int = 10) -> int:
    """Force-remove every container (running or not) carrying ``labels``; returns how many."""
    found = client.api.containers(all=True, filters=label_filter(labels))
    if not found:
        return 0

    def rm(cid: str) -> None:
        with contextlib.suppress(Exception):
            client.api.remove_container(cid, force=True)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(rm, [c["Id"] for c in found]))
    return len(found)


def running_endpoints(dclient, labels: dict[str, str], exclude_ids: set[str] = frozenset(),
                      private_port: int = 8080) -> list[tuple[str, str]]:
    """(container id, "127.0.0.1:PORT") of the running containers carrying ``labels``."""
    out = []
    for ct in dclient.api.containers(filters=label_filter(labels)):
        if ct["Id"] in exclude_ids:
            continue
        if ep := _host_endpoint(ct, private_port):
            out.append((ct["Id"], ep))
    return out


def _host_endpoint(ct: dict[str, Any], private_port: int) -> str | None:
    for p in ct.get("Ports") or []:
        if p.get("PrivatePort") == private_port and p.get("PublicPort"):
            return f"{p.get('IP') or '127.0.0.1'}:{p['PublicPort']}"
    return None
