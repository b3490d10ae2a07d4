"""Signals and updates with fuzzed payloads, sent to a running ServiceWorkflow the way anyone who
reaches Temporal can: with the real Temporal CLI. Malformed JSON, wrong types, other encodings,
missing and extra arguments, huge values. Afterwards — and after every message — the service
still answers its status query, is Running with the same pods (none started, none stopped), its
workflow never failed a workflow task (a stuck workflow), and it undeploys cleanly."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path

import pytest
from conftest import eventually, make_settings, node_pods, seed_spec, sweep_pods, temporal_binary, terminate_running
from fuzz_profiles import fuzz
from hypothesis import example, given
from hypothesis import strategies as st
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

from hms_mgmt import constants
from hms_mgmt.errors import SpecError
from hms_mgmt.models import Approval, PodStatus
from hms_mgmt.nodes import list_routers, registry_nodes
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import cancel_and_wait, free_port
from hms_mgmt.wire import (
    AdmissionRequest,
    DryRunInput,
    EnrolInput,
    HealAttempt,
    NodeLost,
    NodeRegistration,
    RouterRegistration,
    ScaleRequest,
    SpecUpdate,
    UndeployRequest,
)
from worker.main import HmsWorker

NAME = "hms-fuzz"
ARGV_MAX = 100_000  # one command-line argument may hold 128 KiB on Linux: longer inputs go in a file
SIGNALS = {"approve": Approval, "reject": Approval, "node_lost": NodeLost, "pod_reported": PodStatus,
           "heal_attempt_failed": HealAttempt, "pods_draining": None, "image_revoked": None, "capacity_changed": None,
           "no_such_signal": None}
UPDATES = {"scale": ScaleRequest, "update_spec": SpecUpdate, "rollback": SpecUpdate, "undeploy": UndeployRequest,
           "approve": Approval, "reject": Approval, "admission": AdmissionRequest, "no_such_update": None}
# A well-formed `admission` legitimately waits (up to its timeout_s) for a phase: only malformed ones.
MALFORMED = ["raw", "encoding", "several", "none", "huge"]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from([10**30, -(10**30), 2**63, 1e308]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from(["", "hms-fuzz", "registry.gov/hms-ach:1.4", "\u0000", "😀" * 50, "a" * 70_000]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=10)


def shaped(model: type | None) -> st.SearchStrategy[object]:
    """A dict with the model's own field names and fuzzed values: gets past a first glance."""
    if model is None:
        return json_values
    fields = sorted(model.model_fields)  # type: ignore[attr-defined]
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), json_values, max_size=len(fields) + 1)


@st.composite
def messages(draw: st.DrawFn) -> tuple[list[str], bytes | None]:
    """The CLI's arguments after the address and workflow id, and a file's content for huge inputs."""
    kind = draw(st.sampled_from(["signal", "update"]))
    table = SIGNALS if kind == "signal" else UPDATES
    name = draw(st.sampled_from(sorted(table)))
    cmd = ["signal"] if kind == "signal" else ["update", "execute"]
    cmd += ["--name", name]
    modes = ["json", "shaped", "shaped", *MALFORMED] if name != "admission" else MALFORMED
    mode = draw(st.sampled_from(modes))
    file_data = None
    if mode in ("json", "shaped"):
        text = json.dumps(draw(shaped(table[name]) if mode == "shaped" else json_values))
        if len(text) < ARGV_MAX:
            cmd += ["--input", text]
        else:
            file_data = text.encode()
    elif mode == "raw":  # malformed JSON: the CLI refuses it before anything is sent
        cmd += ["--input", draw(st.sampled_from(["{", "nope", "{'a': 1}", "[1,]", "NaN", "01", "\"\\x\""]))]
    elif mode == "encoding":  # not JSON at all: bytes under another encoding
        enc = draw(st.sampled_from(["binary/plain", "binary/null", "json/protobuf", "binary/protobuf", "text/x",
                                    ""]))
        raw = draw(st.binary(max_size=40) | st.sampled_from([b"{", b"null", b"[]", b'"x"', b"{}"]))
        cmd += ["--input-meta", f"encoding={enc}", "--input-base64", "--input", base64.b64encode(raw).decode()]
    elif mode == "several":
        for value in draw(st.lists(shaped(table[name]), min_size=2, max_size=3)):
            cmd += ["--input", json.dumps(value)[:ARGV_MAX]]  # cut: malformed JSON, refused by the CLI
    elif mode == "huge":  # past one argv string's limit: a file
        # The server refuses a signal of 2 MB or more. An update that large it takes (dev server
        # 1.32), and the SDK then fails the workflow task that answers it (PayloadsTooLarge: the
        # answer carries the request back) until the update is dropped, a few seconds later —
        # Temporal's limit, before any of our code runs: updates stay under it here.
        sizes = [200_000, 1_500_000, 2_500_000] if kind == "signal" else [200_000, 1_500_000]
        size = draw(st.sampled_from(sizes))
        file_data = json.dumps({"token": "t" * size, "replicas": 2, "reason": "r" * 10}).encode()
    return cmd, file_data


