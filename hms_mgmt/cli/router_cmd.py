"""``hms router``: the traffic router in the foreground (wired into the app by ``commands.py``:
``app.command()(router)``)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from hms_mgmt import constants
from hms_mgmt.cli.common import _cli_errors, _settings, _setup_logging
from hms_mgmt.cli.render import out


@_cli_errors
def router(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = constants.DEFAULT_ROUTER_PORT,
    engine: Annotated[str, typer.Option("--engine", help="builtin (aiohttp) or haproxy (needs Debian's haproxy).")
                      ] = "builtin",
) -> None:
    """Route http://127.0.0.1:PORT/<service>/<path> to the healthiest ready pod, until Ctrl-C."""
    from router.server import ENGINES, run

    if engine not in ENGINES:
        raise typer.BadParameter(f"choose one of {', '.join(ENGINES)}", param_hint="--engine")
    if engine == "haproxy":
        from router.haproxy import haproxy_binary

        haproxy_binary()  # a clear error now if it is not installed
    _setup_logging(logging.INFO)
    settings = _settings(router_port=port)
    out.print(f"router ({engine}) on http://127.0.0.1:{port}/<service>/<path>  "
              f"(table: /-/table, stats: /-/stats, metrics: /metrics)")
    run(settings, port=port, engine=engine)
