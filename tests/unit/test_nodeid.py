"""Join tokens, node certificates, node statements and trust stamps (hms_mgmt/nodeid.py): pure
functions over a state directory, no Temporal."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hms_mgmt import nodeid, tickets
from hms_mgmt.errors import AccessDenied, HmsError
from hms_mgmt.models import PodStatus


@pytest.fixture
def control(tmp_path: Path) -> Path:
    d = tmp_path / "control"
    d.mkdir()
    tickets.ensure_control_key(d)
    return d


def token(control: Path, **kw: object) -> nodeid.JoinToken:
    text = nodeid.make_join_token(control, temporal_address="10.0.0.1:7233", task_queue="hms-control",
                                  ttl_s=kw.pop("ttl_s", 3600), **kw)  # type: ignore[arg-type]
    return nodeid.parse_join_token(text)


def test_a_token_names_the_control_plane_and_enrols_a_key(control: Path, tmp_path: Path) -> None:
    t = token(control)
    assert t.temporal_address == "10.0.0.1:7233" and t.task_queue == "hms-control"
    assert t.control_fingerprint == nodeid.pem_fingerprint(nodeid.control_public_pem(control))
    key = Ed25519PrivateKey.generate()
    req = nodeid.enrol_request(t, node="b", address="10.0.0.2", public_key=nodeid.raw_public(key))
    cert = nodeid.enrol(control, req)
    claims = nodeid.check_cert(control, cert, "b")
    assert claims["addr"] == "10.0.0.2" and nodeid.pub_of(claims) == nodeid.raw_public(key)
    # The control host stores the token's public half only, never the secret itself.
    text = (control / nodeid.ENROLMENT_FILE).read_text()
    seed = nodeid.make_join_token(control, temporal_address="x:1", task_queue="q", ttl_s=60).split(".")[2]
    assert seed not in (control / nodeid.ENROLMENT_FILE).read_text() and seed not in text
    # A node's host checks the certificate with control.pub alone.
    node_dir = tmp_path / "node"
    (node_dir / "keys").mkdir(parents=True)
    (node_dir / "keys" / "control.pub").write_bytes(nodeid.control_public_pem(control))
    assert nodeid.open_cert(node_dir, cert)["node"] == "b"


def test_expired_rotated_forged_and_stale_requests_are_refused(control: Path) -> None:
    key = nodeid.raw_public(Ed25519PrivateKey.generate())
    old = token(control)
    expired = token(control, ttl_s=1, now=time.time() - 10)
    with pytest.raises(AccessDenied, match="expired"):
        nodeid.enrol(control, nodeid.enrol_request(expired, node="b", address="10.0.0.2", public_key=key))
    with pytest.raises(AccessDenied, match="stale"):
        nodeid.enrol(control, nodeid.enrol_request(old, node="b", address="10.0.0.2", public_key=key,
                                                    now=time.time() - 3600))
    forged = nodeid.JoinToken(old.temporal_address, old.task_queue, old.control_fingerprint,
                              Ed25519PrivateKey.generate())
    with pytest.raises(AccessDenied, match="unknown or was rotated"):
        nodeid.enrol(control, nodeid.enrol_request(forged, node="b", address="10.0.0.2", public_key=key))
    token(control, rotate=True)
    with pytest.raises(AccessDenied, match="unknown or was rotated"):
        nodeid.enrol(control, nodeid.enrol_request(old, node="b", address="10.0.0.2", public_key=key))
    with pytest.raises(HmsError, match="not a join token"):
        nodeid.parse_join_token("hmsjoin1.nope")


def test_a_name_holds_one_key_until_removed(control: Path) -> None:
    t = token(control)
    k1, k2 = (nodeid.raw_public(Ed25519PrivateKey.generate()) for _ in range(2))
    cert1 = nodeid.enrol(control, nodeid.enrol_request(t, node="b", address="10.0.0.2", public_key=k1))
    with pytest.raises(AccessDenied, match="already enrolled with another key"):
        nodeid.enrol(control, nodeid.enrol_request(t, node="b", address="10.0.0.2", public_key=k2))
    assert nodeid.revoke(control, "b")
    with pytest.raises(AccessDenied, match="removed"):
        nodeid.check_cert(control, cert1, "b")
    # The token it joined with (made before the removal) does not bring it back; a new one does.
    with pytest.raises(AccessDenied, match="was removed; it joins again only with a join token made since"):
        nodeid.enrol(control, nodeid.enrol_request(t, node="b", address="10.0.0.2", public_key=k2))
    t = token(control)
    cert2 = nodeid.enrol(control, nodeid.enrol_request(t, node="b", address="10.0.0.2", public_key=k2))
    assert nodeid.check_cert(control, cert2, "b")["key"] != nodeid.open_cert(control, cert1)["key"]
    with pytest.raises(AccessDenied, match="replaced|removed"):
        nodeid.check_cert(control, cert1, "b")
    with pytest.raises(AccessDenied, match="not b's|not c's"):
        nodeid.check_cert(control, cert2, "c")


def test_a_certificate_signed_by_another_control_plane_is_refused(control: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    tickets.ensure_control_key(other)
    key = nodeid.raw_public(Ed25519PrivateKey.generate())
    forged = nodeid.enrol_key(other, node="b", address="10.0.0.2", public_key=key)
    with pytest.raises(AccessDenied, match="forged"):
        nodeid.check_cert(control, forged, "b")
    # ... and a ticket is no certificate
    with pytest.raises(AccessDenied, match="not a node certificate"):
        nodeid.open_cert(control, tickets.sign_claims(control, {"typ": "ticket", "node": "b"}))


def test_statements_bind_node_kind_message_and_time() -> None:
    key = Ed25519PrivateKey.generate()
    pub = nodeid.raw_public(key)
    said = nodeid.statement(key, "b", "heartbeat", {"x": 1})
    assert nodeid.check_statement(pub, said, node="b", kind="heartbeat", message={"x": 1}) > 0
    for kw, why in (({"node": "c"}, "not node c"), ({"kind": "register"}, "register"),
                    ({"message": {"x": 2}}, "another")):
        args = {"node": "b", "kind": "heartbeat", "message": {"x": 1}} | kw
        with pytest.raises(AccessDenied, match=why):
            nodeid.check_statement(pub, said, **args)  # type: ignore[arg-type]
    other = nodeid.raw_public(Ed25519PrivateKey.generate())
    with pytest.raises(AccessDenied, match="not node b's"):
        nodeid.check_statement(other, said, node="b", kind="heartbeat", message={"x": 1})
    old = nodeid.statement(key, "b", "heartbeat", {"x": 1}, now=time.time() - 3600)
    with pytest.raises(AccessDenied, match="stale"):
        nodeid.check_statement(pub, old, node="b", kind="heartbeat", message={"x": 1})
    with pytest.raises(AccessDenied, match="no signature"):
        nodeid.check_statement(pub, "", node="b", kind="heartbeat", message={"x": 1})


def test_a_pod_report_binds_the_service_and_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    pod = PodStatus(id="p", node="b", endpoint="10.0.0.2:4000", ready=True, health="healthy")
    signed = pod.model_copy(update={"report": nodeid.statement(key, "b", "pod", nodeid.pod_report_message("s", pod))})
    check = dict(node="b", kind="pod", max_age_s=60)
    nodeid.check_statement(nodeid.raw_public(key), signed.report, message=nodeid.pod_report_message("s", signed),
                           **check)  # type: ignore[arg-type]
    moved = signed.model_copy(update={"endpoint": "10.66.66.66:6666"})
    with pytest.raises(AccessDenied, match="another pod"):
        nodeid.check_statement(nodeid.raw_public(key), moved.report, message=nodeid.pod_report_message("s", moved),
                               **check)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="another pod"):
        nodeid.check_statement(nodeid.raw_public(key), signed.report,
                               message=nodeid.pod_report_message("t", signed), **check)  # type: ignore[arg-type]


def test_a_trust_stamp_is_for_one_start_and_expires(control: Path) -> None:
    args = dict(service="s", revision=2, image_id="sha256:abc", pod_id="p1", node="b")
    stamp = nodeid.issue_stamp(control, **args)  # type: ignore[arg-type]
    nodeid.check_stamp(control, stamp, **args)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="pod"):
        nodeid.check_stamp(control, stamp, **(args | {"pod_id": "p2"}))  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="expired"):
        nodeid.check_stamp(control, stamp, now=time.time() + nodeid.STAMP_TTL_S + 5, **args)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="no trust stamp"):
        nodeid.check_stamp(control, "", **args)  # type: ignore[arg-type]


def test_a_trust_stamp_names_where_the_node_may_pull_the_content(control: Path) -> None:
    args = dict(service="s", revision=2, image_id="sha256:abc", pod_id="p1", node="b")
    digest = "127.0.0.1:5000/s@sha256:" + "d" * 64
    assert nodeid.check_stamp(control, nodeid.issue_stamp(control, **args), **args) == ""  # type: ignore[arg-type]
    stamp = nodeid.issue_stamp(control, repo_digest=digest, **args)  # type: ignore[arg-type]
    assert nodeid.check_stamp(control, stamp, **args) == digest  # type: ignore[arg-type]


def test_the_control_host_enrols_its_own_node_and_a_joined_one_holds_no_control_key(control: Path,
                                                                                   tmp_path: Path) -> None:
    ident = nodeid.node_identity(control, "a", "127.0.0.1")
    assert nodeid.check_cert(control, ident.cert, "a")["addr"] == "127.0.0.1"
    assert nodeid.node_identity(control, "a", "127.0.0.1").cert == ident.cert  # kept across restarts
    assert not nodeid.is_joined(control)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(nodeid.NotJoined, match="hms node join"):
        nodeid.node_identity(bare, "c", "10.0.0.3")


def test_a_router_token_enrols_a_router_apart_from_nodes(control: Path) -> None:
    t = token(control, role="router")
    assert t.role == "router"
    key = nodeid.raw_public(Ed25519PrivateKey.generate())
    cert = nodeid.enrol(control, nodeid.enrol_request(t, node="edge", address="10.0.0.3", public_key=key))
    assert nodeid.check_cert(control, cert, "edge", role="router")["addr"] == "10.0.0.3"
    # A router's certificate is no node's, and its name is not a node's.
    with pytest.raises(AccessDenied, match="not a node certificate"):
        nodeid.check_cert(control, cert, "edge")
    assert "edge" not in nodeid.enrolled(control) and "edge" in nodeid.enrolled(control, "router")
    # A request claiming another role than its token's is refused.
    lying = nodeid.JoinToken(t.temporal_address, t.task_queue, t.control_fingerprint, t.key, role="node")
    with pytest.raises(AccessDenied, match="for a router"):
        nodeid.enrol(control, nodeid.enrol_request(lying, node="edge2", address="10.0.0.3", public_key=key))
    # Rotating router tokens leaves node tokens alone.
    n = token(control)
    token(control, role="router", rotate=True)
    with pytest.raises(AccessDenied, match="unknown or was rotated"):
        nodeid.enrol(control, nodeid.enrol_request(t, node="edge3", address="10.0.0.3", public_key=key))
    nodeid.enrol(control, nodeid.enrol_request(n, node="b", address="10.0.0.2", public_key=key))
    assert nodeid.revoke(control, "edge", role="router")
    with pytest.raises(AccessDenied, match="router edge was removed"):
        nodeid.node_public_key(control, "edge", role="router")


def test_the_feed_is_signed_by_the_control_key_and_checked_with_its_public_half(control: Path, tmp_path: Path
                                                                                ) -> None:
    from hms_mgmt import feed

    router_dir = tmp_path / "router"
    (router_dir / "keys").mkdir(parents=True)
    (router_dir / "keys" / "control.pub").write_bytes(nodeid.control_public_pem(control))  # all a router holds
    body = b'{"service":"a"}'
    sig = feed.sign(control, body)
    assert feed.verify(router_dir, body, sig) is None
    assert feed.verify(router_dir, b'{"service":"b"}', sig) == "bad signature"
    assert feed.verify(router_dir, body, feed.sign(control, body, kind="drained")) == "bad signature"
    assert feed.verify(router_dir, body, feed.sign(control, body, now=time.time() - 3600)) is not None
    other = tmp_path / "other"
    assert "forged" in (feed.verify(router_dir, body, feed.sign(other, body)) or "")
    assert feed.verify(router_dir, body, None) == "unsigned"
    assert feed.verify(router_dir, body, "x.y") is not None


def test_a_nodes_word_is_good_for_endpoints_on_its_own_address(control: Path) -> None:
    key = nodeid.raw_public(Ed25519PrivateKey.generate())
    nodeid.enrol_key(control, node="b", address="10.0.0.2", public_key=key)
    nodeid.check_endpoint_on_node(control, "b", "10.0.0.2:31000")
    for elsewhere in ("127.0.0.1:8233", "10.0.0.3:31000", "evil.example:80", "10.0.0.2", "10.0.0.2:x"):
        with pytest.raises(AccessDenied, match="not on node b's address"):
            nodeid.check_endpoint_on_node(control, "b", elsewhere)
    nodeid.enrol_key(control, node="c", address="fd00::5", public_key=nodeid.raw_public(Ed25519PrivateKey.generate()))
    nodeid.check_endpoint_on_node(control, "c", "[fd00::5]:31000")
