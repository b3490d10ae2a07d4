"""Admission tickets: proof, checked where a pod starts, that its revision was admitted.

Anyone who can reach Temporal can start any workflow or even run a worker of their own on our
task queues, so a check in a workflow can be skipped. Admission therefore ends in a ticket,
signed by the control plane's own key (``<state>/keys/control.pem``, separate from the key that
signs identity tokens) over the service, the revision, a digest of what a pod runs (the spec's
pod template) and the pinned image id. ``start_pod`` on every node verifies it against exactly
the pod it is asked to start, and refuses anything else.

The same key signs *grants*: what the ``authorize`` activity hands a workflow once it has
verified a request proof — the verified identity (user, role), the action, the service and what
the proof was bound to. A workflow keeps grants, never tokens; ``issue_ticket`` admits from
grants (the deployer's, and a gov_approver's for a spec over the governance limit).

A revision's ticket is the record that it was admitted; what a node takes is a *start ticket*
for one pod on one node, re-issued from it before each start, and a *stop grant* for one stop.
Grants, start tickets and stop grants expire within minutes.

Pure functions over files in the state directory; no Temporal here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hms_mgmt.errors import AccessDenied, GrantExpired
from hms_mgmt.files import atomic_write
from hms_mgmt.models import ServiceSpec

PRIVATE_FILE = "control.pem"
PUBLIC_FILE = "control.pub"


def _keys(state_dir: Path) -> Path:
    return state_dir / "keys"


def ensure_control_key(state_dir: Path) -> None:
    """Create the control plane's key pair once (the control worker does, at start)."""
    kdir = _keys(state_dir)
    kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (kdir / PRIVATE_FILE).exists():
        return
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if atomic_write(kdir / PRIVATE_FILE, pem, mode=0o600, replace=False):
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write(kdir / PUBLIC_FILE, pub, mode=0o644)


def holds_control_key(state_dir: Path) -> bool:
    """Whether this state directory is the control plane's (holds ``control.pem``)."""
    return (_keys(state_dir) / PRIVATE_FILE).exists()


