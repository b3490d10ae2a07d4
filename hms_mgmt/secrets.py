"""Secrets: stored encrypted on the control host, sealed to one node for one pod start, written
to a tmpfs file for the pod (issue 21; SECURITY.md "Secrets").

- **At rest** (control host): ``<state>/secrets.json`` (0600) holds each secret's version, who set
  it and when, and its value encrypted with AES-256-GCM under ``keys/secrets.key`` (32 random
  bytes, 0600), the name and version bound as associated data.
- **Sealed** (in Temporal, the ``start_pod`` input): for each pod start the control worker
  encrypts the spec's secrets to the node's key: an ephemeral X25519 key agreed with the node's
  X25519 key, HKDF-SHA256, AES-256-GCM with the service, revision, pod and node as associated
  data, the whole signed with the control plane's Ed25519 key (``tickets.sign_claims``) and good
  for ``SEAL_TTL_S``. The node's X25519 key is its enrolled Ed25519 key in Montgomery form (the
  map libsodium's ``crypto_sign_ed25519_*_to_curve25519`` implements): nothing new to enrol,
  publish or keep, and the control plane already holds every enrolled node's public key.
- **Delivered** (node): files of 0400 in a 0500 directory on a tmpfs (``/dev/shm``), owned by the
  pod's user; a Docker pod gets that directory bind-mounted read-only at ``/run/secrets``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets as _random
import shutil
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hms_mgmt import tickets
from hms_mgmt.errors import AccessDenied, ActivityErrorType, HmsError, PodRuntimeError, SpecError
from hms_mgmt.files import atomic_write
from hms_mgmt.models import SecretInfo, SecretRef, check_secret_name
from hms_mgmt.runtimes.base import SecretFile, check_pod_id
from hms_mgmt.tickets import b64url, unb64url

STORE_FILE = "secrets.json"
KEY_FILE = "secrets.key"
MAX_VALUE_BYTES = 64 * 1024
KEEP_VERSIONS = 5  # earlier versions kept (encrypted) for pinned revisions and rollbacks
SEAL_TTL_S = 300.0  # a sealed bundle opens within this of its sealing (like a start ticket)
TMPFS_ROOT = Path("/dev/shm/hms-secrets")
# A container engine's pods: their files are bind-mounted by the engine (root), and owned by the
# image's uid, which on the host may be any account's. So no one else may even pass through here.
ENGINE_ROOT = Path("/dev/shm/hms-secrets-engine")
_HKDF_INFO = b"hms-secrets-seal-v1"
_P = 2**255 - 19


class SecretMissing(SpecError):
    """A spec names a secret the store does not hold."""


# --- the store, on the control host ---------------------------------------------------------------


def _keys(state_dir: Path) -> Path:
    path = Path(state_dir) / "keys"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _store_key(state_dir: Path, *, create: bool) -> AESGCM:
    path = _keys(state_dir) / KEY_FILE
    if not path.exists():
        if not create:
            raise HmsError(f"no secrets key here ({path}): secrets live on the control host, in its state directory")
        atomic_write(path, _random.token_bytes(32), mode=0o600, replace=False)
    key = path.read_bytes()
    if len(key) != 32:
        raise HmsError(f"{path} is not a 32-byte key")
    return AESGCM(key)


@contextlib.contextmanager
def _locked(state_dir: Path, *, write: bool) -> Iterator[dict[str, Any]]:
    """The store's records, under a lock; written back (0600) when ``write``."""
    path = Path(state_dir) / STORE_FILE
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        data = json.loads(path.read_text()) if path.exists() else {}
        records: dict[str, Any] = data.get("secrets", {})
        yield records
        if write:
            atomic_write(path, json.dumps({"secrets": records}, indent=1, sort_keys=True), mode=0o600)
    finally:
        os.close(fd)


def _aad(name: str, version: int) -> bytes:
    return f"hms-secret:{name}:v{version}".encode()


def _info(name: str, rec: dict[str, Any]) -> SecretInfo:
    return SecretInfo(name=name, version=rec["version"], set_by=rec["set_by"],
                      set_at=datetime.fromisoformat(rec["set_at"]))