async def test_signal_and_update_payloads_leave_the_service_healthy(temporal_env, tmp_path: Path):
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    try:
        async with HmsWorker(temporal_env.client, settings):
            orch = Orchestrator(temporal_env.client, settings)
            await orch.deploy(seed_spec(name=NAME, min_replicas=1, max_replicas=2, health_interval_s=1.0), wait=True,
                              timeout=120)
            before = await orch.status(NAME)
            pods = sorted(p.id for p in before.pods)
            handle = temporal_env.client.get_workflow_handle(f"svc-{NAME}")
            loop = asyncio.get_running_loop()
            huge = tmp_path / "huge.json"

            def healthy() -> None:
                st_ = asyncio.run_coroutine_threadsafe(orch.status(NAME), loop).result(timeout=30)
                assert st_.phase == "Running" and sorted(p.id for p in st_.pods) == pods, st_
                desc = asyncio.run_coroutine_threadsafe(handle.describe(), loop).result(timeout=30)
                assert desc.status == WorkflowExecutionStatus.RUNNING
                task = desc.raw_description.pending_workflow_task
                assert task.attempt <= 1, f"the workflow task is failing (attempt {task.attempt})"

            @fuzz(60, chaos_examples=1_000)
            @given(messages())
            @example((["signal", "--name", "node_lost", "--input-meta", "encoding=binary/plain", "--input-base64",
                       "--input", base64.b64encode(b"x").decode()], None))
            @example((["signal", "--name", "approve", "--input-meta", "encoding=binary/null", "--input-base64",
                       "--input", ""], None))
            @example((["signal", "--name", "node_lost"], None))  # no argument at all
            @example((["signal", "--name", "heal_attempt_failed"], None))
            @example((["update", "execute", "--name", "admission"], None))  # an update without a validator
            @example((["signal", "--name", "pods_draining", "--input", '[{"a": 1}]', "--input", "2"], None))
            @example((["update", "execute", "--name", "scale", "--input", json.dumps({"replicas": 10**30})], None))
            @example((["update", "execute", "--name", "scale", "--input", '{"replicas": 2, "token": 5}'], None))
            @example((["signal", "--name", "image_revoked", "--input", json.dumps(before.spec.image)], None))
            @example((["signal", "--name", "pods_draining", "--input", json.dumps(pods)], None))
            def send(message: tuple[list[str], bytes | None]) -> None:
                cmd, file_data = message
                if file_data is not None:
                    huge.write_bytes(file_data)
                    cmd = [*cmd, "--input-file", str(huge)]
                subprocess.run([temporal_binary(), "workflow", *cmd, "--address", settings.temporal_address,
                                "--workflow-id", f"svc-{NAME}"], capture_output=True, timeout=60)
                healthy()

            await asyncio.to_thread(send)

            # A malformed update is answered, typed and naming what is wrong; the workflow never sees it.
            out = await asyncio.to_thread(
                subprocess.run, [temporal_binary(), "workflow", "update", "execute", "--name", "scale",
                                 "--address", settings.temporal_address, "--workflow-id", f"svc-{NAME}"],
                capture_output=True, text=True, timeout=60)
            assert out.returncode != 0 and "update scale: takes 1 argument(s), got 0" in out.stdout + out.stderr

            # What the caller could make the workflow keep is bounded, and said so before sending.
            with pytest.raises(SpecError, match="reason: String should have at most 1024 characters"):
                await orch.scale(NAME, 2, reason="x" * 5000)
            with pytest.raises(SpecError, match="timeout_s"):
                await orch.wait_for(NAME, timeout=float("nan"))

            after = await orch.status(NAME)
            assert after.phase == "Running" and sorted(p.id for p in after.pods) == pods
            assert sorted(h.pod_id for h in node_pods(settings, NAME)) == pods, "a pod was started or stopped"
            failed = [e async for e in handle.fetch_history_events()
                      if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
            assert not failed, failed[0].workflow_task_failed_event_attributes.failure.message
            final = await orch.undeploy(NAME)
            assert final is not None and final.phase == "Stopped" and node_pods(settings, NAME) == []
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


# --- the NodeRegistry: enrolment, registration and heartbeats (signed) ---------------------------
REGISTRY_SIGNALS = {"heartbeat": NodeRegistration, "join": NodeRegistration, "remove": None, "no_such_signal": None}
REGISTRY_UPDATES = {"register": NodeRegistration, "enrol": EnrolInput, "dry_run": DryRunInput, "no_such_update": None}
ROUTER_SIGNALS = {"heartbeat": RouterRegistration, "join": RouterRegistration, "no_such_signal": None}
ROUTER_UPDATES = {"register": RouterRegistration, "enrol": EnrolInput, "no_such_update": None}


@st.composite
def registry_messages(draw: st.DrawFn, signals: dict = REGISTRY_SIGNALS, updates: dict = REGISTRY_UPDATES
                      ) -> list[str]:
    """A forged or malformed enrolment, registration, heartbeat or removal, as the CLI sends it."""
    kind = draw(st.sampled_from(["signal", "update"]))
    table = signals if kind == "signal" else updates
    name = draw(st.sampled_from(sorted(table)))
    cmd = (["signal"] if kind == "signal" else ["update", "execute"]) + ["--name", name]
    mode = draw(st.sampled_from(["json", "shaped", "shaped", "raw", "none"]))
    if mode in ("json", "shaped"):
        cmd += ["--input", json.dumps(draw(shaped(table[name]) if mode == "shaped" else json_values))[:ARGV_MAX]]
    elif mode == "raw":
        cmd += ["--input", draw(st.sampled_from(["{", "nope", "[1,]", "NaN"]))]
    return cmd


async def test_forged_node_messages_leave_the_registry_as_it_was(temporal_env, tmp_path: Path):
    """Anyone who reaches Temporal can send the NodeRegistry an enrolment, a registration or a
    heartbeat: fuzzed, shaped like the real ones, or the real node's own registration with a
    changed address. None adds a node, changes the enrolled one, or fails a workflow task."""
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    try:
        async with HmsWorker(temporal_env.client, settings):
            registry_id = constants.node_registry_id(settings.task_queue)
            handle = temporal_env.client.get_workflow_handle(registry_id)
            loop = asyncio.get_running_loop()

            async def read() -> dict[str, tuple[str, str]]:
                records = await registry_nodes(temporal_env.client, settings) or []
                return {r.spec.name: (r.spec.address, r.state) for r in records}

            def nodes() -> dict[str, tuple[str, str]]:  # from the fuzzing thread
                return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=30)

            async def registered() -> bool:
                return (await read()).get(settings.node, ("", ""))[1] == "Ready"

            await eventually(registered, timeout=60, what="the node registered")
            await fuzz_registry(settings, handle, registry_messages(), nodes, [
                ["update", "execute", "--name", "register", "--input",
                 json.dumps({"spec": {"name": "evil", "address": "127.0.0.1"}})],
                ["update", "execute", "--name", "register", "--input",
                 json.dumps({"spec": {"name": settings.node, "address": "127.0.0.9"}, "cert": "x", "proof": "y"})],
                ["signal", "--name", "heartbeat", "--input", json.dumps({"spec": {"name": "evil"}})],
                ["update", "execute", "--name", "enrol", "--input", json.dumps({"name": "evil"})]])
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


