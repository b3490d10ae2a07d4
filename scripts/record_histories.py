"""Record the workflow histories that tests/replay/test_replay.py replays.

Runs each scenario against a fresh Temporal dev server with a real worker and real process pods,
then saves the history of every workflow execution it made (ServiceWorkflow runs and their
children, NodeRegistry, RouterRegistry) as Temporal's JSON history format under
tests/replay/histories/<set>/<scenario>/, one set per recording (default: the UTC date, time and the
commit, e.g. ``20261129-1630-abc1234``, so sets sort by age; ``HMS_HISTORY_SET`` names it).

    .venv/bin/python scripts/record_histories.py              # every scenario (about 2 minutes)
    .venv/bin/python scripts/record_histories.py heal scale   # some of them, into the same set

Regenerate after an intentional workflow change that is guarded by ``workflow.patched`` (the
old histories must still replay: keep them next to the new ones until no such run is left),
or when a new scenario is added. Never regenerate to make a failing replay pass: a failure
means a running workflow would break on the new code.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError  # noqa: E402

from hms_mgmt import (  # noqa: E402
    auth,
    constants,
    nodeid,  # noqa: E402
)
from hms_mgmt.config import Settings  # noqa: E402
from hms_mgmt.errors import RolloutFailed  # noqa: E402
from hms_mgmt.models import NodeRegistration, NodeRegistryInput, NodeSpec  # noqa: E402
from hms_mgmt.nodes import registry_nodes  # noqa: E402
from hms_mgmt.orchestrator import Orchestrator  # noqa: E402
from hms_mgmt.runtimes import make_runtime  # noqa: E402
from hms_mgmt.testing import dev_environment, kill_process_pod  # noqa: E402
from hms_mgmt.trust import TrustStore  # noqa: E402
from hms_mgmt.wire import RouterRegistration, RouterRegistryInput  # noqa: E402
from worker.main import HmsWorker  # noqa: E402
from workflows.nodes import NodeRegistry  # noqa: E402
from workflows.routers import RouterRegistry  # noqa: E402

OUT = REPO / "tests" / "replay" / "histories"
V1 = "registry.gov/hms-ach:1.4"
V2 = "registry.gov/hms-ach:1.5"
CRASHLOOP = "registry.gov/hms-crashloop:1.0"
FAST = {"health_interval_s": 1.0, "health_failures": 2, "drain_s": 0.5, "min_ready_s": 0.5}
KEEP_RUNS = 3  # of a continue-as-new chain: the first runs show the hand-over; more add nothing


def spec(name: str = "hms-ach", **kw: object) -> dict[str, object]:
    return {"name": name, "image": V1, "min_replicas": 1, "max_replicas": 3, "cpu_target": 60, **FAST, **kw}


async def until(what: str, check: Callable[[], Awaitable[object]], timeout: float = 90.0) -> object:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


class Stack:
    """One scenario's worker, node and state: its own task queue, so its executions are its own."""

    def __init__(self, client: Client, address: str, scenario: str, root: Path, **extra: object) -> None:
        state = root / scenario
        tag = scenario.replace("_", "-")
        state.mkdir(parents=True)
        auth.init_keys(state)
        self.client = client
        self.settings = Settings(
            temporal_address=address, state_dir=state, runtime="process", task_queue=f"hms-control-{tag}",
            node=f"node-{tag}", capacity_retry_max_s=1.0, routers=["http://127.0.0.1:9"], metrics_port=0,
            token=auth.issue_token(state, user="alice", role="ops_admin"), **extra,  # type: ignore[arg-type]
        )
        rt = self.runtime()
        try:
            for image in (V1, V2, CRASHLOOP):
                TrustStore(state).sign(image, rt.content_id(image), signer="release")
        finally:
            rt.close()
        self.alice = Orchestrator(client, self.settings)
        self.bob = Orchestrator(client, self.settings.model_copy(
            update={"token": auth.issue_token(state, user="bob", role="gov_approver")}))

    def runtime(self):  # noqa: ANN201
        return make_runtime("process", node=self.settings.node, state_dir=self.settings.state_dir)

    async def kill_and_heal(self) -> None:
        """SIGKILL hms-ach's first pod; wait until a heal child has replaced it."""
        kill_process_pod(self.settings, (await self.alice.status("hms-ach")).pods[0].id)

        async def healed() -> bool:
            st = await self.alice.status("hms-ach")
            return st.heal_count == 1 and st.phase == "Running" and st.ready_replicas == 1
        await until("the heal", healed)

    def sweep(self) -> None:
        rt = self.runtime()
        try:
            for pod in rt.list():
                rt.stop(pod.pod_id, 0)
        finally:
            rt.close()


