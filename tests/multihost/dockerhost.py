"""A Docker Engine of a host's own, and a registry on another host: the pieces a Docker node on a
separate machine has (NOTES.md, "Several hosts on one machine").

``start_dockerd`` runs a second ``dockerd`` inside a host's network and mount namespaces, with its
own data root, exec root, socket and cgroup parent, so its containers, images and published
ports belong to that host alone. ``ip netns exec`` mounts a fresh ``/sys``, which hides the
cgroup hierarchies dockerd needs: they are mounted again inside the host's private mount
namespace first. ``start_registry`` runs Debian's ``docker-registry`` on a host's address.

Everything is undone by ``Host.stop`` (the daemons are that host's processes) and
:func:`remove_cgroups` (the cgroup directories dockerd made).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .conftest import Host, wait_until

REGISTRY_PORT = 5000
CGROUPS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
_MOUNT_CGROUPS = ("mount -t tmpfs cgroup /sys/fs/cgroup || exit 96; "
                  "for c in " + " ".join(CGROUPS) + "; do mkdir -p /sys/fs/cgroup/$c; "
                  "mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c || exit 95; done; "
                  "mkdir -p /sys/fs/cgroup/systemd; mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd; "
                  'exec "$@"')


def why_no_docker() -> str | None:
    for tool in ("dockerd", "docker-registry"):
        if shutil.which(tool) is None:
            return f"a Docker host needs `{tool}` (.ci/run installs docker.io and docker-registry)"
    if not Path("/sys/fs/cgroup/devices").is_dir():
        return "a second dockerd needs cgroup v1 hierarchies under /sys/fs/cgroup"
    return None


@dataclass
class Dockerd:
    host: Host
    socket: Path
    cgroup_parent: str
    runtime_dir: Path

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def docker(self, *args: str, timeout: float = 120.0, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """The ``docker`` CLI against this daemon (its socket is reachable from the root namespace)."""
        return subprocess.run(["docker", "-H", self.docker_host, *args], input=stdin, capture_output=True,
                              timeout=timeout, check=False)

    def close(self) -> None:
        remove_cgroups(self.cgroup_parent)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def start_dockerd(host: Host, data_root: Path, log: Path, *, insecure_registries: list[str] = ()) -> Dockerd:  # type: ignore[assignment]
    """A dockerd of ``host``'s own, answering on a socket; returns once ``docker info`` answers."""
    # Unix socket paths are short (108 bytes): the exec root and socket live in a short /tmp dir.
    runtime_dir = Path(tempfile.mkdtemp(prefix="hmsd-"))
    socket = runtime_dir / "docker.sock"
    parent = f"hms-{host.netns}"
    argv = ["sh", "-c", _MOUNT_CGROUPS, "sh", "dockerd", "--data-root", str(data_root),
            "--exec-root", str(runtime_dir / "exec"), "--pidfile", str(runtime_dir / "docker.pid"),
            "-H", f"unix://{socket}", "--cgroup-parent", parent]
    for registry in insecure_registries:
        argv += ["--insecure-registry", registry]
    proc = host.start(argv, env=host.env(), log=log)
    daemon = Dockerd(host=host, socket=socket, cgroup_parent=parent, runtime_dir=runtime_dir)
    wait_until(lambda: socket.exists() and daemon.docker("info", timeout=10).returncode == 0, timeout=60,
               what=f"the dockerd of host {host.name}", procs=[proc], logs=[log])
    return daemon


def start_registry(host: Host, root: Path, log: Path) -> str:
    """Debian's docker-registry on ``host``'s address; returns ``ADDR:PORT``."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
                      f"http:\n  addr: {host.address}:{REGISTRY_PORT}\n")
    proc = host.start(["docker-registry", "serve", str(config)], env=host.env(), log=log)
    from hms_mgmt.devserver import port_open

    wait_until(lambda: port_open(host.address, REGISTRY_PORT), timeout=30, what=f"the registry on {host.name}",
               procs=[proc], logs=[log])
    return f"{host.address}:{REGISTRY_PORT}"


def remove_cgroups(parent: str) -> None:
    """The cgroup directories dockerd made under ``parent`` (empty once its containers are gone)."""
    for controller in (*CGROUPS, "systemd"):
        top = Path("/sys/fs/cgroup") / controller / parent
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
