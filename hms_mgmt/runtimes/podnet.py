"""Process pods may not open connections to the control plane's ports (issue 19, item 8).

A process pod shares the host's network namespace: without this, its code could reach the
Temporal frontend (and with it start workflows, send signals, run activities), the Web UI, the
router's feed, the dashboard and the worker's metrics. Where the worker is root and pods run as
uids of their own (``pod_user: auto``: the range ``pod_uid_base`` .. ``+ pod_uid_count - 1``, see
``uids.py``) or as a named pod user, the worker adds an iptables chain of its own, entered from
``OUTPUT`` for packets of those uids only (``-m owner --uid-owner A-B``, or one uid), that answers a new TCP
connection (``--syn``) to one of those ports on any address of this host (``-m addrtype
--dst-type LOCAL``), or to a remote Temporal frontend, with a reset. Replies to the routers and
health checks that reach the pod are not SYNs and pass. Added at worker start, replaced whole
if a killed worker left it (idempotent), removed at stop.

The jump carries its worker in a comment (pid, the process's start time, its PID namespace, its
state directory). A worker killed with SIGKILL whose state directory is gone never restarts
under the same chain name, so each worker's start also removes the chains whose worker is gone
(same PID namespace, no process with that pid and start time) and whose state directory is gone
too. While the directory is there, its worker may come back (and replace the chain), and the
pods it left running stay behind their rules meanwhile. A chain whose owner cannot be told
(another PID namespace, no comment) stays: a rule left behind only blocks more.

:func:`plan_rules` and :func:`orphans` are pure; :class:`PodFirewall` runs ``iptables``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

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


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def server_ports(settings: Settings) -> list[int]:
    """Every port that the process serving the Temporal frontend listens on, when it runs on
    this host: a dev server also serves its HTTP API, its metrics and its internal services'
    gRPC on ports picked at random, each as open as the frontend. Empty when it runs elsewhere
    or cannot be seen (the frontend's own port is blocked by :func:`control_ports` anyway)."""
    import psutil

    split = urlsplit(f"//{settings.temporal_address}")
    try:
        port = split.port
        infos = socket.getaddrinfo(split.hostname or "", None, proto=socket.IPPROTO_TCP)
        local = _local_addresses()
        if port is None or not any(ipaddress.ip_address(i[4][0]).is_loopback or i[4][0] in local for i in infos):
            return []
        listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr]
    except (OSError, ValueError, psutil.Error):
        return []
    owners = {c.pid for c in listening if c.laddr.port == port and c.pid}
    return sorted({c.laddr.port for c in listening if c.pid in owners})


def remote_frontends(settings: Settings) -> list[str]:
    """The Temporal frontend's IPv4 addresses when it is on another host (its port is blocked there too)."""
    host = urlsplit(f"//{settings.temporal_address}").hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    addrs = {str(info[4][0]) for info in infos}
    return sorted(a for a in addrs if not ipaddress.ip_address(a).is_loopback)


def plan_rules(chain: str, uid: int | str, ports: list[int], remote: list[str], temporal_port: int | None) -> list[list[str]]:
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


def jump_rule(chain: str, uid: int | str, owner: str = "") -> list[str]:
    """The jump from ``OUTPUT`` for packets of ``uid``: one uid, or a range ``"A-B"`` (every pod's own uid)."""
    tag = ["-m", "comment", "--comment", owner] if owner else []
    return ["OUTPUT", "-m", "owner", "--uid-owner", str(uid), *tag, "-j", chain]


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, ``/proc/<pid>/stat``), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def pid_namespace() -> str:
    return str(os.stat("/proc/self/ns/pid").st_ino)


COMMENT_MAX = 256  # iptables' comment match


def owner_tag(state_dir: Path, pid: int | None = None) -> str:
    """This worker, as its jump's comment (without its state directory if that does not fit: the
    chain is then never taken for an orphan)."""
    pid = os.getpid() if pid is None else pid
    tag = f"hms-worker pid={pid} start={start_time(pid)} pidns={pid_namespace()}"
    state = f" state={quote(str(Path(state_dir).resolve()), safe='/')}"
    return tag + state if len(tag + state) < COMMENT_MAX else tag


def _jumps(output_rules: str) -> list[tuple[list[str], str, dict[str, str]]]:
    """``iptables -S OUTPUT`` lines that jump to an HMS-POD chain: (args after ``-A``, chain, owner fields)."""
    found = []
    for line in output_rules.splitlines():
        args = shlex.split(line)
        if len(args) < 3 or args[0] != "-A" or args[-2] != "-j" or not args[-1].startswith("HMS-POD-"):
            continue
        comment = args[args.index("--comment") + 1] if "--comment" in args else ""
        fields = dict(f.split("=", 1) for f in comment.split() if "=" in f) if comment.startswith("hms-worker ") else {}
        found.append((args[1:], args[-1], fields))
    return found


