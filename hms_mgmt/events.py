"""Events: what happened to a service and why, as pydantic models.

Written as JSON lines to ``<state>/events.jsonl`` (and POSTed to a webhook where configured);
the CLI (`hms events`) and the dashboard read them back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class Event(BaseModel):
    type: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    service: str
    reason: str
    data: dict[str, Any] = Field(default_factory=dict)


class EventSink:
    """Append-only JSON lines file; one line per event, safe for concurrent appenders."""

    def __init__(self, state_dir: Path, webhook: str | None = None) -> None:
        self.path = state_dir / "events.jsonl"
        self.webhook = webhook

    def write(self, event: Event) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (event.model_dump_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write of a line under O_APPEND does not interleave
        finally:
            os.close(fd)
        log.info("event %s %s: %s", event.type, event.service, event.reason)

    async def publish(self, event: Event) -> None:
        import asyncio

        await asyncio.to_thread(self.write, event)
        if self.webhook:
            import aiohttp

            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                    async with session.post(self.webhook, json=json.loads(event.model_dump_json())) as resp:
                        resp.raise_for_status()
            except Exception as e:  # noqa: BLE001 - the file is the record; the webhook is best effort
                log.warning("event webhook %s failed: %s", self.webhook, e)


def read_events(
    state_dir: Path, *, service: str | None = None, follow: bool = False, poll_s: float = 0.5
) -> Iterator[Event]:
    path = state_dir / "events.jsonl"
    while not path.exists():
        if not follow:
            return
        time.sleep(poll_s)
    with open(path) as f:
        while True:
            line = f.readline()
            if not line:
                if not follow:
                    return
                time.sleep(poll_s)
                continue
            try:
                event = Event.model_validate_json(line)
            except ValueError:
                continue
            if service is None or event.service == service:
                yield event
