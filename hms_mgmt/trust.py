"""The image trust store: an image may start only once it is marked signed and safe.

A record binds an image reference to its content identity (a Docker image ID, or a hash of the
process runtime's catalog entry, computed by the caller) with an Ed25519 signature from the
state directory's signing key, so a retagged or rebuilt image is refused until re-signed.

When the image was pushed to a registry, the record also binds its repo digest
(``repo@sha256:...``, the manifest's digest): a node that lacks the content pulls exactly that,
checks that it is the signed content, and runs it by content id, whatever the tag says there.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ValidationError

from hms_mgmt.auth import init_keys, keys_dir, load_private_key, load_public_key
from hms_mgmt.errors import AccessDenied, HmsError, ImageUntrusted, SpecError
from hms_mgmt.files import atomic_write, open_private

STORE_VERSION = 1


class TrustRecord(BaseModel):
    """One signed statement: ``signer`` vouched for ``image`` having content ``content_id``."""

    image: str
    content_id: str
    signer: str
    signed_at: datetime
    signature: str  # base64 Ed25519 signature over signed_message(image, content_id, repo_digest)
    repo_digest: str = ""  # where the content can be pulled by digest ("" when never pushed)


def signed_message(image: str, content_id: str, repo_digest: str = "") -> bytes:
    """The exact bytes a trust signature covers (records without a digest keep their old bytes)."""
    return f"{image}\n{content_id}".encode() + (f"\n{repo_digest}".encode() if repo_digest else b"")


def sign_from(store: TrustStore, runtime: Any, image: str, *, signer: str) -> TrustRecord:
    """Sign ``image`` as ``runtime`` holds it now: its content id and, once pushed, its repo digest."""
    return store.sign(image, runtime.content_id(image), signer=signer, repo_digest=runtime.repo_digest(image))


class TrustStore:
    """Trust records kept as JSON in ``state_dir/trust/store.json``, one per image reference."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "trust"
        self.path = self.dir / "store.json"

    # --- storage ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-modify-write across processes (CLI and worker may sign at once)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with os.fdopen(open_private(self.dir / ".lock", os.O_WRONLY | os.O_CREAT), "w") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise HmsError(f"trust store {self.path} is unreadable ({e}): fix or remove it and re-sign") from e
        records = data.get("records") if isinstance(data, dict) else None
        if not isinstance(records, dict):
            raise HmsError(f"trust store {self.path} has no 'records' mapping: fix or remove it and re-sign")
        return records

    def _save(self, records: dict[str, dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": STORE_VERSION, "records": records}, indent=2, sort_keys=True)
        atomic_write(self.path, payload + "\n")

    # --- API -------------------------------------------------------------------------

    def sign(self, image: str, content_id: str, *, signer: str, now: datetime | None = None,
             repo_digest: str = "") -> TrustRecord:
        """Mark ``image`` with content ``content_id`` as signed and safe (replaces any earlier record)."""
        for name, value in (("image", image), ("content_id", content_id), ("signer", signer)):
            if not value or not value.strip():
                raise SpecError(f"{name} must not be empty")
        if "\n" in image or "\n" in content_id or "\n" in repo_digest:
            raise SpecError("image, content_id and repo_digest must not contain newlines")
        if repo_digest and "@sha256:" not in repo_digest:
            raise SpecError(f"repo_digest {repo_digest!r} is not a digest reference (repo@sha256:...)")
        if not (keys_dir(self.state_dir) / "signing.pem").exists():
            init_keys(self.state_dir)
        key = load_private_key(self.state_dir)
        record = TrustRecord(
            image=image,
            content_id=content_id,
            signer=signer,
            signed_at=now or datetime.now(UTC),
            signature=base64.b64encode(key.sign(signed_message(image, content_id, repo_digest))).decode(),
            repo_digest=repo_digest,
        )
        with self._locked():
            records = self._load()
            records[image] = record.model_dump(mode="json")
            self._save(records)
        return record

    def get(self, image: str) -> TrustRecord | None:
        raw = self._load().get(image)
        if raw is None:
            return None
        try:
            return TrustRecord.model_validate(raw)
        except ValidationError as e:
            raise HmsError(f"trust store {self.path}: record for {image} is malformed: {e}") from e

    def verify(self, image: str, content_id: str) -> tuple[bool, str]:
        """(True, "signed by X at T") or (False, why the image may not start)."""
        record, problem = self.checked(image)
        if record is None:
            return False, problem
        if record.content_id != content_id:
            return False, (
                f"image changed since it was signed (signed content {record.content_id}, now {content_id})"
            )
        return True, f"signed by {record.signer} at {record.signed_at.isoformat()}"

    def checked(self, image: str) -> tuple[TrustRecord | None, str]:
        """(the image's record, "") when its signature holds, else (None, why not)."""
        raw = self._load().get(image)
        if raw is None:
            return None, f"not signed: no trust record for {image}"
        try:
            record = TrustRecord.model_validate(raw)
            signature = base64.b64decode(record.signature, validate=True)
        except (ValidationError, binascii.Error, ValueError):
            return None, f"signature invalid: the trust record for {image} is malformed"
        if record.image != image:
            return None, f"signature invalid: the trust record filed under {image} names {record.image}"
        try:
            public_key = load_public_key(self.state_dir)
        except AccessDenied as e:
            return None, f"signature invalid: cannot be checked ({e})"
        try:
            public_key.verify(signature, signed_message(record.image, record.content_id, record.repo_digest))
        except InvalidSignature:
            return None, f"signature invalid: the trust record for {image} was altered or signed by another key"
        return record, ""

    def repo_digest(self, image: str, content_id: str) -> str:
        """Where the signed ``content_id`` of ``image`` can be pulled by digest ("" if nowhere)."""
        record, _ = self.checked(image)
        return record.repo_digest if record is not None and record.content_id == content_id else ""

    def require(self, image: str, content_id: str) -> str:
        """Like ``verify`` but raises ImageUntrusted; returns the "signed by ..." message."""
        ok, reason = self.verify(image, content_id)
        if not ok:
            raise ImageUntrusted(f"image {image} is not trusted: {reason}")
        return reason

    def revoke(self, image: str) -> bool:
        """Remove the image's record; returns whether there was one."""
        with self._locked():
            records = self._load()
            if image not in records:
                return False
            del records[image]
            self._save(records)
        return True

    def list(self) -> list[TrustRecord]:
        """Every record, sorted by image."""
        records = self._load()
        out = []
        for image in sorted(records):
            try:
                out.append(TrustRecord.model_validate(records[image]))
            except ValidationError as e:
                raise HmsError(f"trust store {self.path}: record for {image} is malformed: {e}") from e
        return out
