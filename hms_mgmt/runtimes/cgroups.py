"""Per-pod cgroups (v1) for process pods: memory, CPU quota and a pids cap, like a container's.

Where ``/sys/fs/cgroup`` is a v1 hierarchy this process may write, each pod gets
``<controller>/<our own cgroup>/hms/<node>/<pod>``, nested under the worker's own cgroup so the
pods stay inside whatever limits the worker itself has (``cpu`` only for a pod with a CPU limit). Elsewhere (cgroup v2, read-only, no
privilege) ``available()`` is False and says why; the runtime reports that, it does not pretend.
Where they are available, a pod whose own cgroups cannot be made is not started (``create`` raises).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
MIN_QUOTA_US = 1000  # the kernel refuses a smaller cfs_quota_us (EINVAL)
MIN_CPUS = MIN_QUOTA_US / CFS_PERIOD_US  # 0.01 CPU, as Docker's NanoCpus


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, from ``/proc/self/cgroup``."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for ctrl in controllers.split(","):
            if ctrl:
                out[ctrl] = path
    return out


class PodCgroups:
    """Creates, fills and removes the per-pod cgroups of one node."""

    def __init__(self, node: str, root: Path = ROOT) -> None:
        own = _own_paths()
        self.bases = {ctrl: root / ctrl / own.get(ctrl, "/").lstrip("/") / "hms" / node for ctrl in CONTROLLERS}
        self.reason = ""
        if not all((root / ctrl / "cgroup.procs").exists() for ctrl in CONTROLLERS):
            self.reason = f"no cgroup v1 hierarchy with {', '.join(CONTROLLERS)} under {root}"
            return
        try:
            for base in self.bases.values():
                base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.reason = f"cannot create cgroups under {root}: {e}"

    def available(self) -> bool:
        return not self.reason

    def _dirs(self, pod_id: str) -> dict[str, Path]:
        return {ctrl: base / pod_id for ctrl, base in self.bases.items()}

    def create(self, pod_id: str, *, memory_mb: int, cpus: float | None, pids: int) -> None:
        """Make the pod's cgroups with their limits (before any process joins them); on any
        failure none of them is left, and the error is raised (``ValueError`` for a CPU limit the
        kernel cannot hold, ``OSError`` for the rest).

        A CPU cgroup only with a CPU limit: a cgroup is weighed as one task against the host's
        other tasks, so uncapped pods inside one would all share a single task's CPU weight."""
        quota = round(cpus * CFS_PERIOD_US) if cpus else 0
        if cpus and quota < MIN_QUOTA_US:
            raise ValueError(f"cpu_limit {cpus:g} is below the least CPU quota a cgroup takes ({MIN_CPUS:g})")
        dirs = self._dirs(pod_id)
        if not cpus:
            del dirs["cpu"]
        try:
            for path in dirs.values():
                path.mkdir(exist_ok=True)
            (dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory_mb * 1024 * 1024))
            (dirs["pids"] / "pids.max").write_text(str(pids))
            if cpus:
                (dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError:
            self.remove(pod_id)
            raise

    def join(self, pod_id: str, pid: int) -> None:
        for path in self._dirs(pod_id).values():
            if path.is_dir():
                (path / "cgroup.procs").write_text(str(pid))

    def members(self, pod_id: str) -> set[int]:
        """Every process (and thread) in any of the pod's cgroups, from ``cgroup.procs`` and ``tasks``."""
        found: set[int] = set()
        for path in self._dirs(pod_id).values():
            for name in ("cgroup.procs", "tasks"):
                with contextlib.suppress(OSError):
                    found.update(int(x) for x in (path / name).read_text().split())
        return found

    def limits(self, pod_id: str) -> dict[str, str]:
        """The limits as the kernel holds them (for tests and ``hms`` diagnostics)."""
        dirs = self._dirs(pod_id)
        quota = dirs["cpu"] / "cpu.cfs_quota_us"
        return {
            "memory": (dirs["memory"] / "memory.limit_in_bytes").read_text().strip(),
            "pids": (dirs["pids"] / "pids.max").read_text().strip(),
            "cpu_quota_us": quota.read_text().strip() if quota.exists() else "-1",
        }

    def remove(self, pod_id: str) -> None:
        """Remove the pod's cgroups once its processes are gone (rmdir of a busy one fails: kept)."""
        for path in self._dirs(pod_id).values():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass  # never made (no CPU limit), or removed already
            except OSError as e:
                log.warning("cgroup %s not removed: %s", path, e)

    def release(self) -> None:
        """Remove the node's own cgroup directories if no pod's remain (pods outlive the worker)."""
        if self.reason:
            return
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                base.rmdir()
