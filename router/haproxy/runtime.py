"""HAProxy's Runtime API over its unix socket, and sending a plan through it."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from router.haproxy.plan import Plan
from router.haproxy.state import Backend, record

log = logging.getLogger("hms.router.haproxy")

Ask = Callable[[str], Awaitable[str]]


class RuntimeAPI:
    """One connection per batch of commands, in prompt mode (one answer per command)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Ask]:
        """``ask(command) -> answer`` on one connection. A command is one line and one command:
        a newline or ``;`` in it would start another, so it is refused (the plan never makes one)."""
        reader, writer = await asyncio.open_unix_connection(str(self.path))

        async def ask(command: str) -> str:
            if "\n" in command or "\r" in command or ";" in command:
                raise ValueError(f"refused to send a Runtime API command holding a separator: {command[:80]!r}")
            writer.write(command.encode() + b"\n")
            await writer.drain()
            return (await reader.readuntil(b"\n> "))[:-3].decode(errors="replace").strip()

        try:
            # Prompt mode keeps one session for several commands; each answer ends with "\n> ".
            writer.write(b"prompt\n")
            await writer.drain()
            await reader.readuntil(b"> ")
            yield ask
            writer.write(b"quit\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def run(self, *commands: str) -> list[str]:
        """Run ``commands`` in one session; one answer per command."""
        if not commands:
            return []
        async with self.session() as ask:
            return [await ask(c) for c in commands]

    async def one(self, command: str) -> str:
        return (await self.run(command))[0]


def parse_stat(text: str) -> list[dict[str, str]]:
    """``show stat`` CSV into dicts keyed by column name."""
    text = text.lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


async def apply(api: RuntimeAPI, plan: Plan, backends: Sequence[Backend], now: float) -> None:
    """Send ``plan`` in one session, recording each answer in ``backends`` as it comes, so a
    connection lost half-way leaves them true to what HAProxy did."""
    if not plan.steps:
        return
    by_name = {b.name: b for b in backends}
    async with api.session() as ask:
        for step in plan.steps:
            for command in step:
                answer = await ask(command.line)
                if not record(by_name[command.backend], command, answer, now):
                    _log_failure(command.op, command.line, answer)
                    break  # the rest of the step needs this one (see router.haproxy.plan)


def _log_failure(op: str, line: str, answer: str) -> None:
    if op == "del":  # HAProxy keeps a server with connections open: retried on the next tick
        log.debug("%s deferred: %s", line, answer)
    else:
        log.warning("%s: %s", line, answer)
