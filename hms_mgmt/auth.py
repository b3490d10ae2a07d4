"""Identity and access: Ed25519-signed tokens, request proofs, a role → action matrix, and
four-eyes approval.

A token is two halves, ``<certificate>~<holder key>``. The certificate is a JWT signed with the
control host's *token* key (``keys/token.pem``; image trust records are signed with another key,
``keys/signing.pem``) naming the user, the role, the expiry and the public half of a holder key
made for this token alone. A token never leaves the caller's machine: each request carries a
*proof* instead, a short-lived JWT signed with the holder key that names the action, the
service and what exactly is asked (the spec's hash, the replica count, the revision approved)
and a one-time ``jti``. A proof copied from workflow history is good for nothing else.

PyJWT checks every token and proof, and issues certificates; it is imported where it is used.
A proof is signed here with the holder key alone (:func:`prove`, a compact JWS PyJWT verifies):
signing is what every request of a user's script does, and PyJWT's import (every algorithm and
cryptography's x509 with it) was a tenth of such a script's start-up.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from hms_mgmt.durations import format_duration
from hms_mgmt.errors import AccessDenied, ConfigError, HmsError, SpecError
from hms_mgmt.files import atomic_write, load_yaml_mapping
from hms_mgmt.tickets import b64url, unb64url

if TYPE_CHECKING:
    from hms_mgmt.config import Settings

log = logging.getLogger(__name__)

Role = Literal["ops_admin", "gov_approver", "viewer"]
Action = Literal["deploy", "scale", "undeploy", "update", "approve", "reject", "status", "logs", "secrets"]

ROLES: tuple[str, ...] = get_args(Role)
ACTIONS: tuple[str, ...] = get_args(Action)

ISSUER = "hms-mgmt"
ALGORITHM = "EdDSA"
DEFAULT_TTL_S = 8 * 3600.0
LOCAL_OPERATOR_TTL_S = 30 * 86400.0
MAX_TTL_S = 366 * 86400.0  # a token is a working identity, not a credential for ever
# Tolerated clock skew between the machine that issued a token and the one checking it.
CLOCK_SKEW_S = 60.0

# The image signing key (trust records; ``hms_mgmt.trust``).
PRIVATE_KEY_FILE = "signing.pem"
PUBLIC_KEY_FILE = "signing.pub"
# The token key: only the control host holds its private half; workers verify with the public one.
TOKEN_KEY_FILE = "token.pem"
TOKEN_PUB_FILE = "token.pub"
HOLDER_SEP = "~"
PROOF_TYPE = "hms-proof"
PROOF_TTL_S = 300.0  # a request proof is used at once
MAX_PROOF_TTL_S = 3600.0  # an approval pasted into the Web UI may take a while, not a day

DEFAULT_ACCESS: dict[str, list[str]] = {
    "ops_admin": ["deploy", "scale", "undeploy", "update", "status", "logs", "secrets"],
    "gov_approver": ["approve", "reject", "status", "logs"],
    "viewer": ["status", "logs"],
}


class Identity(BaseModel):
    """Who is asking, as proven by a verified token."""

    user: str
    role: Role
    issued_at: datetime
    expires_at: datetime


# --- keys -----------------------------------------------------------------------------


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "keys"


def _public_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _init_pair(kdir: Path, private_name: str, public_name: str, *, force: bool) -> Path:
    private_path = kdir / private_name
    public_path = kdir / public_name
    if force or not private_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        if atomic_write(private_path, pem, mode=0o600, replace=force):
            atomic_write(public_path, _public_pem(key), mode=0o644)
            return private_path
    # Keep the existing key; make sure its public half is there and matches.
    pub = _public_pem(_load_private(private_path))
    if not public_path.exists() or public_path.read_bytes() != pub:
        atomic_write(public_path, pub, mode=0o644)
    return private_path


def init_keys(state_dir: Path, *, force: bool = False) -> Path:
    """Create the two Ed25519 key pairs once: the image signing key and the token key (``force``
    replaces both, invalidating every token and trust record they signed). Returns the image
    signing key's path."""
    kdir = keys_dir(state_dir)
    kdir.mkdir(parents=True, exist_ok=True)
    os.chmod(kdir, 0o700)
    _init_pair(kdir, TOKEN_KEY_FILE, TOKEN_PUB_FILE, force=force)
    return _init_pair(kdir, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, force=force)