def set_secret(state_dir: Path, name: str, value: bytes, *, by: str) -> SecretInfo:
    """Store ``value`` as the next version of ``name`` (version 1 if new)."""
    check_secret_name(name)
    if not value:
        raise SpecError(f"secret {name}: the value is empty")
    if len(value) > MAX_VALUE_BYTES:
        raise SpecError(f"secret {name}: at most {MAX_VALUE_BYTES} bytes (got {len(value)})")
    box = _store_key(state_dir, create=True)
    with _locked(state_dir, write=True) as records:
        prev = records.get(name, {})
        version = int(prev.get("version", 0)) + 1
        kept = {**prev.get("old", {}), **({str(prev["version"]): {"nonce": prev["nonce"], "ct": prev["ct"]}} if prev else {})}
        kept = {v: kept[v] for v in sorted(kept, key=int)[-KEEP_VERSIONS:]}  # a rollback may still need them
        nonce = _random.token_bytes(12)
        records[name] = {"version": version, "set_by": by, "set_at": datetime.now(UTC).isoformat(), "old": kept,
                         "nonce": b64url(nonce), "ct": b64url(box.encrypt(nonce, value, _aad(name, version)))}
        return _info(name, records[name])


def list_secrets(state_dir: Path) -> list[SecretInfo]:
    with _locked(state_dir, write=False) as records:
        return [_info(name, rec) for name, rec in sorted(records.items())]


def remove_secret(state_dir: Path, name: str) -> bool:
    with _locked(state_dir, write=True) as records:
        return records.pop(name, None) is not None


def _record(records: dict[str, Any], name: str, version: int | None) -> tuple[int, dict[str, Any]]:
    rec = records.get(name)
    if rec is None:
        raise SecretMissing(f"no secret {name!r} (set it with `hms secret set {name}`)")
    if version is None or version == rec["version"]:
        return rec["version"], rec
    old = rec.get("old", {}).get(str(version))
    if old is None:
        raise SecretMissing(f"secret {name} v{version} is not kept (the store keeps the last {KEEP_VERSIONS + 1})")
    return version, old


def read_secret(state_dir: Path, name: str, version: int | None = None) -> tuple[int, bytes]:
    """(version, value) of a stored secret, the latest or ``version``: on the control host only."""
    box = _store_key(state_dir, create=False)
    with _locked(state_dir, write=False) as records:
        version, rec = _record(records, name, version)
    try:
        return version, box.decrypt(unb64url(rec["nonce"]), unb64url(rec["ct"]), _aad(name, version))
    except InvalidTag:
        raise HmsError(f"secret {name}: the stored value is damaged or not for this key") from None


def missing(state_dir: Path, refs: list[SecretRef]) -> list[str]:
    """The secrets (or pinned versions) in ``refs`` the store does not hold."""
    gone = []
    with _locked(state_dir, write=False) as records:
        for ref in refs:
            try:
                _record(records, ref.name, ref.version)
            except SecretMissing:
                gone.append(ref.name + (f" v{ref.version}" if ref.version else ""))
    return gone


def values_equal_to(state_dir: Path, env: dict[str, str]) -> list[str]:
    """The env names whose value is a stored secret's value (admission refuses them)."""
    if not env or not (Path(state_dir) / STORE_FILE).exists():
        return []
    stored = {read_secret(state_dir, info.name)[1] for info in list_secrets(state_dir)}
    return sorted(k for k, v in env.items() if v.encode() in stored)


def store_here(state_dir: Path) -> bool:
    """Whether this host holds the secrets store (the control host)."""
    return (Path(state_dir) / "keys" / KEY_FILE).exists()


