"""The two file operations the state directory needs: read a YAML mapping, write a file atomically.

Every config-like file (``config.yaml``, ``access.yaml``, ``governance.yaml``, ``images.yaml``) is
read with ``load_yaml_mapping``; every file a reader must never see half-written (keys, the trust
store, the config file, process-pod records) is written with ``atomic_write``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hms_mgmt.errors import ConfigError

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# Files under the state directory that anyone may read: public keys only.
_PUBLIC_SUFFIXES = (".pub",)


def load_yaml_mapping(path: Path | str, *, what: str) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path``; ``{}`` when the file is absent or empty.

    ``what`` says what the mapping holds (``"setting to value"``) and goes into the error.
    Raises ConfigError naming the file when it is unreadable, not YAML, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e}") from e
    import yaml  # the config files only: a client that has none never loads it

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, got a {type(loaded).__name__}")
    return loaded


def atomic_write(path: Path | str, data: bytes | str, *, mode: int = 0o600, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    A temp file in the same directory is written, fsynced, given ``mode`` and renamed over
    ``path``. With ``replace=False`` an existing ``path`` wins (two processes racing to create
    it keep one) and nothing is written. Returns whether ``path`` was written. The directory
    must exist.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class DamagedRecord(ConfigError):
    """A record file of acts already done does not parse: believing it empty would let them be
    done again, so the caller refuses until an operator looks (the message names the file)."""


@contextlib.contextmanager
def expiring_record(path: Path | str, *, now: float, durable: bool = True) -> Iterator[dict[str, list[Any]]]:
    """A small JSON file of ``{key: [value, until]}`` (``until`` in Unix seconds) that lives
    across restarts: read under an exclusive ``flock`` (every process and thread of the host),
    with the entries whose ``until`` passed dropped; the caller reads or changes the dict it
    is given; it is written back (0600, atomically, fsynced unless ``durable=False``) if it
    changed. Missing: empty. Does not parse: :class:`DamagedRecord`, never empty."""
    path = Path(path)
    with os.fdopen(open_private(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = "{}"
        try:
            loaded = json.loads(text)
            if not isinstance(loaded, dict):
                raise ValueError(f"a {type(loaded).__name__}, not a mapping")
        except ValueError as e:
            raise DamagedRecord(f"{path} is damaged ({e})") from None
        record = {k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 2
                  and isinstance(v[1], (int, float)) and v[1] > now}
        before = json.dumps(record, sort_keys=True)
        yield record
        if json.dumps(record, sort_keys=True) != before or len(record) != len(loaded):
            if durable:
                atomic_write(path, json.dumps(record), mode=PRIVATE_FILE)
            else:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
                try:
                    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "w") as f:
                        json.dump(record, f)
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)


def inside(base: Path | str, *parts: str) -> Path:
    """``base / parts...``, refusing any result that is not under ``base`` (``..``, an absolute
    part, or a symlink out): a name that arrives from a request never names a file elsewhere.

    Raises ValueError naming the path."""
    root = Path(base).resolve()
    target = root.joinpath(*parts).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"{'/'.join(parts)!r} is outside {root}")
    return target


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and its parents) private to its owner (0700). A directory an earlier
    version made readable by others is tightened, with a warning: it holds keys, the event log
    and pod logs."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, PRIVATE_DIR)
        log.warning("%s was mode %o: tightened to %o (only its owner may read the state directory)",
                    path, mode, PRIVATE_DIR)
    return path


def open_private(path: Path | str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """``os.open`` a file private to its owner (0600), tightening one made readable by others."""
    fd = os.open(path, flags, PRIVATE_FILE)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        os.fchmod(fd, PRIVATE_FILE)
    return fd


def secure_state_dir(state_dir: Path | str) -> int:
    """Make the state directory private (0700) and every file in it that is not a public key
    0600, as a state directory made by an earlier version may not be. Returns how many entries
    were tightened; says so once in the log. Symlinks are left alone (never followed)."""
    root = private_dir(state_dir)
    tightened = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "cache" in dirnames:
            dirnames.remove("cache")  # a base image's root filesystem: its modes are its own
        for name in dirnames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(p, PRIVATE_DIR)
                tightened += 1
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077
                    and not name.endswith(_PUBLIC_SUFFIXES)):
                os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)
                tightened += 1
    if tightened:
        log.warning("state directory %s: %d file(s) or folder(s) were readable by others: made private to "
                    "their owner", root, tightened)
    return tightened
