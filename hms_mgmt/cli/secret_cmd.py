"""``hms secret set|list|rm``: secrets on the control host (ops_admin only; wired into the app
by ``commands.py``). Values come from stdin or a file, never from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from hms_mgmt.cli.common import _cli_errors, _connect, _run
from hms_mgmt.cli.output import Format, OutputOpt, show
from hms_mgmt.cli.render import _when, out, print_records
from hms_mgmt.errors import SpecError

secret_app = typer.Typer(help="Secrets: stored encrypted on the control host, delivered to pods as files.",
                         no_args_is_help=True, rich_markup_mode=None)

NameArg = Annotated[str, typer.Argument(help="The secret's name (letters, digits, '_', '.', '-').")]


def _value(from_file: Path | None) -> bytes:
    if from_file is not None:
        return from_file.read_bytes()
    if sys.stdin.isatty():
        raise SpecError("give the value on stdin (e.g. `hms secret set NAME < file`) or with --from-file; "
                        "never on the command line")
    data = sys.stdin.buffer.read()
    return data[:-1] if data.endswith(b"\n") and not data.endswith(b"\n\n") else data


@secret_app.command("set")
@_cli_errors
def secret_set(
    name: NameArg,
    from_file: Annotated[Path | None, typer.Option("--from-file", exists=True, dir_okay=False,
                                                   help="Read the value from this file (as is).")] = None,
) -> None:
    """Store a secret (its next version): the value from stdin (one trailing newline dropped) or
    --from-file. Every running service that names it rolls onto the new version."""
    value = _value(from_file)

    async def go() -> None:
        info = await (await _connect()).set_secret(name, value)
        out.print(f"secret {info.name} v{info.version} set by {info.set_by}")
        for service in info.used_by:
            out.print(f"  {service}: rolling onto v{info.version} (`hms rollout status {service}`)")

    _run(go())


@secret_app.command("list")
@_cli_errors
def secret_list(output: OutputOpt = Format.table) -> None:
    """Names, versions, who set each and when (-o json: a list of SecretInfo); never a value."""

    async def go() -> None:
        infos = await (await _connect()).list_secrets()

        def table() -> None:
            print_records(("name", "version", "set by", "set at", "used by"),
                          ((i.name, f"v{i.version}", i.set_by, _when(i.set_at), ", ".join(i.used_by) or "-")
                           for i in infos),
                          empty="no secrets (store one with `hms secret set NAME < file`)")

        show(infos, output, table)

    _run(go())


@secret_app.command("rm")
@_cli_errors
def secret_rm(name: NameArg) -> None:
    """Remove a secret; refused while a running service's spec names it."""

    async def go() -> None:
        await (await _connect()).remove_secret(name)
        out.print(f"removed secret {name}")

    _run(go())
