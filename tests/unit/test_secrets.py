"""Secrets (issue 21): the store at rest, sealing to one node, and the spec's shape."""

from __future__ import annotations

import base64
import json
import os
import secrets as stdlib_secrets
import stat
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hms_mgmt import nodeid, tickets
from hms_mgmt import secrets as store
from hms_mgmt.errors import AccessDenied, PodRuntimeError, SpecError
from hms_mgmt.models import SecretRef, ServiceSpec

BASE = {"name": "hms-ach", "image": "registry.gov/hms-ach:1.4", "min_replicas": 1, "max_replicas": 2, "cpu_target": 60}
POD = str(uuid.uuid4())


@pytest.fixture
def state(tmp_path: Path) -> Path:
    tickets.ensure_control_key(tmp_path)
    return tmp_path


def _value() -> bytes:
    return stdlib_secrets.token_hex(16).encode()  # 32 characters


def _seal(state: Path, key: Ed25519PrivateKey, refs: list[SecretRef], **over: object) -> str:
    bind = {"service": "hms-ach", "revision": 1, "pod_id": POD, "node": "n1", **over}
    bundle, _ = store.seal(state, refs, nodeid.raw_public(key), **bind)  # type: ignore[arg-type]
    return bundle


def test_at_rest_encrypted_key_private_and_versions(state: Path) -> None:
    value = _value()
    info = store.set_secret(state, "bank-key", value, by="alice")
    assert (info.name, info.version, info.set_by) == ("bank-key", 1, "alice")
    assert store.set_secret(state, "bank-key", value + b"2", by="bob").version == 2
    for path in (state / "secrets.json", state / "keys" / "secrets.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert value not in path.read_bytes() and base64.b64encode(value) not in path.read_bytes()
    assert store.read_secret(state, "bank-key") == (2, value + b"2")
    assert [(i.name, i.version, i.set_by) for i in store.list_secrets(state)] == [("bank-key", 2, "bob")]
    assert value not in json.dumps([i.model_dump(mode="json") for i in store.list_secrets(state)]).encode()
    assert store.remove_secret(state, "bank-key") and not store.list_secrets(state)


def test_stored_value_tamper_detected(state: Path) -> None:
    store.set_secret(state, "a", b"x" * 32, by="alice")
    data = json.loads((state / "secrets.json").read_text())
    data["secrets"]["a"]["version"] = 7  # bound as associated data
    (state / "secrets.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="damaged"):
        store.read_secret(state, "a")


def test_seal_round_trip_only_on_its_node(state: Path) -> None:
    value = _value()
    store.set_secret(state, "bank-key", value, by="alice")
    node, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    refs = [SecretRef(name="bank-key", target="bank.pem")]
    bundle = _seal(state, node, refs)
    assert value not in bundle.encode() and base64.urlsafe_b64encode(value).rstrip(b"=") not in bundle.encode()
    files = store.open_bundle(state, node, bundle, service="hms-ach", revision=1, pod_id=POD, node="n1")
    assert [(f.name, f.file, f.version, f.value) for f in files] == [("bank-key", "bank.pem", 1, value)]
    assert value.decode() not in repr(files)
    with pytest.raises(AccessDenied, match="does not open"):
        store.open_bundle(state, other, bundle, service="hms-ach", revision=1, pod_id=POD, node="n1")
    with pytest.raises(AccessDenied, match="another pod"):
        store.open_bundle(state, node, bundle, service="hms-ach", revision=1, pod_id=str(uuid.uuid4()), node="n1")
    with pytest.raises(AccessDenied, match="expired"):
        store.open_bundle(state, node, bundle, service="hms-ach", revision=1, pod_id=POD, node="n1",
                          now=9e12)


def test_tampered_or_forged_bundle_refused(state: Path) -> None:
    store.set_secret(state, "bank-key", _value(), by="alice")
    node = Ed25519PrivateKey.generate()
    bundle = _seal(state, node, [SecretRef(name="bank-key")])
    head, sig = bundle.split(".")
    claims = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    ct = bytearray(base64.urlsafe_b64decode(claims["ct"] + "=="))
    ct[0] ^= 1
    claims["ct"] = base64.urlsafe_b64encode(bytes(ct)).decode().rstrip("=")
    forged_head = base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(AccessDenied, match="forged or damaged"):  # the control plane's signature
        store.open_bundle(state, node, forged_head.decode().rstrip("=") + "." + sig, service="hms-ach", revision=1,
                          pod_id=POD, node="n1")
    # Re-signed by the control key (an insider's tamper), the AEAD still refuses it.
    resigned = tickets.sign_claims(state, claims)
    with pytest.raises(AccessDenied, match="does not open"):
        store.open_bundle(state, node, resigned, service="hms-ach", revision=1, pod_id=POD, node="n1")
    # Sealed by someone without the control key: refused.
    other_state = state / "other"
    tickets.ensure_control_key(other_state)
    store.set_secret(other_state, "bank-key", b"attacker's", by="mallory")
    forged = _seal(other_state, node, [SecretRef(name="bank-key")])
    with pytest.raises(AccessDenied, match="forged or damaged"):
        store.open_bundle(state, node, forged, service="hms-ach", revision=1, pod_id=POD, node="n1")


def test_open_for_pod_needs_the_specs_bundle(state: Path) -> None:
    store.set_secret(state, "bank-key", _value(), by="alice")
    key = Ed25519PrivateKey.generate()
    spec = ServiceSpec(**BASE, secrets=["bank-key"])
    identity = SimpleNamespace(node="n1", key=key)
    inp = SimpleNamespace(spec=spec, secrets="", service="hms-ach", revision=1, pod_id=POD)
    with pytest.raises(PodRuntimeError, match="carries no sealed secrets"):
        store.open_for_pod(identity, state, inp)
    inp.secrets = _seal(state, key, [SecretRef(name="bank-key")])
    assert [f.name for f in store.open_for_pod(identity, state, inp)] == ["bank-key"]
    assert store.open_for_pod(identity, state, SimpleNamespace(spec=ServiceSpec(**BASE))) == []


def test_admission_refusals(state: Path) -> None:
    value = _value()
    store.set_secret(state, "bank-key", value, by="alice")
    with pytest.raises(SpecError, match="no secret other"):
        store.check_spec(state, ServiceSpec(**BASE, secrets=["bank-key", "other"]))
    with pytest.raises(SpecError, match="env: a value is a stored secret's.*secrets:") as leaked:
        store.check_spec(state, ServiceSpec(**BASE, env={"A": "1", "BANK": value.decode(), "Z": "2"}))
    assert "BANK" not in str(leaked.value) and "bank-key" not in str(leaked.value)  # no oracle: which one matched
    store.check_spec(state, ServiceSpec(**BASE, secrets=["bank-key"], env={"X": "1"}))


def test_spec_shape_and_digest() -> None:
    plain = ServiceSpec(**BASE)
    assert plain.digest() == "sha256:" + __import__("hashlib").sha256(json.dumps(
        plain.model_dump(mode="json", exclude={"time_slots", "secrets"}), sort_keys=True,
        separators=(",", ":")).encode()).hexdigest()
    assert "secrets" not in plain.pod_template()
    spec = ServiceSpec(**BASE, secrets=["bank-key", {"name": "tls", "target": "tls.pem"}])
    assert [(r.name, r.file) for r in spec.secrets] == [("bank-key", "bank-key"), ("tls", "tls.pem")]
    assert spec.digest() != plain.digest() and "secrets" in spec.pod_template()
    for bad in (["../etc"], [{"name": "a", "target": "x/y"}], ["a", {"name": "b", "target": "a"}]):
        with pytest.raises(ValueError):
            ServiceSpec(**BASE, secrets=bad)


def test_x25519_of_an_ed25519_key_matches() -> None:
    key = Ed25519PrivateKey.generate()
    mine = store.x25519_private(key).public_key()
    assert store._raw(mine) == store._raw(store.x25519_public(nodeid.raw_public(key)))


def test_pod_files_on_tmpfs_0400(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pod = str(uuid.uuid4())
    value = _value()
    where = store.write_pod_files(pod, [store.SecretFile(name="a", file="a.txt", version=1, value=value)],
                                  uid=os.getuid(), gid=os.getgid())
    try:
        assert store._on_tmpfs(where)
        assert stat.S_IMODE((where / "a.txt").stat().st_mode) == 0o400
        assert stat.S_IMODE(where.stat().st_mode) == 0o500
        assert (where / "a.txt").read_bytes() == value
    finally:
        store.remove_pod_files(pod)
    assert not where.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: files are owned by another uid")
def test_a_container_pods_files_are_out_of_reach_of_a_host_account_with_the_images_uid() -> None:
    """A container engine's pod files are owned by the image's uid (say 1000), which on the host
    is some account's: that account must not get through to them; a process pod's own uid must."""
    uid = 1_899_999_123  # an account of the host that shares the image's uid
    read = ["python3", "-c", "import sys; print(open(sys.argv[1]).read())"]
    for engine, readable in ((True, False), (False, True)):
        pod = str(uuid.uuid4())
        where = store.write_pod_files(pod, [store.SecretFile(name="a", file="a.txt", version=1, value=b"v")],
                                      uid=uid, gid=uid, engine=engine)
        try:
            assert where.parent == (store.ENGINE_ROOT if engine else store.TMPFS_ROOT)
            got = subprocess.run([*read, str(where / "a.txt")], user=uid, group=uid, extra_groups=[],
                                 capture_output=True, text=True, check=False)
            assert (got.returncode == 0) == readable, (engine, got.stdout, got.stderr)
            if not readable:
                assert "Permission denied" in got.stderr
        finally:
            store.remove_pod_files(pod)
        assert not where.exists()


def test_earlier_versions_kept_for_pinned_revisions(state: Path) -> None:
    for n in range(1, 8):
        store.set_secret(state, "a", f"value-{n}".encode(), by="alice")
    assert store.read_secret(state, "a") == (7, b"value-7")
    assert store.read_secret(state, "a", 2) == (2, b"value-2")
    assert store.missing(state, [SecretRef(name="a", version=1), SecretRef(name="a", version=3), SecretRef(name="b")]
                         ) == ["a v1", "b"]
    key = Ed25519PrivateKey.generate()
    bundle, versions = store.seal(state, [SecretRef(name="a", version=4)], nodeid.raw_public(key), service="hms-ach",
                                  revision=1, pod_id=POD, node="n1")
    assert versions == {"a": 4}
    opened = store.open_bundle(state, key, bundle, service="hms-ach", revision=1, pod_id=POD, node="n1")
    assert [(f.version, f.value) for f in opened] == [(4, b"value-4")]
    assert b"value-" not in (state / "secrets.json").read_bytes()
