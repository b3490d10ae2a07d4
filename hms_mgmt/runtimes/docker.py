"""Pods as Docker containers, through the docker SDK.

Containers carry our labels, publish their port on the node's address only (127.0.0.1 on one host), get the spec's cpu/memory
limits and no restart policy: healing is ours, so that every replacement is a decision the
workflow history explains. Every pod is also boxed whatever its spec says: a default memory
limit, a pids limit, ``no-new-privileges``, all capabilities dropped (the spec's ``cap_add``
takes back only allowlisted ones) and a read-only root filesystem with a tmpfs ``/tmp``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import docker
import docker.errors
from docker.types import Mount

from hms_mgmt import constants as c
from hms_mgmt import secrets as pod_secrets
from hms_mgmt.addresses import LOOPBACK, host_port
from hms_mgmt.errors import ActivityErrorType, PodRuntimeError
from hms_mgmt.runtimes.base import ExitSubscribers, PodHandle, PodLaunch, PodLimits, PodRuntime, check_pod_id
from hms_mgmt.runtimes.follow import LogFollow, StreamFollow

log = logging.getLogger(__name__)

_CGROUP_V1 = Path("/sys/fs/cgroup/cpuacct/docker")
_CGROUP_V2 = Path("/sys/fs/cgroup/system.slice")
EXIT_CODES_KEPT = 4096  # die events' exit codes remembered (pods' last exits, newest kept)


def docker_available(timeout: float = 2.0) -> bool:
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine answers"
        return False


def _repository(image: str) -> str:
    """``host:port/name:tag`` or ``name@sha256:...`` → ``host:port/name`` (a port is no tag)."""
    name = image.partition("@")[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.partition(':')[0]}" if head else last.partition(":")[0]


def _parse_time(value: str | None) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; fromisoformat takes at most microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{frac}+00:00")


class DockerRuntime(PodRuntime):
    name = "docker"

    def __init__(
        self, node: str, client: docker.DockerClient | None = None, *, limits: PodLimits | None = None,
        address: str = LOOPBACK,
    ) -> None:
        super().__init__(node, address)
        self.client = client or docker.from_env(timeout=60)
        self.limits = limits or PodLimits()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hms-docker-stats")
        self._lock = threading.Lock()
        self._subscribers = ExitSubscribers(self._lock)
        self._exit_codes: OrderedDict[str, int] = OrderedDict()  # pod id -> exit code, from die events
        self._pod_locks: dict[str, threading.Lock] = {}
        self._events_thread: threading.Thread | None = None
        self._events_stream = None
        self._closed = False

    def _filters(self, service: str | None = None, pod_id: str | None = None) -> dict[str, list[str]]:
        labels = [f"{c.LABEL_NODE}={self.node}", f"{c.LABEL_MANAGED}=1"]
        if service:
            labels.append(f"{c.LABEL_SERVICE}={service}")
        if pod_id:
            labels.append(f"{c.LABEL_POD}={check_pod_id(pod_id)}")
        return {"label": labels}

    def _containers(self, service: str | None = None, pod_id: str | None = None):
        # ignore_removed: a container removed between the list and its inspect is just gone.
        return self.client.containers.list(all=True, filters=self._filters(service, pod_id), ignore_removed=True)

    def _handle(self, container) -> PodHandle:
        attrs = container.attrs
        labels = attrs["Config"]["Labels"] or {}
        state = attrs["State"]
        status = state.get("Status", "created")
        endpoint = None
        ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
        for binding in ports.values():
            if binding:
                endpoint = host_port(binding[0]["HostIp"] or self.address, int(binding[0]["HostPort"]))
                break
        nano = (attrs.get("HostConfig") or {}).get("NanoCpus") or 0
        return PodHandle(
            pod_id=labels.get(c.LABEL_POD, ""),
            service=labels.get(c.LABEL_SERVICE, ""),
            revision=int(labels.get(c.LABEL_REVISION, "1")),
            node=labels.get(c.LABEL_NODE, self.node),
            image=labels.get(c.LABEL_IMAGE) or attrs["Config"].get("Image", ""),
            state="running" if status == "running" else ("created" if status == "created" else "exited"),
            endpoint=endpoint,
            started_at=_parse_time(state.get("StartedAt")),
            exit_code=None if status == "running" else state.get("ExitCode"),
            cpu_limit=nano / 1e9 if nano else None,
            extra={"container_id": container.id},
        )

    def _pod_lock(self, pod_id: str) -> threading.Lock:
        with self._lock:
            return self._pod_locks.setdefault(pod_id, threading.Lock())

    def start(self, req: PodLaunch) -> PodHandle:
        """Create first, look only on a name conflict: the common path is the fewest engine
        calls, and a retry of the same pod id still finds the container it made."""
        check_pod_id(req.pod_id)
        with self._pod_lock(req.pod_id):  # per pod: different pods start in parallel
            try:
                return self._run(req)
            except docker.errors.APIError as e:
                if e.status_code != 409:
                    raise
            for existing in self._containers(pod_id=req.pod_id):
                if existing.status == "running":
                    return self._handle(existing)
                existing.remove(force=True)
            return self._run(req)

    def _run(self, req: PodLaunch) -> PodHandle:
        """Create, then start at once (no inspect between the two: it is on a heal's critical
        path), then read the published host port back."""
        image = req.image_id or req.spec.image  # the pinned content id: a re-pointed tag changes nothing
        try:
            try:
                created = self._create(req, image)
            except docker.errors.ImageNotFound:
                self.client.images.pull(image)
                created = self._create(req, image)
            self.client.api.start(created["Id"])
        except docker.errors.ImageNotFound as e:
            raise PodRuntimeError(
                f"image {req.spec.image!r} is not on node {self.node} and cannot be pulled: {e.explanation or e}",
                error_type=ActivityErrorType.IMAGE_NOT_FOUND,
            ) from e
        except docker.errors.APIError as e:
            if e.status_code == 400:
                raise PodRuntimeError(f"docker refused the pod: {e.explanation or e}", error_type=ActivityErrorType.SPEC_UNRUNNABLE) from e
            url = getattr(e.response, "url", "") or ""
            if url.split("?")[0].endswith("/images/create"):  # the pull of a missing image failed
                raise PodRuntimeError(
                    f"image {req.spec.image!r} is not on node {self.node} and cannot be pulled: {e.explanation or e}",
                    error_type=ActivityErrorType.IMAGE_NOT_FOUND,
                ) from e
            raise
        container = self.client.containers.get(created["Id"])  # the published host port is known only once it runs
        log.info("started pod %s (%s) as container %s", req.pod_id, req.service, container.short_id)
        return self._handle(container)

    def _create(self, req: PodLaunch, image: str) -> dict[str, str]:
        spec = req.spec
        env = dict(spec.env)
        env.update({"PORT": str(spec.port), "HMS_POD_ID": req.pod_id, "HMS_SERVICE": req.service,
                    "HMS_REVISION": str(req.revision)})
        memory = f"{spec.memory_mb or self.limits.memory_mb}m"
        api = self.client.api
        host_config = api.create_host_config(
            port_bindings={f"{spec.port}/tcp": (self.address, None)},
            pids_limit=self.limits.pids,
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"],
            cap_add=list(spec.cap_add) or None,
            mem_limit=memory,
            memswap_limit=memory,  # no swap on top: the limit is the limit
            nano_cpus=int(spec.cpu_limit * 1e9) if spec.cpu_limit else None,
            read_only=True if spec.read_only_root else None,
            tmpfs={"/tmp": "rw,noexec,nosuid,size=64m"} if spec.read_only_root else None,
            mounts=self._secrets_mount(req) if req.secrets else None,
        )
        return api.create_container(
            image,
            command=spec.command,
            detach=True,
            name=f"hms-{req.service}-{req.pod_id[:12]}",
            labels={
                c.LABEL_SERVICE: req.service,
                c.LABEL_POD: req.pod_id,
                c.LABEL_REVISION: str(req.revision),
                c.LABEL_IMAGE: spec.image,
                c.LABEL_NODE: self.node,
                c.LABEL_MANAGED: "1",
            },
            environment=env,
            ports=[(spec.port, "tcp")],
            host_config=host_config,
        )

    def _secrets_mount(self, req: PodLaunch) -> list[Mount]:
        """``/run/secrets``: the pod's files on the node's tmpfs (0400, owned by the image's user),
        bind-mounted read-only. ``docker inspect`` shows the mount's path, never a value."""
        user = (self.client.images.get(req.image_id or req.spec.image).attrs.get("Config") or {}).get("User") or "0"
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or not (gid or uid).isdigit():
            raise PodRuntimeError(f"image {req.spec.image} runs as user {user!r}: a pod with secrets needs a numeric "
                                  "USER (uid[:gid]) so its files can be owned by it", error_type=ActivityErrorType.SPEC_UNRUNNABLE)
        where = pod_secrets.write_pod_files(req.pod_id, req.secrets, uid=int(uid), gid=int(gid or uid), engine=True)
        return [Mount(target="/run/secrets", source=str(where), type="bind", read_only=True)]

    def find(self, pod_id: str) -> PodHandle | None:
        found = self._containers(pod_id=pod_id)
        return self._handle(found[0]) if found else None

    def list(self, service: str | None = None) -> list[PodHandle]:
        return [self._handle(ct) for ct in self._containers(service=service)]

    def stop(self, pod_id: str, grace_s: float) -> bool:
        with self._lock:
            self._pod_locks.pop(pod_id, None)
        found = self._containers(pod_id=pod_id)
        for container in found:
            try:
                if container.status == "running":
                    container.stop(timeout=max(0, int(round(grace_s))))
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
        pod_secrets.remove_pod_files(pod_id)
        return bool(found)

    def logs(self, pod_id: str, tail: int = 100) -> list[str]:
        found = self._containers(pod_id=pod_id)
        if not found:
            raise PodRuntimeError(f"no pod {pod_id} on node {self.node}", error_type=ActivityErrorType.POD_NOT_FOUND)
        raw = found[0].logs(tail=tail if tail > 0 else "all", stdout=True, stderr=True)
        return raw.decode(errors="replace").splitlines()

    def follow(self, pod_id: str, tail: int = 100) -> LogFollow:
        found = self._containers(pod_id=pod_id)
        if not found:
            raise PodRuntimeError(f"no pod {pod_id} on node {self.node}", error_type=ActivityErrorType.POD_NOT_FOUND)
        # Docker ends the stream when the container stops; close() ends a blocked read.
        stream = found[0].logs(stream=True, follow=True, tail=tail if tail > 0 else "all", stdout=True, stderr=True)
        return StreamFollow(stream, stream.close)

    def _cpu_one(self, pod_id: str, container_id: str) -> float | None:
        for path in (_CGROUP_V1 / container_id / "cpuacct.usage",):
            try:
                return int(path.read_text()) / 1e9
            except (OSError, ValueError):
                pass
        v2 = _CGROUP_V2 / f"docker-{container_id}.scope" / "cpu.stat"
        try:
            for line in v2.read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            pass
        try:  # the engine's one-shot stats: one request, no two-sample wait
            stats = self.client.api.stats(container_id, stream=False, one_shot=True)
            return stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        except Exception:  # noqa: BLE001 - a pod that just exited has no stats
            return None

    def cpu_seconds(self, pod_ids: list[str]) -> dict[str, float]:
        wanted = set(pod_ids)
        ids = {h.pod_id: h.extra["container_id"] for h in self.list() if h.pod_id in wanted and h.running}
        futures = {pid: self._pool.submit(self._cpu_one, pid, cid) for pid, cid in ids.items()}
        out = {}
        for pid, fut in futures.items():
            value = fut.result()
            if value is not None:
                out[pid] = value
        return out

    def subscribe_exits(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Docker's event stream tells us of a dying container at once (no polling)."""
        with self._lock:
            unsubscribe = self._subscribers.add(callback)
            if self._events_thread is None or not self._events_thread.is_alive():
                self._events_thread = threading.Thread(target=self._pump_events, name="hms-docker-events", daemon=True)
                self._events_thread.start()
        return unsubscribe

    def _pump_events(self) -> None:
        while not self._closed:
            try:
                stream = self.client.events(
                    decode=True,
                    filters={"type": "container", "event": ["die"], "label": [f"{c.LABEL_NODE}={self.node}"]},
                )
                self._events_stream = stream
                for event in stream:
                    attrs = (event.get("Actor") or {}).get("Attributes") or {}
                    pod_id = attrs.get(c.LABEL_POD)
                    if not pod_id:
                        continue
                    with self._lock:
                        self._remember_exit(pod_id, attrs.get("exitCode"))
                    for cb in self._subscribers.current():
                        cb(pod_id)
            except Exception as e:  # noqa: BLE001 - reconnect: the watchers poll meanwhile
                if self._closed:
                    return
                log.warning("docker event stream broke (%s); reconnecting", e)
                time.sleep(1)

    def _remember_exit(self, pod_id: str, code: str | None) -> None:
        if code is None or not code.lstrip("-").isdigit():
            return
        self._exit_codes[pod_id] = int(code)
        self._exit_codes.move_to_end(pod_id)
        while len(self._exit_codes) > EXIT_CODES_KEPT:
            self._exit_codes.popitem(last=False)

    def reported_exit(self, pod_id: str) -> int | None:
        """The ``exitCode`` of the pod's container's last ``die`` event (no engine call)."""
        with self._lock:
            return self._exit_codes.get(pod_id)

    def content_id(self, image: str) -> str:
        try:
            return self.client.images.get(image).id
        except docker.errors.ImageNotFound as e:
            raise PodRuntimeError(f"image {image!r} is not on node {self.node}", error_type=ActivityErrorType.IMAGE_NOT_FOUND) from e

    def repo_digest(self, image: str) -> str:
        """The digest the registry named in ``image`` gave this content when it was pushed there."""
        repo = _repository(image)
        digests = self.client.images.get(image).attrs.get("RepoDigests") or []
        return next((d for d in digests if d.partition("@")[0] == repo), "")

    def pull_content_id(self, image: str) -> str:
        """What the registry named in ``image`` serves under it (a local tag may hold other
        content: a pod runs what was signed, never what a tag on this node says), pulled by
        digest when missing here; the local content when no registry answers."""
        if "/" not in image.partition("@")[0]:
            return self.content_id(image)  # names no registry: only this node's copy counts
        try:
            served = f"{_repository(image)}@{self.client.images.get_registry_data(image).id}"
        except docker.errors.APIError as e:
            try:
                return self.content_id(image)
            except PodRuntimeError:
                raise PodRuntimeError(f"image {image!r} is not on node {self.node} and cannot be pulled: "
                                      f"{e.explanation or e}", error_type=ActivityErrorType.IMAGE_NOT_FOUND) from e
        try:
            return self.client.images.get(served).id
        except docker.errors.ImageNotFound:
            pass
        try:
            return self.client.images.pull(served).id
        except docker.errors.APIError as e:
            raise PodRuntimeError(f"image {image!r} is not on node {self.node} and cannot be pulled from {served}: "
                                  f"{e.explanation or e}", error_type=ActivityErrorType.IMAGE_NOT_FOUND) from e

    def fetch(self, content_id: str, repo_digest: str) -> None:
        """Pull by digest, never by tag, and keep the result only if it is the signed content."""
        try:
            self.client.images.get(content_id)
            return
        except docker.errors.ImageNotFound:
            pass
        if not repo_digest:
            raise PodRuntimeError(f"content {content_id[:19]} is not on node {self.node} and was signed with no "
                                  "registry digest: push the image to a registry and sign it again",
                                  error_type=ActivityErrorType.IMAGE_NOT_FOUND)
        try:
            got = self.client.images.pull(repo_digest)
        except docker.errors.APIError as e:
            raise PodRuntimeError(f"content {content_id[:19]} is not on node {self.node} and cannot be pulled from "
                                  f"{repo_digest}: {e.explanation or e}",
                                  error_type=ActivityErrorType.IMAGE_NOT_FOUND) from e
        if got.id != content_id:  # a registry that serves other bytes for a digest: keep none of it
            self.client.images.remove(repo_digest, force=True)
            raise PodRuntimeError(f"{repo_digest} gave content {got.id[:19]}, not the signed {content_id[:19]}",
                                  error_type=ActivityErrorType.IMAGE_UNTRUSTED)
        log.info("pulled %s (content %s) onto node %s", repo_digest, content_id[:19], self.node)

    def close(self) -> None:
        self._closed = True
        if self._events_stream is not None:
            try:
                self._events_stream.close()
            except Exception:  # noqa: BLE001
                pass
        self._pool.shutdown(wait=False)
        self.client.close()
