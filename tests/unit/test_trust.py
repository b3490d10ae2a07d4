"""The image trust store: sign, verify, refuse changed or tampered images, revoke."""

from __future__ import annotations

import base64
import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hms_mgmt.auth import init_keys
from hms_mgmt.errors import HmsError, ImageUntrusted, SpecError
from hms_mgmt.trust import TrustRecord, TrustStore

IMAGE = "registry.gov/hms-ach:1.4"
ID_A = "sha256:" + "a" * 64
ID_B = "sha256:" + "b" * 64
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def test_sign_and_verify(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    record = store.sign(IMAGE, ID_A, signer="alice", now=T0)
    assert isinstance(record, TrustRecord)
    assert record.image == IMAGE and record.content_id == ID_A and record.signer == "alice"
    assert len(base64.b64decode(record.signature)) == 64  # an Ed25519 signature
    ok, reason = store.verify(IMAGE, ID_A)
    assert ok, reason
    assert reason == "signed by alice at 2025-01-01T12:00:00+00:00"
    assert store.require(IMAGE, ID_A) == reason
    # keys were created on demand, and the store is a JSON file in state_dir/trust
    assert (tmp_path / "keys" / "signing.pem").exists()
    data = json.loads((tmp_path / "trust" / "store.json").read_text())
    assert data["records"][IMAGE]["content_id"] == ID_A


def test_a_fresh_store_instance_reads_what_was_signed(tmp_path: Path) -> None:
    TrustStore(tmp_path).sign(IMAGE, ID_A, signer="alice")
    assert TrustStore(tmp_path).verify(IMAGE, ID_A)[0]


def test_not_signed(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    ok, reason = store.verify(IMAGE, ID_A)
    assert not ok and reason.startswith("not signed")
    store.sign("other:1", ID_A, signer="alice")
    ok, reason = store.verify(IMAGE, ID_A)
    assert not ok and reason.startswith("not signed")
    with pytest.raises(ImageUntrusted, match=f"image {IMAGE} is not trusted: not signed"):
        store.require(IMAGE, ID_A)


def test_changed_content_refused_naming_both_ids(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice")
    ok, reason = store.verify(IMAGE, ID_B)
    assert not ok
    assert reason == f"image changed since it was signed (signed content {ID_A}, now {ID_B})"
    with pytest.raises(ImageUntrusted, match="image changed since it was signed"):
        store.require(IMAGE, ID_B)
    # re-signing the new content replaces the record
    store.sign(IMAGE, ID_B, signer="bob")
    assert store.verify(IMAGE, ID_B)[0]
    assert not store.verify(IMAGE, ID_A)[0]
    assert len(store.list()) == 1


def _tamper(tmp_path: Path, key: str, **changes: str) -> None:
    path = tmp_path / "trust" / "store.json"
    data = json.loads(path.read_text())
    data["records"][key].update(changes)
    path.write_text(json.dumps(data))


def test_tampered_content_id_refused(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice")
    _tamper(tmp_path, IMAGE, content_id=ID_B)  # someone edits the store to bless new content
    ok, reason = store.verify(IMAGE, ID_B)
    assert not ok and reason.startswith("signature invalid")


def test_tampered_signature_refused(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    record = store.sign(IMAGE, ID_A, signer="alice")
    sig = bytearray(base64.b64decode(record.signature))
    sig[0] ^= 0xFF
    _tamper(tmp_path, IMAGE, signature=base64.b64encode(bytes(sig)).decode())
    ok, reason = store.verify(IMAGE, ID_A)
    assert not ok and reason.startswith("signature invalid")


def test_garbage_signature_refused(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice")
    _tamper(tmp_path, IMAGE, signature="not base64!!")
    ok, reason = store.verify(IMAGE, ID_A)
    assert not ok and reason.startswith("signature invalid")


def test_record_copied_to_another_image_refused(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice")
    path = tmp_path / "trust" / "store.json"
    data = json.loads(path.read_text())
    data["records"]["evil:1"] = data["records"][IMAGE]
    path.write_text(json.dumps(data))
    ok, reason = store.verify("evil:1", ID_A)
    assert not ok and reason.startswith("signature invalid")
    # and re-labelling the record's image field breaks the signature
    _tamper(tmp_path, "evil:1", image="evil:1")
    ok, reason = store.verify("evil:1", ID_A)
    assert not ok and reason.startswith("signature invalid")


def test_signed_by_another_key_refused(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice")
    init_keys(tmp_path, force=True)  # key rotated: old records no longer verify
    ok, reason = store.verify(IMAGE, ID_A)
    assert not ok and reason.startswith("signature invalid")


def test_revoke_and_list(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    assert store.list() == []
    assert store.revoke(IMAGE) is False
    store.sign("b-image:1", ID_B, signer="bob")
    store.sign("a-image:1", ID_A, signer="alice")
    assert [r.image for r in store.list()] == ["a-image:1", "b-image:1"]
    assert store.revoke("a-image:1") is True
    assert store.revoke("a-image:1") is False
    assert [r.image for r in store.list()] == ["b-image:1"]
    ok, reason = store.verify("a-image:1", ID_A)
    assert not ok and reason.startswith("not signed")


def test_store_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    for i in range(5):
        store.sign(f"img:{i}", ID_A, signer="alice")
    names = {p.name for p in (tmp_path / "trust").iterdir()}
    assert names <= {"store.json", ".lock"}
    assert stat.S_IMODE((tmp_path / "trust" / "store.json").stat().st_mode) & 0o022 == 0


def test_corrupt_store_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "store.json").write_text("{not json")
    with pytest.raises(HmsError, match="store.json is unreadable"):
        TrustStore(tmp_path).verify(IMAGE, ID_A)


@pytest.mark.parametrize(("image", "content_id", "signer"), [("", ID_A, "a"), (IMAGE, "", "a"), (IMAGE, ID_A, " ")])
def test_sign_requires_all_fields(tmp_path: Path, image: str, content_id: str, signer: str) -> None:
    with pytest.raises(SpecError, match="must not be empty"):
        TrustStore(tmp_path).sign(image, content_id, signer=signer)


DIGEST = "127.0.0.1:5000/hms-ach@sha256:" + "d" * 64


def test_a_pushed_image_is_signed_with_its_repo_digest(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice", repo_digest=DIGEST)
    assert store.verify(IMAGE, ID_A)[0]
    assert store.repo_digest(IMAGE, ID_A) == DIGEST
    assert store.repo_digest(IMAGE, ID_B) == ""  # a digest only for the signed content
    assert store.repo_digest("registry.gov/other:1", ID_A) == ""


def test_a_tampered_repo_digest_breaks_the_signature(tmp_path: Path) -> None:
    store = TrustStore(tmp_path)
    store.sign(IMAGE, ID_A, signer="alice", repo_digest=DIGEST)
    data = json.loads(store.path.read_text())
    data["records"][IMAGE]["repo_digest"] = "evil.example:5000/hms-ach@sha256:" + "e" * 64
    store.path.write_text(json.dumps(data))
    ok, reason = store.verify(IMAGE, ID_A)
    assert not ok and "altered" in reason
    assert store.repo_digest(IMAGE, ID_A) == ""


def test_a_repo_digest_must_be_a_digest_reference(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="repo_digest"):
        TrustStore(tmp_path).sign(IMAGE, ID_A, signer="alice", repo_digest="127.0.0.1:5000/hms-ach:1.4")