def check_spec(state_dir: Path, spec: Any) -> None:
    """Admission: every secret the spec names is stored, and no ``env`` value is a secret's value."""
    gone = missing(state_dir, spec.secrets) if spec.secrets else []
    if gone:
        raise SecretMissing(f"secrets: no secret {', '.join(gone)} (set it with `hms secret set NAME`); nothing started")
    # Refused without naming the entry (or the secret): an answer that says which value matched
    # would let whoever may send a spec guess a secret's value, one try per env entry.
    if values_equal_to(state_dir, spec.env):
        raise SpecError("env: a value is a stored secret's; name the secret in `secrets:` instead (it "
                        "reaches the pod as a file, never in env or history)")


# --- X25519 from a node's Ed25519 key ---------------------------------------------------------------


def x25519_public(ed25519_public: bytes) -> X25519PublicKey:
    """The Montgomery form u = (1 + y) / (1 - y) of an Ed25519 public key."""
    if len(ed25519_public) != 32:
        raise AccessDenied("a node key is 32 bytes")
    y = int.from_bytes(ed25519_public, "little") & ((1 << 255) - 1)
    if y >= _P or y == 1:
        raise AccessDenied("not a usable node key")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return X25519PublicKey.from_public_bytes(u.to_bytes(32, "little"))


def x25519_private(key: Ed25519PrivateKey) -> X25519PrivateKey:
    """The X25519 scalar of an Ed25519 key: the first half of SHA-512 of its seed (clamped by X25519)."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return X25519PrivateKey.from_private_bytes(hashlib.sha512(seed).digest()[:32])


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kek(shared: bytes, epk: bytes, node_pub: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=_HKDF_INFO + epk + node_pub).derive(shared))


def _bind(service: str, revision: int, pod_id: str, node: str) -> dict[str, Any]:
    return {"svc": service, "rev": revision, "pod": pod_id, "node": node}


# --- sealing (control host) and opening (node) ------------------------------------------------------


def seal(state_dir: Path, refs: list[SecretRef], node_key: bytes, *, service: str, revision: int, pod_id: str,
         node: str, now: float | None = None) -> tuple[str, dict[str, int]]:
    """The secrets ``refs`` names, encrypted to ``node_key`` (its Ed25519 public key) for this
    one pod, signed by the control plane. Returns (bundle, name -> version)."""
    files, versions = [], {}
    for ref in refs:
        version, value = read_secret(state_dir, ref.name, ref.version)
        versions[ref.name] = version
        files.append({"name": ref.name, "file": ref.file, "v": version, "value": b64url(value)})
    node_pub = x25519_public(node_key)
    eph = X25519PrivateKey.generate()
    epk = _raw(eph.public_key())
    bind = _bind(service, revision, pod_id, node)
    nonce = _random.token_bytes(12)
    sealed = _kek(eph.exchange(node_pub), epk, _raw(node_pub)).encrypt(
        nonce, json.dumps({"files": files}).encode(), json.dumps(bind, sort_keys=True).encode())
    now = time.time() if now is None else now
    claims = {"typ": "secrets", **bind, "versions": versions, "epk": b64url(epk), "n": b64url(nonce),
              "ct": b64url(sealed), "exp": int(now + SEAL_TTL_S)}
    return tickets.sign_claims(state_dir, claims), versions


def open_bundle(state_dir: Path, key: Ed25519PrivateKey, bundle: str, *, service: str, revision: int, pod_id: str,
                node: str, now: float | None = None) -> list[SecretFile]:
    """Open a bundle on its node: the control plane's signature, for exactly this pod here, in
    time, and decryptable only with this node's key. AccessDenied otherwise."""
    claims = tickets.open_claims(state_dir, bundle, "secrets bundle")
    bind = _bind(service, revision, pod_id, node)
    wrong = sorted(k for k, v in {"typ": "secrets", **bind}.items() if claims.get(k) != v)
    if wrong:
        raise AccessDenied(f"the secrets bundle is for another {', '.join(wrong)}")
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp < (time.time() if now is None else now):
        raise AccessDenied("the secrets bundle has expired")
    mine = x25519_private(key)
    try:
        epk = unb64url(claims["epk"])
        box = _kek(mine.exchange(X25519PublicKey.from_public_bytes(epk)), epk, _raw(mine.public_key()))
        plain = box.decrypt(unb64url(claims["n"]), unb64url(claims["ct"]), json.dumps(bind, sort_keys=True).encode())
        files = json.loads(plain)["files"]
    except (InvalidTag, KeyError, ValueError):
        raise AccessDenied("the secrets bundle does not open with this node's key") from None
    return [SecretFile(name=f["name"], file=f["file"], version=f["v"], value=unb64url(f["value"])) for f in files]


