"""Which product code a benchmark measures: :func:`use_source`, before any product import."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.lib import REPO

PRODUCT_DIRS = ("hms_mgmt", "workflows", "activities", "worker", "router", "services")
# The bench's harness, taken from the working tree when a measured git ref predates it.
HARNESS = ("hms_mgmt/devserver.py", "hms_mgmt/testing.py")
_source: dict[str, Any] = {"mode": "live", "root": str(REPO)}


def current() -> dict[str, Any]:
    """What :func:`use_source` chose (a copy)."""
    return dict(_source)


def source_fingerprint(root: Path | str | None = None) -> str:
    """sha256 over the product's Python sources under ``root`` (default: the measured ones):
    equal fingerprints mean the same code was measured, committed or not."""
    root = Path(root or _source["root"])
    h = hashlib.sha256()
    for d in PRODUCT_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def use_source(source: str = "snapshot") -> dict[str, Any]:
    """Choose the product code a benchmark measures. Call before importing any product module.

    - ``snapshot`` (default): copy the working tree's packages now and import from the copy,
      so edits others make while the benchmark runs cannot mix code versions (the workflow
      sandbox re-imports workflow modules from disk on every run);
    - ``live``: import from the working tree as it is on disk;
    - anything else: a git ref (``HEAD``, a commit), exported with ``git archive``.
    """
    if any(m.split(".")[0] in PRODUCT_DIRS for m in sys.modules):
        raise RuntimeError("use_source() must run before any product module is imported")
    info: dict[str, Any] = {"mode": source, "root": str(REPO)}
    if source != "live":
        tmp = Path(tempfile.mkdtemp(prefix="hms-bench-src-"))
        atexit.register(shutil.rmtree, tmp, True)
        if source == "snapshot":
            for d in PRODUCT_DIRS:
                if (REPO / d).is_dir():
                    shutil.copytree(REPO / d, tmp / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            commit = subprocess.run(["git", "rev-parse", "--verify", f"{source}^{{commit}}"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip()
            archive = subprocess.run(["git", "archive", commit, *PRODUCT_DIRS], cwd=REPO, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
            info["commit"] = commit
            for rel in HARNESS:
                if not (tmp / rel).exists():
                    shutil.copy2(REPO / rel, tmp / rel)
        sys.path.insert(0, str(tmp))
        info["root"] = str(tmp)
    if source in ("live", "snapshot"):
        with contextlib.suppress(Exception):
            info["uncommitted"] = subprocess.run(
                ["git", "status", "--porcelain", "--", *PRODUCT_DIRS], cwd=REPO, capture_output=True, text=True,
                timeout=5).stdout.splitlines()
    _source.update(info)
    _source["fingerprint"] = source_fingerprint()
    return dict(_source)
