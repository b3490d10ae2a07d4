"""A benchmark's result file, ``bench/results/<name>.json``, with machine info, load and the
measured source; the tables it prints; how a script runs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench.lib import REPO
from bench.lib.source import _source, source_fingerprint

RESULTS = REPO / "bench" / "results"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{commit}{'+dirty' if dirty and commit else ''}" if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_mb"] = psutil.virtual_memory().total // (1024 * 1024)
    with contextlib.suppress(Exception):
        import docker

        c = docker.from_env(timeout=5)
        try:
            info["docker"] = c.version().get("Version")
        finally:
            c.close()
    return info


class Run:
    """Collects the machine info, load before/after and timestamps around one benchmark."""

    def __init__(self, name: str, argv: list[str] | None = None) -> None:
        self.name = name
        self.started = _dt.datetime.now(_dt.UTC)
        self.load_before = loadavg()
        self.fingerprint_before = source_fingerprint()
        self.source = dict(_source)
        self.argv = argv if argv is not None else sys.argv[1:]

    def source_changed(self) -> bool:
        return source_fingerprint() != self.fingerprint_before

    def finish(self, payload: dict[str, Any]) -> Path:
        after = source_fingerprint()
        meta = {
            "benchmark": self.name,
            "timestamp": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "source": {k: v for k, v in self.source.items() if k != "root"},
            "source_fingerprint": self.fingerprint_before,
            "source_changed_during_run": after != self.fingerprint_before,
            "argv": self.argv,
            "machine": machine_info(),
            "load_average_before": self.load_before,
            "load_average_after": loadavg(),
        }
        return write_result(self.name, {**meta, **payload})

    def done(self, payload: dict[str, Any]) -> Path:
        """``finish`` and say so: a warning if the code changed on disk, and where it wrote."""
        path = self.finish(payload)
        if self.source_changed():
            print("WARNING: product sources changed on disk during the run: figures mix code versions; run again")
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        print(f"\nwrote {shown}")
        return path

    def announce(self, source: str) -> None:
        print(f"measuring product source: {source} (fingerprint {self.fingerprint_before})", flush=True)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json``; adds machine info unless the payload has it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data.setdefault("benchmark", name)
    data.setdefault("timestamp", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    data.setdefault("git_commit", git_commit())
    data.setdefault("machine", machine_info())
    data.setdefault("load_average_after", loadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "n/a"
    return "PASS" if ratio <= target else "FAIL"


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [[str(h) for h in header]] + [["-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
                                           for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))

def parser(doc: str | None) -> Any:
    """An argument parser described by the first paragraph of a benchmark's docstring."""
    import argparse

    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def parse_common(ap: Any, argv: list[str] | None, *, timeout_s: float, image: str) -> Any:
    """Add what every docker benchmark takes (--timeout, --image, --source) and parse."""
    ap.add_argument("--timeout", type=float, default=timeout_s)
    ap.add_argument("--image", default=image)
    add_source_arg(ap)
    return ap.parse_args(argv)


def add_source_arg(ap: Any) -> None:
    ap.add_argument("--source", default="snapshot",
                    help="product code to measure: snapshot (copy of the working tree, default), live, or a git ref")


def run_main(main: Callable[[Any], Coroutine[Any, Any, int]], args: Any) -> None:
    """``sys.exit(asyncio.run(main(args)))`` with warnings logged and Ctrl-C as exit 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main(args)))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
