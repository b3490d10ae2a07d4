"""The worker SIGKILLed at random moments while services deploy, scale up, heal and roll out.

The worker runs as a real process (``python -m worker``) and is started again after every kill.
Whatever was in flight, every service ends at the replica count and image it was last asked
for, with exactly the pods its workflow reports: no orphan (a pod that runs but is on no
workflow's books), no duplicate (a pod id running twice, or more pods than wanted), none missing
— compared with the process table (process runtime) or the containers carrying the test's node
label (Docker runtime). Short run: 3 kills, process runtime; ``HMS_CHAOS=full``: 20 kills, both.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest
from chaos_helpers import (  # noqa: F401 - chaos_rng is a fixture
    COUNTS,
    FULL,
    MAX_REPLICAS,
    chaos_rng,
    chaos_spec,
    converge,
    describe,
    kill_pod,
    replay_failures,
    report,
    runtime_pods,
)
from conftest import (
    EXAMPLE_IMAGE,
    V2_IMAGE,
    WorkerProcess,
    eventually,
    make_settings,
    require_docker,
    sweep_pods,
    terminate_running,
)

from hms_mgmt.events import read_events
from hms_mgmt.orchestrator import Orchestrator

RUNTIMES = ["process", "docker"] if FULL else ["process"]
def ready_lines(worker: WorkerProcess) -> int:
    """How many times a worker process said it is ready (one line per start)."""
    try:
        return worker.log_path.read_text(errors="replace").count("worker ready")
    except FileNotFoundError:
        return 0


class Chaos:
    """The operations the test asks for, and what each service should end up as."""

    def __init__(self, orch: Orchestrator, settings, names: list[str], rng: random.Random) -> None:
        self.orch = orch
        self.settings = settings
        self.rng = rng
        self.undeployed = list(names)
        self.want: dict[str, tuple[int, str]] = {}  # name -> (replicas, image) last accepted
        self.busy: set[str] = set()
        self.outcomes: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: list[str] = []

    async def _supervised(self, name: str) -> None:
        await eventually(lambda: self._phase_in(name, {"Running", "Healing", "Scaling"}), timeout=120,
                         interval=0.5, what=f"{name} supervised")

    async def _phase_in(self, name: str, phases: set[str]) -> bool:
        try:
            return (await asyncio.wait_for(self.orch.status(name, live=False), 10)).phase in phases
        except Exception:  # noqa: BLE001 - no worker to answer the query yet
            return False

    def next_op(self) -> tuple[str, str] | None:
        choices: list[tuple[str, str]] = []
        if self.undeployed:
            choices.append(("deploy", self.undeployed[0]))
        for name, (replicas, _) in self.want.items():
            if name in self.busy:
                continue
            choices.append(("rollout", name))
            choices.append(("heal", name))
            if replicas < MAX_REPLICAS:
                choices.append(("scale_up", name))
        return self.rng.choice(choices) if choices else None

    async def launch_when_free(self, timeout: float = 60.0) -> str:
        """An operation on a service with none in flight (waiting for one, bounded)."""
        deadline = time.monotonic() + timeout
        while self.next_op() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return self.launch()

    def launch(self, op: tuple[str, str] | None = None) -> str:
        op = op or self.next_op()
        if op is None:
            return "none (every service busy)"
        kind, name = op
        if kind == "deploy":
            self.undeployed.remove(name)
        self.busy.add(name)
        self.tasks.append(asyncio.ensure_future(self._run(kind, name)))
        return f"{kind} {name}"

    async def _run(self, kind: str, name: str) -> None:
        try:
            await asyncio.wait_for(self._op(kind, name), 300)
            self.outcomes[f"{kind}: ok"] += 1
        except Exception as e:  # noqa: BLE001 - a refusal is an answer; the books decide
            self.outcomes[f"{kind}: {type(e).__name__}"] += 1
            self.errors.append(f"{kind} {name}: {type(e).__name__}: {e}")
        finally:
            self.busy.discard(name)

    async def _op(self, kind: str, name: str) -> None:
        if kind == "deploy":
            await self.orch.deploy(chaos_spec(name))
            self.want[name] = (2, EXAMPLE_IMAGE)
        elif kind == "scale_up":
            replicas, image = self.want[name]
            await self._supervised(name)  # a scale while a rollout runs is refused, rightly
            await self.orch.scale(name, replicas + 1)
            self.want[name] = (replicas + 1, image)
        elif kind == "rollout":  # v1 -> v2, and back to v1 as a new revision
            replicas, image = self.want[name]
            other = V2_IMAGE if image == EXAMPLE_IMAGE else EXAMPLE_IMAGE
            await self.orch.deploy(chaos_spec(name, other))
            self.want[name] = (replicas, other)
        elif kind == "heal":
            running = [h.pod_id for h in await asyncio.to_thread(runtime_pods, self.settings)
                       if h.service == name and h.running]
            if running:
                await asyncio.to_thread(kill_pod, self.settings, self.rng.choice(sorted(running)))


@pytest.mark.timeout(300 + 40 * COUNTS.worker_kills)
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_worker_sigkilled_at_random_moments_converges_with_exact_pods(temporal_env, tmp_path, runtime,
                                                                            chaos_rng, capsys):
    if runtime == "docker":
        require_docker()
    rng = chaos_rng
    settings = make_settings(temporal_env, tmp_path / "state", runtime)
    tag = settings.node[1:7]
    names = [f"chaos-{tag}-{i}" for i in range(COUNTS.worker_services)]
    orch = Orchestrator(temporal_env.client, settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    chaos = Chaos(orch, settings, names, rng)
    started = time.monotonic()
    worker.start()
    await eventually(lambda: ready_lines(worker) > 0, timeout=90, what="the worker started")
    try:
        # The first deploy goes through whole, so the rest has a service to act on.
        chaos.launch()
        await asyncio.gather(*chaos.tasks)
        log = []
        for i in range(COUNTS.worker_kills):
            op = await chaos.launch_when_free()
            await asyncio.sleep(rng.uniform(0.2, 6.0))
            worker.kill()
            down = rng.uniform(0.0, 1.5)
            log.append(f"kill {i + 1} during {op}, down {down:.1f}s")
            await asyncio.sleep(down)
            ready_before = ready_lines(worker)
            worker.start()
            await eventually(lambda: ready_lines(worker) > ready_before, timeout=90, what="the worker started")
        last_kill = time.monotonic()
        for name in list(chaos.undeployed):  # every service exists by the end
            chaos.launch(("deploy", name))
        done, pending = await asyncio.wait(chaos.tasks, timeout=240) if chaos.tasks else (set(), set())
        assert not pending, f"operations still unanswered 240 s after the last kill: {chaos.outcomes}"
        # A worker that keeps dying leaves the workflow's task failed for a while: callers wait
        # for it (the server's "Workflow Task in failed state") rather than fail.
        turned_away = [e for e in chaos.errors if "Workflow Task in failed state" in e]
        assert not turned_away, f"operations turned away while the worker restarted: {turned_away}"
        want = {n: chaos.want[n] for n in names}
        sts, bk = await converge(orch, settings, want, timeout=240)
        converged_s = time.monotonic() - last_kill
        assert sts and all(
            s.phase == "Running" and s.desired_replicas == want[n][0] and s.spec.image == want[n][1]
            and len(s.pods) == want[n][0] and all(p.ready and p.revision == s.revision for p in s.pods)
            for n, s in sts.items()
        ), f"not converged to {want} (seed in the header): {describe(sts)}"
        for b in bk:
            assert not b.orphans, f"orphan pods: {b}"
            assert not b.duplicates, f"duplicate pods: {b}"
            assert not b.missing and not b.exited, f"booked pods not running / leftovers: {b}"
        # An orphan removed by the monitor or the node sweep leaked once: that counts too.
        removed = [e for e in read_events(settings.state_dir)
                   if e.type == "pod.stopped" and "orphan" in e.reason and e.service in names]
        swept = (tmp_path / "worker.log").read_text(errors="replace").count("removed stale pod")
        assert not removed and not swept, f"orphans were removed along the way: {removed} / {swept} swept"
        report(f"worker kills ({runtime}): {COUNTS.worker_kills} SIGKILLs, {len(names)} services, "
               f"ops {dict(sorted(chaos.outcomes.items()))}; converged {converged_s:.0f}s after the last kill; "
               f"pods {sum(len(s.pods) for s in sts.values())}: 0 orphan, 0 duplicate, 0 missing; "
               f"total {time.monotonic() - started:.0f}s", capsys)
        report("; ".join(log), capsys)
        if chaos.errors:
            report("refused or failed operations: " + "; ".join(chaos.errors), capsys)

        await asyncio.gather(*(orch.undeploy(n, timeout=120) for n in names))
        left = [h.pod_id for h in await asyncio.to_thread(runtime_pods, settings) if h.service in names]
        assert left == [], f"pods left after undeploy: {left}"
    finally:
        worker.stop()
        # Every run, replayed whole as a restarted worker replays it (the histories that fail are kept).
        bad = await replay_failures(temporal_env.client, settings, tmp_path / "nondeterministic")
        if bad:
            report(f"histories that do not replay (kept in {tmp_path / 'nondeterministic'}): {bad}", capsys)
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
    assert not bad, f"workflow histories that a restarted worker could not replay: {bad}"
