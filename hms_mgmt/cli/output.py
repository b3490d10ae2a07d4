"""Machine-readable output: ``-o table|json|yaml`` on every command that shows state.

JSON and YAML are the models the Python API returns, as ``model_dump(mode="json")``: a stable
interface (fields are added, never renamed or removed). A command that shows state declares
``output: OutputOpt = Format.table`` and hands its models and its table to :func:`show`; a
stream (``events``, ``status --watch``) hands each model to :func:`show_item`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel


class Format(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[Format, typer.Option(
    "--output", "-o", case_sensitive=False,
    help="table (for people), json or yaml (for scripts: the Python API's models; a stream prints "
         "one JSON object a line).")]
JsonAliasOpt = Annotated[bool, typer.Option("--json", help="The same as -o json.", hidden=True)]


def chosen(output: Format, as_json: bool = False) -> Format:
    """``-o``, with an older command's ``--json`` flag as its alias."""
    return Format.json if as_json else output


def jsonable(data: Any) -> Any:
    """Models (and lists and dicts of them) as plain JSON values."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, list | tuple):
        return [jsonable(x) for x in data]
    if isinstance(data, dict):
        return {str(k): jsonable(v) for k, v in data.items()}
    return data


def render(data: Any, fmt: Format, *, stream: bool = False) -> str:
    """``data`` as text in ``fmt`` (json or yaml); ``stream``: one line (JSON Lines) or one
    YAML document of a stream, as ``kubectl get -w -o`` does."""
    doc = jsonable(data)
    if fmt is Format.yaml:
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        return f"---\n{text}".rstrip("\n") if stream else text.rstrip("\n")
    # ASCII only: C1 controls, bidi overrides and line separators in a server's text are \u-escaped
    # (still the same JSON), so `hms events -o json` on a terminal shows them and obeys none.
    if stream:
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
    return json.dumps(doc, indent=2, ensure_ascii=True)


def show(data: Any, fmt: Format, table: Callable[[], None]) -> None:
    """Print ``data`` in ``fmt``; ``table`` draws it for people."""
    if fmt is Format.table:
        table()
        return
    typer.echo(render(data, fmt))


def show_item(data: Any, fmt: Format, line: Callable[[], None]) -> None:
    """One item of a stream: a JSON line, a YAML document, or ``line`` for people. Flushed at
    once, so a pipe (``| jq``) sees each item as it happens."""
    if fmt is Format.table:
        line()
    else:
        typer.echo(render(data, fmt, stream=True))
    sys.stdout.flush()
