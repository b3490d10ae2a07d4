"""The HAProxy process: where its files are, the configuration check, start and soft stop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from hms_mgmt.errors import ConfigError
from router.haproxy.config import CONTROL_MAP
from router.haproxy.runtime import RuntimeAPI

INSTALL_HINT = "haproxy is not installed: `apt-get install haproxy` (Debian/Ubuntu), or use --engine builtin"
FALLBACK_PATHS = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")  # sbin is not on every user's PATH
START_TIMEOUT_S = 10.0
PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+=@,-]+")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in FALLBACK_PATHS if Path(p).exists()), None)
    if found is None:
        raise ConfigError(INSTALL_HINT)
    return found


class HAProxyProcess:
    """One HAProxy, run in the foreground (``-db``) as our child, with its files under ``dir``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        # Both paths are written in the configuration and in Runtime API commands, where a space or
        # a separator would cut them; a unix socket path is at most ~100 bytes. Else: a private temp dir.
        elsewhere = dir if PLAIN_PATH.fullmatch(str(dir)) and len(str(dir)) < 80 else Path(
            tempfile.mkdtemp(prefix="hms-haproxy-"))
        self.socket_path = elsewhere / "admin.sock"
        self.map_path = elsewhere / "services.map"
        self.landed_path = elsewhere / "landed.map"  # landed services -> their slot's end, epoch seconds
        self.config_path = dir / "haproxy.cfg"
        self.log_path = dir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary: str | None = None  # set at start

    def returncode(self) -> int | None:
        """None while it runs (or before it started)."""
        return None if self.proc is None else self.proc.poll()

    async def start(self, config: str, api: RuntimeAPI, *, binary: str | None = None) -> None:
        """Write ``config`` (checked first), start HAProxy and wait for its runtime socket."""
        binary = self.binary = binary or haproxy_binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.map_path.write_text(CONTROL_MAP)
        self.landed_path.write_text("")
        self.socket_path.unlink(missing_ok=True)
        self.config_path.write_text(config)
        check = await asyncio.to_thread(subprocess.run, [binary, "-c", "-f", str(self.config_path)],
                                        capture_output=True, text=True)
        if check.returncode != 0:
            raise ConfigError(f"generated HAProxy configuration is invalid: {check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config_path)], stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        await self._wait_for_socket(api)

    async def _wait_for_socket(self, api: RuntimeAPI) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.returncode()
            if code is not None:
                raise ConfigError(f"haproxy exited at start ({code}): {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await api.one("show info")
                return
            await asyncio.sleep(0.05)
        raise ConfigError(f"haproxy did not open its runtime socket {self.socket_path} within {START_TIMEOUT_S:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # soft stop: finish in-flight requests
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the router dies, so no orphan HAProxy keeps the port."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
