"""Separate hosts on one machine: each host is a Linux network namespace with its own address on
one bridge, and its processes run in a mount namespace where the other hosts' state dirs are
hidden (NOTES.md, "Several hosts on one machine").

``network`` builds them and removes everything it made — processes, namespaces, veths, the
bridge and the iptables rule — on every exit path, a failed test included. Needs root and
iproute2; skips with the reason otherwise. Traffic stays on the bridge's subnet and loopback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBNET_PREFIX = "10.213"  # 10.213.N.0/24, N picked per run among those no interface uses
CMD_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=CMD_TIMEOUT_S)


def why_no_hosts() -> str | None:
    if os.geteuid() != 0:
        return "multihost tests need root (network namespaces, veths, a bridge)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"multihost tests need `{tool}` (iproute2 / util-linux)"
    return None


def _free_subnet() -> str:
    used = _ip("-o", "-4", "addr").stdout
    free = [n for n in range(1, 255) if f" {SUBNET_PREFIX}.{n}." not in used]
    if not free:
        raise RuntimeError(f"no free /24 in {SUBNET_PREFIX}.0.0/16")
    return f"{SUBNET_PREFIX}.{random.choice(free)}"


@dataclass
class Host:
    """One machine: a network namespace, its address, its own state dir, and the processes it runs."""

    name: str
    netns: str
    address: str
    state_dir: Path
    network: Network
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    veth: str = ""  # its cable: the bridge's end of its veth pair

    def unplug(self) -> None:
        """Power loss: the cable out (peers then time out, no reset), then every process of the host killed."""
        _ip("link", "set", self.veth, "down")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _wrap(self, argv: list[str]) -> list[str]:
        """``argv`` in this host's network namespace, with the other hosts' state dirs hidden."""
        hidden = [str(h.state_dir) for h in self.network.hosts if h is not self]
        script = 'while [ "$1" != -- ]; do mount -t tmpfs -o size=1m,mode=0700 hidden "$1" || exit 97; shift; done; ' \
                 'shift; exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", "private",
                "sh", "-c", script, "sh", *hidden, "--", *argv]

    def env(self, **values: str) -> dict[str, str]:
        """A clean environment for an ``hms`` process of this host (no HMS_* of the test's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
        env.update(HMS_STATE_DIR=str(self.state_dir), HMS_METRICS_PORT="0", PYTHONPATH=str(REPO),
                   PYTHONUNBUFFERED="1")
        env.update(values)
        return env

    def start(self, argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(self._wrap(argv), env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], *, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._wrap(argv), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def pids(self) -> list[int]:
        found = _ip("netns", "pids", self.netns, check=False).stdout.split()
        return [int(p) for p in found if p.isdigit()]

    def stop(self) -> None:
        """SIGTERM what we started (a worker deregisters, ``hms up`` stops its dev server), then
        SIGKILL whatever still runs in the namespace (pods outlive workers by design)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


class Network:
    """A bridge with an address in the root namespace (so the test reaches every host) and one
    namespace per host, plugged into it by a veth pair."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"hmb{self.tag}"
        self.prefix = _free_subnet()
        self.gateway = f"{self.prefix}.1"
        self.hosts: list[Host] = []
        self._veths: list[str] = []
        self._netns: list[str] = []
        self._rule: list[str] | None = None
        self._closed = False
        atexit.register(self.close)  # a run killed between setup and teardown still cleans up
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            if shutil.which("iptables"):  # dockerd may set FORWARD to DROP
                rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
                subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True, timeout=CMD_TIMEOUT_S)
                self._rule = rule
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        n = len(self.hosts) + 2
        netns, outer, inner = f"hms-{self.tag}-{name}", f"hv{self.tag}{n}", f"hp{self.tag}{n}"
        _ip("netns", "add", netns)
        self._netns.append(netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._veths.append(outer)
        _ip("link", "set", inner, "netns", netns)
        _ip("-n", netns, "link", "set", inner, "name", "eth0")
        address = f"{self.prefix}.{n}"
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("link", "set", outer, "master", self.bridge, "up")
        state_dir = self.root / f"host-{name}"
        state_dir.mkdir(parents=True, mode=0o700)
        host = Host(name=name, netns=netns, address=address, state_dir=state_dir, network=self, veth=outer)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop()
        for netns in self._netns:
            _ip("netns", "del", netns, check=False)
        for veth in self._veths:  # gone with its namespace's end, normally
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        if self._rule is not None:
            subprocess.run(["iptables", "-D", *self._rule], capture_output=True, check=False, timeout=CMD_TIMEOUT_S)
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """What of ours is still there (empty after ``close()``)."""
        left = [ns for ns in self._netns if ns in _ip("netns", "list", check=False).stdout]
        links = _ip("-o", "link", check=False).stdout
        left += [name for name in [self.bridge, *self._veths] if f" {name}:" in links or f" {name}@" in links]
        if self._rule is not None:
            check = subprocess.run(["iptables", "-C", *self._rule], capture_output=True, check=False,
                                   timeout=CMD_TIMEOUT_S)
            if check.returncode == 0:
                left.append("iptables " + " ".join(self._rule))
        return left


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    why = why_no_hosts()
    if why:
        pytest.skip(why)
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()
        assert net.leftovers() == [], "the multihost network was not fully removed"


def hms_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hms_mgmt.cli", *args]


def wait_until(predicate, *, timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = (),
               logs: list[Path] = ()) -> object:  # type: ignore[assignment]
    """Poll ``predicate`` until truthy, at most ``timeout`` s; fail early when one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: a process exited with code {proc.returncode}\n{tails(logs)}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{tails(logs)}")


def tails(logs: list[Path], lines: int = 30) -> str:
    parts = []
    for log in logs:
        with contextlib.suppress(OSError):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts)


def join_host(control: Host, host: Host, name: str, *, runtime: str = "process") -> str:
    """``hms node join-token`` on ``control``, ``hms node join`` on ``host`` (as an operator would,
    each in its own namespace); returns what the join printed."""
    made = control.run(hms_argv("node", "join-token", "--ttl", "10m"), env=control.env())
    assert made.returncode == 0, made.stdout + made.stderr
    token = made.stdout.strip().splitlines()[-1]
    joined = host.run(hms_argv("node", "join", token, "--name", name, "--address", host.address, "--runtime", runtime),
                      env=host.env())
    assert joined.returncode == 0, joined.stdout + joined.stderr
    return joined.stdout


CONTROL_PORTS = (7233, 8233, 8000, 8088)  # Temporal, its Web UI, the router, the dashboard


def start_control(a: Host, log: Path, *, logs: list[Path], extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``hms up --listen A --no-node [extra...]`` on host A, until its ports answer and its control key exists."""
    from hms_mgmt.devserver import port_open

    up = a.start(hms_argv("up", "--listen", a.address, "--no-node", *extra), env=a.env(HMS_RUNTIME="process"), log=log)
    wait_until(lambda: all(port_open(a.address, p) for p in CONTROL_PORTS)
               and (a.state_dir / "keys" / "control.pub").exists(),
               timeout=90, what="hms up on host A", procs=[up], logs=logs)
    return up


def start_node(control: Host, host: Host, name: str, log: Path, *, procs: list[subprocess.Popen[bytes]],
               logs: list[Path], runtime: str = "process", joined: bool = False,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``host`` joins ``control`` (unless ``joined``) and runs ``hms worker`` until it registers."""
    if not joined:
        join_host(control, host, name, runtime=runtime)
    worker = host.start(hms_argv("worker"), env=env or host.env(), log=log)
    wait_until(lambda: f"node {name} registered" in log.read_text(errors="replace"), timeout=60,
               what=f"node {name} to register", procs=[*procs, worker], logs=logs)
    return worker


def sign_image(control: Host, image: str, *, runtime: str = "process", **env: str) -> str:
    """``hms image sign`` on the control host; returns what it printed."""
    signed = control.run(hms_argv("image", "sign", image, "--runtime", runtime), env=control.env(**env))
    assert signed.returncode == 0, signed.stdout + signed.stderr
    return signed.stdout


def pod_answering(url: str) -> str | None:
    """The ``X-HMS-Pod`` of a 200 answer at ``url``; None for anything else."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return resp.headers.get("X-HMS-Pod") if resp.status == 200 else None
    except OSError:
        return None
