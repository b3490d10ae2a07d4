"""The builtin engine's own work per proxied request, without sockets or other processes.

A GET goes through the real :class:`router.builtin.BuiltinEngine` and :mod:`router.http1`
(caller parser, routing, P2C, the request written to a pooled pod connection, the pod's answer
parsed, filtered and written back, the figures recorded) with transports that only keep what
is written, so what is measured is the Python work the engine does per request, and nothing of
the kernel's, wrk's or the pods'. Then a second's worth of a worker's figures crosses to the
primary as it does every second (:class:`router.workers.StatsBatch`, JSON, ``absorb``).

    .venv/bin/python bench/router_path.py            # microseconds per request, best of 5
    valgrind --tool=callgrind .venv/bin/python bench/router_path.py --requests 2000 --rounds 1
                                                     # instructions: run it at two --requests, subtract

Printed only (no JSON, no verdict): it is a tool for work on the hot path; the router
benchmark (bench/router.py) is where the engine is judged against nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hms_mgmt.models import Endpoint, EndpointSet  # noqa: E402
from router import http1  # noqa: E402
from router.builtin import BuiltinEngine, ControlRelay, caller_server  # noqa: E402
from router.feed import EndpointTable  # noqa: E402
from router.stats import TrafficStats  # noqa: E402
from router.workers import StatsBatch, absorb  # noqa: E402

REQUEST = b"GET /svc/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 16:38:46 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")
PODS = ("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")


class Transport:
    """Keeps what is written; nothing else happens."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def path_us(requests: int, rounds: int) -> float:
    """Best of ``rounds``: microseconds of engine work per request."""
    table, batch = EndpointTable(), StatsBatch()
    engine = BuiltinEngine(table, batch)
    table.put(EndpointSet(service="svc", version=1,
                          endpoints=[Endpoint(pod=f"p{i}", address=a) for i, a in enumerate(PODS)]))
    with tempfile.TemporaryDirectory() as tmp:
        server = caller_server(engine, ControlRelay(Path(tmp) / "control.sock"))
    conns = []
    for address in PODS:
        for _ in range(4):
            conn = http1.PodConnection(engine.connections, address)
            conn.connection_made(Transport())  # type: ignore[arg-type]
            engine.connections.conns.setdefault(address, set()).add(conn)
            engine.connections.put_back(conn)
            conns.append(conn)
    caller = http1.CallerConnection(server)
    out = Transport()
    caller.connection_made(out)  # type: ignore[arg-type]

    def one() -> None:
        caller.data_received(REQUEST)
        for conn in conns:
            if conn.exchange is not None:  # the pod the request went to answers
                conn.data_received(ANSWER)
                return
        raise SystemExit(f"the request was not sent to a pod: {out.written[-1:]!r}")

    def lookup_only() -> None:  # the harness's own search for the busy connection, subtracted
        for conn in conns:
            if conn.exchange is not None:
                return

    best = float("inf")
    for _ in range(rounds):
        out.written.clear()
        batch.take()
        t0 = time.perf_counter()
        for _ in range(requests):
            one()
        spent = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(requests):
            lookup_only()
        spent -= time.perf_counter() - t1
        best = min(best, spent / requests * 1e6)
        answers = [w for w in out.written if w.startswith(b"HTTP/1.1 200")]
        if len(answers) != requests or b"X-HMS-Pod: p" not in answers[-1]:
            raise SystemExit(f"not every request was answered through a pod: {out.written[-1:]!r}")
    return best


def stats_us(requests: int, rounds: int) -> float:
    """Best of ``rounds``: microseconds per request for a worker's figures to reach the primary's."""
    best = float("inf")
    for _ in range(rounds):
        batch, stats = StatsBatch(), TrafficStats("builtin")
        now = time.monotonic()
        for i in range(requests):
            batch.record("svc", f"p{i % 3}", 200, 0.002, now=now + i / requests)
        t0 = time.perf_counter()
        absorb(stats, json.loads(json.dumps(batch.take())))  # as it crosses the worker's socket
        best = min(best, (time.perf_counter() - t0) / requests * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000, help="requests per round (default 100,000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the best is printed (default 5)")
    args = ap.parse_args()
    print(f"engine path: {asyncio.run(path_us(args.requests, args.rounds)):.2f} us per request "
          f"(best of {args.rounds} x {args.requests:,})")
    print(f"figures to the primary: {stats_us(min(args.requests, 7000), args.rounds):.2f} us per request "
          "(a second of 7,000 requests, JSON both ways)")


if __name__ == "__main__":
    main()
