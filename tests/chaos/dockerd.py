"""A second Docker Engine of the test's own, to restart (or kill) without touching the machine's.

Everything it uses is its own: a data root, an exec root (its containerd runs there), a pid
file, a unix socket, and a Linux bridge with a /24 nobody else uses. It changes no iptables rule
and no sysctl (``--iptables=false --ip-forward=false``): ports are published on 127.0.0.1 by
docker-proxy, which reaches the containers over the bridge. Images come in with
``docker save | docker load`` from the machine's engine, so their ids (the pinned content) are
the same on both. Needs root."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


class SecondDockerd:
    def __init__(self) -> None:
        # Short: a unix socket path must fit in 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="hms-dockerd-", dir="/tmp"))
        self.socket = self.dir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.bridge = f"hmsc{secrets.token_hex(3)}"  # at most 15 characters
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "dockerd.log"
        used = _used_networks()
        for _ in range(200):
            net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 40}.{secrets.randbelow(250) + 1}.0/24")
            if not any(net.overlaps(u) for u in used):
                self.net = net
                break
        else:
            raise RuntimeError("no free /24 under 10.0.0.0/8 for the test's bridge")

    def setup(self) -> None:
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        gateway = next(self.net.hosts())
        subprocess.run(["ip", "addr", "add", f"{gateway}/{self.net.prefixlen}", "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        (self.dir / "daemon.json").write_text("{}")

    def start(self, timeout: float = 60.0) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", str(self.dir / "daemon.json"), "--data-root", str(self.dir / "data"),
             "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "dockerd.pid"), "-H", self.host,
             "--bridge", self.bridge, "--iptables=false", "--ip6tables=false", "--ip-forward=false",
             "--ip-masq=false", "--userland-proxy=true", "--storage-driver", "overlay2", "--log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dockerd exited: {self.log.read_text(errors='replace')[-3000:]}"
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=self.host, timeout=5)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            time.sleep(0.3)
        raise TimeoutError(f"dockerd not answering on {self.host} after {timeout:g}s")

    def load_images(self, *images: str) -> None:
        """``docker save`` from the machine's engine into this one (same image ids)."""
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "-H", self.host, "load"], stdin=save.stdout, capture_output=True, text=True)
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait() == 0 and load.returncode == 0, f"docker load failed: {load.stderr}"

    def stop(self, *, kill: bool = False, timeout: float = 60.0) -> None:
        """SIGTERM (dockerd stops its containers first) or SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def _containerd_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / "exec" / "containerd" / "containerd.pid").read_text().strip())
        return None

    def teardown(self) -> None:
        """Remove every container of this engine, stop it and its containerd, unmount and delete
        its directories, remove the bridge."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=self.host, timeout=30)
                for ct in client.containers.list(all=True):
                    with contextlib.suppress(Exception):
                        ct.remove(force=True)
                client.close()
        self.stop()
        pid = self._containerd_pid()
        if pid:  # left running by a killed dockerd
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.dir))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
