"""HAProxy's request log, received on a UDP socket of ours (``format raw``), one line per
request or, under load, one line per k requests (k is written in the line)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogLine:
    """``<backend> <server> <status> <Ta ms> <Tr ms> <retries> <k>``, standing for ``count`` requests."""

    backend: int  # be_<N>'s N
    server: str
    status: int  # 0 if none was logged
    seconds: float  # Ta, the whole time
    server_ms: float | None  # Tr, the server's time to answer; None if it did not
    retries: int
    count: int


def parse_log_line(data: bytes) -> LogLine | None:
    """The request in ``data``, or None for a line that is not one of a pool backend's."""
    try:
        be_name, server, status, ta, tr, retries, k = data.decode(errors="replace").split()[-7:]
    except ValueError:
        return None
    if not be_name.startswith("be_") or not _is_count(be_name[3:]):  # be_control, or the frontend's own answer
        return None
    # HAProxy logs whole milliseconds: a logged t stands for [t, t + 1) ms, recorded as its middle
    # (a sub-millisecond reply is 0.5 ms, not 0).
    seconds = (max(0, int(ta)) + 0.5) / 1000.0 if _is_int(ta) else 0.0
    n = retries.lstrip("+")
    return LogLine(backend=int(be_name[3:]), server=server, status=int(status) if _is_int(status) else 0,
                   seconds=seconds, server_ms=max(0.1, float(tr)) if _is_count(tr) else None,
                   retries=int(n) if _is_count(n) else 0, count=int(k) if _is_count(k) and int(k) > 0 else 1)


def _is_int(s: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", s) is not None


def _is_count(s: str) -> bool:
    return re.fullmatch(r"[0-9]+", s) is not None


class LogProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self.on_line = on_line

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_line(data)
