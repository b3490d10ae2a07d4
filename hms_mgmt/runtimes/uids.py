"""A uid of its own per process pod, as systemd's ``DynamicUser=`` gives a service one.

With ``pod_user: auto`` and a root worker, each process pod runs as a uid (and a gid of the same
number, no supplementary groups) taken from ``pod_uid_base`` .. ``pod_uid_base + pod_uid_count - 1``,
a range no account uses, and given back when the pod stops. No ``/etc/passwd`` entry is needed to
run as a number. Every process of that uid is then the pod (nothing else runs as it): a stop kills
them all, whatever environment or session they gave themselves, and no pod can signal, ptrace or
read the files of another.

**Leases.** A uid is taken machine-wide (every node, worker and state directory of the host) by a
lease file ``/run/hms-pod-uids/<uid>`` (directory 0700, root's), created under an ``flock`` of the
directory's ``.lock`` file and holding the pod's id, its record's path and the worker that took it.
The lease is the proof of ownership: a stop kills "every process of the uid" only while the lease
names that pod (a record that outlived a reboot, whose uid went to another pod since, kills none of
it). A lease is free again when it is given back (the pod stopped and no process of the uid is
left), or when it is stale: its pod's record is gone (or names another uid), no process has the
uid, and the worker that took it is gone (or took it more than ``LEASE_GRACE_S`` ago; between
taking a uid and writing its record a worker is mid-start). uids are handed out round-robin from
where the last one was taken, so a uid given back is reused as late as the range allows.

What a uid cannot take back by itself: files a pod left in world-writable directories. A release
removes those it owns at the top of ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (SECURITY.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from hms_mgmt.errors import ActivityErrorType, PodRuntimeError
from hms_mgmt.files import atomic_write, open_private
from hms_mgmt.runtimes.podnet import start_time

log = logging.getLogger(__name__)

LEASE_DIR = Path("/run/hms-pod-uids")
LEASE_GRACE_S = 600.0  # a lease without its record is a start in progress for this long, if its worker lives
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable: what a pod leaves there goes at release
SYSV_IPC = (("/proc/sysvipc/shm", "shmid", "-m"), ("/proc/sysvipc/msg", "msqid", "-q"),
            ("/proc/sysvipc/sem", "semid", "-s"))
POSIX_MQUEUE = "/dev/mqueue"
# Run as the pod's uid: Linux's kill(-1) signals every process the caller may signal but itself,
# walking them under the lock that fork needs, so a process that forks on and on (a new pid every
# millisecond, which a scan of /proc misses) is caught too. It first checks that it runs as that uid:
# as root, -1 would be every process of the host.
_SIGNAL_ALL = '[ "$(id -u)" = "$1" ] || exit 97\nkill -s "$2" -- -1 2>/dev/null\nexit 0\n'

DEFAULT_BASE = 1_900_000_000
DEFAULT_COUNT = 65_536
UID_MAX = 2**31 - 2  # 2^31-1 and above: tools that take uids as signed ints break
PROCESS_UID_MIN = 65536  # a pod range starts here or above (no account, no system user)


_DONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)  # exited, not yet reaped: nothing left to run or to kill


def process_uids() -> set[int]:
    """Every uid (real, effective, saved) some live process of this host has."""
    found: set[int] = set()
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info.get("uids")
        if uids is not None and proc.info.get("status") not in _DONE:
            found.update((uids.real, uids.effective, uids.saved))
    return found


def signal_uid(uid: int, sig: str) -> None:
    """``sig`` (``TERM``, ``KILL``) to every process of ``uid`` at once (see :data:`_SIGNAL_ALL`):
    the processes of a uid of the pod range only, never root's or an account's."""
    if not PROCESS_UID_MIN <= uid <= UID_MAX:
        raise ValueError(f"uid {uid} is not a pod uid: not signalling all its processes")
    done = subprocess.run(["/bin/sh", "-c", _SIGNAL_ALL, "hms-signal", str(uid), sig], user=uid, group=uid,
                          extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        log.warning("pod uid %d: signalling its processes failed (%d): %s", uid, done.returncode,
                    done.stderr.decode(errors="replace")[:200])


def processes_of(uid: int) -> list[int]:
    """The pids of every live process whose real, effective or saved uid is ``uid``."""
    out = []
    for proc in psutil.process_iter(["pid", "uids", "status"]):
        uids = proc.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective, uids.saved) and proc.info.get("status") not in _DONE:
            out.append(proc.info["pid"])
    return out


class UidPool:
    """The leases of the pod uid range (``base`` .. ``base + count - 1``) in ``directory``."""

    def __init__(self, base: int = DEFAULT_BASE, count: int = DEFAULT_COUNT, directory: Path | None = None) -> None:
        if base < 65536 or count < 1 or base + count - 1 > UID_MAX:
            raise PodRuntimeError(f"pod uid range {base}+{count}: pod_uid_base must be at least 65536 and "
                                  f"pod_uid_base + pod_uid_count - 1 at most {UID_MAX}",
                                  error_type=ActivityErrorType.RUNTIME_FAILURE)
        self.base, self.count = base, count
        self.directory = directory or LEASE_DIR
        self._accounts_checked = False

    @property
    def last(self) -> int:
        return self.base + self.count - 1

    def owner_match(self) -> str:
        """The range as iptables' owner match takes it (``--uid-owner A-B``)."""
        return f"{self.base}-{self.last}"

    def _path(self, uid: int) -> Path:
        return self.directory / str(uid)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        except OSError as e:
            raise PodRuntimeError(f"cannot keep the process pods' uid leases in {self.directory}: {e}",
                                  error_type=ActivityErrorType.RUNTIME_FAILURE) from e
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise PodRuntimeError(f"{self.directory} must be a directory of uid {os.geteuid()}, mode 0700 "
                                  "(the process pods' uid leases)", error_type=ActivityErrorType.RUNTIME_FAILURE)
        with os.fdopen(open_private(self.directory / ".lock", os.O_WRONLY | os.O_CREAT), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read(self, uid: int) -> dict[str, Any] | None:
        try:
            lease = json.loads(self._path(uid).read_text())
        except (OSError, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def holds(self, uid: int, pod_id: str, record: Path | str) -> bool:
        """Whether ``uid``'s lease names this pod (and its record): then every process of it is the pod's."""
        lease = self.read(uid)
        return lease is not None and lease.get("pod_id") == pod_id and lease.get("record") == str(record)

    def _check_accounts(self) -> None:
        """Once: no account of this host may lie in the range (its processes would be taken for a pod's)."""
        if self._accounts_checked:
            return
        import grp
        import pwd

        taken = sorted({p.pw_uid for p in pwd.getpwall() if self.base <= p.pw_uid <= self.last}
                       | {g.gr_gid for g in grp.getgrall() if self.base <= g.gr_gid <= self.last})
        if taken:
            raise PodRuntimeError(
                f"pod_uid_base/pod_uid_count ({self.base}-{self.last}) overlap the accounts or groups of this host "
                f"(ids {taken[:5]}): choose a range no account uses", error_type=ActivityErrorType.RUNTIME_FAILURE)
        self._accounts_checked = True

    def _stale(self, uid: int, lease: dict[str, Any] | None, running: set[int], now: float) -> bool:
        if uid in running:
            return False
        if lease is None:  # unreadable (a write cut short: leases are written whole, so not ours)
            with contextlib.suppress(OSError):
                return now - self._path(uid).stat().st_mtime > LEASE_GRACE_S
            return True
        record = lease.get("record")
        if record:
            try:
                rec = json.loads(Path(record).read_text())
                if rec.get("uid") == uid:
                    return False
            except FileNotFoundError:
                pass
            except (OSError, ValueError):
                return False  # there, but unreadable now: not ours to judge
        worker = lease.get("worker") or {}
        alive = isinstance(worker.get("pid"), int) and start_time(worker["pid"]) == worker.get("start")
        return not alive or now - float(lease.get("at") or 0) > LEASE_GRACE_S

    def take(self, pod_id: str, record: Path | str) -> int:
        """A free uid of the range, leased to ``pod_id`` (whose record will be ``record``)."""
        with self._locked():
            self._check_accounts()
            now = time.time()
            leased = {int(n) for n in os.listdir(self.directory) if n.isdigit() and self.base <= int(n) <= self.last}
            running = process_uids()
            try:
                start = int((self.directory / ".next").read_text())
            except (OSError, ValueError):
                start = self.base
            if not self.base <= start <= self.last:
                start = self.base
            order = [*range(start, self.last + 1), *range(self.base, start)]
            chosen = next((uid for uid in order if uid not in leased and uid not in running), None)
            if chosen is None:
                chosen = next((uid for uid in order if uid in leased
                               and self._stale(uid, self.read(uid), running, now)), None)
                if chosen is not None:
                    log.info("pod uid %d: its lease %s was stale (no record, no process): taken again",
                             chosen, self.read(chosen))
                    sweep_shared(chosen)  # what its last pod left, before the next one gets it
                    self._path(chosen).unlink(missing_ok=True)
            if chosen is None:
                raise PodRuntimeError(
                    f"no free pod uid: all {self.count} uids of the range {self.base}-{self.last} "
                    f"(settings pod_uid_base, pod_uid_count) are taken by pods of this host; raise pod_uid_count, "
                    f"or stop pods. The pod is not started (never as root or a shared user instead)",
                    error_type=ActivityErrorType.RUNTIME_FAILURE)
            lease = {"pod_id": pod_id, "record": str(record), "at": now,
                     "worker": {"pid": os.getpid(), "start": start_time(os.getpid())}}
            if not atomic_write(self._path(chosen), json.dumps(lease), replace=False):  # O_EXCL, under the lock
                raise PodRuntimeError(f"pod uid {chosen}: its lease appeared meanwhile",
                                      error_type=ActivityErrorType.RUNTIME_FAILURE)
            nxt = chosen + 1 if chosen < self.last else self.base
            atomic_write(self.directory / ".next", str(nxt))
            return chosen

    def release(self, uid: int, pod_id: str, record: Path | str) -> bool:
        """Give ``uid`` back, if its lease names this pod and no process of it is left (else the
        lease stays: it is reclaimed once they are gone). Removes what the uid owns at the top of
        the world-writable directories. Returns whether it was given back."""
        with self._locked():
            if not self.holds(uid, pod_id, record):
                return False
            left = processes_of(uid)
            if left:
                log.warning("pod %s: uid %d still has processes %s: its lease stays", pod_id, uid, left[:10])
                return False
            try:
                sweep_shared(uid)
            except Exception as e:  # noqa: BLE001 - what a pod left must not keep its uid from being given back
                log.warning("pod %s: uid %d: removing what it left failed: %s", pod_id, uid, e)
            self._path(uid).unlink(missing_ok=True)
            return True


def sweep_shared(uid: int, dirs: tuple[str, ...] = SHARED_DIRS) -> None:
    """Remove what ``uid`` owns at the top of ``dirs`` (as that uid, never following a symlink, so
    root never walks a tree a pod made), its System V IPC objects and its POSIX message queues."""
    _remove_ipc(uid)
    for top in dirs:
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != uid:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    remove_tree_as(uid, entry.path)
                else:
                    os.unlink(entry.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("could not remove %s (left by pod uid %d): %s", entry.path, uid, e)


def remove_tree_as(uid: int, path: str) -> None:
    """``rm -rf`` of a tree a pod made, run as the pod's uid (no recursion of ours for a pod to
    exhaust, no root walking its links); what it cannot remove stays, logged."""
    if not PROCESS_UID_MIN <= uid <= UID_MAX:
        raise ValueError(f"uid {uid} is not a pod uid")
    try:
        done = subprocess.run(["rm", "-rf", "--one-file-system", "--", path], user=uid, group=uid, extra_groups=[],
                              cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not remove %s (left by pod uid %d): %s", path, uid, e)
        return
    if done.returncode != 0 and os.path.lexists(path):
        log.warning("could not remove all of %s (left by pod uid %d): %s", path, uid,
                    done.stderr.decode(errors="replace")[:200])


def _remove_ipc(uid: int) -> None:
    """The System V shared memory, queues and semaphores ``uid`` owns or made, and its POSIX
    message queues, as systemd's ``RemoveIPC=`` does: the next pod with the uid finds none."""
    for table, key, flag in SYSV_IPC:
        try:
            lines = Path(table).read_text().splitlines()
        except OSError:
            continue
        head = lines[0].split() if lines else []
        for line in lines[1:]:
            row = dict(zip(head, line.split(), strict=False))
            if str(uid) in (row.get("uid"), row.get("cuid")) and row.get(key, "").isdigit():
                done = subprocess.run(["ipcrm", flag, row[key]], capture_output=True, check=False)
                if done.returncode != 0:
                    log.warning("could not remove IPC object %s %s of pod uid %d: %s", flag, row[key], uid,
                                done.stderr.decode(errors="replace")[:200])
    with contextlib.suppress(OSError):
        for entry in os.scandir(POSIX_MQUEUE):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    os.unlink(entry.path)