# --- scenarios ---------------------------------------------------------------------------------


async def deploy(s: Stack) -> None:
    """A dry run (the NodeRegistry's dry_run update), then deploy the seed's spec, wait until
    Running, dry-run a changed spec, read a pod's log, undeploy."""
    await until("the node registered", lambda: registry_nodes(s.client, s.settings))
    assert (await s.alice.dry_run(spec(min_replicas=2))).admitted
    await s.alice.deploy(spec(min_replicas=2), wait=True, timeout=120)
    assert (await s.alice.dry_run(spec(min_replicas=2, image=V2))).change is not None
    await s.alice.logs("hms-ach", (await s.alice.status("hms-ach")).pods[0].id, tail=5)
    await s.alice.undeploy("hms-ach")


async def heal(s: Stack) -> None:
    """A pod killed with SIGKILL is replaced by a heal child."""
    await s.alice.deploy(spec(), wait=True, timeout=120)
    await s.kill_and_heal()
    await s.alice.undeploy("hms-ach")


async def crashloop(s: Stack) -> None:
    """An image that exits at start: Degraded, heal retries with backoff timers, then undeployed."""
    await s.alice.deploy(spec(name="hms-loop", image=CRASHLOOP, backoff_initial_s=0.5, backoff_max_s=2))

    async def degraded() -> bool:
        st = await s.alice.status("hms-loop")
        return st.phase == "Degraded" and st.crash_count >= 3
    await until("Degraded", degraded)
    await s.alice.undeploy("hms-loop")


async def scale(s: Stack) -> None:
    """Manual scale up (1 -> 3) and down (3 -> 1, the victims drained first)."""
    await s.alice.deploy(spec(), wait=True, timeout=120)
    await s.alice.scale("hms-ach", 3, reason="more traffic")
    await s.alice.scale("hms-ach", 1, reason="less traffic")
    await s.alice.undeploy("hms-ach")


async def approval(s: Stack) -> None:
    """Over the governance limit: one service approved by signal (as the Temporal CLI and the Web
    UI send it), one approved by update, one rejected by update."""
    big = {"max_replicas": 12}
    for name in ("hms-ach", "hms-frm", "hms-notify"):
        await s.alice.deploy(spec(name=name, **big))
    # What `hms approve hms-ach --print-signal` prints: a proof bound to the pending request.
    by_signal = await s.bob.approval("approve", "hms-ach", reason="by signal")
    await s.client.get_workflow_handle("svc-hms-ach").signal("approve", by_signal)
    await s.bob.approve("hms-frm", reason="by update")
    await s.bob.reject("hms-notify", reason="not today")
    for name in ("hms-ach", "hms-frm"):
        await s.alice.wait_for(name, timeout=60)
        await s.alice.undeploy(name)


async def capacity(s: Stack) -> None:
    """One pod slot: a second service waits for capacity (status().waiting_for, re-read on the
    Scheduler's hint) until the first one is undeployed."""
    await s.alice.deploy(spec(), wait=True, timeout=120)
    await s.alice.deploy(spec(name="hms-frm"))

    async def waiting() -> bool:
        w = (await s.alice.status("hms-frm")).waiting_for
        return w is not None and w.kind == "capacity"
    await until("the capacity wait", waiting)
    await s.alice.undeploy("hms-ach")
    await s.alice.wait_for("hms-frm", timeout=60)
    await s.alice.undeploy("hms-frm")


async def continue_as_new(s: Stack) -> None:
    """A tiny history threshold (Settings.history_threshold): continue-as-new after each step,
    a heal carried into a later run."""
    first = await s.alice.deploy(spec(), wait=True, timeout=120)
    handle = s.client.get_workflow_handle("svc-hms-ach")

    async def new_run() -> bool:
        desc = await handle.describe()
        return desc.run_id != first.run_id and desc.status == WorkflowExecutionStatus.RUNNING
    await until("a continue-as-new", new_run)
    await s.kill_and_heal()
    await s.alice.undeploy("hms-ach")


async def rollout(s: Stack) -> None:
    """v1 -> v2 completes; v2 -> a crash-looping image rolls back to v2."""
    v1 = spec(min_replicas=2, max_replicas=2, progress_deadline_s=30)
    await s.alice.deploy(v1, wait=True, timeout=120)
    await s.alice.update_spec({**v1, "image": V2}, wait=True, timeout=120)
    try:
        await s.alice.update_spec({**v1, "image": CRASHLOOP}, wait=True, timeout=120)
        raise AssertionError("the crash-looping revision did not roll back")
    except RolloutFailed:
        pass
    await s.alice.undeploy("hms-ach")


