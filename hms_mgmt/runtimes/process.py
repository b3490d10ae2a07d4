"""Pods as local processes: the embedded default where no Docker Engine answers.

A pod process outlives the worker that started it (as a container outlives a Docker client):
it runs in its own session and is recorded under ``<state>/pods/<node>/<pod>.json`` so a
restarted worker finds and adopts it.

The box a pod runs in (see SECURITY.md for what it does not cover): the image catalog's command
only, a fresh minimal environment (the worker's is not inherited) plus the names the catalog
entry allows; when the worker is root, a uid of the pod's own (``hms_mgmt/runtimes/uids.py``:
the state directory's keys and every other pod's files stay unreadable to it, and a stop kills
every process of that uid) or the user ``pod_user`` names; ``prlimit`` caps on address space and
open files; and, where cgroup v1 is writable, a memory limit, a CPU quota and a pids cap per pod.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from hms_mgmt import secrets as pod_secrets
from hms_mgmt.addresses import LOOPBACK, host_port
from hms_mgmt.errors import ActivityErrorType, ConfigError, PodRuntimeError
from hms_mgmt.events import Event, EventSink
from hms_mgmt.files import atomic_write, inside, load_yaml_mapping, open_private, private_dir
from hms_mgmt.models import ServiceSpec
from hms_mgmt.policy.sandbox import check_process_spec
from hms_mgmt.runtimes.base import ExitSubscribers, PodHandle, PodLaunch, PodLimits, PodRuntime, check_pod_id
from hms_mgmt.runtimes.cgroups import MIN_CPUS, PodCgroups
from hms_mgmt.runtimes.follow import FileFollow, LogFollow
from hms_mgmt.runtimes.uids import UidPool, processes_of, remove_tree_as, signal_uid

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]


PYTHON = "{python}"  # in a command: the worker's own interpreter (or the system's, see _python_for_user)
POD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The example services' knobs (demos and tests set them in spec.env): nothing executable.
EXAMPLE_ENV = ["HMS_STARTUP_DELAY_S", "HMS_FAIL_HEALTH", "HMS_BURN_CPU", "HMS_ACCESS_LOG", "HMS_SMS_SEND_DELAY_S"]
# Address space is virtual (thread stacks, malloc arenas), not resident memory: cap it loosely
# above the memory limit, as a backstop where no cgroup enforces the real one.
AS_FACTOR, AS_HEADROOM_MB = 4, 1024
KILL_WAIT_S = 10.0  # how long a stop goes on SIGKILLing a pod's processes (a fork bomb) before it gives up


def _running(pid: int) -> bool:
    """A process that is neither gone nor a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X", "")


def _executable(name: str, cwd: str, path: str) -> bool:
    """Whether a pod's command names an executable (on the pod's PATH, unless it is a path)."""
    if "/" in name:
        name = os.path.join(cwd, name)
        return os.path.isfile(name) and os.access(name, os.X_OK)
    return shutil.which(name, path=path) is not None


def default_catalog() -> dict[str, dict[str, Any]]:
    """The example services' images, runnable as processes of the worker's Python."""
    py = PYTHON
    allow = EXAMPLE_ENV
    return {
        "*hms-ach:1.5": {"command": [py, "-m", "services.hms_ach"], "env": {"HMS_VERSION": "1.5"}, "allow_env": allow},
        "*hms-ach:*": {"command": [py, "-m", "services.hms_ach"], "allow_env": allow},
        "*hms-frm:*": {"command": [py, "-m", "services.hms_frm"], "allow_env": allow},
        "*hms-notify:*": {"command": [py, "-m", "services.hms_notify"], "allow_env": allow},
        "*hms-crashloop:*": {
            "command": [py, "-m", "services.hms_ach"],
            "env": {"HMS_EXIT_AT_START": "3"},
            "allow_env": allow,
        },
    }


