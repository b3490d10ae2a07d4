"""Identity tokens, the access matrix, four-eyes approval and the local operator bootstrap."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
import yaml

from hms_mgmt import auth
from hms_mgmt.auth import (
    DEFAULT_ACCESS,
    Identity,
    authorize,
    check_approver,
    ensure_local_operator,
    init_keys,
    issue_token,
    load_access_matrix,
    load_private_key,
    load_public_key,
    parse_ttl,
    verify_token,
)
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied, ConfigError, HmsError, SpecError

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def ident(user: str, role: str) -> Identity:
    return Identity(user=user, role=role, issued_at=T0, expires_at=T0 + timedelta(hours=1))


# --- keys ---------------------------------------------------------------------------


def test_init_keys_creates_private_key_with_tight_modes(tmp_path: Path) -> None:
    path = init_keys(tmp_path)
    assert path == tmp_path / "keys" / "signing.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert (tmp_path / "keys" / "signing.pub").exists()
    assert b"PRIVATE KEY" in path.read_bytes()


def test_init_keys_is_idempotent_unless_forced(tmp_path: Path) -> None:
    init_keys(tmp_path)
    first = (tmp_path / "keys" / "signing.pem").read_bytes()
    init_keys(tmp_path)
    assert (tmp_path / "keys" / "signing.pem").read_bytes() == first
    init_keys(tmp_path, force=True)
    assert (tmp_path / "keys" / "signing.pem").read_bytes() != first
    # the public half follows the private one
    assert load_public_key(tmp_path).public_bytes_raw() == load_private_key(tmp_path).public_key().public_bytes_raw()


def test_init_keys_restores_a_missing_public_key(tmp_path: Path) -> None:
    init_keys(tmp_path)
    (tmp_path / "keys" / "signing.pub").unlink()
    init_keys(tmp_path)
    assert load_public_key(tmp_path).public_bytes_raw() == load_private_key(tmp_path).public_key().public_bytes_raw()


def test_missing_keys_say_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(HmsError, match="hms auth init"):
        load_private_key(tmp_path)
    with pytest.raises(AccessDenied, match="hms auth init"):
        load_public_key(tmp_path)
    with pytest.raises(HmsError, match="hms auth init"):
        issue_token(tmp_path, user="alice", role="ops_admin")


# --- tokens -------------------------------------------------------------------------


def test_issue_verify_round_trip(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token = issue_token(tmp_path, user="alice", role="ops_admin", ttl_s=3600, now=T0)
    identity = verify_token(token, state_dir=tmp_path, now=T0 + timedelta(minutes=5))
    assert identity.user == "alice"
    assert identity.role == "ops_admin"
    assert identity.issued_at == T0
    assert identity.expires_at == T0 + timedelta(hours=1)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "hms-mgmt" and claims["sub"] == "alice" and claims["role"] == "ops_admin"
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    # explicit public key instead of the state dir
    assert verify_token(token, public_key=load_public_key(tmp_path), now=T0).user == "alice"


def test_verify_with_real_clock(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token = issue_token(tmp_path, user="bob", role="viewer")
    assert verify_token(f"  {token}\n", state_dir=tmp_path).role == "viewer"


@pytest.mark.parametrize("role", ["root", "", "OPS_ADMIN"])
def test_issue_unknown_role_names_valid_ones(tmp_path: Path, role: str) -> None:
    init_keys(tmp_path)
    with pytest.raises(SpecError, match="ops_admin, gov_approver, viewer") as e:
        issue_token(tmp_path, user="alice", role=role)
    assert repr(role) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_issue_empty_user_refused(tmp_path: Path) -> None:
    init_keys(tmp_path)
    with pytest.raises(SpecError, match="user"):
        issue_token(tmp_path, user="  ", role="viewer")


@pytest.mark.parametrize("token", [None, "", "   "])
def test_no_token(tmp_path: Path, token: str | None) -> None:
    init_keys(tmp_path)
    with pytest.raises(AccessDenied, match="no identity: set HMS_TOKEN"):
        verify_token(token, state_dir=tmp_path)


def test_expired_token_says_when(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token = issue_token(tmp_path, user="alice", role="ops_admin", ttl_s=60, now=T0)
    with pytest.raises(AccessDenied, match=r"expired at 2025-01-01T12:01:00\+00:00 \(2m ago\)"):
        verify_token(token, state_dir=tmp_path, now=T0 + timedelta(minutes=3))
    # exactly at expiry it is already expired
    with pytest.raises(AccessDenied, match="expired"):
        verify_token(token, state_dir=tmp_path, now=T0 + timedelta(seconds=60))


def test_token_signed_by_another_key(tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_keys(tmp_path)
    init_keys(other)
    token = issue_token(other, user="mallory", role="ops_admin", now=T0)
    with pytest.raises(AccessDenied, match="signature is invalid"):
        verify_token(token, state_dir=tmp_path, now=T0)


def test_token_invalid_after_forced_key_rotation(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token = issue_token(tmp_path, user="alice", role="ops_admin", now=T0)
    init_keys(tmp_path, force=True)
    with pytest.raises(AccessDenied, match="signature is invalid"):
        verify_token(token, state_dir=tmp_path, now=T0)


def test_tampered_token(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token = issue_token(tmp_path, user="viewer1", role="viewer", now=T0)
    header, _, signature = token.split(".")
    forged_claims = jwt.utils.base64url_encode(
        b'{"sub":"viewer1","role":"ops_admin","iat":1735732800,"exp":1735761600,"iss":"hms-mgmt"}'
    ).decode()
    with pytest.raises(AccessDenied, match="signature is invalid"):
        verify_token(f"{header}.{forged_claims}.{signature}", state_dir=tmp_path, now=T0)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "x.y"])
def test_malformed_token(tmp_path: Path, token: str) -> None:
    init_keys(tmp_path)
    with pytest.raises(AccessDenied, match="malformed token"):
        verify_token(token, state_dir=tmp_path, now=T0)


def test_hmac_signed_token_refused(tmp_path: Path) -> None:
    """Only EdDSA is accepted, so a token minted with a shared secret (alg confusion) fails."""
    init_keys(tmp_path)
    claims = {"sub": "eve", "role": "ops_admin", "iat": 1735732800, "exp": 1735761600, "iss": "hms-mgmt"}
    forged = jwt.encode(claims, "a-guessable-shared-secret-0123456789abcdef", algorithm="HS256")
    with pytest.raises(AccessDenied, match="not signed with EdDSA"):
        verify_token(forged, state_dir=tmp_path, now=T0)


def _signed(tmp_path: Path, claims: dict) -> str:
    return jwt.encode(claims, load_private_key(tmp_path), algorithm="EdDSA")


def test_unknown_role_in_token(tmp_path: Path) -> None:
    init_keys(tmp_path)
    iat = int(T0.timestamp())
    token = _signed(tmp_path, {"sub": "a", "role": "root", "iat": iat, "exp": iat + 60, "iss": "hms-mgmt"})
    with pytest.raises(AccessDenied, match="unknown role 'root'"):
        verify_token(token, state_dir=tmp_path, now=T0)


def test_wrong_issuer(tmp_path: Path) -> None:
    init_keys(tmp_path)
    iat = int(T0.timestamp())
    token = _signed(tmp_path, {"sub": "a", "role": "viewer", "iat": iat, "exp": iat + 60, "iss": "someone-else"})
    with pytest.raises(AccessDenied, match="issued by 'someone-else', not 'hms-mgmt'"):
        verify_token(token, state_dir=tmp_path, now=T0)


def test_missing_claim(tmp_path: Path) -> None:
    init_keys(tmp_path)
    iat = int(T0.timestamp())
    token = _signed(tmp_path, {"sub": "a", "iat": iat, "exp": iat + 60, "iss": "hms-mgmt"})
    with pytest.raises(AccessDenied, match="missing the 'role' claim"):
        verify_token(token, state_dir=tmp_path, now=T0)


def test_token_from_the_future(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token = issue_token(tmp_path, user="a", role="viewer", now=T0 + timedelta(hours=1))
    with pytest.raises(AccessDenied, match="in the future"):
        verify_token(token, state_dir=tmp_path, now=T0)
    # small skew is tolerated
    token = issue_token(tmp_path, user="a", role="viewer", now=T0 + timedelta(seconds=30))
    assert verify_token(token, state_dir=tmp_path, now=T0).user == "a"


def test_verify_without_keys_is_denied(tmp_path: Path) -> None:
    with pytest.raises(AccessDenied, match="hms auth init"):
        verify_token("a.b.c", state_dir=tmp_path)


# --- ttl ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("8h", 28800), ("30m", 1800), ("45s", 45), ("2d", 172800), ("3600", 3600), ("1.5h", 5400), (" 10M ", 600), (90, 90)],
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "8x", "-5m", "0", "ten minutes", "8h30m", "367d", "99999999d", float("inf"), float("nan")])
def test_parse_ttl_errors(text: str) -> None:
    with pytest.raises(SpecError, match="invalid TTL"):
        parse_ttl(text)


# --- access -------------------------------------------------------------------------

EXPECTED = {
    "ops_admin": {"deploy", "scale", "undeploy", "update", "status", "logs"},
    "gov_approver": {"approve", "reject", "status", "logs"},
    "viewer": {"status", "logs"},
}


@pytest.mark.parametrize("role", sorted(EXPECTED))
@pytest.mark.parametrize("action", list(auth.ACTIONS))
def test_default_matrix_for_every_role_and_action(role: str, action: str) -> None:
    identity = ident("u", role)
    if action in EXPECTED[role]:
        authorize(identity, action)
    else:
        with pytest.raises(AccessDenied) as e:
            authorize(identity, action)
        allowed = ", ".join(r for r in DEFAULT_ACCESS if action in DEFAULT_ACCESS[r])
        assert str(e.value) == f"u ({role}) may not {action}; allowed roles: {allowed}"


def test_authorize_unknown_action() -> None:
    with pytest.raises(SpecError, match="unknown action 'reboot'"):
        authorize(ident("u", "ops_admin"), "reboot")


def test_load_access_matrix_default(tmp_path: Path) -> None:
    matrix = load_access_matrix(tmp_path)
    assert matrix == DEFAULT_ACCESS
    matrix["viewer"].append("deploy")  # a copy: the defaults stay intact
    assert "deploy" not in DEFAULT_ACCESS["viewer"]


def test_custom_access_yaml(tmp_path: Path) -> None:
    (tmp_path / "access.yaml").write_text(
        yaml.safe_dump({"ops_admin": ["deploy", "status", "approve"], "viewer": ["status", "status"]})
    )
    matrix = load_access_matrix(tmp_path)
    assert matrix == {"ops_admin": ["deploy", "status", "approve"], "viewer": ["status"]}
    authorize(ident("o", "ops_admin"), "approve", matrix)
    with pytest.raises(AccessDenied, match="may not scale; allowed roles: none"):
        authorize(ident("o", "ops_admin"), "scale", matrix)
    with pytest.raises(AccessDenied, match="may not logs"):
        authorize(ident("v", "viewer"), "logs", matrix)
    # a role not listed may do nothing
    with pytest.raises(AccessDenied, match=r"g \(gov_approver\) may not approve; allowed roles: ops_admin"):
        check_approver(ident("g", "gov_approver"), "someone", matrix)
    check_approver(ident("o", "ops_admin"), "someone", matrix)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("superuser: [deploy]\n", "unknown role 'superuser'"),
        ("viewer: [status, reboot]\n", "role 'viewer' has unknown action 'reboot'"),
        ("viewer: status\n", "role 'viewer' must map to a list"),
        ("- viewer\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("viewer: [status\n", "not valid YAML"),
    ],
)
def test_bad_access_yaml(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "access.yaml").write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_access_matrix(tmp_path)
    assert "access.yaml" in str(e.value)


def test_access_yaml_null_means_nothing(tmp_path: Path) -> None:
    (tmp_path / "access.yaml").write_text("viewer:\nops_admin: [deploy]\n")
    assert load_access_matrix(tmp_path) == {"viewer": [], "ops_admin": ["deploy"]}


# --- four eyes ----------------------------------------------------------------------


def test_approver_may_approve_someone_elses_request() -> None:
    check_approver(ident("grace", "gov_approver"), "alice")


def test_self_approval_refused() -> None:
    with pytest.raises(AccessDenied, match="four eyes: grace may not approve their own request"):
        check_approver(ident("grace", "gov_approver"), "grace")
    with pytest.raises(AccessDenied, match="four eyes"):
        check_approver(ident("Grace", "gov_approver"), " grace ")


@pytest.mark.parametrize("role", ["ops_admin", "viewer"])
def test_only_approver_role_may_approve(role: str) -> None:
    with pytest.raises(AccessDenied, match="may not approve; allowed roles: gov_approver"):
        check_approver(ident("x", role), "alice")


# --- local operator bootstrap ---------------------------------------------------------


def test_ensure_local_operator_writes_a_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "dana")
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path)})
    assert not settings.token
    token = ensure_local_operator(settings)
    assert token and settings.token == token
    assert (tmp_path / "keys" / "signing.pem").exists()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["token"] == token
    identity = verify_token(token, state_dir=tmp_path)
    assert identity.user == "dana" and identity.role == "ops_admin"
    assert identity.expires_at - identity.issued_at == timedelta(days=30)

    # a second run (config file now holds the token) keeps it
    again = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path)})
    assert ensure_local_operator(again) == token
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["token"] == token


def test_ensure_local_operator_never_overwrites_a_configured_token(tmp_path: Path) -> None:
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path), "HMS_TOKEN": "configured-elsewhere"})
    assert ensure_local_operator(settings) == "configured-elsewhere"
    assert not (tmp_path / "config.yaml").exists()
    assert (tmp_path / "keys" / "signing.pem").exists()

    settings.write_config(token="stale", namespace="ns1")
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path)})
    assert ensure_local_operator(settings) == "stale"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == {"token": "stale", "namespace": "ns1"}


def test_ensure_local_operator_defaults_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USER", raising=False)
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path)})
    token = ensure_local_operator(settings)
    assert verify_token(token, state_dir=tmp_path).user == "operator"
