"""The endpoint feed's wire format, shared by the publisher (an activity) and the router.

A table is an :class:`~hms_mgmt.models.EndpointSet` as JSON. It travels two ways:
- written atomically to ``<state_dir>/feed/<service>.json`` (for operators and tools);
- pushed as ``POST <router>/-/feed``, signed by the control plane's Ed25519 key (``control.pem``,
  the key that signs tickets and grants) over a digest of the body and a timestamp. A router
  holds only the public half (``control.pub``): no router can sign a table for the others.
  Anyone can reach a router's port, so a router refuses a push whose signature does not verify,
  or whose timestamp is more than :data:`MAX_SKEW_S` away from its clock (a replayed old push is
  refused; a replayed recent one carries an old version and changes nothing).

A read of a router's ``/-/table``, ``/-/stats`` or ``/metrics`` from outside its
``router_inspect_from`` networks is signed the same way over its path (kind ``inspect``).

A drain question (``GET /-/drained``) is signed the same way over its query; the router answers
with its own statement (:func:`hms_mgmt.nodeid.statement`, kind ``drained``) over the question's
signature and its answer, so the control plane knows which enrolled router confirmed.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from hms_mgmt import tickets
from hms_mgmt.errors import AccessDenied
from hms_mgmt.files import atomic_write, inside
from hms_mgmt.models import EndpointSet

SIGNATURE_HEADER = "X-HMS-Feed-Signature"
ROUTER_HEADER = "X-HMS-Router"  # a drain answer's signer: the router's enrolled name
ROUTER_SIGNATURE_HEADER = "X-HMS-Router-Signature"
FEED_PATH = "/-/feed"
DRAINED_PATH = "/-/drained"
# What a router shows of its pods and traffic: to callers in ``router_inspect_from`` (loopback by
# default), or to a read the control plane signed (kind ``inspect``, over the path).
INSPECT_PATHS = ("/-/table", "/-/stats", "/metrics")
MAX_SKEW_S = 300.0


def feed_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "feed"


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def sign(state_dir: Path, body: bytes, *, kind: str = "feed", now: float | None = None) -> str:
    """The header value: the control plane's signed claims over ``kind``, a time and ``body``'s digest."""
    t = int(time.time() if now is None else now)
    return tickets.sign_claims(state_dir, {"typ": kind, "t": t, "d": _digest(body)})


def verify(state_dir: Path, body: bytes, header: str | None, *, kind: str = "feed",
           now: float | None = None, signed_since: float | None = None) -> str | None:
    """None if ``header`` is the control plane's signature of ``body`` as ``kind``, recent enough
    (and, with ``signed_since``, signed no earlier than then); else why not. Needs only
    ``control.pub`` in ``state_dir``."""
    if not header:
        return "unsigned"
    try:
        claims = tickets.open_claims(state_dir, header, f"{kind} signature")
    except AccessDenied as e:
        return str(e)
    if claims.get("typ") != kind or claims.get("d") != _digest(body):
        return "bad signature"
    t = claims.get("t")
    now = time.time() if now is None else now
    if not isinstance(t, int) or abs(now - t) > MAX_SKEW_S:
        return "signature timestamp too far from now"
    if signed_since is not None and t < int(signed_since):
        return "signed before this process started (its resync reads the current table)"
    return None


def drained_query(service: str, pods: str, wait: str) -> bytes:
    """What a ``GET /-/drained`` signs (kind ``drained``): its query."""
    return f"drained\n{service}\n{pods}\n{wait}".encode()


def inspect_query(path: str) -> bytes:
    """What a signed read of a router's ``/-/table``, ``/-/stats`` or ``/metrics`` signs: its path."""
    return f"inspect\n{path}".encode()


def inspect_headers(state_dir: Path, path: str) -> dict[str, str]:
    """Headers that let a caller outside a router's ``router_inspect_from`` read ``path``: the
    control plane's signature, where this state directory holds its key; none elsewhere (a
    router on loopback answers without them)."""
    if not tickets.holds_control_key(state_dir):
        return {}
    try:
        return {SIGNATURE_HEADER: sign(state_dir, inspect_query(path), kind="inspect")}
    except (OSError, ValueError):
        return {}


def drained_answer(question_signature: str, answer: bytes) -> dict[str, Any]:
    """What a router's drain answer signs: the question it answers (its signature, which carries
    a time) and the answer's body."""
    return {"q": question_signature, "a": _digest(answer)}


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
