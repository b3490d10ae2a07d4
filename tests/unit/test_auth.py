"""Identity tokens, the access matrix, four-eyes approval and the local operator bootstrap."""

from __future__ import annotations

import json
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
    cert = token.split("~")[0]
    claims = jwt.decode(cert, options={"verify_signature": False})
    assert claims["iss"] == "hms-mgmt" and claims["sub"] == "alice" and claims["role"] == "ops_admin"
    assert jwt.get_unverified_header(cert)["alg"] == "EdDSA"
    # explicit public key instead of the state dir: the token key's, not the image key's
    assert verify_token(token, public_key=auth.load_token_public_key(tmp_path), now=T0).user == "alice"
    with pytest.raises(AccessDenied, match="signature is invalid"):
        verify_token(token, public_key=load_public_key(tmp_path), now=T0)


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
    token, holder = issue_token(tmp_path, user="viewer1", role="viewer", now=T0).split("~")
    header, _, signature = token.split(".")
    forged_claims = jwt.utils.base64url_encode(
        b'{"sub":"viewer1","role":"ops_admin","iat":1735732800,"exp":1735761600,"iss":"hms-mgmt"}'
    ).decode()
    with pytest.raises(AccessDenied, match="signature is invalid"):
        verify_token(f"{header}.{forged_claims}.{signature}~{holder}", state_dir=tmp_path, now=T0)


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
    return jwt.encode(claims, auth.load_token_key(tmp_path), algorithm="EdDSA")


@pytest.mark.parametrize(("claims", "why"), [
    ({"sub": "a", "role": "root", "iss": "hms-mgmt"}, "unknown role 'root'"),
    ({"sub": "a", "role": "viewer", "iss": "someone-else"}, "issued by 'someone-else', not 'hms-mgmt'"),
    ({"sub": "a", "iss": "hms-mgmt"}, "missing the 'role' claim"),
], ids=["unknown-role", "wrong-issuer", "missing-claim"])
def test_a_token_with_bad_claims_is_refused(tmp_path: Path, claims: dict, why: str) -> None:
    init_keys(tmp_path)
    iat = int(T0.timestamp())
    token = _signed(tmp_path, {**claims, "iat": iat, "exp": iat + 60})
    with pytest.raises(AccessDenied, match=why):
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
    "ops_admin": {"deploy", "scale", "undeploy", "update", "status", "logs", "secrets"},
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


# --- separate keys, request proofs, grants ----------------------------------------------


def test_tokens_and_image_signatures_use_separate_keys(tmp_path: Path) -> None:
    init_keys(tmp_path)
    keys = tmp_path / "keys"
    assert (keys / "token.pem").read_bytes() != (keys / "signing.pem").read_bytes()
    assert stat.S_IMODE((keys / "token.pem").stat().st_mode) == 0o600
    # A JWT signed with the image key (anyone who may sign images) is no token.
    iat = int(T0.timestamp())
    forged = jwt.encode({"sub": "eve", "role": "ops_admin", "iat": iat, "exp": iat + 60, "iss": "hms-mgmt"},
                        load_private_key(tmp_path), algorithm="EdDSA")
    with pytest.raises(AccessDenied, match="signature is invalid"):
        verify_token(forged + "~x", state_dir=tmp_path, now=T0)


def test_issuing_needs_the_token_key_file(tmp_path: Path) -> None:
    init_keys(tmp_path)
    (tmp_path / "keys" / "token.pem").unlink()  # a node: it has token.pub, not the private half
    with pytest.raises(HmsError, match=r"issuing a token needs the token key .*token\.pem.*control host"):
        issue_token(tmp_path, user="alice", role="ops_admin")
    assert not (tmp_path / "keys" / "token.pem").exists()  # never made as a side effect


