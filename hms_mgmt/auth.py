"""Identity and access: Ed25519-signed JWTs, a role → action matrix, and four-eyes approval.

Tokens are signed with the state directory's Ed25519 key (the same key signs image trust
records), so anyone holding only the public key can check who is asking without a server.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from hms_mgmt.durations import format_duration
from hms_mgmt.errors import AccessDenied, ConfigError, HmsError, SpecError
from hms_mgmt.files import atomic_write, load_yaml_mapping

if TYPE_CHECKING:
    from hms_mgmt.config import Settings

log = logging.getLogger(__name__)

Role = Literal["ops_admin", "gov_approver", "viewer"]
Action = Literal["deploy", "scale", "undeploy", "update", "approve", "reject", "status", "logs"]

ROLES: tuple[str, ...] = get_args(Role)
ACTIONS: tuple[str, ...] = get_args(Action)

ISSUER = "hms-mgmt"
ALGORITHM = "EdDSA"
DEFAULT_TTL_S = 8 * 3600.0
LOCAL_OPERATOR_TTL_S = 30 * 86400.0
MAX_TTL_S = 366 * 86400.0  # a token is a working identity, not a credential for ever
# Tolerated clock skew between the machine that issued a token and the one checking it.
CLOCK_SKEW_S = 60.0

PRIVATE_KEY_FILE = "signing.pem"
PUBLIC_KEY_FILE = "signing.pub"

DEFAULT_ACCESS: dict[str, list[str]] = {
    "ops_admin": ["deploy", "scale", "undeploy", "update", "status", "logs"],
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


def init_keys(state_dir: Path, *, force: bool = False) -> Path:
    """Create the Ed25519 signing key pair once (``force`` replaces it, invalidating every token
    and trust record it signed). Returns the private key's path."""
    kdir = keys_dir(state_dir)
    kdir.mkdir(parents=True, exist_ok=True)
    os.chmod(kdir, 0o700)
    private_path = kdir / PRIVATE_KEY_FILE
    public_path = kdir / PUBLIC_KEY_FILE
    if force or not private_path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        if atomic_write(private_path, pem, mode=0o600, replace=force):
            atomic_write(public_path, _public_pem(key), mode=0o644)
            return private_path
    # Keep the existing key; make sure its public half is there and matches.
    key = load_private_key(state_dir)
    pub = _public_pem(key)
    if not public_path.exists() or public_path.read_bytes() != pub:
        atomic_write(public_path, pub, mode=0o644)
    return private_path


def load_private_key(state_dir: Path) -> Ed25519PrivateKey:
    """The signing key; needed to issue tokens and sign images."""
    path = keys_dir(state_dir) / PRIVATE_KEY_FILE
    if not path.exists():
        raise HmsError(f"no signing key at {path}: run `hms auth init`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise HmsError(f"signing key {path} is unreadable ({e}): run `hms auth init --force`") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise HmsError(f"signing key {path} is not an Ed25519 key: run `hms auth init --force`")
    return key


def load_public_key(state_dir: Path) -> Ed25519PublicKey:
    """The verification key; without it no identity can be proven, hence AccessDenied."""
    kdir = keys_dir(state_dir)
    path = kdir / PUBLIC_KEY_FILE
    if not path.exists():
        if (kdir / PRIVATE_KEY_FILE).exists():
            return load_private_key(state_dir).public_key()
        raise AccessDenied(f"no public key at {path}, so no token can be verified: run `hms auth init`")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise AccessDenied(f"public key {path} is unreadable ({e}): run `hms auth init --force`") from e
    if not isinstance(key, Ed25519PublicKey):
        raise AccessDenied(f"public key {path} is not an Ed25519 key: run `hms auth init --force`")
    return key


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
    """A signed token naming ``user`` and ``role``, valid for ``ttl_s`` seconds from ``now``."""
    user = (user or "").strip()
    if not user:
        raise SpecError("user must not be empty")
    _check_role(role)
    if not ttl_s or ttl_s <= 0:
        raise SpecError(f"ttl must be positive, got {ttl_s!r}")
    issued = _utc(now)
    claims = {
        "sub": user,
        "role": role,
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=ttl_s)).timestamp()),
        "iss": ISSUER,
    }
    return jwt.encode(claims, load_private_key(state_dir), algorithm=ALGORITHM)


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


def verify_token(
    token: str | None,
    *,
    state_dir: Path | None = None,
    public_key: Any = None,
    now: datetime | None = None,
) -> Identity:
    """The identity a token proves, or AccessDenied saying exactly why it proves none."""
    token = (token or "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        raise AccessDenied("no identity: set HMS_TOKEN or run `hms auth issue ...`")
    if public_key is None:
        if state_dir is None:
            raise ValueError("verify_token needs state_dir or public_key")
        key = load_public_key(state_dir)
    else:
        key = _coerce_public_key(public_key)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            # Time and issuer are checked below, against ``now`` and with precise messages.
            options={
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
    return Identity(user=user, role=role, issued_at=issued_at, expires_at=expires_at)


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