def orphans(output_rules: str, own_chain: str, pidns: str, started: Callable[[int], str | None],
            exists: Callable[[str], bool]) -> dict[str, list[list[str]]]:
    """The HMS-POD chains, other than ``own_chain``, whose worker is gone, with their jumps: each
    of its jumps names a worker of this PID namespace, no process has that pid and start time,
    and its state directory is gone."""
    jumps: dict[str, list[tuple[list[str], dict[str, str]]]] = {}
    for args, chain, fields in _jumps(output_rules):
        jumps.setdefault(chain, []).append((args, fields))
    gone: dict[str, list[list[str]]] = {}
    for chain, rules in jumps.items():
        if chain == own_chain:
            continue
        if all(f.get("pidns") == pidns and f.get("pid", "").isdigit() and started(int(f["pid"])) != f.get("start")
               and f.get("state") and not exists(unquote(f["state"])) for _, f in rules):
            gone[chain] = [args for args, _ in rules]
    return gone


class PodFirewall:
    """The worker's rule for its pods' uids: ``install()`` at start, ``remove()`` at stop. ``uid`` is
    one uid or a range ``"A-B"`` (iptables' owner match takes both)."""

    def __init__(self, settings: Settings, uid: int | str) -> None:
        self.chain = chain_name(settings.state_dir, settings.node)
        self.state_dir = settings.state_dir
        self.uid = uid
        self.settings = settings
        self.ports = sorted(set(control_ports(settings)) | set(server_ports(settings)))
        self.remote = remote_frontends(settings)
        self.temporal_port = _port_of(settings.temporal_address)
        self.rules = plan_rules(self.chain, uid, self.ports, self.remote, self.temporal_port)
        self.iptables = shutil.which("iptables")
        self.installed = False

    def ports_changed(self) -> bool:
        """Read the Temporal server's ports again (a dev server restarted picks new ones); True,
        with the rules replanned, if they changed: ``install()`` again then."""
        ports = sorted(set(control_ports(self.settings)) | set(server_ports(self.settings)))
        if ports == self.ports:
            return False
        self.ports = ports
        self.rules = plan_rules(self.chain, self.uid, self.ports, self.remote, self.temporal_port)
        return True

    @property
    def staged(self) -> str:
        return self.chain + "-N"

    def _run(self, *args: str, check: bool = True) -> bool:
        assert self.iptables is not None
        done = subprocess.run([self.iptables, "-w", "5", *args], capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise OSError(f"iptables {' '.join(args)}: {done.stderr.strip() or done.returncode}")
        return done.returncode == 0

    def _output_rules(self) -> str:
        assert self.iptables is not None
        done = subprocess.run([self.iptables, "-w", "5", "-S", "OUTPUT"], capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else ""

    def _drop(self, chain: str, jumps: list[list[str]]) -> None:
        for args in jumps:
            self._run("-D", *args, check=False)
        if self._run("-F", chain, check=False):
            self._run("-X", chain, check=False)

    def install(self) -> None:
        """Add the chain and its jump, or make them what they should be (a killed worker's are
        replaced), and remove the chains of workers that are gone. Make before break: the new
        rules are built in a staged chain and jumped to before the old jump goes, so pods that
        outlived a worker are never without a rule (a connection opened in a gap would stay)."""
        if self.iptables is None:
            raise OSError("iptables is not installed")
        rules = self._output_rules()
        for chain, jumps in orphans(rules, self.chain, pid_namespace(), start_time, os.path.exists).items():
            if chain == self.staged:
                continue
            self._drop(chain, jumps)
            log.info("removed iptables chain %s: the worker that added it is gone", chain)
        # a staged chain a worker left when it was killed mid-install
        self._drop(self.staged, [args for args, chain, _ in _jumps(rules) if chain == self.staged])
        self._run("-N", self.staged)
        for rule in plan_rules(self.staged, self.uid, self.ports, self.remote, self.temporal_port):
            self._run("-A", *rule)
        self._run("-I", *jump_rule(self.staged, self.uid, owner_tag(self.state_dir)))
        # the new rules are in force; the old chain (a worker's before us, or ours) goes
        self._drop(self.chain, [args for args, chain, _ in _jumps(rules) if chain == self.chain])
        self._run("-E", self.staged, self.chain)  # the jump follows the rename
        self.installed = True
        log.info("process pods (uid %s) may not connect to ports %s of this host (iptables chain %s)",
                 self.uid, ",".join(map(str, self.ports)), self.chain)

    def remove(self) -> None:
        if self.iptables is None:
            return
        self._drop(self.chain, [args for args, chain, _ in _jumps(self._output_rules()) if chain == self.chain])
        self.installed = False