class ImageCatalog:
    """Maps image references (exact, or fnmatch patterns) to a command, env and cwd, and what a
    spec may add: ``allow_env: [NAME, ...]`` and ``allow_command: true`` (both signed with it).

    ``<state>/images.yaml`` adds to and overrides the built-in entries.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "images.yaml"

    def entries(self) -> dict[str, dict[str, Any]]:
        entries = default_catalog()
        try:
            entries.update(load_yaml_mapping(self.path, what="image to {command: [...]}"))
        except ConfigError as e:
            raise PodRuntimeError(str(e)) from e
        return entries

    def resolve(self, image: str) -> dict[str, Any]:
        entries = self.entries()
        if image in entries:
            return entries[image]
        for pattern, entry in entries.items():
            if fnmatch.fnmatchcase(image, pattern):
                return entry
        raise PodRuntimeError(
            f"image {image!r} is not in the process runtime's image catalog ({self.path}); "
            f"known: {', '.join(sorted(entries))}",
            error_type=ActivityErrorType.IMAGE_NOT_FOUND,
        )

    def content_id(self, image: str) -> str:
        """A hash of the catalog entry (with ``{python}`` unresolved, so the same entry has
        the same identity whichever interpreter path the worker was started with)."""
        entry = self.resolve(image)
        blob = json.dumps(entry, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


def _free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class PortPicker:
    """Free ports for pods, none handed out twice within ``hold_s``. A port is free when tested
    and taken only when the pod's interpreter binds it, a moment later: meanwhile the kernel may
    offer the same free port again (it picks at random), and two pods would share one endpoint,
    the second dying at start while the first answers its probes. A node starting hundreds of
    pods meets that."""

    def __init__(self, hold_s: float = 60.0, free: Callable[[str], int] = _free_port) -> None:
        self.hold_s = hold_s
        self.free = free
        self._given: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def take(self, address: str, tries: int = 50) -> int:
        with self._lock:
            now = time.monotonic()
            self._given = {k: t for k, t in self._given.items() if now - t < self.hold_s}
            for _ in range(tries):
                port = self.free(address)
                if (address, port) not in self._given:
                    self._given[(address, port)] = now
                    return port
        raise PodRuntimeError(f"no free port on {address} after {tries} tries", error_type=ActivityErrorType.RUNTIME_FAILURE)


_ports = PortPicker()  # one per process: every node runtime in it draws from the same ports


def ensure_pod_user(setting: str) -> pwd.struct_passwd | None:
    """The user ``pod_user`` names, or None: the worker's own user (``worker``, or a worker that
    is not root: only root can switch users) or, with ``auto`` under a root worker, a uid of its
    own per pod (:class:`ProcessRuntime` takes them from its :class:`UidPool`)."""
    if os.geteuid() != 0 or setting in ("", "worker", "auto"):
        return None
    try:
        return pwd.getpwnam(setting)
    except KeyError as e:
        raise PodRuntimeError(f"pod user {setting!r} (setting pod_user) does not exist",
                              error_type=ActivityErrorType.RUNTIME_FAILURE) from e


@dataclass(frozen=True)
class RunAs:
    """Who a pod runs as: a uid of its own (``own``: every process of it is the pod), or a named user."""

    uid: int
    gid: int
    name: str  # "uid 1900000007", or the user's name
    own: bool = False

    @classmethod
    def user(cls, user: pwd.struct_passwd) -> RunAs:
        return cls(user.pw_uid, user.pw_gid, user.pw_name)


class ProcessRuntime(PodRuntime):
    name = "process"

    def __init__(
        self, node: str, state_dir: Path, *, limits: PodLimits | None = None, events: EventSink | None = None,
        address: str = LOOPBACK,
    ) -> None:
        super().__init__(node, address)
        self.state_dir = state_dir
        self.records = state_dir / "pods" / node
        self.log_dir = state_dir / "logs" / node
        private_dir(self.records)
        private_dir(self.log_dir)
        self.catalog = ImageCatalog(state_dir)
        self.limits = limits or PodLimits()
        self.events = events or EventSink(state_dir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._user: pwd.struct_passwd | None | bool = False  # False: not resolved yet
        self.uids = UidPool(self.limits.uid_base, self.limits.uid_count)
        self._python_for: dict[str, str] = {}  # cwd -> an interpreter the pod user could run there
        self._cgroups: PodCgroups | None = None
        self._warned: set[tuple[str, str]] = set()  # (service, reason) already reported
        self._exits = _ExitWatcher(self)

    # --- the box -------------------------------------------------------------------

    def per_pod_uids(self) -> bool:
        """Whether each pod runs as a uid of its own (``pod_user: auto`` under a root worker)."""
        return os.geteuid() == 0 and self.limits.pod_user == "auto"

    def pod_user(self) -> pwd.struct_passwd | None:
        """The named user pods run as (``pod_user: NAME`` under a root worker), else None."""
        if self._user is False:
            self._user = None if self.per_pod_uids() else ensure_pod_user(self.limits.pod_user)
        return self._user  # type: ignore[return-value]

    def firewall_owner(self) -> str | None:
        """What the pod firewall's ``--uid-owner`` matches: the whole per-pod uid range (``A-B``),
        the named pod user's uid, or None where pods run as the worker's user."""
        if self.per_pod_uids():
            return self.uids.owner_match()
        user = self.pod_user()
        return str(user.pw_uid) if user is not None and user.pw_uid != 0 else None

    def cgroups(self) -> PodCgroups:
        if self._cgroups is None:
            self._cgroups = PodCgroups(self.node)
        return self._cgroups

    def _python_for_user(self, user: RunAs, cwd: str) -> tuple[str | None, str]:
        """The interpreter ``{python}`` means for pods of ``user`` in ``cwd``: the worker's own,
        else the system's ``python3`` (a worker's interpreter often lives under a private home;
        the example services need only the stdlib). ``(None, why)`` when the user can run
        neither there. Tried, not guessed from mode bits (ACLs, mount options).

        The probe runs as ``user``: a pod's own uid before the pod starts (nothing else runs as it),
        or a named user, whose running pods may kill or stop it. Only a success is remembered, per
        ``cwd`` (any uid of the range may do what another may: none has an account or a group), and a
        failure refuses the pod (``_run_as``)."""
        if cwd in self._python_for:
            return self._python_for[cwd], ""
        candidates = [sys.executable]
        system = shutil.which("python3", path=POD_PATH)
        if system and os.path.realpath(system) != os.path.realpath(sys.executable):
            candidates.append(system)
        whys: list[str] = []
        for python in candidates:
            try:
                probe = subprocess.run(
                    [python, "-c", "import os; os.listdir('.')"], cwd=cwd, env={"PATH": POD_PATH},
                    user=user.uid, group=user.gid, extra_groups=[], stdin=subprocess.DEVNULL,
                    capture_output=True, start_new_session=True, timeout=30, check=False)
                if probe.returncode == 0:
                    if python != sys.executable:
                        log.warning("process pods run %s as %s: it cannot run the worker's interpreter %s",
                                    python, user.name, sys.executable)
                    self._python_for[cwd] = python
                    return python, ""
                whys.append(probe.stderr.decode(errors="replace").strip()[-300:] or f"exit code {probe.returncode}")
            except (OSError, subprocess.SubprocessError) as e:
                whys.append(str(e))
        return None, "; ".join(whys)

    def _environment(self, req: PodLaunch, entry: dict[str, Any], port: int, home: str,
                     address: str) -> dict[str, str]:
        """A fresh environment: nothing of the worker's (its tokens, its HMS_* settings, its
        PYTHON*/LD_* variables), the catalog entry's own env, then the spec's allowed names."""
        env = {"PATH": POD_PATH, "LANG": "C.UTF-8", "HOME": home}
        env.update({str(k): str(v) for k, v in (entry.get("env") or {}).items()})
        env.update(req.spec.env)  # check_process_spec let only allowed names through
        pythonpath = [str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(
            {
                "PORT": str(port),
                "HOST": address,  # the node's address: the pod binds there, and is dialled there
                "HMS_POD_ID": req.pod_id,
                "HMS_SERVICE": req.service,
                "HMS_REVISION": str(req.revision),
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _degraded(self, req: PodLaunch, reason: str) -> None:
        """Say it, loudly: a pod runs with less isolation than the box promises (an event once
        per service and reason for this worker, a log line for every pod)."""
        log.warning("pod %s (%s): %s", req.pod_id, req.service, reason)
        if (req.service, reason) in self._warned:
            return
        self._warned.add((req.service, reason))
        try:
            self.events.write(Event(type="pod.sandbox_degraded", service=req.service, reason=reason,
                                    data={"pod": req.pod_id, "node": self.node}))
        except OSError as e:
            log.warning("could not record pod.sandbox_degraded: %s", e)

    def check_spec(self, spec: ServiceSpec) -> list[str]:
        try:
            entry = self.catalog.resolve(spec.image)
        except PodRuntimeError as e:
            return [f"image: {e}"]
        return check_process_spec(spec, entry)

    # --- records -----------------------------------------------------------------

    def _record_path(self, pod_id: str) -> Path:
        return inside(self.records, f"{check_pod_id(pod_id)}.json")

    def _log_path(self, pod_id: str) -> Path:
        return inside(self.log_dir, f"{check_pod_id(pod_id)}.log")

    def _read(self, pod_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(pod_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self, rec: dict[str, Any]) -> None:
        path = self._record_path(rec["pod_id"])
        atomic_write(path, json.dumps(rec))

    def _process(self, rec: dict[str, Any]) -> psutil.Process | None:
        """The live process of a record, or None (gone, zombie, or a reused pid)."""
        if not rec.get("pid"):  # a start cut short before its pid was recorded
            return None
        child = self._children.get(rec["pod_id"])
        if child is not None and child.poll() is not None:
            rec.setdefault("exit_code", child.returncode)
            return None
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["create_time"]) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def _handle(self, rec: dict[str, Any]) -> PodHandle:
        alive = self._process(rec) is not None
        return PodHandle(
            pod_id=rec["pod_id"],
            service=rec["service"],
            revision=rec["revision"],
            node=rec["node"],
            image=rec["image"],
            state="running" if alive else "exited",
            endpoint=host_port(rec.get("address", LOOPBACK), rec["port"]),
            started_at=datetime.fromisoformat(rec["started_at"]),
            exit_code=None if alive else rec.get("exit_code"),
            cpu_limit=rec.get("cpu_limit"),
            extra={"pid": str(rec["pid"]), "log": rec["log"]},
        )

    # --- interface -----------------------------------------------------------------

    def start(self, req: PodLaunch) -> PodHandle:
        with self._lock:
            rec = self._read(req.pod_id)
            if rec is not None:
                if self._process(rec) is not None:
                    return self._handle(rec)
                self._stop_record(rec, 0)
            entry = self._admitted_entry(req)
            cwd = str(entry.get("cwd") or _REPO_ROOT)
            user, python = self._run_as(req, cwd)
            try:
                return self._start_as(req, entry, cwd, user, python)
            except BaseException:
                # Not on record (the record names the uid once written; a stop gives it back then).
                if user is not None and user.own and self._read(req.pod_id) is None:
                    self.uids.release(user.uid, req.pod_id, self._record_path(req.pod_id))
                raise

    def _start_as(self, req: PodLaunch, entry: dict[str, Any], cwd: str, user: RunAs | None,
                  python: str) -> PodHandle:
        """The rest of ``start`` (under its lock), once who the pod runs as is settled."""
        command = [part.replace(PYTHON, python) for part in (req.spec.command or entry["command"])]
        memory_mb = req.spec.memory_mb or self.limits.memory_mb
        rlimits = [f"--nofile={self.limits.nofile}",
                   f"--as={max(memory_mb * AS_FACTOR, memory_mb + AS_HEADROOM_MB) * 1024 * 1024}"]
        if not _executable(command[0], cwd, str((entry.get("env") or {}).get("PATH") or POD_PATH)):
            raise PodRuntimeError(f"cannot start {command[0]!r}: no such executable",
                                  error_type=ActivityErrorType.IMAGE_NOT_FOUND)
        prlimit = shutil.which("prlimit")
        if prlimit:  # set in the child before it runs anything: no window, no preexec_fn in a threaded worker
            command = [prlimit, *rlimits, "--", *command]
        cgroups = self._pod_cgroups(req, memory_mb)
        port = _ports.take(self.address)
        home = tempfile.mkdtemp(prefix=f"hms-pod-{req.pod_id[:8]}-")
        if user is not None:
            os.chown(home, user.uid, user.gid)
        env = self._environment(req, entry, port, home, self.address)
        rec = self._new_record(req, port, command, user, home)
        if req.secrets:  # files on a tmpfs, named by HMS_SECRETS_DIR: never in the environment
            env["HMS_SECRETS_DIR"] = rec["secrets_dir"] = str(pod_secrets.write_pod_files(
                req.pod_id, req.secrets, uid=user.uid if user else os.getuid(), gid=user.gid if user else os.getgid()))
        # On record before it exists: a worker killed between the spawn and the pid below
        # leaves this, and the next start or stop of the pod finds the process (_pod_processes).
        self._write(rec)
        gate, release = os.pipe()
        try:
            child = self._spawn(req, rec, env, cwd, user, gate)
        finally:
            os.close(gate)
        try:
            self._children[req.pod_id] = child
            rec.update(pid=child.pid, create_time=psutil.Process(child.pid).create_time())
            if not prlimit:
                self._set_rlimits(req, child.pid, memory_mb)
            if cgroups is not None:  # before the pod's first instruction: it waits at the gate
                cgroups.join(req.pod_id, child.pid)
            self._write(rec)
            os.write(release, b"\n")
        except (OSError, psutil.Error) as e:
            with contextlib.suppress(OSError):
                child.kill()
            self._stop_record(rec, 0)
            raise PodRuntimeError(f"pod {req.pod_id} not started: cannot put it in its box: {e}",
                                  error_type=ActivityErrorType.RUNTIME_FAILURE) from e
        finally:
            os.close(release)
        self._exits.poke()
        log.info("started pod %s (%s) pid %s on %s as %s", req.pod_id, req.service, child.pid,
                 host_port(self.address, port), user.name if user else "the worker's user")
        return self._handle(rec)

    def _admitted_entry(self, req: PodLaunch) -> dict[str, Any]:
        """The image's catalog entry, if it is still the content admitted and would run this spec."""
        entry = self.catalog.resolve(req.spec.image)
        if req.image_id and self.catalog.content_id(req.spec.image) != req.image_id:
            # A process cannot run old content: refuse rather than run what was not admitted.
            raise PodRuntimeError(
                f"image {req.spec.image} changed since it was admitted ({req.image_id[:19]}): redeploy it",
                error_type=ActivityErrorType.IMAGE_UNTRUSTED,
            )
        problems = check_process_spec(req.spec, entry)
        if problems:
            raise PodRuntimeError("; ".join(problems), error_type=ActivityErrorType.SPEC_UNRUNNABLE)
        return entry

    def _run_as(self, req: PodLaunch, cwd: str) -> tuple[RunAs | None, str]:
        """(who the pod runs as, its Python), or (None, the worker's Python) with a sandbox warning
        where the worker's user is all there is (``pod_user: worker``, or a worker that is not root).
        With ``pod_user: auto`` under a root worker the pod gets a uid of its own, leased here (the
        caller gives it back if the pod does not start). A pod user that cannot run Python in
        ``cwd`` refuses the pod: it never runs as the worker's user instead (that is the operator's
        choice, ``pod_user: worker``, not a pod's)."""
        if self.per_pod_uids():
            uid = self.uids.take(req.pod_id, self._record_path(req.pod_id))
            user = RunAs(uid, uid, f"uid {uid}", own=True)
        else:
            named = self.pod_user()
            if named is None:
                why = "pod_user is 'worker'" if os.geteuid() == 0 else "only a root worker can run pods as another user"
                self._degraded(req, f"runs as the worker's user ({why}); it can read the state directory's keys")
                return None, sys.executable
            user = RunAs.user(named)
        found, why = self._python_for_user(user, cwd)
        if found is None:
            if user.own:
                self.uids.release(user.uid, req.pod_id, self._record_path(req.pod_id))
            raise PodRuntimeError(
                f"pod user {user.name} cannot run Python in {cwd} ({why}): the pod is not started "
                f"(it is never run as the worker's user instead; pod_user: worker would allow that)",
                error_type=ActivityErrorType.SPEC_UNRUNNABLE)
        return user, found

    def _pod_cgroups(self, req: PodLaunch, memory_mb: int) -> PodCgroups | None:
        """The pod's cgroups, made; None (with a sandbox warning) where this host has none to
        limit it. Where it has, a pod whose cgroups cannot be made is refused, never run unconfined."""
        cpus = req.spec.cpu_limit
        if cpus is not None and cpus < MIN_CPUS:
            raise PodRuntimeError(f"cpu_limit: {cpus:g} is below the least CPU limit a pod may have ({MIN_CPUS:g})",
                                  error_type=ActivityErrorType.SPEC_UNRUNNABLE)
        cgroups: PodCgroups = self.cgroups()
        if not cgroups.available():
            self._degraded(req, f"no memory, CPU or pids limit beyond rlimits: {cgroups.reason}")
            return None
        try:
            cgroups.create(req.pod_id, memory_mb=memory_mb, cpus=cpus, pids=self.limits.pids)
        except (OSError, ValueError) as e:
            raise PodRuntimeError(f"pod {req.pod_id} not started: cannot make its cgroups (memory {memory_mb} MB, "
                                  f"cpu_limit {cpus}, pids {self.limits.pids}): {e}",
                                  error_type=ActivityErrorType.RUNTIME_FAILURE) from e
        return cgroups

    def _new_record(self, req: PodLaunch, port: int, command: list[str], user: RunAs | None,
                    home: str) -> dict[str, Any]:
        return {
            "pod_id": req.pod_id,
            "service": req.service,
            "revision": req.revision,
            "node": self.node,
            "image": req.spec.image,
            "pid": 0,
            "create_time": 0.0,
            "port": port,
            "address": self.address,
            "cpu_limit": req.spec.cpu_limit,
            "started_at": datetime.now(UTC).isoformat(),
            "log": str(self._log_path(req.pod_id)),
            "command": command,
            "user": "" if user is None or user.own else user.name,
            "uid": user.uid if user else os.getuid(),
            "own_uid": bool(user and user.own),  # every process of "uid" is the pod's (while its lease names it)
            "home": home,
        }

    def _spawn(self, req: PodLaunch, rec: dict[str, Any], env: dict[str, str], cwd: str,
               user: RunAs | None, gate: int) -> subprocess.Popen[bytes]:
        """The pod's process in a session of its own, as ``user``. The log is opened here and
        handed over as stdout: the pod writes it without any access to the state directory.

        It starts as a gate, ``sh`` waiting for a line on ``gate`` (its stdin), and becomes the
        pod's command (``exec``: the same pid, process group and log; stdin ``/dev/null``) only once
        the worker has put it in its cgroups: the pod's first instruction already runs inside them."""
        command = rec["command"]
        script = f'read _ || exit 125; {"" if "PWD" in env else "unset PWD; "}exec "$0" "$@" </dev/null'
        with os.fdopen(open_private(rec["log"]), "ab") as log_file:
            try:
                return subprocess.Popen(
                    ["/bin/sh", "-c", script, *command],
                    env=env,
                    cwd=cwd,
                    stdin=gate,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    user=user.uid if user else None,
                    group=user.gid if user else None,
                    extra_groups=[] if user else None,  # drop root's supplementary groups too
                    umask=0o077,
                )
            except OSError as e:
                self._stop_record(rec, 0)
                raise PodRuntimeError(f"cannot start {command[0]!r}: {e}",
                                      error_type=ActivityErrorType.IMAGE_NOT_FOUND) from e

    def _set_rlimits(self, req: PodLaunch, pid: int, memory_mb: int) -> None:
        """Without the prlimit tool: the same limits through prlimit(2), just after the start."""
        import resource

        as_bytes = max(memory_mb * AS_FACTOR, memory_mb + AS_HEADROOM_MB) * 1024 * 1024
        try:
            proc = psutil.Process(pid)
            proc.rlimit(resource.RLIMIT_NOFILE, (self.limits.nofile, self.limits.nofile))
            proc.rlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        except (psutil.Error, OSError, ValueError) as e:
            self._degraded(req, f"no rlimits (address space, open files): {e}")

    def find(self, pod_id: str) -> PodHandle | None:
        rec = self._read(pod_id)
        return self._handle(rec) if rec else None

    def list(self, service: str | None = None) -> list[PodHandle]:
        out = []
        for path in sorted(self.records.glob("*.json")):
            try:
                rec = self._read(path.stem)
            except PodRuntimeError:  # not a pod's record (its name is no pod id)
                continue
            if rec and (service is None or rec["service"] == service):
                out.append(self._handle(rec))
        return out

    def _own_uid(self, rec: dict[str, Any]) -> int | None:
        """The pod's own uid, while its lease still names the pod: then every process of it is the pod."""
        uid = rec.get("uid")
        if not rec.get("own_uid") or not isinstance(uid, int):
            return None
        return uid if self.uids.holds(uid, rec["pod_id"], self._record_path(rec["pod_id"])) else None

    def _pod_processes(self, rec: dict[str, Any]) -> set[int]:
        """Every live process of the pod, whatever became of its main process: the members of its
        cgroups; with a uid of its own, every process of that uid (whatever environment or session
        it gave itself); else the processes of its user that carry its id in their environment
        (without cgroups, or started by a worker that died before it recorded the pid)."""
        pod_id = rec["pod_id"]
        found: set[int] = set()
        main = self._process(rec)
        if self.cgroups().available():
            # No process leaves its cgroup (cgroup.procs is root's): its members are all of them,
            # and no scan of every process of the pod user (thousands, on a busy node) is needed.
            found |= self.cgroups().members(pod_id)
            if found or main is None:
                found.discard(os.getpid())
                return {pid for pid in found if _running(pid)}
        if main is not None:  # its session too: what a stop reached before cgroups
            found.add(main.pid)
        own = self._own_uid(rec)
        if own is not None:
            found |= set(processes_of(own))
            found.discard(os.getpid())
            return {pid for pid in found if _running(pid)}
        uid = os.getuid()
        if rec.get("user"):  # a named pod user (records before per-pod uids name "hms-pod")
            try:
                uid = pwd.getpwnam(rec["user"]).pw_uid
            except KeyError:
                uid = -1
        elif rec.get("own_uid") and isinstance(rec.get("uid"), int):
            uid = rec["uid"]  # its lease is gone or another pod's: only what carries the pod's id
        for proc in psutil.process_iter(["pid", "uids"]):
            try:
                uids = proc.info["uids"]
                if uids is None or uid not in (uids.real, uids.effective):
                    continue
                if (main is not None and os.getsid(proc.pid) == main.pid) or \
                        proc.environ().get("HMS_POD_ID") == pod_id:
                    found.add(proc.pid)
            except (psutil.Error, OSError):
                continue
        found.discard(os.getpid())
        return {pid for pid in found if _running(pid)}

    def _signal_all(self, rec: dict[str, Any], sig: signal.Signals, done: set[int]) -> set[int]:
        """Send ``sig`` to every process of the pod not in ``done``; the pod's processes now."""
        child = self._children.get(rec["pod_id"])
        if child is not None:
            child.poll()  # reap our own child: a zombie is no process to wait for
        pids = self._pod_processes(rec)
        for pid in pids - done:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        done |= pids
        return pids

    def _kill_pod(self, rec: dict[str, Any], grace_s: float) -> None:
        """SIGTERM to every process of the pod, SIGKILL after ``grace_s`` to all that remain, again
        until none does (a process may fork meanwhile), for a bounded time. With a uid of its own,
        the kernel signals them all at once (:func:`signal_uid`) first: no scan can miss one."""
        own = self._own_uid(rec)
        if own is not None:
            self._kill_uid(rec, own, grace_s)
        termed: set[int] = set()
        if grace_s > 0 and self._signal_all(rec, signal.SIGTERM, termed):
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._signal_all(rec, signal.SIGTERM, termed):
                time.sleep(0.05)
        deadline = time.monotonic() + KILL_WAIT_S
        while self._signal_all(rec, signal.SIGKILL, set()):
            if time.monotonic() >= deadline:
                log.warning("pod %s: processes %s still there after SIGKILL", rec["pod_id"],
                            sorted(self._pod_processes(rec)))
                break
            time.sleep(0.02)

    def _kill_uid(self, rec: dict[str, Any], uid: int, grace_s: float) -> None:
        child = self._children.get(rec["pod_id"])

        def left() -> list[int]:
            if child is not None:
                child.poll()  # reap our own child: a zombie is no process
            return processes_of(uid)

        if grace_s > 0 and left():
            signal_uid(uid, "TERM")
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and left():
                time.sleep(0.05)
        deadline = time.monotonic() + KILL_WAIT_S
        while left() and time.monotonic() < deadline:
            signal_uid(uid, "KILL")
            time.sleep(0.02)

    def _stop_record(self, rec: dict[str, Any], grace_s: float) -> None:
        if not rec.get("pid"):  # a start cut short: whatever it left runs unrecorded
            grace_s = 0
        self._kill_pod(rec, grace_s)
        child = self._children.pop(rec["pod_id"], None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("pod %s did not exit after SIGKILL", rec["pod_id"])
        # Each step whatever became of the one before (a pod's tree can make any of them fail):
        # the record, the cgroups and the lease must go in any case.
        if rec.get("home"):
            self._cleanup(rec, "its home", self._remove_home, rec)
        if rec.get("secrets_dir"):
            self._cleanup(rec, "its secret files", pod_secrets.remove_pod_files, rec["pod_id"])
        if self.cgroups().available():
            self._cleanup(rec, "its cgroups", self.cgroups().remove, rec["pod_id"])
        self._record_path(rec["pod_id"]).unlink(missing_ok=True)
        if rec.get("own_uid") and isinstance(rec.get("uid"), int):
            # After the record: should a process of the uid remain, the lease stays until it is gone.
            self.uids.release(rec["uid"], rec["pod_id"], self._record_path(rec["pod_id"]))

    @staticmethod
    def _cleanup(rec: dict[str, Any], what: str, step: Any, *args: Any) -> None:
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001 - a pod's leftovers must not keep its record, cgroups or uid
            log.warning("pod %s: could not remove %s: %s", rec["pod_id"], what, e)

    def _remove_home(self, rec: dict[str, Any]) -> None:
        """The pod's home: as the pod's own uid where it has one (``rm -rf``: a tree the pod made
        deep is no recursion of ours), else as before."""
        if rec.get("own_uid") and isinstance(rec.get("uid"), int):
            remove_tree_as(rec["uid"], rec["home"])
        shutil.rmtree(rec["home"], ignore_errors=True)

    def stop(self, pod_id: str, grace_s: float) -> bool:
        with self._lock:
            rec = self._read(pod_id)
            if rec is None:
                return False
            self._stop_record(rec, grace_s)
            return True

    def logs(self, pod_id: str, tail: int = 100) -> list[str]:
        path = self._log_path(pod_id)
        if not path.exists():
            raise PodRuntimeError(f"no logs for pod {pod_id} on node {self.node}", error_type=ActivityErrorType.POD_NOT_FOUND)
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
        return lines[-tail:] if tail > 0 else lines

    def follow(self, pod_id: str, tail: int = 100) -> LogFollow:
        path = self._log_path(pod_id)
        if not path.exists():
            raise PodRuntimeError(f"no logs for pod {pod_id} on node {self.node}", error_type=ActivityErrorType.POD_NOT_FOUND)

        def running() -> bool:
            handle = self.find(pod_id)
            return handle is not None and handle.running

        return FileFollow(path, tail, running)

    def cpu_seconds(self, pod_ids: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for pod_id in pod_ids:
            rec = self._read(pod_id)
            proc = self._process(rec) if rec else None
            if proc is None:
                continue
            try:
                t = proc.cpu_times()
                out[pod_id] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
        return out

    def exited(self, pod_ids: list[str]) -> list[str]:
        """Pods among ``pod_ids`` whose process is gone (cheap: one stat per pod)."""
        gone = []
        for pod_id in pod_ids:
            rec = self._read(pod_id)
            if rec is None or self._process(rec) is None:
                gone.append(pod_id)
        return gone

    def subscribe_exits(self, callback: Callable[[str], None]) -> Callable[[], None] | None:
        """One thread waits on a pidfd per pod (Linux >= 5.3) and calls back the moment a pod's
        process exits, so health monitors need not poll ``exited`` several times a second each."""
        return self._exits.subscribe(callback)

    def content_id(self, image: str) -> str:
        return self.catalog.content_id(image)

    def close(self) -> None:
        self._exits.close()
        if self._cgroups is not None:
            self._cgroups.release()


class _ExitWatcher:
    """Exit events of a node's process pods: one thread, one ``epoll`` over a pidfd per recorded
    pod (pidfds also work for adopted pods, which are not our children). The pod set is re-read
    from the records when a pod starts, when someone subscribes, and every ``RESCAN_S``."""

    RESCAN_S = 1.0

    def __init__(self, runtime: ProcessRuntime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()
        self.subscribers = ExitSubscribers(self.lock)
        self.thread: threading.Thread | None = None
        self.wake_r, self.wake_w = -1, -1
        self.closed = False

    @staticmethod
    def available() -> bool:
        return hasattr(os, "pidfd_open")

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None] | None:
        if not self.available():
            return None
        with self.lock:
            if self.closed:
                return None
            unsubscribe = self.subscribers.add(callback)
            if self.thread is None:
                self.wake_r, self.wake_w = os.pipe()
                os.set_blocking(self.wake_w, False)
                self.thread = threading.Thread(target=self._run, name=f"hms-process-exits-{self.runtime.node}",
                                               daemon=True)
                self.thread.start()
        self.poke()
        return unsubscribe

    def poke(self) -> None:
        """Re-read the pod records now (a pod just started)."""
        with self.lock:
            if self.wake_w >= 0:
                with contextlib.suppress(OSError):  # a full pipe already means "wake up"
                    os.write(self.wake_w, b"x")

    def close(self) -> None:
        with self.lock:
            self.closed = True
            thread = self.thread
        self.poke()
        if thread is not None:
            thread.join(timeout=5)

    def _exited(self, pod_id: str) -> None:
        for cb in self.subscribers.current():
            try:
                cb(pod_id)
            except Exception:  # noqa: BLE001 - one subscriber's bug must not stop the others' events
                log.exception("exit subscriber failed for pod %s", pod_id)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.wake_r, selectors.EVENT_READ, None)
        # pod id -> (pidfd, version of the record it came from): a pod restarted under the same id
        # (an idempotent start after its process died) has a new record, so it is watched again.
        watched: dict[str, tuple[int, tuple[int, int]]] = {}
        gone: dict[str, tuple[int, int]] = {}  # reported once: pod id -> its record's version
        next_scan = 0.0
        try:
            while not self.closed:
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.RESCAN_S
                    try:
                        self._scan(sel, watched, gone)
                    except Exception:  # noqa: BLE001 - a bad record must not end exit events for all pods
                        log.exception("process pod exit watcher: cannot read the pod records")
                for key, _ in sel.select(timeout=max(0.0, next_scan - time.monotonic())):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self.wake_r, 4096)
                        next_scan = 0.0
                        continue
                    pod_id = key.data
                    fd, ino = watched.pop(pod_id)
                    sel.unregister(fd)
                    os.close(fd)
                    gone[pod_id] = ino
                    self._exited(pod_id)
        finally:
            for fd, _ in watched.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            sel.close()
            with self.lock:
                r, w = self.wake_r, self.wake_w
                self.wake_r = self.wake_w = -1
                self.thread = None
            os.close(r)
            os.close(w)

    def _scan(self, sel: selectors.BaseSelector, watched: dict[str, tuple[int, tuple[int, int]]],
              gone: dict[str, tuple[int, int]]) -> None:
        rt = self.runtime
        present: dict[str, tuple[int, int]] = {}
        for path in rt.records.glob("*.json"):
            with contextlib.suppress(OSError):
                st = path.stat()  # a rewritten record is a new file (atomic write); inodes get reused
                present[path.stem] = (st.st_ino, st.st_mtime_ns)
        for pod_id in [p for p in watched if present.get(p) != watched[p][1]]:  # stopped, or restarted
            fd, _ = watched.pop(pod_id)
            sel.unregister(fd)
            os.close(fd)
        for pod_id, ino in present.items():
            if pod_id in watched or gone.get(pod_id) == ino:
                continue
            try:
                rec = rt._read(pod_id)
            except PodRuntimeError:  # not a pod's record
                gone[pod_id] = ino
                continue
            if rec is None:
                continue
            proc = rt._process(rec)
            fd = -1
            if proc is not None:
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(proc.pid)
            if fd >= 0 and rt._process(rec) is not None:  # still the same process once we hold its fd
                watched[pod_id] = (fd, ino)
                sel.register(fd, selectors.EVENT_READ, pod_id)
                continue
            if fd >= 0:
                os.close(fd)
            gone[pod_id] = ino
            self._exited(pod_id)
        for pod_id in [p for p in gone if p not in present]:
            del gone[pod_id]