def _load_private(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        raise HmsError(f"no signing key at {path}: run `hms auth init`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise HmsError(f"signing key {path} is unreadable ({e}): run `hms auth init --force`") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise HmsError(f"signing key {path} is not an Ed25519 key: run `hms auth init --force`")
    return key


def _load_public(kdir: Path, private_name: str, public_name: str) -> Ed25519PublicKey:
    path = kdir / public_name
    if not path.exists():
        if (kdir / private_name).exists():
            return _load_private(kdir / private_name).public_key()
        raise AccessDenied(f"no public key at {path}, so nothing it signs can be verified: run `hms auth init`")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise AccessDenied(f"public key {path} is unreadable ({e}): run `hms auth init --force`") from e
    if not isinstance(key, Ed25519PublicKey):
        raise AccessDenied(f"public key {path} is not an Ed25519 key: run `hms auth init --force`")
    return key


def load_token_key(state_dir: Path) -> Ed25519PrivateKey:
    """The token key's private half: only where it is (the control host, readable by its
    operator alone) can tokens be issued. Never created here: ``hms auth init`` makes it."""
    path = keys_dir(state_dir) / TOKEN_KEY_FILE
    if not path.exists():
        raise HmsError(
            f"issuing a token needs the token key {path} (0600, on the control host, readable only by its "
            "operator); run `hms auth init` there, or issue the token on the control host"
        )
    return _load_private(path)


def load_token_public_key(state_dir: Path) -> Ed25519PublicKey:
    """What verifies tokens: a worker needs only this public half."""
    return _load_public(keys_dir(state_dir), TOKEN_KEY_FILE, TOKEN_PUB_FILE)


def load_private_key(state_dir: Path) -> Ed25519PrivateKey:
    """The image signing key; needed to sign images (``hms image sign``)."""
    return _load_private(keys_dir(state_dir) / PRIVATE_KEY_FILE)


def load_public_key(state_dir: Path) -> Ed25519PublicKey:
    """The image signing key's public half: what checks trust records."""
    return _load_public(keys_dir(state_dir), PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)


# --- tokens ---------------------------------------------------------------------------


def _utc(dt: datetime | None) -> datetime:
    if dt is None:
        return datetime.now(UTC)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise SpecError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")


def issue_token(
    state_dir: Path,
    *,
    user: str,
    role: str,
    ttl_s: float = DEFAULT_TTL_S,
    now: datetime | None = None,
) -> str:
    """A token naming ``user`` and ``role``, valid for ``ttl_s`` seconds from ``now``: a
    certificate signed with the token key, ``~``, and the holder key only this token has.
    Needs the token key's private half (the control host)."""
    user = (user or "").strip()
    if not user:
        raise SpecError("user must not be empty")
    _check_role(role)
    if not ttl_s or ttl_s <= 0:
        raise SpecError(f"ttl must be positive, got {ttl_s!r}")
    key = load_token_key(state_dir)
    holder = Ed25519PrivateKey.generate()
    issued = _utc(now)
    claims = {
        "sub": user,
        "role": role,
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=ttl_s)).timestamp()),
        "iss": ISSUER,
        "jti": uuid.uuid4().hex,
        "cnf": {"x": b64url(holder.public_key().public_bytes_raw())},
    }
    import jwt

    cert = jwt.encode(claims, key, algorithm=ALGORITHM)
    return f"{cert}{HOLDER_SEP}{b64url(holder.private_bytes_raw())}"


def _issuer_key(public_key: Any, state_dir: Path | None, caller: str) -> Ed25519PublicKey:
    """The key that signed tokens: the one given, else the one kept in ``state_dir``."""
    if public_key is not None:
        return _coerce_public_key(public_key)
    if state_dir is None:
        raise ValueError(f"{caller} needs state_dir or public_key")
    return load_token_public_key(state_dir)