async def secrets(s: Stack) -> None:
    """A spec naming a secret (its value sealed per pod start: the pod-secrets branch), a pod of
    it healed, then a new value that rolls the service onto a revision pinning version 2."""
    await s.alice.set_secret("bank-key", b"recorded-value-1")
    await s.alice.deploy(spec(secrets=["bank-key"]), wait=True, timeout=120)
    await s.kill_and_heal()
    await s.alice.set_secret("bank-key", b"recorded-value-2")

    async def rotated() -> bool:
        st = await s.alice.status("hms-ach")
        return st.revision == 2 and st.phase == "Running" and all(p.revision == 2 and p.ready for p in st.pods)
    await until("the rollout onto bank-key v2", rotated)
    await s.alice.undeploy("hms-ach")


async def beat_until_continued(s: Stack, handle: WorkflowHandle, heartbeat: Any, signed: Callable[[str], object],
                               what: str) -> WorkflowHandle:
    """Heartbeats, each freshly signed, until the registry continued-as-new; a handle on its latest run."""
    first = (await handle.describe()).run_id
    latest = s.client.get_workflow_handle(handle.id)

    async def moved_on() -> bool:
        return (await latest.describe()).run_id != first
    for _ in range(100):  # a few at a time: a burst is checked as one batch
        if await moved_on():
            break
        for _ in range(3):
            await handle.signal(heartbeat, signed("heartbeat"))
        await asyncio.sleep(0.1)
    await until(what, moved_on, timeout=20)
    return latest


async def registry(s: Stack) -> None:
    """A NodeRegistry of its own (its seed and grace from the control worker's settings: the
    scenario configures a static node and a 2 s grace): a worker node joins (the ``join``
    signal) and another registers with the older ``register`` update, both heartbeat until
    continue-as-new (history_threshold), a silent seeded node turns Lost and services are told."""
    queue = s.settings.task_queue
    handle = await s.client.start_workflow(
        NodeRegistry.run, NodeRegistryInput(control_task_queue=queue, history_threshold=40),
        id=f"{constants.node_registry_id(queue)}-recorded", task_queue=queue,
    )
    # An enrolled node (the recorder's state dir holds the control key: it enrols itself), signing each message.
    ident = nodeid.node_identity(s.settings.state_dir, "w", "127.0.0.1")
    node = NodeRegistration(spec=NodeSpec(name="w", task_queue=constants.node_task_queue("w")), worker="recorder",
                            cert=ident.cert)

    def signed(kind: str) -> NodeRegistration:
        return node.model_copy(update={"proof": ident.say(kind, node.signed_part())})

    await handle.signal(NodeRegistry.join, signed("register").model_copy(update={"request_id": "recorded-join"}))
    await until("the join answered", lambda: handle.query(NodeRegistry.joined, "recorded-join"), timeout=20)
    await handle.execute_update(NodeRegistry.register, signed("register"))
    latest = await beat_until_continued(s, handle, NodeRegistry.heartbeat, signed, "a continue-as-new")

    async def static_lost() -> bool:
        out = await latest.query(NodeRegistry.nodes)
        return any(r.spec.name == "static" and r.state == "Lost" for r in out.nodes)
    await until("the silent node Lost", static_lost, timeout=20)
    await router_registry(s)


async def router_registry(s: Stack) -> None:
    """A RouterRegistry: an enrolled router registers and heartbeats until continue-as-new, a
    registration without a certificate is refused, and the silent router turns Lost."""
    queue = s.settings.task_queue
    handle = await s.client.start_workflow(
        RouterRegistry.run, RouterRegistryInput(control_task_queue=queue, history_threshold=40),
        id=constants.router_registry_id(queue), task_queue=queue)
    ident = nodeid.node_identity(s.settings.state_dir, "edge", "127.0.0.1", role="router")
    reg = RouterRegistration(name="edge", address="127.0.0.1", url="http://127.0.0.1:9", worker="recorder",
                             cert=ident.cert)

    def signed(kind: str) -> RouterRegistration:
        return reg.model_copy(update={"proof": ident.say(f"router-{kind}", reg.signed_part())})

    await handle.signal(RouterRegistry.join, signed("register").model_copy(update={"request_id": "recorded-join"}))
    await until("the router's join answered", lambda: handle.query(RouterRegistry.joined, "recorded-join"), timeout=20)
    await handle.execute_update(RouterRegistry.register, signed("register"))
    try:
        await handle.execute_update(RouterRegistry.register, RouterRegistration(name="intruder", address="127.0.0.1",
                                                                                url="http://127.0.0.1:9"))
        raise AssertionError("an unenrolled router registered")
    except WorkflowUpdateFailedError:
        pass
    latest = await beat_until_continued(s, handle, RouterRegistry.heartbeat, signed,
                                        "a continue-as-new of the router registry")

    async def lost() -> bool:
        return any(r.state == "Lost" for r in (await latest.query(RouterRegistry.routers_query)).routers)
    await until("the silent router Lost", lost, timeout=20)


