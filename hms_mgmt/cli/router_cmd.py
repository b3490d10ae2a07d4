"""``hms router``: the traffic router in the foreground, and how a router on another host joins
(``hms router join-token`` on the control host, ``hms router join TOKEN`` on the router's host),
as nodes do. ``hms routers`` lists the registered routers. Wired into the app by ``commands.py``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from hms_mgmt import constants, nodeid
from hms_mgmt.cli.common import _cli_errors, _settings, _setup_logging
from hms_mgmt.cli.node_cmd import RotateOpt, TtlOpt, _control_host, enrol_here, print_join_token
from hms_mgmt.cli.output import Format, OutputOpt, show
from hms_mgmt.cli.render import out
from hms_mgmt.errors import HmsError

router_app = typer.Typer(help="The traffic router: run it (`hms router [--host ADDR]`), or join one on "
                         "another host with a token.", rich_markup_mode=None)


@router_app.callback(invoke_without_command=True)
@_cli_errors
def router(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default: HMS_ROUTER_PORT, "
                                             f"else {constants.DEFAULT_ROUTER_PORT}).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="builtin (aiohttp) or haproxy (needs Debian's haproxy).")
                      ] = "builtin",
    host: Annotated[str | None, typer.Option("--host", help="The IP address to listen on and register "
                                             "(default: the address it joined with, else 127.0.0.1).")] = None,
) -> None:
    """Route http://HOST:PORT/<service>/<path> to the healthiest ready pod, until Ctrl-C. The
    router registers itself with the control plane, which then sends it the endpoint feed."""
    if ctx.invoked_subcommand is not None:
        return
    from router.server import ENGINES, run

    if engine not in ENGINES:
        raise typer.BadParameter(f"choose one of {', '.join(ENGINES)}", param_hint="--engine")
    if engine == "haproxy":
        from router.haproxy import haproxy_binary

        haproxy_binary()  # a clear error now if it is not installed
    _setup_logging(logging.INFO)
    settings = _settings(router_port=port)
    port = settings.router_port
    host = host or settings.router_address
    out.print(f"router ({engine}) on http://{host}:{port}/<service>/<path>  "
              f"(table: /-/table, stats: /-/stats, metrics: /metrics, from "
              f"{', '.join(settings.router_inspect_from)} or signed by the control plane)")
    run(settings, port=port, engine=engine, host=host)


@router_app.command("join-token")
@_cli_errors
def join_token(ttl: TtlOpt = "24h", rotate: RotateOpt = False) -> None:
    """Print a router join token (the last line of the output) and the command a router host runs."""
    print_join_token("router", ttl, rotate)


@router_app.command("join")
@_cli_errors
def join(
    token: Annotated[str, typer.Argument(help="The token `hms router join-token` printed on the control host.")],
    name: Annotated[str | None, typer.Option("--name", help="This router's name (default: the host name).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="This host's IP address, where the router "
                                                "listens and the control plane pushes the feed.")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="This router's state directory "
                                                   "(default: HMS_STATE_DIR or ~/.hms).")] = None,
) -> None:
    """Join a router on this host to a control plane: make its key, have the control plane sign
    it into a router certificate (through Temporal), write the state directory. Then run
    `hms router` here."""
    sdir, _, addr, _ = enrol_here(token, "router", name, address, state_dir,
                                  lambda n, a: {"router_name": n, "router_address": a})
    env = "" if os.environ.get("HMS_STATE_DIR") == str(sdir) else f"HMS_STATE_DIR={sdir} "
    out.print(f"  now run: {env}hms router --host {addr}", soft_wrap=True)


@router_app.command("remove")
@_cli_errors
def remove(name: Annotated[str, typer.Argument(help="The router.")]) -> None:
    """Revoke a router: its next heartbeat is refused, and it gets no feed and is asked no drain."""
    settings = _settings()
    _control_host(settings.state_dir)
    if not nodeid.revoke(settings.state_dir, name, role="router"):
        raise HmsError(f"router {name} is not enrolled here (or was removed already)")
    out.print(f"removed router {name}: its certificate is revoked; the feed stops at its next heartbeat")


@_cli_errors
def routers(output: OutputOpt = Format.table) -> None:
    """The routers that registered: address, feed URL, engine, state (Ready, or Lost after a
    silence) and last heartbeat. -o json: a list of RouterRecord."""
    from rich.table import Table
    from rich.text import Text

    from hms_mgmt.cli.common import _run
    from hms_mgmt.cli.render import _when, shown
    from hms_mgmt.config import connect
    from hms_mgmt.nodes import list_routers

    settings = _settings()

    async def go():  # -> list[RouterRecord]
        return await list_routers(await connect(settings), settings)

    records = _run(go())

    def table() -> None:
        if not records:
            out.print("no routers registered (`hms up` starts one; `hms router join` adds one on another host)")
            return
        t = Table()
        for col in ("router", "address", "feed URL", "engine", "state", "last heartbeat"):
            t.add_column(col, no_wrap=True)
        for r in records:
            t.add_row(shown(r.name), shown(r.address), shown(r.url), shown(r.engine) or "-",
                      Text(shown(r.state), style="green" if r.state == "Ready" else "red"),
                      _when(r.last_heartbeat) if r.last_heartbeat else "-")
        out.print(t)

    show(records, output, table)
