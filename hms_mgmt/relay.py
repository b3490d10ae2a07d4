"""A TCP relay: accept on one address, forward each connection to another (``hms up --listen``).

Why: the Temporal dev server (CLI 1.9.1, server 1.32.0) started with ``--ip ADDR`` other than
127.0.0.1 serves most calls, but an update-with-start (``ExecuteMultiOperation``) fails inside
it with "dial tcp 127.0.0.1:<its history port>: connection refused". So ``hms up --listen ADDR``
runs the dev server on 127.0.0.1 and relays ADDR's gRPC and Web UI ports to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress


def exposure_warning(listen: str, port: int) -> str | None:
    """What ``hms up --listen ADDR`` opens to ADDR's network, or None on a loopback address. The
    dev server has no authentication and no TLS; the relay passes every call through."""
    try:
        if ipaddress.ip_address(listen.removeprefix("[").removesuffix("]")).is_loopback:
            return None
    except ValueError:
        if listen == "localhost":
            return None
    return (f"warning: --listen {listen} relays the Temporal dev server (port {port}) and its Web UI, "
            "which have no authentication and no TLS, to a non-loopback address. Anyone who can reach "
            f"{listen} can read every workflow history, start, signal and terminate workflows (deploys, "
            "scaling, stops), and poll the task queues to take the workers' tasks. Use it only on a "
            "network you trust; otherwise run a production Temporal cluster (README, \"Running against "
            "a production Temporal cluster or Temporal Cloud\").")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def start_relay(host: str, port: int, target_host: str, target_port: int) -> asyncio.Server:
    """Listen on ``host:port``; each connection is piped to ``target_host:target_port``."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.wait_for(asyncio.open_connection(target_host, target_port), 10)
        except (OSError, TimeoutError):
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    return await asyncio.start_server(handle, host, port, reuse_address=True)