def _coerce_public_key(public_key: Any) -> Ed25519PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, Ed25519PrivateKey):
        return public_key.public_key()
    if isinstance(public_key, (str, bytes)):
        data = public_key.encode() if isinstance(public_key, str) else public_key
        key = serialization.load_pem_public_key(data)
        if isinstance(key, Ed25519PublicKey):
            return key
    raise TypeError("public_key must be an Ed25519 public key (object or PEM)")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _split_token(token: str | None) -> tuple[str, str]:
    token = (token or "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        raise AccessDenied("no identity: set HMS_TOKEN or run `hms auth issue ...`")
    cert, _, holder = token.partition(HOLDER_SEP)
    return cert, holder


def _holder_key(holder: str, cnf_x: str) -> Ed25519PrivateKey:
    if not holder:
        raise AccessDenied(
            "this token has no holder key (it is a certificate copied from a request, or a token from before "
            "request proofs): issue a new one with `hms auth issue`"
        )
    try:
        key = Ed25519PrivateKey.from_private_bytes(unb64url(holder))
    except ValueError as e:
        raise AccessDenied(f"malformed token: the holder key is damaged ({e})") from None
    if b64url(key.public_key().public_bytes_raw()) != cnf_x:
        raise AccessDenied("malformed token: the holder key does not belong to this token")
    return key


def _decode_cert(cert: str, key: Ed25519PublicKey | None) -> dict[str, Any]:
    """A certificate's claims, its signature checked with ``key`` (when given), or AccessDenied
    saying what is wrong with it."""
    import jwt

    try:
        return jwt.decode(
            cert,
            key,
            algorithms=[ALGORITHM],
            # Time and issuer are checked by _verify_cert, against ``now`` and with precise messages.
            options={
                "verify_signature": key is not None,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_iss": False,
                "verify_aud": False,
                "require": ["sub", "role", "iat", "exp", "iss"],
            },
        )
    except jwt.InvalidSignatureError as e:
        raise AccessDenied(
            "token signature is invalid: it was altered or signed by another key "
            "(issue a new one with `hms auth issue`)"
        ) from e
    except jwt.InvalidAlgorithmError as e:
        raise AccessDenied(f"token is not signed with {ALGORITHM}: {e}") from e
    except jwt.MissingRequiredClaimError as e:
        raise AccessDenied(f"malformed token: missing the {e.claim!r} claim") from e
    except jwt.DecodeError as e:
        raise AccessDenied(f"malformed token: {e}") from e
    except jwt.InvalidTokenError as e:
        raise AccessDenied(f"invalid token: {e}") from e


def _verify_cert(
    cert: str, key: Ed25519PublicKey | None, now: datetime | None
) -> tuple[Identity, str]:
    """The identity a token's certificate proves and its holder key's public half (``cnf.x``).
    With ``key`` None the signature is not checked (a client without the token key's public
    half checking its own token; never a worker)."""
    claims = _decode_cert(cert, key)
    if claims.get("iss") != ISSUER:
        raise AccessDenied(f"token was issued by {claims.get('iss')!r}, not {ISSUER!r}")
    user = claims.get("sub")
    if not isinstance(user, str) or not user.strip():
        raise AccessDenied("malformed token: empty 'sub' (user)")
    role = claims.get("role")
    if role not in ROLES:
        raise AccessDenied(f"token for {user} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not _is_number(iat) or not _is_number(exp):
        raise AccessDenied("malformed token: 'iat' and 'exp' must be numeric timestamps")
    issued_at = datetime.fromtimestamp(iat, UTC)
    expires_at = datetime.fromtimestamp(exp, UTC)
    current = _utc(now)
    if current >= expires_at:
        ago = (current - expires_at).total_seconds()
        raise AccessDenied(
            f"token for {user} expired at {expires_at.isoformat()} ({format_duration(ago)} ago): "
            "issue a new one with `hms auth issue`"
        )
    if (issued_at - current).total_seconds() > CLOCK_SKEW_S:
        raise AccessDenied(
            f"token for {user} is issued in the future ({issued_at.isoformat()}): check the clocks"
        )
    cnf = claims.get("cnf")
    cnf_x = cnf.get("x") if isinstance(cnf, dict) else None
    return Identity(user=user, role=role, issued_at=issued_at, expires_at=expires_at), cnf_x or ""


def verify_token(
    token: str | None,
    *,
    state_dir: Path | None = None,
    public_key: Any = None,
    now: datetime | None = None,
) -> Identity:
    """The identity a whole token (certificate and holder key) proves, or AccessDenied saying
    exactly why it proves none. For the token's own holder; workers verify proofs."""
    cert, holder = _split_token(token)
    key = _issuer_key(public_key, state_dir, "verify_token")
    identity, cnf_x = _verify_cert(cert, key, now)
    _holder_key(holder, cnf_x)
    return identity


def check_own_token(token: str, action: str, state_dir: Path, *, now: datetime | None = None) -> Identity:
    """A client's check of its own token before a read (``status``, ``logs``): valid, unexpired
    and allowed ``action`` by the access matrix. With the token key's public half in
    ``state_dir`` the signature is checked too; a remote client without it checks the rest.
    A courtesy, not a boundary: what Temporal serves can be read by anyone who reaches it."""
    cert, holder = _split_token(token)
    try:
        key: Ed25519PublicKey | None = load_token_public_key(state_dir)
    except AccessDenied:
        key = None
    identity, cnf_x = _verify_cert(cert, key, now)
    _holder_key(holder, cnf_x)
    authorize(identity, action, load_access_matrix(state_dir))
    return identity


# --- request proofs ------------------------------------------------------------------------


class ProofMismatch(AccessDenied):
    """A valid proof made for another request (action, service, spec, revision, pod, ...)."""


@dataclass(frozen=True)
class Proven:
    """What a verified request proof establishes."""

    identity: Identity
    jti: str
    expires_at: datetime


def prove(
    token: str | None,
    *,
    action: str,
    service: str,
    bind: dict[str, Any] | None = None,
    ttl_s: float = PROOF_TTL_S,
    now: datetime | None = None,
) -> str:
    """A proof that the holder of ``token`` asks for ``action`` on ``service`` with exactly
    ``bind`` (e.g. ``{"spec": spec.digest()}``): what a request carries instead of the token.
    No token, no proof (""): the worker refuses it with "no identity"."""
    if not (token or "").strip():
        return ""
    if not 0 < ttl_s <= MAX_PROOF_TTL_S:
        raise SpecError(f"a proof lives at most {MAX_PROOF_TTL_S:g}s, got {ttl_s!r}")
    cert, holder = _split_token(token)
    key = _holder_key(holder, _unverified_cnf(cert))
    issued = _utc(now)
    claims = {
        "cert": cert,
        "act": action,
        "svc": service,
        "bind": bind or {},
        "jti": uuid.uuid4().hex,
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=ttl_s)).timestamp()),
    }
    return _jws(claims, key, PROOF_TYPE)


