"""The endpoint feed's wire format, shared by the publisher (an activity) and the router.

A table is an :class:`~hms_mgmt.models.EndpointSet` as JSON. It travels two ways:
- written atomically to ``<state_dir>/feed/<service>.json`` (for operators and tools);
- pushed as ``POST <router>/-/feed``, signed with HMAC-SHA256 over ``<timestamp>.<body>`` under a
  key in ``<state_dir>/keys/feed.key`` (created 0600 on first use). Anyone can reach a router's
  port, so a router refuses a push whose signature does not verify, or whose timestamp is more
  than :data:`MAX_SKEW_S` away from its clock (a replayed old push is refused; a replayed recent
  one carries an old version and changes nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from hms_mgmt.auth import keys_dir
from hms_mgmt.files import atomic_write, inside
from hms_mgmt.models import EndpointSet

FEED_KEY_FILE = "feed.key"
SIGNATURE_HEADER = "X-HMS-Feed-Signature"
FEED_PATH = "/-/feed"
DRAINED_PATH = "/-/drained"
MAX_SKEW_S = 300.0


def feed_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "feed"


def feed_key(state_dir: Path) -> bytes:
    """The shared HMAC key, created (32 random bytes, mode 0600) by whoever needs it first."""
    path = keys_dir(state_dir) / FEED_KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # create-if-absent: two processes racing keep one key
    atomic_write(path, secrets.token_hex(32), mode=0o600, replace=False)
    return bytes.fromhex(path.read_text().strip())


def sign(key: bytes, body: bytes, *, now: float | None = None) -> str:
    """The header value: ``t=<unix seconds>,sig=<hex HMAC-SHA256 of "t.body">``."""
    ts = str(int(time.time() if now is None else now))
    mac = hmac.new(key, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={ts},sig={mac}"


def verify(key: bytes, body: bytes, header: str | None, *, now: float | None = None) -> str | None:
    """None if ``header`` signs ``body`` under ``key`` recently enough, else why not."""
    if not header:
        return "unsigned"
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts, sig = parts["t"], parts["sig"]
        t = int(ts)
    except (ValueError, KeyError):
        return "malformed signature header"
    now = time.time() if now is None else now
    if abs(now - t) > MAX_SKEW_S:
        return "signature timestamp too far from now"
    want = hmac.new(key, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        return "bad signature"
    return None


def drained_query(service: str, pods: str, wait: str) -> bytes:
    """What a ``GET /-/drained`` signs: the same key and header as a feed push, over its query."""
    return f"drained\n{service}\n{pods}\n{wait}".encode()


def write_table(state_dir: Path, table: EndpointSet) -> Path:
    """Write ``feed/<service>.json`` atomically, unless the file already holds a newer version."""
    d = feed_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    # Checked again here (a table may be built without validation): a DNS label, never a path.
    EndpointSet.model_validate({"service": table.service})
    path = inside(d, f"{table.service}.json")
    try:
        if EndpointSet.model_validate_json(path.read_text()).version > table.version:
            return path
    except (FileNotFoundError, ValueError):
        pass
    atomic_write(path, table.model_dump_json())
    return path


def read_tables(state_dir: Path) -> list[EndpointSet]:
    """Every table in ``feed/`` (a file that does not parse is skipped)."""
    out = []
    for path in sorted(feed_dir(state_dir).glob("*.json")):
        try:
            out.append(EndpointSet.model_validate_json(path.read_text()))
        except (OSError, ValueError):
            continue
    return out