SCENARIOS: dict[str, tuple[Callable[[Stack], Awaitable[None]], dict[str, object]]] = {
    "deploy": (deploy, {}),
    "heal": (heal, {}),
    "crashloop": (crashloop, {}),
    "scale": (scale, {}),
    "approval": (approval, {}),
    "continue_as_new": (continue_as_new, {"history_threshold": 12}),
    "rollout": (rollout, {}),
    # The recorded registry's seed and grace (and the router registry's grace) are the control worker's.
    "registry": (registry, {"node_lost_after_s": 2.0, "node_heartbeat_s": 1.0,
                            "nodes": [{"name": "node-registry"}, {"name": "static", "task_queue": "hms-node-static"}]}),
    "secrets": (secrets, {}),
    "capacity": (capacity, {"node_max_pods": 1}),
}


# --- recording -----------------------------------------------------------------------------------


async def save_histories(client: Client, queue: str, out: Path, *, keep_registry: bool) -> list[Path]:
    """Every execution on ``queue``: running ones (the worker's own NodeRegistry) are terminated
    first, so each history ends where a replay can check it to the last event."""
    async for wf in client.list_workflows(f'TaskQueue = "{queue}" AND ExecutionStatus = "Running"'):
        await client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate("recording done")
    runs: dict[str, list[tuple[object, str]]] = {}
    async for wf in client.list_workflows(f'TaskQueue = "{queue}"'):
        runs.setdefault(wf.id, []).append((wf.start_time, wf.run_id))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = []
    for wf_id, chain in sorted(runs.items()):
        if wf_id == constants.node_registry_id(queue) and not keep_registry:
            continue  # the worker's own registry: the same in every scenario, kept once
        chain.sort()
        kept = chain if len(chain) <= KEEP_RUNS + 1 else chain[:KEEP_RUNS] + chain[-1:]
        for i, (_, run_id) in enumerate(kept):
            history = await client.get_workflow_handle(wf_id, run_id=run_id).fetch_history()
            name = wf_id.replace(queue, "q")
            path = out / (f"{name}.json" if len(kept) == 1 else f"{name}.run{i + 1}.json")
            # Temporal's JSON history format (``temporal workflow show --output json`` reads the
            # same), plus the workflow id, which a replay needs: child ids derive from it.
            events = json.loads(history.to_json())["events"]
            lines = ",\n".join(json.dumps(e, separators=(",", ":")) for e in events)
            path.write_text(f'{{"workflow_id": {json.dumps(wf_id)},\n "events": [\n{lines}\n]}}\n')
            written.append(path)
    return written


def history_set() -> str:
    if os.environ.get("HMS_HISTORY_SET"):
        return os.environ["HMS_HISTORY_SET"]
    import datetime
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M}-{commit}"


async def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    env = await dev_environment()
    out = OUT / history_set()
    root = Path(tempfile.mkdtemp(prefix="hms-record-"))
    root.chmod(0o755)  # process pods run as an unprivileged user
    try:
        address = env.client.service_client.config.target_host
        for name in names or list(SCENARIOS):
            scenario, extra = SCENARIOS[name]
            stack = Stack(env.client, address, name, root, **extra)
            try:
                async with HmsWorker(env.client, stack.settings):
                    await asyncio.wait_for(scenario(stack), timeout=240)
                    await asyncio.sleep(0.5)  # the last events' workflow tasks complete
                    files = await save_histories(env.client, stack.settings.task_queue, out / name,
                                                 keep_registry=name == "deploy")
            finally:
                stack.sweep()
            events = sum(len(json.loads(f.read_text())["events"]) for f in files)
            print(f"{name}: {len(files)} histories, {events} events")
    finally:
        await env.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
