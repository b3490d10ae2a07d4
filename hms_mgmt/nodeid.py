"""Node identity: join tokens, node certificates, what a node signs, and the control plane's
per-start trust stamps. Pure functions over files; no Temporal here (SECURITY.md, "Node identity").

- A **join token** (``hms node join-token``) is ``hmsjoin1.<where>.<secret>``: where holds the
  Temporal address, the control task queue and the fingerprint of the control plane's public key
  (so the new host can tell it reached the right control plane); the secret is the seed of an
  Ed25519 key made for that token alone. The control host keeps only its public half (one-way, like
  a hash), its expiry, and drops it on ``--rotate``. The joining host never sends the secret: it
  signs its enrolment request (its name, address and public key) with it, so a request copied from
  Temporal's history enrols nothing but that very key, which the copier does not hold.
- A **node certificate** is the control plane's signature (``control.pem``) over a node's name,
  address and public key. The control host records each enrolled node in ``enrolment.json``
  (one key per name); ``hms node remove`` revokes it there.
- A **statement** is a node's own signature (its ``node-<name>.pem``) over its name, what it
  says (``kind``), a time, a nonce and the message: registrations, heartbeats and pod reports.
- A **trust stamp** is the control plane's word, at one pod start, that the pinned image is
  signed and not revoked now; it names the pod and expires within minutes.

Routers join the same way, in a role of their own (``role="router"``: ``hms router join-token``):
a token records its role, the certificate's ``typ`` says it, and routers are recorded apart from
nodes (a router's certificate never runs pods, a node's never confirms a drain).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hms_mgmt import tickets
from hms_mgmt.errors import AccessDenied, HmsError
from hms_mgmt.files import atomic_write, open_private
from hms_mgmt.tickets import b64url, unb64url

TOKEN_PREFIX = "hmsjoin1"
ENROLMENT_FILE = "enrolment.json"
MAX_SKEW_S = 300.0  # a statement or enrolment request older (or newer) than this is refused
STAMP_TTL_S = 300.0  # a trust stamp is good for one start, within this
REPORT_MAX_AGE_S = 600.0  # a pod report reaches its service within this (a busy workflow reads late)
ROLES = ("node", "router")


class NotJoined(HmsError):
    """This host holds neither a node certificate nor the control plane's key."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest(obj: Any) -> str:
    """A canonical hash of a JSON-able message: what a statement binds."""
    return "sha256:" + hashlib.sha256(_canonical(obj)).hexdigest()


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return "sha256:" + hashlib.sha256(raw_public(key)).hexdigest()


def _keys(state_dir: Path) -> Path:
    return state_dir / "keys"


# --- the control plane's public key ------------------------------------------------------------


def control_public_pem(state_dir: Path) -> bytes:
    return (_keys(state_dir) / tickets.PUBLIC_FILE).read_bytes()


def pem_fingerprint(pem: bytes) -> str:
    pub = serialization.load_pem_public_key(pem)
    if not isinstance(pub, Ed25519PublicKey):
        raise AccessDenied("the control plane's public key is not an Ed25519 key")
    return fingerprint(pub)


def has_control_key(state_dir: Path) -> bool:
    return (_keys(state_dir) / tickets.PRIVATE_FILE).exists()


# --- this node's own key and certificate --------------------------------------------------------