def proof_for(tmp_path: Path, **kw: object) -> tuple[str, str]:
    token = issue_token(tmp_path, user="bob", role="gov_approver", now=T0)
    args = {"action": "approve", "service": "hms-ach", "bind": {"revision": 1, "spec": "sha256:aa"}, "now": T0}
    args.update(kw)
    return token, auth.prove(token, **args)  # type: ignore[arg-type]


def test_proof_is_bound_to_its_request(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token, proof = proof_for(tmp_path)
    want = {"action": "approve", "service": "hms-ach", "bind": {"revision": 1, "spec": "sha256:aa"}}
    proven = auth.verify_proof(proof, state_dir=tmp_path, now=T0, **want)  # type: ignore[arg-type]
    assert proven.identity.user == "bob" and proven.jti and token not in proof and token.split("~")[1] not in proof
    for change, match in [({"service": "hms-frm"}, "for service 'hms-ach', not 'hms-frm'"),
                          ({"action": "reject"}, "asks to approve, not to reject"),
                          ({"bind": {"revision": 2, "spec": "sha256:aa"}}, r"another revision \(1, not 2\)"),
                          ({"bind": {"revision": 1, "spec": "sha256:bb"}}, "another spec")]:
        with pytest.raises(auth.ProofMismatch, match=match):
            auth.verify_proof(proof, state_dir=tmp_path, now=T0, **{**want, **change})  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="expired"):
        auth.verify_proof(proof, state_dir=tmp_path, now=T0 + timedelta(minutes=10), **want)  # type: ignore[arg-type]


def test_a_token_or_a_bare_certificate_is_not_a_proof(tmp_path: Path) -> None:
    init_keys(tmp_path)
    token, proof = proof_for(tmp_path)
    with pytest.raises(AccessDenied, match="whole token was sent instead of a request proof"):
        auth.verify_proof(token, action="approve", service="hms-ach", state_dir=tmp_path, now=T0)
    cert = jwt.decode(proof, options={"verify_signature": False})["cert"]
    with pytest.raises(AccessDenied, match="no holder key"):
        auth.prove(cert, action="approve", service="hms-ach")  # copied from history: proves nothing
    # A proof re-signed by someone else's key (claims edited) fails on the holder's signature.
    claims = jwt.decode(proof, options={"verify_signature": False})
    other = auth.Ed25519PrivateKey.generate()
    forged = jwt.encode({**claims, "svc": "hms-frm"}, other, algorithm="EdDSA", headers={"typ": "hms-proof"})
    with pytest.raises(AccessDenied, match="not made by the token's holder"):
        auth.verify_proof(forged, action="approve", service="hms-frm", state_dir=tmp_path, now=T0)


def test_proof_lifetime_is_capped(tmp_path: Path) -> None:
    init_keys(tmp_path)
    with pytest.raises(SpecError, match="at most 3600s"):
        proof_for(tmp_path, ttl_s=7200)


def test_check_own_token_needs_the_action(tmp_path: Path) -> None:
    init_keys(tmp_path)
    viewer = issue_token(tmp_path, user="vic", role="viewer")
    assert auth.check_own_token(viewer, "status", tmp_path).user == "vic"
    (tmp_path / "access.yaml").write_text("viewer: []\nops_admin: [status]\n")
    with pytest.raises(AccessDenied, match=r"vic \(viewer\) may not status"):
        auth.check_own_token(viewer, "status", tmp_path)


def test_grants_are_bound_and_signed_by_the_control_key(tmp_path: Path) -> None:
    from hms_mgmt import tickets

    g = tickets.grant(tmp_path, action="approve", service="a", user="bob", role="gov_approver",
                      bind={"revision": 2, "spec": "sha256:aa", "request": "2-1"})
    claims = tickets.check_grant(tmp_path, g, service="a", actions={"approve"}, bind={"revision": 2})
    assert claims["sub"] == "bob"
    with pytest.raises(AccessDenied, match="another revision"):
        tickets.check_grant(tmp_path, g, service="a", actions={"approve"}, bind={"revision": 3})
    with pytest.raises(AccessDenied, match="not deploy/update on a"):
        tickets.check_grant(tmp_path, g, service="a", actions={"deploy", "update"})
    ticket = tickets.issue(tmp_path, service="a", revision=2, spec=_spec(), image_id="sha256:x")
    with pytest.raises(AccessDenied, match="not a grant"):
        tickets.check_grant(tmp_path, ticket, service="a", actions={"approve"})


