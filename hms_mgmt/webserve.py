"""Serve an aiohttp application on one address: what the dashboard and a node's log stream share."""

from __future__ import annotations

from aiohttp import web

from hms_mgmt.addresses import host_port
from hms_mgmt.errors import HmsError


async def serve_app(app: web.Application, host: str, port: int, what: str) -> tuple[web.AppRunner, int]:
    """Listen on ``host``:``port`` (0: any free port); the runner to clean up and the port it got.
    Raises HmsError naming ``what`` when the address cannot be had (nothing is left running)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise HmsError(f"{what} cannot listen on {host_port(host, port)}: {e}") from e
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