def _section(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return role + "s"


def node_key_path(state_dir: Path, node: str, role: str = "node") -> Path:
    return _keys(state_dir) / f"{role}-{node}.pem"


def node_cert_path(state_dir: Path, node: str, role: str = "node") -> Path:
    return _keys(state_dir) / f"{role}-{node}.crt"


def ensure_node_key(state_dir: Path, node: str, role: str = "node") -> Ed25519PrivateKey:
    """This node's (or router's) key, made once (0600); the control plane never sees its private half."""
    path = node_key_path(state_dir, node, role)
    if not path.exists():
        _keys(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write(path, pem, mode=0o600, replace=False)
    return load_node_key(state_dir, node, role)


def load_node_key(state_dir: Path, node: str, role: str = "node") -> Ed25519PrivateKey:
    path = node_key_path(state_dir, node, role)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AccessDenied(f"{path} is not an Ed25519 key")
    return key


def is_joined(state_dir: Path) -> bool:
    """A host that joined with a token: a node certificate, and no control plane key of its own."""
    return not has_control_key(state_dir) and any(_keys(state_dir).glob("node-*.crt"))


@dataclass(frozen=True)
class NodeIdentity:
    """What a node's worker signs with: its name, key and certificate."""

    node: str
    key: Ed25519PrivateKey
    cert: str

    def say(self, kind: str, message: Any) -> str:
        return statement(self.key, self.node, kind, message)


def node_identity(state_dir: Path, node: str, address: str, role: str = "node") -> NodeIdentity:
    """This node's (or router's) identity. On the control plane's own host (``control.pem`` here:
    the single-host default) it enrols itself; elsewhere it must have joined with a token."""
    cert_path = node_cert_path(state_dir, node, role)
    if has_control_key(state_dir):
        key = ensure_node_key(state_dir, node, role)
        cert = cert_path.read_text().strip() if cert_path.exists() else ""
        claims = _cert_claims_unchecked(cert)
        if claims.get("key") != b64url(raw_public(key)) or claims.get("addr") != address or not _enrolled_as(
                state_dir, node, claims, role):
            cert = enrol_key(state_dir, node=node, address=address, public_key=raw_public(key), role=role)
            atomic_write(cert_path, cert + "\n", mode=0o644)
        return NodeIdentity(node=node, key=key, cert=cert)
    if not cert_path.exists() or not node_key_path(state_dir, node, role).exists():
        raise NotJoined(f"{role} {node} has not joined a control plane (no {cert_path}): run "
                        f"`hms {role} join-token` on the control host, then `hms {role} join TOKEN --name "
                        f"{node} --address ADDR` here")
    key = load_node_key(state_dir, node, role)
    cert = cert_path.read_text().strip()
    claims = open_cert(state_dir, cert, role)
    if claims["node"] != node or claims["key"] != b64url(raw_public(key)):
        raise AccessDenied(f"{cert_path} is not {node}'s certificate for its key")
    if claims.get("addr") != address:
        raise AccessDenied(f"{role} {node} joined with address {claims.get('addr')}, not {address}: join again "
                           f"with the new address (`hms {role} remove` on the control host first)")
    return NodeIdentity(node=node, key=key, cert=cert)


# --- statements: what a node signs --------------------------------------------------------------


def statement(key: Ed25519PrivateKey, node: str, kind: str, message: Any, *, now: float | None = None) -> str:
    claims = {"n": node, "k": kind, "t": round(now if now is not None else time.time(), 3),
              "j": secrets.token_hex(8), "d": digest(message)}
    payload = _canonical(claims)
    return f"{b64url(payload)}.{b64url(key.sign(payload))}"


def check_statement(public_key: bytes, signed: str, *, node: str, kind: str, message: Any,
                    max_age_s: float = MAX_SKEW_S, now: float | None = None) -> float:
    """The statement's time, or AccessDenied unless ``node``'s key said exactly ``message`` as
    ``kind`` within ``max_age_s``."""
    if not signed:
        raise AccessDenied(f"no signature by node {node}")
    try:
        head, sig = signed.split(".", 1)
        payload = unb64url(head)
        Ed25519PublicKey.from_public_bytes(public_key).verify(unb64url(sig), payload)
        claims = json.loads(payload)
    except (ValueError, InvalidSignature):
        raise AccessDenied(f"the signature is not node {node}'s") from None
    if not isinstance(claims, dict) or claims.get("n") != node or claims.get("k") != kind:
        raise AccessDenied(f"the signature is not node {node}'s {kind}")
    if claims.get("d") != digest(message):
        raise AccessDenied(f"node {node} signed another {kind}")
    at = claims.get("t")
    now = time.time() if now is None else now
    if not isinstance(at, (int, float)) or abs(now - at) > max_age_s:
        raise AccessDenied(f"node {node}'s {kind} is stale or from the future")
    return float(at)


# --- join tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    temporal_address: str
    task_queue: str
    control_fingerprint: str
    key: Ed25519PrivateKey
    role: str = "node"

    @property
    def token_id(self) -> str:
        return fingerprint(self.key)[7:23]


def parse_join_token(text: str) -> JoinToken:
    try:
        prefix, where, secret = text.strip().split(".")
        if prefix != TOKEN_PREFIX:
            raise ValueError(prefix)
        info = json.loads(unb64url(where))
        key = Ed25519PrivateKey.from_private_bytes(unb64url(secret))
        role = str(info.get("role", "node"))
        _section(role)
        return JoinToken(temporal_address=str(info["addr"]), task_queue=str(info["tq"]),
                         control_fingerprint=str(info["fp"]), key=key, role=role)
    except (ValueError, KeyError, TypeError):
        raise HmsError("not a join token (it starts with hmsjoin1.; print one with `hms node join-token` "
                       "on the control host)") from None


@contextlib.contextmanager
def _enrolment(state_dir: Path, *, write: bool) -> Iterator[dict[str, Any]]:
    """The control host's record of join tokens and enrolled nodes, under a lock."""
    path = state_dir / ENROLMENT_FILE
    lock = state_dir / (ENROLMENT_FILE + ".lock")
    with os.fdopen(open_private(lock, os.O_WRONLY | os.O_CREAT), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise HmsError(f"{path} is damaged: {e}") from None
        data.setdefault("tokens", {})
        data.setdefault("nodes", {})
        data.setdefault("routers", {})
        yield data
        if write:
            atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)


def make_join_token(state_dir: Path, *, temporal_address: str, task_queue: str, ttl_s: float,
                    rotate: bool = False, now: float | None = None, role: str = "node") -> str:
    """A new join token for ``role``; with ``rotate`` every earlier one of that role stops working."""
    _section(role)
    tickets.ensure_control_key(state_dir)
    now = time.time() if now is None else now
    key = Ed25519PrivateKey.generate()
    where = {"addr": temporal_address, "tq": task_queue, "fp": pem_fingerprint(control_public_pem(state_dir))}
    if role != "node":
        where["role"] = role
    token = JoinToken(temporal_address, task_queue, where["fp"], key, role)
    with _enrolment(state_dir, write=True) as data:
        data["tokens"] = {tid: t for tid, t in data["tokens"].items()
                          if t["exp"] > now and not (rotate and t.get("role", "node") == role)}
        data["tokens"][token.token_id] = {"pub": b64url(raw_public(key)), "exp": now + ttl_s, "made": now,
                                          "role": role}
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return f"{TOKEN_PREFIX}.{b64url(_canonical(where))}.{b64url(seed)}"


def enrol_request(token: JoinToken, *, node: str, address: str, public_key: bytes, now: float | None = None) -> str:
    """What the joining host sends: its name, address and key, signed with the token's key."""
    claims = {"tid": token.token_id, "node": node, "addr": address, "key": b64url(public_key),
              "t": round(time.time() if now is None else now, 3), "role": token.role}
    payload = _canonical(claims)
    return f"{b64url(payload)}.{b64url(token.key.sign(payload))}"


def enrol(state_dir: Path, request: str, *, now: float | None = None) -> str:
    """Check an enrolment request against the live join tokens and sign the node's certificate."""
    now = time.time() if now is None else now
    try:
        head, sig = request.split(".", 1)
        payload = unb64url(head)
        claims = json.loads(payload)
        tid = str(claims["tid"])
    except (ValueError, KeyError, TypeError):
        raise AccessDenied("the enrolment request is malformed") from None
    with _enrolment(state_dir, write=False) as data:
        known = data["tokens"].get(tid)
    if known is None:
        raise AccessDenied("the join token is unknown or was rotated")
    if known["exp"] < now:
        raise AccessDenied("the join token has expired")
    try:
        Ed25519PublicKey.from_public_bytes(unb64url(known["pub"])).verify(unb64url(sig), payload)
    except (ValueError, InvalidSignature):
        raise AccessDenied("the enrolment request is not signed with a live join token") from None
    at = claims.get("t")
    if not isinstance(at, (int, float)) or abs(now - at) > MAX_SKEW_S:
        raise AccessDenied("the enrolment request is stale")
    role = known.get("role", "node")
    if claims.get("role", "node") != role:
        raise AccessDenied(f"the join token is for a {role}, not a {claims.get('role')}: "
                           f"use `hms {role} join`")
    return enrol_key(state_dir, node=str(claims.get("node")), address=str(claims.get("addr")),
                     public_key=unb64url(str(claims.get("key"))), now=now, role=role,
                     token_made=float(known.get("made", 0.0)))


def enrol_key(state_dir: Path, *, node: str, address: str, public_key: bytes, now: float | None = None,
              role: str = "node", token_made: float | None = None) -> str:
    """Record ``node`` (a node or a router, by ``role``) with ``public_key`` and sign its certificate.
    A name holds one key: another key for an enrolled name is refused until ``hms node remove``
    (``hms router remove``) revokes the first; and a removed name joins again only with a join
    token made after its removal (``token_made``), so a host taken over and removed cannot come
    straight back with the token it joined with."""
    section = _section(role)
    from hms_mgmt.models import NodeSpec

    NodeSpec(name=node, task_queue="x", address=address)  # the name and address are valid, or ValueError
    Ed25519PublicKey.from_public_bytes(public_key)
    now = time.time() if now is None else now
    key = b64url(public_key)
    with _enrolment(state_dir, write=True) as data:
        old = data[section].get(node)
        if old and not old.get("revoked_at") and old["key"] != key:
            raise AccessDenied(f"{role} {node} is already enrolled with another key (remove it first: "
                               f"`hms {role} remove {node}`)")
        if old and old.get("revoked_at") and token_made is not None and token_made <= old["revoked_at"]:
            raise AccessDenied(f"{role} {node} was removed; it joins again only with a join token made since "
                               f"(`hms {role} join-token`)")
        serial = old["serial"] if old and old["key"] == key and old["addr"] == address and not old.get(
            "revoked_at") else uuid.uuid4().hex
        data[section][node] = {"key": key, "addr": address, "serial": serial, "enrolled_at": now}
    return tickets.sign_claims(state_dir, {"typ": role, "node": node, "addr": address, "key": key,
                                           "serial": serial, "iat": int(now)})


def revoke(state_dir: Path, node: str, *, now: float | None = None, role: str = "node") -> bool:
    with _enrolment(state_dir, write=True) as data:
        rec = data[_section(role)].get(node)
        if rec is None or rec.get("revoked_at"):
            return False
        rec["revoked_at"] = time.time() if now is None else now
    return True


def enrolled(state_dir: Path, role: str = "node") -> dict[str, dict[str, Any]]:
    with _enrolment(state_dir, write=False) as data:
        return dict(data[_section(role)])


def _enrolled_as(state_dir: Path, node: str, claims: dict[str, Any], role: str = "node") -> bool:
    rec = enrolled(state_dir, role).get(node)
    return bool(rec) and not rec.get("revoked_at") and rec.get("serial") == claims.get("serial")


def _cert_claims_unchecked(cert: str) -> dict[str, Any]:
    try:
        claims = json.loads(unb64url(cert.split(".", 1)[0]))
    except (ValueError, IndexError):
        return {}
    return claims if isinstance(claims, dict) else {}


def open_cert(state_dir: Path, cert: str, role: str = "node") -> dict[str, Any]:
    """A certificate's claims if the control plane signed it for ``role`` (any host with ``control.pub``)."""
    if not cert:
        raise AccessDenied(f"no {role} certificate")
    claims = tickets.open_claims(state_dir, cert, f"{role} certificate")
    if claims.get("typ") != role or not all(isinstance(claims.get(k), str) for k in ("node", "key", "serial")):
        raise AccessDenied(f"not a {role} certificate")
    return claims


def _live_record(state_dir: Path, node: str, role: str) -> dict[str, Any]:
    rec = enrolled(state_dir, role).get(node)
    if rec is None:
        raise AccessDenied(f"{role} {node} is not enrolled")
    if rec.get("revoked_at"):
        raise AccessDenied(f"{role} {node} was removed (its certificate is revoked)")
    return rec


def check_cert(state_dir: Path, cert: str, node: str, role: str = "node") -> dict[str, Any]:
    """On the control host: the certificate is ours, names ``node``, and is its current, unrevoked one."""
    claims = open_cert(state_dir, cert, role)
    if claims["node"] != node:
        raise AccessDenied(f"the certificate is {role} {claims['node']}'s, not {node}'s")
    if _live_record(state_dir, node, role).get("serial") != claims["serial"]:
        raise AccessDenied(f"{role} {node}'s certificate was replaced")
    return claims


def node_public_key(state_dir: Path, node: str, role: str = "node") -> bytes:
    """On the control host: the key ``node`` enrolled with, unless it was removed."""
    return unb64url(_live_record(state_dir, node, role)["key"])


def check_endpoint_on_node(state_dir: Path, node: str, endpoint: str) -> None:
    """AccessDenied unless ``endpoint`` (``host:port``) is on the address ``node`` enrolled with:
    a node's word is good for its own pods, which publish or bind on its address, and not for
    sending a service's traffic to another host or to a router's own loopback."""
    from hms_mgmt.addresses import check_address

    enrolled_at = str(_live_record(state_dir, node, "node")["addr"])
    host, sep, port = endpoint.rpartition(":")
    try:
        same = bool(sep) and port.isdigit() and check_address(host) == check_address(enrolled_at)
    except ValueError:
        same = False
    if not same:
        raise AccessDenied(f"endpoint {endpoint[:80]!r} is not on node {node}'s address {enrolled_at}")


def key_id(cert_claims: dict[str, Any]) -> str:
    return hashlib.sha256(unb64url(cert_claims["key"])).hexdigest()[:16]


def pub_of(cert_claims: dict[str, Any]) -> bytes:
    return unb64url(cert_claims["key"])


# --- trust stamps: the control plane's word at one pod start -------------------------------------


def issue_stamp(state_dir: Path, *, service: str, revision: int, image_id: str, pod_id: str, node: str,
                now: float | None = None, repo_digest: str = "") -> str:
    """``repo_digest``: where the node may pull the signed content by digest when it lacks it."""
    now = time.time() if now is None else now
    claims = {"typ": "stamp", "svc": service, "rev": revision, "img": image_id, "pod": pod_id, "node": node,
              "iat": int(now), "exp": int(now + STAMP_TTL_S)}
    return tickets.sign_claims(state_dir, {**claims, "dig": repo_digest} if repo_digest else claims)


def check_stamp(state_dir: Path, stamp: str, *, service: str, revision: int, image_id: str, pod_id: str,
                node: str, now: float | None = None) -> str:
    """Refuses (AccessDenied) a stamp for anything else; returns its repo digest ("" if none)."""
    if not stamp:
        raise AccessDenied("no trust stamp from the control plane for this start")
    claims = tickets.open_claims(state_dir, stamp, "trust stamp")
    want = {"typ": "stamp", "svc": service, "rev": revision, "img": image_id, "pod": pod_id, "node": node}
    wrong = sorted(k for k, v in want.items() if claims.get(k) != v)
    if wrong:
        raise AccessDenied(f"the trust stamp is for another {', '.join(wrong)}")
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp < (time.time() if now is None else now):
        raise AccessDenied("the trust stamp has expired")
    return str(claims.get("dig") or "")


def pod_report_message(service: str, pod: Any) -> dict[str, Any]:
    """What a node signs about one of its pods (a ``PodStatus``), bound to the service."""
    return {"svc": service, "pod": pod.model_dump(mode="json", exclude={"report"})}