def spec_digest(spec: ServiceSpec) -> str:
    """What a pod of the service runs (name + pod template), canonically hashed: an in-place
    change (replicas, targets, intervals) keeps the ticket; anything a pod runs does not."""
    blob = json.dumps({"name": spec.name, **spec.pod_template()}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def b64url(data: bytes) -> str:
    """Unpadded URL-safe base64, as every signed token and proof of ours carries its parts."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(state_dir: Path, claims: dict[str, Any]) -> str:
    ensure_control_key(state_dir)
    key = serialization.load_pem_private_key((_keys(state_dir) / PRIVATE_FILE).read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    payload = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return f"{b64url(payload)}.{b64url(key.sign(payload))}"


def _open(state_dir: Path, signed: str, what: str) -> dict[str, Any]:
    try:
        pub = serialization.load_pem_public_key((_keys(state_dir) / PUBLIC_FILE).read_bytes())
    except (OSError, ValueError) as e:
        raise AccessDenied(f"{what}s cannot be checked on this node ({e})") from None
    assert isinstance(pub, Ed25519PublicKey)
    try:
        head, sig = signed.split(".", 1)
        payload = unb64url(head)
        pub.verify(unb64url(sig), payload)
        claims = json.loads(payload)
    except (ValueError, InvalidSignature):
        raise AccessDenied(f"the {what} is forged or damaged") from None
    if not isinstance(claims, dict):
        raise AccessDenied(f"the {what} is forged or damaged")
    return claims


def issue(state_dir: Path, *, service: str, revision: int, spec: ServiceSpec, image_id: str) -> str:
    """A ticket for pods of ``service`` revision ``revision`` running ``spec`` from ``image_id``."""
    return _sign(state_dir, {"svc": service, "rev": revision, "spec": spec_digest(spec), "img": image_id,
                             "iat": int(time.time())})


def verify(state_dir: Path, ticket: str, *, service: str, revision: int, spec: ServiceSpec, image_id: str) -> None:
    """Raise AccessDenied unless ``ticket`` was issued for exactly this pod's revision."""
    if not ticket:
        raise AccessDenied("no admission ticket: only an admitted revision may start pods")
    claims = _open(state_dir, ticket, "admission ticket")
    if claims.get("typ", "ticket") != "ticket":
        raise AccessDenied("not an admission ticket")
    want = {"svc": service, "rev": revision, "spec": spec_digest(spec), "img": image_id}
    wrong = sorted(k for k, v in want.items() if claims.get(k) != v)
    if wrong:
        names = {"svc": "service", "rev": "revision", "spec": "spec", "img": "image id"}
        raise AccessDenied("the admission ticket is for another "
                           + ", ".join(names[k] for k in wrong) + f" (service {claims.get('svc')}, "
                           f"revision {claims.get('rev')})")


# A grant is used at once (a log read, an admission right after the checks). One that must wait
# for an approval or an image signature is kept only by the service's own workflow, and
# ``issue_ticket`` (which believes no other caller) accepts it for as long as that spec's own wait
# may last (``max_age_s``).
GRANT_TTL_S = 300.0
START_TICKET_TTL_S = 300.0  # a pod start (and its retries) that takes longer asks again
STOP_GRANT_TTL_S = 300.0


def grant(state_dir: Path, *, action: str, service: str, user: str, role: str, bind: dict[str, Any],
          ttl_s: float = GRANT_TTL_S) -> str:
    """The control plane's word that ``user`` (``role``) was allowed ``action`` on ``service``
    for exactly ``bind``: what a workflow keeps instead of the caller's token. A standing grant
    (a time slot's schedule acting for its deployer) lives longer: ``ttl_s``."""
    now = int(time.time())
    return _sign(state_dir, {"typ": "grant", "act": action, "svc": service, "sub": user, "role": role,
                             "bind": bind, "iat": now, "exp": now + int(ttl_s)})


def check_grant(state_dir: Path, signed: str, *, service: str, actions: Collection[str],
                bind: dict[str, Any] | None = None, max_age_s: float | None = None) -> dict[str, Any]:
    """The grant's claims (``sub``, ``role``, ``act``, ``bind``), or AccessDenied unless it was
    issued here for one of ``actions`` on ``service``, bound to ``bind``, and has not expired
    (with ``max_age_s``: is no older than that, whatever its own expiry)."""
    if not signed:
        raise AccessDenied("no grant: the request was never authorized")
    claims = _open(state_dir, signed, "grant")
    if claims.get("typ") != "grant":
        raise AccessDenied("not a grant")
    if claims.get("svc") != service or claims.get("act") not in actions:
        # What the grant says (signed here) may be quoted; the service asked for only when it is
        # the grant's: otherwise it is no more than the caller's word, and a refusal reaches logs
        # and terminals.
        asked = service if service == claims.get("svc") else "another service"
        raise AccessDenied(f"the grant is for {claims.get('act')} on {claims.get('svc')}, not "
                           f"{'/'.join(sorted(actions))} on {asked}")
    got = claims.get("bind") if isinstance(claims.get("bind"), dict) else {}
    for name, want in sorted((bind or {}).items()):
        if got.get(name) != want:
            raise AccessDenied(f"the grant is for another {name} ({got.get(name)!r}, not {want!r})")
    if max_age_s is not None:
        if not isinstance(claims.get("iat"), int) or claims["iat"] + max_age_s < time.time():
            raise AccessDenied(f"the grant has expired (older than {max_age_s:g}s)")
    elif not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
        raise AccessDenied("the grant has expired")
    return claims


def _check_claims(claims: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """AccessDenied naming every claim that differs from ``want``, or an expiry in the past."""
    wrong = sorted(k for k, v in want.items() if claims.get(k) != v)
    if wrong:
        raise AccessDenied(f"the {what} is for another " + ", ".join(wrong) + " ("
                           + ", ".join(f"{k} {claims.get(k)!r}" for k in wrong) + ")")
    if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
        raise GrantExpired(f"the {what} has expired")


def start_ticket(state_dir: Path, *, service: str, revision: int, spec: ServiceSpec, image_id: str, pod_id: str,
                 node: str) -> str:
    """A ticket to start exactly one pod of an admitted revision on one node, for a few minutes:
    what ``start_pod`` checks (the revision's admission ticket is only the record it comes from)."""
    now = int(time.time())
    return _sign(state_dir, {"typ": "start", "svc": service, "rev": revision, "spec": spec_digest(spec),
                             "img": image_id, "pod": pod_id, "node": node, "iat": now,
                             "exp": now + int(START_TICKET_TTL_S)})


def verify_start(state_dir: Path, ticket: str, *, service: str, revision: int, spec: ServiceSpec, image_id: str,
                 pod_id: str, node: str) -> None:
    """Raise AccessDenied unless ``ticket`` is a current start ticket for exactly this pod."""
    if not ticket:
        raise AccessDenied("no admission ticket: only an admitted revision may start pods")
    claims = _open(state_dir, ticket, "start ticket")
    if claims.get("typ") != "start":
        raise AccessDenied("not a start ticket (a revision's admission ticket no longer starts a pod by itself: "
                           "the control plane issues one per start)")
    _check_claims(claims, {"svc": service, "rev": revision, "spec": spec_digest(spec), "img": image_id,
                           "pod": pod_id, "node": node}, "start ticket")


def stop_grant(state_dir: Path, *, service: str, pod_id: str, node: str) -> str:
    """The control plane's word, for a few minutes, that ``service``'s workflow stops ``pod_id`` on ``node``."""
    now = int(time.time())
    return _sign(state_dir, {"typ": "stop", "svc": service, "pod": pod_id, "node": node, "iat": now,
                             "exp": now + int(STOP_GRANT_TTL_S)})


def verify_stop(state_dir: Path, grant: str, *, pod_id: str, node: str) -> str:
    """The service a current stop grant for exactly this pod on this node names, or AccessDenied."""
    if not grant:
        raise AccessDenied("no stop grant: only the pod's own service workflow may stop it")
    claims = _open(state_dir, grant, "stop grant")
    if claims.get("typ") != "stop":
        raise AccessDenied("not a stop grant")
    _check_claims(claims, {"pod": pod_id, "node": node}, "stop grant")
    return str(claims.get("svc"))


# --- node enrolment (hms_mgmt/nodeid.py): the same key signs node certificates and trust stamps ---


def sign_claims(state_dir: Path, claims: dict[str, Any]) -> str:
    """Sign ``claims`` with the control plane's key (their ``typ`` says what they are)."""
    return _sign(state_dir, claims)


def open_claims(state_dir: Path, signed: str, what: str) -> dict[str, Any]:
    """The claims of something the control plane signed, or AccessDenied."""
    return _open(state_dir, signed, what)
