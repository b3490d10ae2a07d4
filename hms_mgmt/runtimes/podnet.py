"""Process pods may not open connections to the control plane's ports (issue 19, item 8).

A process pod shares the host's network namespace: without this, its code could reach the
Temporal frontend (and with it start workflows, send signals, run activities), the Web UI, the
router's feed, the dashboard and the worker's metrics. Where the worker is root and pods run as
their own user (``hms-pod``), the worker adds an iptables chain of its own, entered from
``OUTPUT`` for packets of that user only (``-m owner --uid-owner``), that answers a new TCP
connection (``--syn``) to one of those ports on any address of this host (``-m addrtype
--dst-type LOCAL``), or to a remote Temporal frontend, with a reset. Replies to the routers and
health checks that reach the pod are not SYNs and pass. Added at worker start, replaced whole
if a killed worker left it (idempotent), removed at stop.

:func:`plan_rules` is pure (what to add); :class:`PodFirewall` runs ``iptables``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from hms_mgmt.config import Settings

log = logging.getLogger(__name__)

MULTIPORT_MAX = 15  # ports per iptables multiport match


def chain_name(state_dir: Path, node: str) -> str:
    """One chain per worker (state dir and node): two workers of one host never share one."""
    return "HMS-POD-" + hashlib.sha256(f"{Path(state_dir).resolve()}\0{node}".encode()).hexdigest()[:12]


def _port_of(url_or_address: str, default: int | None = None) -> int | None:
    text = url_or_address if "//" in url_or_address else f"//{url_or_address}"
    try:
        return urlsplit(text).port or default
    except ValueError:
        return default


def control_ports(settings: Settings) -> list[int]:
    """Temporal's frontend and Web UI, every router's port, the dashboard's and the worker's metrics."""
    ports = {_port_of(settings.temporal_address), _port_of(settings.web_ui_url, 80), settings.router_port,
             settings.dashboard_port, settings.metrics_port or None}
    ports |= {_port_of(u, 80) for u in settings.routers}
    return sorted(p for p in ports if p)


def remote_frontends(settings: Settings) -> list[str]:
    """The Temporal frontend's IPv4 addresses when it is on another host (its port is blocked there too)."""
    host = urlsplit(f"//{settings.temporal_address}").hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    addrs = {str(info[4][0]) for info in infos}
    return sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback)


def plan_rules(chain: str, uid: int, ports: list[int], remote: list[str], temporal_port: int | None) -> list[list[str]]:
    """The chain's rules and the jump into it (iptables arguments after ``-A``/``-I``)."""
    reject = ["-j", "REJECT", "--reject-with", "tcp-reset"]
    rules = []
    for i in range(0, len(ports), MULTIPORT_MAX):
        group = ",".join(str(p) for p in ports[i:i + MULTIPORT_MAX])
        rules.append([chain, "-p", "tcp", "--syn", "-m", "addrtype", "--dst-type", "LOCAL",
                      "-m", "multiport", "--dports", group, *reject])
    if temporal_port:
        rules += [[chain, "-p", "tcp", "--syn", "-d", addr, "--dport", str(temporal_port), *reject] for addr in remote]
    return rules


def jump_rule(chain: str, uid: int) -> list[str]:
    return ["OUTPUT", "-m", "owner", "--uid-owner", str(uid), "-j", chain]


class PodFirewall:
    """The worker's rule for its pods' user: ``install()`` at start, ``remove()`` at stop."""

    def __init__(self, settings: Settings, uid: int) -> None:
        self.chain = chain_name(settings.state_dir, settings.node)
        self.uid = uid
        self.ports = control_ports(settings)
        self.rules = plan_rules(self.chain, uid, self.ports, remote_frontends(settings),
                                _port_of(settings.temporal_address))
        self.iptables = shutil.which("iptables")
        self.installed = False

    def _run(self, *args: str, check: bool = True) -> bool:
        assert self.iptables is not None
        done = subprocess.run([self.iptables, "-w", "5", *args], capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise OSError(f"iptables {' '.join(args)}: {done.stderr.strip() or done.returncode}")
        return done.returncode == 0

    def install(self) -> None:
        """Add the chain and its jump, or make them what they should be (a killed worker's are replaced)."""
        if self.iptables is None:
            raise OSError("iptables is not installed")
        if not self._run("-N", self.chain, check=False):
            self._run("-F", self.chain)
        for rule in self.rules:
            self._run("-A", *rule)
        jump = jump_rule(self.chain, self.uid)
        if not self._run("-C", *jump, check=False):
            self._run("-I", *jump)
        self.installed = True
        log.info("process pods (uid %d) may not connect to ports %s of this host (iptables chain %s)",
                 self.uid, ",".join(map(str, self.ports)), self.chain)

    def remove(self) -> None:
        if self.iptables is None:
            return
        jump = jump_rule(self.chain, self.uid)
        while self._run("-D", *jump, check=False):
            pass
        if self._run("-F", self.chain, check=False):
            self._run("-X", self.chain, check=False)
        self.installed = False
