"""The one interface both pod drivers implement. Calls are synchronous (docker-py is); the
activities run them on worker threads, never on the event loop."""

from __future__ import annotations

import abc
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from hms_mgmt.addresses import LOOPBACK, check_address
from hms_mgmt.errors import ActivityErrorType
from hms_mgmt.errors import PodRuntimeError as PodRuntimeError  # defined with the other errors; importable here too
from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes.follow import LogFollow

PodState = Literal["created", "running", "exited"]


def check_pod_id(pod_id: str) -> str:
    """A pod id is a canonical UUID (the workflow makes them with ``workflow.uuid4()``); anything
    else is refused before it reaches a file name, a container name or a label filter."""
    try:
        ok = str(uuid.UUID(pod_id)) == pod_id
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise PodRuntimeError(f"pod id {str(pod_id)[:80]!r} is not a UUID", error_type=ActivityErrorType.SPEC_UNRUNNABLE)
    return pod_id


@dataclass(frozen=True)
class SecretFile:
    """One opened secret for one pod: its file's name and its value (never in a repr or a log)."""

    name: str
    file: str
    version: int
    value: bytes = field(repr=False)


@dataclass
class PodLaunch:
    """What a runtime needs to start one pod (not to be confused with the scheduler's
    ``PlacementRequest``, which is only the resources a pod reserves)."""

    pod_id: str
    service: str
    revision: int
    node: str
    spec: ServiceSpec
    image_id: str = ""  # content pinned at admission: run exactly this, whatever the tag points to now
    secrets: list[SecretFile] = field(default_factory=list)  # opened on this node, written to a tmpfs only


@dataclass(frozen=True)
class PodLimits:
    """What a node imposes on every pod whatever its spec says (from the worker's settings)."""

    memory_mb: int = 512  # when the spec sets no memory_mb
    pids: int = 256  # processes and threads per pod
    nofile: int = 4096  # open files per process (process runtime)
    # Process pods run as: "auto" (a uid of its own per pod, from the range below, when the worker
    # is root), a user name, or "worker" (the worker's own user).
    pod_user: str = "auto"
    uid_base: int = 1_900_000_000  # the per-pod uids: uid_base .. uid_base + uid_count - 1
    uid_count: int = 65_536


class ExitSubscribers:
    """Who is told of a pod's exit (by its pod id), under the runtime's lock; the thread that
    watches for exits calls a copy of them outside it."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._callbacks: list[Callable[[str], None]] = []

    def add(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Add ``callback`` (the caller holds the lock); returns the function that removes it."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def current(self) -> list[Callable[[str], None]]:
        with self._lock:
            return list(self._callbacks)


@dataclass
class PodHandle:
    pod_id: str
    service: str
    revision: int
    node: str
    image: str
    state: PodState
    endpoint: str | None = None
    started_at: datetime | None = None
    exit_code: int | None = None
    cpu_limit: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "running"


class PodRuntime(abc.ABC):
    """Starts, finds, stops and measures pods. Every method is idempotent by pod id."""

    name: str

    def __init__(self, node: str, address: str = LOOPBACK) -> None:
        self.node = node
        self.address = check_address(address)  # pods publish or bind here; endpoints name it

    @abc.abstractmethod
    def start(self, req: PodLaunch) -> PodHandle:
        """Start the pod, or return it if a pod with this id already runs."""

    @abc.abstractmethod
    def find(self, pod_id: str) -> PodHandle | None: ...

    @abc.abstractmethod
    def list(self, service: str | None = None) -> list[PodHandle]:
        """Pods of this node carrying our labels (all services when ``service`` is None)."""

    @abc.abstractmethod
    def stop(self, pod_id: str, grace_s: float) -> bool:
        """SIGTERM, SIGKILL after ``grace_s``, then remove. False when there was no such pod."""

    @abc.abstractmethod
    def logs(self, pod_id: str, tail: int = 100) -> list[str]: ...

    def follow(self, pod_id: str, tail: int = 100) -> LogFollow:
        """The last ``tail`` lines, then each new line until the pod stops (``logs -f``)."""
        raise PodRuntimeError(f"the {self.name} runtime cannot follow logs", error_type=ActivityErrorType.POD_NOT_FOUND)

    @abc.abstractmethod
    def cpu_seconds(self, pod_ids: list[str]) -> dict[str, float]:
        """Cumulative CPU seconds used by each running pod; the caller takes deltas."""

    @abc.abstractmethod
    def content_id(self, image: str) -> str:
        """The image's content identity (what a trust signature covers)."""

    def repo_digest(self, image: str) -> str:
        """Where this content can be pulled by digest (``repo@sha256:...``), "" if nowhere."""
        return ""

    def pull_content_id(self, image: str) -> str:
        """``content_id``, pulling ``image`` from its registry first when it is not here (a node
        with no trust store says what the tag holds; the control plane judges that content)."""
        return self.content_id(image)

    def fetch(self, content_id: str, repo_digest: str) -> None:
        """Make exactly ``content_id`` available here, from ``repo_digest`` when it is missing;
        raise PodRuntimeError (IMAGE_NOT_FOUND) naming why when it cannot be had."""

    def check_spec(self, spec: ServiceSpec) -> list[str]:
        """Problems with running ``spec`` on this runtime, each naming the field (admission can
        ask before any pod starts; ``start`` refuses the same)."""
        return []

    def exited(self, pod_ids: list[str]) -> list[str]:
        """Pods among ``pod_ids`` that are not running (gone, exited, or never started)."""
        running = {h.pod_id for h in self.list() if h.running}
        return [p for p in pod_ids if p not in running]

    def subscribe_exits(self, callback: Callable[[str], None]) -> Callable[[], None] | None:
        """Call ``callback(pod_id)`` from another thread the moment a pod exits.

        Returns an unsubscribe function, or None when the runtime has no event stream (the
        caller then polls ``exited``)."""
        return None

    def reported_exit(self, pod_id: str) -> int | None:
        """The exit code the event stream gave with the pod's exit, None if it gave none: a
        watcher that learnt of an exit from the stream need not ask the engine again."""
        return None

    def close(self) -> None:
        """Release clients and background threads."""
