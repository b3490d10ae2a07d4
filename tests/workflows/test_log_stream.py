"""`logs -f` against the real dev server and real pods: lines come straight from the node's log
stream (a new line shows while the stream is open, the stream ends with a line once the pod is
gone, every pod's lines interleaved with a prefix), none of them is in any workflow's history,
and the node's endpoint reads nothing for a caller without a valid grant."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
import uuid

import aiohttp
import pytest
from conftest import eventually, make_settings, seed_spec, sweep_pods, temporal_binary, terminate_running
from temporalio.client import WorkflowFailureError

from hms_mgmt import auth, logstream, tickets
from hms_mgmt.errors import AccessDenied, HmsError
from hms_mgmt.events import read_events
from hms_mgmt.nodes import registry_nodes
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.wire import LogGrantInput, LogGrantOutput
from worker.main import HmsWorker


def poke(endpoint: str, marker: str) -> None:
    """One request to the pod: its access log writes a line naming ``marker``."""
    urllib.request.urlopen(f"http://{endpoint}/?marker={marker}", timeout=5).read()


class Reader:
    """A follow running in the background, its lines collected as they come."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream) -> None:
        async for line in stream:
            self.lines.append(line)

    def has(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    async def ended(self, timeout: float = 60) -> list[str]:
        await asyncio.wait_for(self.task, timeout)
        return self.lines


def history_texts(settings, service: str) -> dict[str, str]:
    """``temporal workflow show`` of every workflow of ``service`` (the service's, its children's,
    its log grants'), as JSON text."""
    listed = subprocess.run([temporal_binary(), "workflow", "list", "--address", settings.temporal_address,
                             "--query", f'TaskQueue = "{settings.task_queue}"', "--output", "json"],
                            capture_output=True, text=True, timeout=60, check=True)
    ids = {w["execution"]["workflowId"] for w in json.loads(listed.stdout or "[]")}
    out = {}
    for wf_id in sorted(i for i in ids if i.startswith(f"svc-{service}")):
        shown = subprocess.run([temporal_binary(), "workflow", "show", "--address", settings.temporal_address,
                                "--workflow-id", wf_id, "--output", "json"],
                               capture_output=True, text=True, timeout=60, check=True)
        out[wf_id] = shown.stdout
    return out


async def test_follow_shows_new_lines_then_ends_when_the_pod_is_gone(hms: Orchestrator, settings):
    await hms.deploy(seed_spec(min_replicas=1, max_replicas=2, health_interval_s=1.0), wait=True, timeout=120)
    (pod,) = (await hms.status("hms-ach")).pods
    before, after = f"before-{uuid.uuid4().hex[:8]}", f"after-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(poke, pod.endpoint, before)
    snap = await eventually(lambda: _has(hms.logs("hms-ach", pod.id[:8], 50), before), timeout=30,
                            what="the first marker in the snapshot")
    assert all(" | " not in line for line in snap)  # one pod asked for: no prefix

    reader = Reader(hms.follow_logs("hms-ach", pod.id, tail=50))
    await eventually(lambda: reader.has(before), timeout=30, what="the tail")
    await asyncio.to_thread(poke, pod.endpoint, after)
    await eventually(lambda: reader.has(after), timeout=10, what="a line written after the stream started")

    await hms.undeploy("hms-ach")
    lines = await reader.ended()
    assert lines[-1].startswith(f"--- pod {pod.id} is gone"), lines[-3:]

    histories = await asyncio.to_thread(history_texts, settings, "hms-ach")
    assert any("-logs-" in wf_id for wf_id in histories), sorted(histories)
    for wf_id, text in histories.items():
        assert before not in text and after not in text, f"a log line is in the history of {wf_id}"


async def _ready(hms: Orchestrator, n: int):
    st = await hms.status("hms-ach")
    return st if st.ready_replicas == n and len(st.pods) == n else None


async def _has(lines_coro, marker: str):
    lines = await lines_coro
    return lines if any(marker in line for line in lines) else None


@pytest.mark.parametrize("runtime_name", ["process"], indirect=True)
async def test_every_pod_interleaved_with_a_prefix(hms: Orchestrator, settings):
    await hms.deploy(seed_spec(min_replicas=1, max_replicas=3, health_interval_s=1.0), wait=True, timeout=120)
    await hms.scale("hms-ach", 2)
    st = await eventually(lambda: _ready(hms, 2), timeout=90, what="2 ready pods")
    pods = st.pods
    reader = Reader(hms.follow_logs("hms-ach", tail=5))
    markers = {p.id: f"m-{uuid.uuid4().hex[:8]}" for p in pods}
    for p in pods:
        await asyncio.to_thread(poke, p.endpoint, markers[p.id])
    for p in pods:
        found = await eventually(lambda p=p: reader.has(markers[p.id]), timeout=10, what=f"pod {p.id[:8]}'s line")
        assert found[0].startswith(f"{p.id[:8]}@{p.node} | "), found

    snapshot = await hms.logs("hms-ach", tail=20)
    for p in pods:
        assert any(line.startswith(f"{p.id[:8]}@{p.node} | ") and markers[p.id] in line for line in snapshot)

    await hms.scale("hms-ach", 1)
    gone = await eventually(lambda: reader.has(" | --- pod "), timeout=60, what="one pod's end line")
    (left,) = (await hms.status("hms-ach")).pods
    stopped = next(p for p in pods if p.id != left.id)
    assert gone[0] == f"{stopped.id[:8]}@{stopped.node} | " + gone[0].split(" | ", 1)[1]
    assert stopped.id in gone[0] and not reader.task.done()  # the other pod is still followed

    late = f"late-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(poke, left.endpoint, late)
    await eventually(lambda: reader.has(late), timeout=10, what="a line of the pod left")

    # A pod that starts while the service is followed joins the stream.
    await hms.scale("hms-ach", 2)
    st = await eventually(lambda: _ready(hms, 2), timeout=90, what="2 ready pods again")
    (new,) = [p for p in st.pods if p.id != left.id]
    joined = f"joined-{uuid.uuid4().hex[:8]}"

    async def joined_line():
        await asyncio.to_thread(poke, new.endpoint, joined)
        return reader.has(joined)

    found = await eventually(joined_line, timeout=20, interval=1.0, what="the new pod's line")
    assert found[0].startswith(f"{new.id[:8]}@{new.node} | ")

    await hms.undeploy("hms-ach")
    lines = await reader.ended()
    ends = [line for line in lines if " | --- pod " in line]
    assert len(ends) == 3 and lines[-1] in ends, lines[-4:]
    for p in (left, new):
        assert any(line.startswith(f"{p.id[:8]}@{p.node} | --- pod {p.id} is gone") for line in ends)


@pytest.mark.parametrize("runtime_name", ["process"], indirect=True)
async def test_the_node_stream_reads_nothing_without_a_valid_grant(hms: Orchestrator, settings):
    await hms.deploy(seed_spec(min_replicas=2, max_replicas=3, health_interval_s=1.0), wait=True, timeout=120)
    a, b = (await hms.status("hms-ach")).pods
    marker = f"secret-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(poke, a.endpoint, marker)
    (node,) = [r.spec for r in await registry_nodes(hms.client, settings) if r.spec.name == a.node]
    assert node.log_port > 0
    url = f"http://{node.address}:{node.log_port}/v1/pods/{a.id}/logs"
    key, kh = logstream.new_key()
    state = settings.state_dir

    def grant(pods, *, service="hms-ach", key_hash=kh, **over):
        now = int(time.time())
        claims = {"typ": "grant", "act": "logs", "svc": service, "sub": "mallory", "role": "viewer",
                  "bind": logstream.grant_bind(pods, key_hash), "iat": now, "exp": now + 300, **over}
        return tickets.sign_claims(state, claims)

    other_plane = settings.state_dir.parent / "other-plane"
    tickets.ensure_control_key(other_plane)
    forged = tickets.sign_claims(other_plane, tickets.open_claims(state, grant([a.id]), "grant"))
    attempts = {
        "no grant": ({}, 401),
        "a grant but not its key": ({"Authorization": f"Bearer {grant([a.id])}"}, 401),
        "a grant for another pod": ({"Authorization": f"Bearer {grant([b.id])}", logstream.KEY_HEADER: key}, 403),
        "a grant for another service": ({"Authorization": f"Bearer {grant([a.id], service='hms-frm')}",
                                         logstream.KEY_HEADER: key}, 403),
        "another secret": ({"Authorization": f"Bearer {grant([a.id])}", logstream.KEY_HEADER: "guess"}, 403),
        "an expired grant": ({"Authorization": f"Bearer {grant([a.id], iat=int(time.time()) - 600)}",
                              logstream.KEY_HEADER: key}, 403),
        "a grant signed by another key": ({"Authorization": f"Bearer {forged}", logstream.KEY_HEADER: key}, 403),
        "another act's grant": ({"Authorization": f"Bearer {grant([a.id], act='status')}",
                                 logstream.KEY_HEADER: key}, 403),
        "a grant held by a role that may not read logs": ({"Authorization": f"Bearer {grant([a.id], role='nobody')}",
                                                            logstream.KEY_HEADER: key}, 403),
    }
    async with aiohttp.ClientSession() as session:
        for why, (headers, status) in attempts.items():
            async with session.get(url, params={"service": "hms-ach", "tail": "100"}, headers=headers) as resp:
                body = await resp.text()
                assert resp.status == status, (why, resp.status, body)
                assert marker not in body, why
        # The same request with a good grant reads the line: the refusals above are the grant's.
        good = {"Authorization": f"Bearer {grant([a.id])}", logstream.KEY_HEADER: key}
        async with session.get(url, params={"service": "hms-ach", "tail": "100"}, headers=good) as resp:
            assert resp.status == 200 and marker in await resp.text()
    denied = [e for e in read_events(settings.state_dir) if e.type == "access.denied" and "log stream" in e.reason]
    assert len(denied) >= len(attempts)

    # Knocking with no grant, a hundred times, naming a "service" that is a terminal escape: the
    # node records a bounded number of refusals (its real events stay in its log), none of the text.
    evil = "\x1b[2J\x1b]0;owned\x07"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(url, params={"service": evil}) as resp:
                assert resp.status == 401
        # One viewer's grant opens at most FOLLOWS_PER_GRANT follow streams of a pod.
        good = {"Authorization": f"Bearer {grant([a.id])}", logstream.KEY_HEADER: key}
        follow = {"service": "hms-ach", "tail": "1", "follow": "1"}
        held = [await session.get(url, params=follow, headers=good) for _ in range(logstream.FOLLOWS_PER_GRANT)]
        try:
            assert [r.status for r in held] == [200] * logstream.FOLLOWS_PER_GRANT
            async with session.get(url, params=follow, headers=good) as resp:
                assert resp.status == 429 and "open for this grant" in await resp.text()
        finally:
            for r in held:
                r.close()
    after = [e for e in read_events(settings.state_dir) if e.type == "access.denied" and "log stream" in e.reason]
    assert len(after) - len(denied) <= 2 * logstream.REFUSALS_PER_MINUTE, len(after) - len(denied)
    assert not [e for e in after if "\x1b" in e.service or "\x1b" in e.reason]

    # Asking the control plane directly: no proof, or a viewer's proof for another pod, gets no grant.
    viewer_token = auth.issue_token(state, user="vic", role="viewer")
    for proof in ("", auth.prove(viewer_token, action="logs", service="hms-ach",
                                 bind=logstream.grant_bind([b.id], kh))):
        with pytest.raises(WorkflowFailureError):
            await hms.client.execute_workflow(
                "PodLogGrantWorkflow", LogGrantInput(service="hms-ach", pods=[a.id], key_hash=kh, proof=proof),
                id=f"attack-logs-{uuid.uuid4().hex[:6]}", task_queue=settings.task_queue, result_type=LogGrantOutput)

    # Through the API, a caller with no token gets no grant at all; a viewer does.
    anonymous = Orchestrator(hms.client, settings.model_copy(update={"token": None}))
    with pytest.raises(AccessDenied):
        await anonymous.logs("hms-ach", a.id)
    viewer = Orchestrator(hms.client, settings.model_copy(update={"token": viewer_token}))
    assert any(marker in line for line in await viewer.logs("hms-ach", a.id, 100))


async def test_a_node_without_a_log_stream_reads_snapshots_through_temporal(temporal_env, tmp_path):
    """``log_port: -1``: the node serves no stream; ``logs`` still reads a snapshot (through
    PodLogsWorkflow), and ``-f`` is refused, saying why."""
    s = make_settings(temporal_env, tmp_path / "state", "process", log_port=-1)
    try:
        async with HmsWorker(temporal_env.client, s):
            orch = Orchestrator(temporal_env.client, s)
            await orch.deploy(seed_spec(min_replicas=1, max_replicas=2), wait=True, timeout=120)
            (pod,) = (await orch.status("hms-ach")).pods
            marker = f"snap-{uuid.uuid4().hex[:8]}"
            await asyncio.to_thread(poke, pod.endpoint, marker)
            await eventually(lambda: _has(orch.logs("hms-ach", pod.id, 20), marker), timeout=30,
                             what="the line through PodLogsWorkflow")
            with pytest.raises(HmsError, match="serves no log stream"):
                async for _line in orch.follow_logs("hms-ach", pod.id):
                    pass
    finally:
        await terminate_running(temporal_env, s)
        sweep_pods(s)