def _compact_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _jws(claims: dict[str, Any], key: Ed25519PrivateKey, typ: str) -> str:
    """``claims`` as a compact JWS signed with ``key`` (EdDSA), as ``jwt.encode`` makes it."""
    signing_input = f"{b64url(_compact_json({'alg': ALGORITHM, 'typ': typ}))}.{b64url(_compact_json(claims))}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def _unverified_cnf(cert: str) -> str:
    """The holder key a certificate names, read without checking it: the signature over the
    proof made with that key is what the verifier checks, against the certificate it verifies."""
    try:
        _, payload, _ = cert.split(".")
        claims = json.loads(unb64url(payload))
    except ValueError as e:  # not three parts, not base64, not JSON
        raise AccessDenied(f"malformed token: {e}") from None
    if not isinstance(claims, dict):
        raise AccessDenied("malformed token: its claims are not a JSON object")
    cnf = claims.get("cnf")
    return (cnf.get("x") if isinstance(cnf, dict) else None) or ""


PROOFS_TAKEN = "proofs-taken.json"  # in the state directory: request proofs taken, until they expire


def take_proof(state_dir: Path, proven: Proven, run: str, *, now: float | None = None) -> None:
    """A verified proof is good for the one workflow run that first presented it (that run's
    retries included), never for another: anyone who reaches Temporal can read a proof from a
    history and hand it to a workflow of ours that they start (their own ``PodLogsWorkflow``, a
    ``ServiceWorkflow`` deployed again under the same name) while it still lives. Kept in the
    control plane's state directory for as long as ``verify_proof`` accepts it (its expiry plus
    ``CLOCK_SKEW_S``; fsynced: a power loss forgets none); AccessDenied once taken by another
    run, or when that record is damaged."""
    import time

    from hms_mgmt.files import DamagedRecord, expiring_record

    now = time.time() if now is None else now
    try:
        with expiring_record(state_dir / PROOFS_TAKEN, now=now) as taken:
            held = taken.get(proven.jti)
            if held is not None and held[0] != run:
                raise AccessDenied("this request proof was already used by another request: make the request "
                                   "again (each is signed for one use)")
            taken[proven.jti] = [run, proven.expires_at.timestamp() + CLOCK_SKEW_S]
    except DamagedRecord as e:
        raise AccessDenied(f"no request proof is accepted: {e}, and it records the proofs already used. "
                           "An operator removes it once an hour has passed (every proof in it has expired "
                           "by then)") from None