async def fuzz_registry(settings, handle, messages, read, examples: list[list[str]]) -> None:
    """Send ``messages`` (and ``examples``) to the registry behind ``handle`` with the Temporal CLI:
    after each, ``read()`` (from the fuzzing thread) answers as before, and no workflow task failed."""
    def run() -> None:  # on a thread: ``read`` waits for the event loop
        before = read()

        def send(cmd: list[str]) -> None:
            subprocess.run([temporal_binary(), "workflow", *cmd, "--address", settings.temporal_address,
                            "--workflow-id", handle.id], capture_output=True, timeout=60)
            assert read() == before

        for ex in examples:
            send = example(ex)(send)
        fuzz(40, chaos_examples=1_000)(given(messages)(send))()

    await asyncio.to_thread(run)
    failed = [e async for e in handle.fetch_history_events() if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert not failed, failed[0].workflow_task_failed_event_attributes.failure.message


async def test_forged_router_messages_leave_the_router_registry_as_it_was(temporal_env, tmp_path: Path):
    """Anyone who reaches Temporal can send the RouterRegistry a registration, a heartbeat or an
    enrolment: fuzzed, shaped like the real ones, or the real router's own with another feed URL.
    None adds a router, moves the real one, or fails a workflow task."""
    from router.server import serve

    port = free_port()
    settings = make_settings(temporal_env, tmp_path / "state", "process", routers=[])
    loop = asyncio.get_running_loop()
    try:
        async with HmsWorker(temporal_env.client, settings, node=False):
            async def read() -> dict[str, tuple[str, str]]:
                return {r.name: (r.url, r.state) for r in await list_routers(temporal_env.client, settings)}

            router = asyncio.create_task(serve(settings, port=port, client=temporal_env.client))
            try:
                await eventually(read, timeout=60, what="the router registered")
                name = next(iter(await read()))
                handle = temporal_env.client.get_workflow_handle(constants.router_registry_id(settings.task_queue))
                await fuzz_registry(
                    settings, handle, registry_messages(ROUTER_SIGNALS, ROUTER_UPDATES),
                    lambda: {n: url for n, (url, _) in
                             asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=30).items()}, [
                        ["update", "execute", "--name", "register", "--input",
                         json.dumps({"name": "evil", "address": "127.0.0.1", "url": "http://127.0.0.1:1"})],
                        ["update", "execute", "--name", "register", "--input",
                         json.dumps({"name": name, "address": "127.0.0.1", "url": "http://127.0.0.1:1", "cert": "x"})],
                        ["signal", "--name", "heartbeat", "--input",
                         json.dumps({"name": name, "address": "127.0.0.9", "url": "http://127.0.0.9:1"})],
                        ["update", "execute", "--name", "enrol", "--input", json.dumps({"request": "evil"})]])
            finally:
                await cancel_and_wait(router)
    finally:
        await terminate_running(temporal_env, settings)