def open_for_pod(identity: Any, state_dir: Path | None, inp: Any) -> list[SecretFile]:
    """``start_pod``'s one step: the secrets its spec names, opened here; none when it names none.
    A spec naming secrets without a bundle that opens here starts no pod."""
    if not inp.spec.secrets:
        return []
    try:
        if identity is None or state_dir is None:
            raise AccessDenied("this node has no key to open secrets with")
        if not inp.secrets:
            raise AccessDenied("the start carries no sealed secrets")
        files = open_bundle(state_dir, identity.key, inp.secrets, service=inp.service, revision=inp.revision,
                            pod_id=inp.pod_id, node=identity.node)
    except AccessDenied as e:
        raise PodRuntimeError(f"pod {inp.pod_id} not started: its secrets: {e}",
                              error_type=ActivityErrorType.ACCESS_DENIED) from None
    if sorted(f.name for f in files) != sorted(ref.name for ref in inp.spec.secrets):
        raise PodRuntimeError(f"pod {inp.pod_id} not started: the sealed secrets are not the spec's",
                              error_type=ActivityErrorType.ACCESS_DENIED)
    return files


# --- delivery (node): files on a tmpfs ------------------------------------------------------------------


def pod_dir(pod_id: str, *, engine: bool = False) -> Path:
    """Where a pod's files are: under :data:`ENGINE_ROOT` for a container engine's pods."""
    return (ENGINE_ROOT if engine else TMPFS_ROOT) / check_pod_id(pod_id)


def _on_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
    return fstype == "tmpfs"


def _check_own_dir(path: Path) -> None:
    """Refuse unless ``path`` is a real directory (no symlink) owned by this process's euid that
    no group or other user may write to. ``/dev/shm`` is world-writable: another local user who
    made ``hms-secrets`` first could otherwise rename a pod's directory and put their own files
    in its place."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        why = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.geteuid():
        why = f"is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"is writable by its group or other users (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise PodRuntimeError(f"no secret written: {path} {why}; remove it (the node recreates it)",
                          error_type=ActivityErrorType.SPEC_UNRUNNABLE)


def write_pod_files(pod_id: str, files: list[SecretFile], *, uid: int, gid: int, engine: bool = False) -> Path:
    """Each file 0400 in the pod's own 0500 directory on a tmpfs, owned by ``uid``:``gid``.

    A process pod reaches its directory through :data:`TMPFS_ROOT` (0711: passable, not
    listable). A container engine mounts it for its pod (``engine``): then it sits under
    :data:`ENGINE_ROOT`, 0700, so a host account that happens to have the image's uid cannot
    pass through to it."""
    root = ENGINE_ROOT if engine else TMPFS_ROOT
    if not _on_tmpfs(root):
        raise PodRuntimeError(f"{root.parent} is not a tmpfs: no secret is written to disk",
                              error_type=ActivityErrorType.SPEC_UNRUNNABLE)
    root.mkdir(mode=0o700 if engine else 0o711, exist_ok=True)
    _check_own_dir(root)
    if engine:
        root.chmod(0o700)  # ours (checked): whatever mode it was made with, only its owner passes
    where = pod_dir(pod_id, engine=engine)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(mode=0o700)
    _check_own_dir(where)
    for f in files:
        fd = os.open(where / f.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            os.write(fd, f.value)
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    if os.geteuid() == 0:
        os.chown(where, uid, gid)
    where.chmod(0o500)
    return where


def remove_pod_files(pod_id: str) -> None:
    for engine in (False, True):
        shutil.rmtree(pod_dir(pod_id, engine=engine), ignore_errors=True)