def verify_proof(
    proof: str | None,
    *,
    action: str,
    service: str,
    bind: dict[str, Any] | None = None,
    state_dir: Path | None = None,
    public_key: Any = None,
    now: datetime | None = None,
) -> Proven:
    """Who made this proof, if it is valid and made for exactly this request; else
    AccessDenied (``ProofMismatch`` when it is a good proof of another request)."""
    proof = (proof or "").strip()
    if not proof:
        raise AccessDenied("no identity: set HMS_TOKEN or run `hms auth issue ...`")
    if HOLDER_SEP in proof:
        raise AccessDenied("a whole token was sent instead of a request proof: it is now in this workflow's "
                           "history, so issue a new one; requests carry proofs (`hms approve --print-signal`)")
    import jwt

    try:
        header = jwt.get_unverified_header(proof)
        unverified = jwt.decode(proof, options={"verify_signature": False})
    except jwt.InvalidTokenError as e:
        raise AccessDenied(f"malformed request proof: {e}") from None
    if header.get("typ") != PROOF_TYPE or not isinstance(unverified.get("cert"), str):
        raise AccessDenied("not a request proof: requests carry a proof made from the token "
                           "(`hms`, the Python API and `hms approve --print-signal` make them), never a token")
    key = _issuer_key(public_key, state_dir, "verify_proof")
    identity, cnf_x = _verify_cert(unverified["cert"], key, now)
    try:
        holder = Ed25519PublicKey.from_public_bytes(unb64url(cnf_x))
        claims = jwt.decode(proof, holder, algorithms=[ALGORITHM],
                            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                     "require": ["act", "svc", "jti", "iat", "exp"]})
    except (ValueError, jwt.InvalidTokenError) as e:
        raise AccessDenied(f"request proof signature is invalid: not made by the token's holder ({e})") from None
    if claims["act"] != action:
        raise ProofMismatch(f"the proof asks to {claims['act']}, not to {action}")
    if claims["svc"] != service:
        raise ProofMismatch(f"the proof is for service {claims['svc']!r}, not {service!r}")
    got = claims.get("bind") if isinstance(claims.get("bind"), dict) else {}
    for name, want in sorted((bind or {}).items()):
        if got.get(name) != want:
            raise ProofMismatch(f"the proof is for another {name} ({got.get(name)!r}, not {want!r})")
    iat, exp = claims["iat"], claims["exp"]
    if not _is_number(iat) or not _is_number(exp) or exp - iat > MAX_PROOF_TTL_S:
        raise AccessDenied(f"request proof lifetime is invalid (at most {MAX_PROOF_TTL_S:g}s)")
    current = _utc(now)
    expires_at = datetime.fromtimestamp(exp, UTC)
    if current >= expires_at + timedelta(seconds=CLOCK_SKEW_S):
        ago = (current - expires_at).total_seconds()
        raise AccessDenied(f"the request proof of {identity.user} expired {format_duration(ago)} ago "
                           "(a proof is for one request, made just before it)")
    if iat - current.timestamp() > CLOCK_SKEW_S:
        raise AccessDenied(f"the request proof of {identity.user} is made in the future: check the clocks")
    return Proven(identity=identity, jti=str(claims["jti"]), expires_at=expires_at)