def _spec():
    from hms_mgmt.models import ServiceSpec

    return ServiceSpec(name="a", image="registry.gov/a:1", port=8080, min_replicas=1, max_replicas=1, cpu_target=70)


def test_legacy_token_of_this_host_is_renewed_with_its_role(tmp_path: Path) -> None:
    init_keys(tmp_path)
    iat = int(datetime.now(UTC).timestamp())
    legacy = jwt.encode({"sub": "grace", "role": "gov_approver", "iat": iat, "exp": iat + 3600, "iss": "hms-mgmt"},
                        load_private_key(tmp_path), algorithm="EdDSA")
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path)})
    settings.write_config(token=legacy)
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(tmp_path)})
    token = ensure_local_operator(settings)
    assert token != legacy and "~" in token
    identity = verify_token(token, state_dir=tmp_path)
    assert identity.user == "grace" and identity.role == "gov_approver"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["token"] == token


def test_a_proof_is_taken_by_one_run_until_it_expires(tmp_path: Path):
    soon = datetime.now(UTC) + timedelta(minutes=5)
    proven = auth.Proven(identity=ident("alice", "ops_admin"), jti="j1", expires_at=soon)
    auth.take_proof(tmp_path, proven, "run-a")
    auth.take_proof(tmp_path, proven, "run-a")  # the same run again (an activity retried): still its own
    with pytest.raises(AccessDenied, match="already used"):
        auth.take_proof(tmp_path, proven, "run-b")
    other = auth.Proven(identity=proven.identity, jti="j2", expires_at=soon)
    auth.take_proof(tmp_path, other, "run-b")
    # Once verify_proof refuses it (expired, past the clock skew it tolerates), the record of it goes.
    auth.take_proof(tmp_path, auth.Proven(identity=proven.identity, jti="j3", expires_at=soon), "run-c",
                    now=soon.timestamp() + auth.CLOCK_SKEW_S + 1)
    assert set(json.loads((tmp_path / auth.PROOFS_TAKEN).read_text())) == {"j3"}
    assert stat.S_IMODE((tmp_path / auth.PROOFS_TAKEN).stat().st_mode) == 0o600


def test_a_proof_stays_taken_for_as_long_as_verify_proof_accepts_it(tmp_path: Path):
    """verify_proof accepts a proof until its expiry plus CLOCK_SKEW_S: its record lasts as long,
    or another run could present it in that last minute."""
    state = tmp_path / "state"
    auth.init_keys(state)
    token = auth.issue_token(state, user="alice", role="ops_admin")
    t0 = datetime.now(UTC)
    proof = auth.prove(token, action="undeploy", service="pay", now=t0)
    first = auth.verify_proof(proof, action="undeploy", service="pay", state_dir=state, now=t0)
    auth.take_proof(state, first, "run-a", now=t0.timestamp())
    late = t0 + timedelta(seconds=auth.PROOF_TTL_S + auth.CLOCK_SKEW_S / 2)
    again = auth.verify_proof(proof, action="undeploy", service="pay", state_dir=state, now=late)  # still accepted
    with pytest.raises(AccessDenied, match="already used"):
        auth.take_proof(state, again, "run-b", now=late.timestamp())
    auth.take_proof(state, again, "run-a", now=late.timestamp())  # its own run's retry
    gone = t0 + timedelta(seconds=auth.PROOF_TTL_S + auth.CLOCK_SKEW_S + 1)
    with pytest.raises(AccessDenied, match="expired"):
        auth.verify_proof(proof, action="undeploy", service="pay", state_dir=state, now=gone)
