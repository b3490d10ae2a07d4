"""Pods as local processes: the embedded default where no Docker Engine answers.

A pod process outlives the worker that started it (as a container outlives a Docker client):
it runs in its own session and is recorded under ``<state>/pods/<node>/<pod>.json`` so a
restarted worker finds and adopts it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from hms_mgmt.errors import ConfigError
from hms_mgmt.files import atomic_write, load_yaml_mapping
from hms_mgmt.runtimes.base import PodHandle, PodLaunch, PodRuntime, PodRuntimeError

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]


PYTHON = "{python}"  # stands for the worker's own interpreter, whichever path started it


def default_catalog() -> dict[str, dict[str, Any]]:
    """The example services' images, runnable as processes of the worker's Python."""
    py = PYTHON
    return {
        "*hms-ach:1.5": {"command": [py, "-m", "services.hms_ach"], "env": {"HMS_VERSION": "1.5"}},
        "*hms-ach:*": {"command": [py, "-m", "services.hms_ach"]},
        "*hms-frm:*": {"command": [py, "-m", "services.hms_frm"]},
        "*hms-notify:*": {"command": [py, "-m", "services.hms_notify"]},
        "*hms-crashloop:*": {
            "command": [py, "-m", "services.hms_ach"],
            "env": {"HMS_EXIT_AT_START": "3"},
        },
    }


class ImageCatalog:
    """Maps image references (exact, or fnmatch patterns) to a command, env and cwd.

    ``<state>/images.yaml`` adds to and overrides the built-in entries.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "images.yaml"

    def entries(self) -> dict[str, dict[str, Any]]:
        entries = default_catalog()
        try:
            entries.update(load_yaml_mapping(self.path, what="image to {command: [...]}"))
        except ConfigError as e:
            raise PodRuntimeError(str(e)) from e
        return entries

    def resolve(self, image: str) -> dict[str, Any]:
        entries = self.entries()
        if image in entries:
            return entries[image]
        for pattern, entry in entries.items():
            if fnmatch.fnmatchcase(image, pattern):
                return entry
        raise PodRuntimeError(
            f"image {image!r} is not in the process runtime's image catalog ({self.path}); "
            f"known: {', '.join(sorted(entries))}",
            kind="ImageNotFound",
        )

    def content_id(self, image: str) -> str:
        """A hash of the catalog entry (with ``{python}`` unresolved, so the same entry has
        the same identity whichever interpreter path the worker was started with)."""
        entry = self.resolve(image)
        blob = json.dumps(entry, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessRuntime(PodRuntime):
    name = "process"

    def __init__(self, node: str, state_dir: Path) -> None:
        super().__init__(node)
        self.state_dir = state_dir
        self.records = state_dir / "pods" / node
        self.log_dir = state_dir / "logs" / node
        self.records.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = ImageCatalog(state_dir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # --- records -----------------------------------------------------------------

    def _record_path(self, pod_id: str) -> Path:
        return self.records / f"{pod_id}.json"

    def _read(self, pod_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(pod_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self, rec: dict[str, Any]) -> None:
        path = self._record_path(rec["pod_id"])
        atomic_write(path, json.dumps(rec))

    def _process(self, rec: dict[str, Any]) -> psutil.Process | None:
        """The live process of a record, or None (gone, zombie, or a reused pid)."""
        child = self._children.get(rec["pod_id"])
        if child is not None and child.poll() is not None:
            rec.setdefault("exit_code", child.returncode)
            return None
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["create_time"]) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def _handle(self, rec: dict[str, Any]) -> PodHandle:
        alive = self._process(rec) is not None
        return PodHandle(
            pod_id=rec["pod_id"],
            service=rec["service"],
            revision=rec["revision"],
            node=rec["node"],
            image=rec["image"],
            state="running" if alive else "exited",
            endpoint=f"127.0.0.1:{rec['port']}",
            started_at=datetime.fromisoformat(rec["started_at"]),
            exit_code=None if alive else rec.get("exit_code"),
            cpu_limit=rec.get("cpu_limit"),
            extra={"pid": str(rec["pid"]), "log": rec["log"]},
        )

    # --- interface -----------------------------------------------------------------

    def start(self, req: PodLaunch) -> PodHandle:
        with self._lock:
            rec = self._read(req.pod_id)
            if rec is not None:
                if self._process(rec) is not None:
                    return self._handle(rec)
                self._stop_record(rec, 0)
            entry = self.catalog.resolve(req.spec.image)
            if req.image_id and self.catalog.content_id(req.spec.image) != req.image_id:
                # A process cannot run old content: refuse rather than run what was not admitted.
                raise PodRuntimeError(
                    f"image {req.spec.image} changed since it was admitted ({req.image_id[:19]}): redeploy it",
                    kind="ImageUntrusted",
                )
            command = [sys.executable if part == PYTHON else part for part in (req.spec.command or entry["command"])]
            port = _free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
            env.update({str(k): str(v) for k, v in (entry.get("env") or {}).items()})
            env.update(req.spec.env)
            env.update(
                {
                    "PORT": str(port),
                    "HOST": "127.0.0.1",
                    "HMS_POD_ID": req.pod_id,
                    "HMS_SERVICE": req.service,
                    "HMS_REVISION": str(req.revision),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            pythonpath = [str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            env["PYTHONPATH"] = os.pathsep.join(pythonpath)
            log_path = self.log_dir / f"{req.pod_id}.log"
            with open(log_path, "ab") as log_file:
                try:
                    child = subprocess.Popen(
                        command,
                        env=env,
                        cwd=entry.get("cwd") or str(_REPO_ROOT),
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as e:
                    raise PodRuntimeError(f"cannot start {command[0]!r}: {e}", kind="ImageNotFound") from e
            self._children[req.pod_id] = child
            rec = {
                "pod_id": req.pod_id,
                "service": req.service,
                "revision": req.revision,
                "node": self.node,
                "image": req.spec.image,
                "pid": child.pid,
                "create_time": psutil.Process(child.pid).create_time(),
                "port": port,
                "cpu_limit": req.spec.cpu_limit,
                "started_at": datetime.now(UTC).isoformat(),
                "log": str(log_path),
                "command": command,
            }
            self._write(rec)
            log.info("started pod %s (%s) pid %s on 127.0.0.1:%s", req.pod_id, req.service, child.pid, port)
            return self._handle(rec)

    def find(self, pod_id: str) -> PodHandle | None:
        rec = self._read(pod_id)
        return self._handle(rec) if rec else None

    def list(self, service: str | None = None) -> list[PodHandle]:
        out = []
        for path in sorted(self.records.glob("*.json")):
            rec = self._read(path.stem)
            if rec and (service is None or rec["service"] == service):
                out.append(self._handle(rec))
        return out

    def _stop_record(self, rec: dict[str, Any], grace_s: float) -> None:
        proc = self._process(rec)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._process(rec) is not None:
                time.sleep(0.05)
            if self._process(rec) is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=5)
                except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
                    pass
        child = self._children.pop(rec["pod_id"], None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("pod %s did not exit after SIGKILL", rec["pod_id"])
        self._record_path(rec["pod_id"]).unlink(missing_ok=True)

    def stop(self, pod_id: str, grace_s: float) -> bool:
        with self._lock:
            rec = self._read(pod_id)
            if rec is None:
                return False
            self._stop_record(rec, grace_s)
            return True

    def logs(self, pod_id: str, tail: int = 100) -> list[str]:
        path = self.log_dir / f"{pod_id}.log"
        if not path.exists():
            raise PodRuntimeError(f"no logs for pod {pod_id} on node {self.node}", kind="PodNotFound")
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
        return lines[-tail:] if tail > 0 else lines

    def cpu_seconds(self, pod_ids: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for pod_id in pod_ids:
            rec = self._read(pod_id)
            proc = self._process(rec) if rec else None
            if proc is None:
                continue
            try:
                t = proc.cpu_times()
                out[pod_id] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
        return out

    def exited(self, pod_ids: list[str]) -> list[str]:
        """Pods among ``pod_ids`` whose process is gone (cheap: one stat per pod)."""
        gone = []
        for pod_id in pod_ids:
            rec = self._read(pod_id)
            if rec is None or self._process(rec) is None:
                gone.append(pod_id)
        return gone

    def content_id(self, image: str) -> str:
        return self.catalog.content_id(image)
