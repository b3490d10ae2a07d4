"""``hms dashboard``: the operators' live page on 127.0.0.1 (wired into the app by ``cli/commands``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from hms_mgmt import auth, constants
from hms_mgmt.cli.common import _cli_errors, _run, _settings, _setup_logging
from hms_mgmt.cli.render import out
from hms_mgmt.config import Settings
from hms_mgmt.errors import HmsError


def read_token_file(path: Path, settings: Settings) -> str:
    """The token in ``path``, verified now so a typo fails at start rather than at a click."""
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise HmsError(f"cannot read the token file {path}: {e}") from e
    if not token:
        raise HmsError(f"the token file {path} is empty")
    identity = auth.verify_token(token, state_dir=settings.state_dir)
    out.print(Text.assemble(("identity  ", "bold"), f"{identity.user} ({identity.role}), from {path}"))
    return token


async def run_dashboard_until_signal(settings: Settings, *, port: int, token: str | None,
                                     public_read: bool = False) -> None:
    """Serve until SIGINT/SIGTERM, printing the URL (and the sign-in link for ``token``)."""
    from dashboard import running_dashboard
    from hms_mgmt.config import connect

    client = await connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_dashboard(client, settings, port=port, token=token, public_read=public_read) as dash:
        out.print(Text.assemble(("dashboard ", "bold"), (dash.url, "cyan underline")), soft_wrap=True)
        if dash.sign_in_url:
            out.print(Text.assemble(("sign in   ", "bold"), dash.sign_in_url,
                                    (" (opens signed in as the token file's identity)", "dim")), soft_wrap=True)
        out.print("Ctrl-C stops it")
        await stop.wait()


@_cli_errors
def dashboard(
    port: Annotated[int | None, typer.Option(
        "--port", help=f"Port on 127.0.0.1 (default: HMS_DASHBOARD_PORT, else {constants.DEFAULT_DASHBOARD_PORT}).",
        min=0, max=65535)] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="A token (e.g. a gov_approver's) to sign the browser in with, via a printed link."),
    ] = None,
    public_read: Annotated[bool, typer.Option(
        "--public-read", help="Let anyone who reaches the port read the fleet and events, with no token.")] = False,
) -> None:
    """The live operations page: services, pods, charts, traffic, approvals and events."""
    _setup_logging(logging.WARNING)
    settings = _settings()
    port = settings.dashboard_port if port is None else port
    token = read_token_file(token_file, settings) if token_file else None
    _run(run_dashboard_until_signal(settings, port=port, token=token, public_read=public_read))
