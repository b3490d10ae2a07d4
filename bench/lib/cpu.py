"""CPU seconds and memory of processes, for a benchmark's cost figures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any


def proc_cpu(procs: Iterable[Any]) -> float:
    """User + system CPU seconds of psutil processes (the ones gone meanwhile count 0)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(Exception):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def proc_rss(procs: Iterable[Any]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(Exception):
            total += p.memory_info().rss
    return total


class CpuMeter:
    """CPU seconds used between ``start()`` and ``stop()``: by this process (client, in-process
    worker, pollers), by its children (the Temporal dev server), by the Docker daemons
    (dockerd, containerd), and machine-wide busy time. Other people's load shows up as
    ``machine`` minus the rest."""

    DAEMONS = ("dockerd", "containerd")

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._before: dict[str, float] = {}
        self._t = 0.0

    def _sample(self) -> dict[str, float]:
        ps = self._psutil
        daemons = [p for p in ps.process_iter(["name"]) if (p.info.get("name") or "") in self.DAEMONS]
        busy = ps.cpu_times()
        idle = busy.idle + getattr(busy, "iowait", 0.0)
        return {
            "self": proc_cpu([self._me]),
            "children": proc_cpu(self._me.children(recursive=True)),
            "docker_daemons": proc_cpu(daemons),
            "machine": sum(busy) - idle,
        }

    def start(self) -> CpuMeter:
        self._before = self._sample()
        self._t = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        after = self._sample()
        out = {f"{k}_cpu_s": round(after[k] - self._before.get(k, 0.0), 3) for k in after}
        out["wall_s"] = round(time.perf_counter() - self._t, 3)
        return out