_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(value: str | float) -> float:
    """Seconds from ``"45s"``, ``"30m"``, ``"8h"``, ``"2d"`` or a bare number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _TTL.match(str(value))
        if not match:
            raise SpecError(
                f"invalid TTL {value!r}: use seconds (3600) or a number with a unit: 45s, 30m, 8h, 2d"
            )
        seconds = float(match.group(1)) * _TTL_UNITS[match.group(2).lower()]
    if seconds <= 0:
        raise SpecError(f"invalid TTL {value!r}: must be positive")
    if not seconds <= MAX_TTL_S:  # also NaN and infinity
        raise SpecError(f"invalid TTL {value!r}: at most {MAX_TTL_S / 86400:g}d")
    return seconds


# --- access -----------------------------------------------------------------------------


def load_access_matrix(state_dir: Path) -> dict[str, list[str]]:
    """Role → allowed actions from ``state_dir/access.yaml``, else the defaults.

    The file replaces the defaults as a whole: a role it does not list may do nothing."""
    path = Path(state_dir) / "access.yaml"
    if not path.exists():
        return copy.deepcopy(DEFAULT_ACCESS)
    raw = load_yaml_mapping(path, what="role to a list of actions")
    if not raw:
        raise ConfigError(
            f"{path}: expected a mapping of role to a list of actions "
            f"(e.g. 'viewer: [status, logs]'); delete the file to use the defaults"
        )
    matrix: dict[str, list[str]] = {}
    for role, actions in raw.items():
        if role not in ROLES:
            raise ConfigError(f"{path}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if actions is None:
            actions = []
        if not isinstance(actions, list):
            raise ConfigError(f"{path}: role {role!r} must map to a list of actions, got {actions!r}")
        allowed: list[str] = []
        for action in actions:
            if action not in ACTIONS:
                raise ConfigError(
                    f"{path}: role {role!r} has unknown action {action!r}; valid actions: {', '.join(ACTIONS)}"
                )
            if action not in allowed:
                allowed.append(action)
        matrix[role] = allowed
    return matrix


def roles_allowed(action: str, matrix: dict[str, list[str]] | None = None) -> list[str]:
    """The roles that may perform ``action``, for error messages and help text."""
    matrix = DEFAULT_ACCESS if matrix is None else matrix
    return [role for role, actions in matrix.items() if action in actions]


def authorize(identity: Identity, action: str, matrix: dict[str, list[str]] | None = None) -> None:
    """Raise AccessDenied unless the identity's role may perform ``action``."""
    if action not in ACTIONS:
        raise SpecError(f"unknown action {action!r}; valid actions: {', '.join(ACTIONS)}")
    matrix = DEFAULT_ACCESS if matrix is None else matrix
    if action in matrix.get(identity.role, []):
        return
    allowed = ", ".join(roles_allowed(action, matrix)) or "none"
    raise AccessDenied(f"{identity.user} ({identity.role}) may not {action}; allowed roles: {allowed}")


def check_approver(
    approver: Identity, requester: str, matrix: dict[str, list[str]] | None = None
) -> None:
    """Raise AccessDenied unless the approver's role may approve and they are not the requester."""
    authorize(approver, "approve", matrix)
    if approver.user.strip().casefold() == (requester or "").strip().casefold():
        raise AccessDenied(f"four eyes: {approver.user} may not approve their own request")


def ensure_local_operator(settings: Settings) -> str | None:
    """Make a fresh machine usable (``make demo``, ``hms up``): keys, plus an ``ops_admin`` token
    saved to the config file when none is configured. A configured token is never replaced.

    Returns the token in effect and sets ``settings.token`` to it."""
    init_keys(settings.state_dir)
    if settings.token and HOLDER_SEP not in settings.token:
        renewed = _renew_legacy(settings)
        if renewed:
            return renewed
    if settings.token:
        try:
            verify_token(settings.token, state_dir=settings.state_dir)
        except AccessDenied as e:
            log.warning("the configured token is not usable (%s); it is kept as configured", e)
        return settings.token
    user = os.environ.get("USER") or "operator"
    token = issue_token(settings.state_dir, user=user, role="ops_admin", ttl_s=LOCAL_OPERATOR_TTL_S)
    settings.write_config(token=token)
    settings.token = token
    return token


def _renew_legacy(settings: Settings) -> str | None:
    """A token from before the token key and request proofs (a bare JWT signed with the image
    key) that this host issued: the same user and role, until the same expiry, in today's form."""
    import jwt

    try:
        claims = jwt.decode(settings.token or "", load_public_key(settings.state_dir), algorithms=[ALGORITHM],
                            options={"require": ["sub", "role", "exp"]})
    except (jwt.InvalidTokenError, AccessDenied):
        return None
    left = float(claims["exp"]) - datetime.now(UTC).timestamp()
    if claims.get("role") not in ROLES or left <= 0:
        return None
    token = issue_token(settings.state_dir, user=str(claims["sub"]), role=str(claims["role"]), ttl_s=left)
    if os.environ.get("HMS_TOKEN") != settings.token:
        settings.write_config(token=token)
    log.warning("the configured token of %s was in the old form (a bearer JWT); replaced by a token with a "
                "holder key, same role and expiry", claims["sub"])
    settings.token = token
    return token
