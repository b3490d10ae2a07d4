"""The benchmarks' stack: a dev server and a control+node worker in this process (the test kit's
:func:`hms_mgmt.testing.local_stack`), access to the measured product, and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from bench.lib import EXAMPLE_IMAGE
from bench.lib.poll import poll_until
from bench.lib.ports import docker_client, remove_containers


@contextlib.asynccontextmanager
async def hms_stack(runtime: str = "docker", **settings_extra: Any) -> AsyncIterator[Any]:
    """A Temporal dev server and a control+node worker in this process, for ``runtime``: a fresh
    task queue, node and state directory, so a benchmark never sees anyone else's workflows or
    pods; everything shut down on exit. ``router_engine="builtin"`` adds ``python -m router``."""
    from hms_mgmt.testing import local_stack

    async with local_stack(runtime, prefix="hms-bench", node_prefix="b", **settings_extra) as stack:
        yield stack


async def terminate_running(client, task_queue: str, reason: str = "benchmark cleanup") -> int:
    n = 0
    async for wf in client.list_workflows(f'ExecutionStatus = "Running" AND TaskQueue = "{task_queue}"'):
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate(reason)
            n += 1
    return n


def grant_access(stack: Any, images: Iterable[str] = (EXAMPLE_IMAGE,), *, user: str = "bench",
                 role: str = "ops_admin", runtime: str = "docker") -> dict[str, Any]:
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
    if runtime == "process":  # a process pod's image is a local program: its content id is the runtime's
        from hms_mgmt.runtimes import make_runtime

        rt = make_runtime("process", node=stack.settings.node, state_dir=stack.settings.state_dir)
        try:
            for image in images:
                store.sign(image, rt.content_id(image), signer="bench")
                done["signed"].append(image)
        finally:
            rt.close()
        return done
    dclient = docker_client()
    try:
        for image in images:
            with contextlib.suppress(Exception):
                store.sign(image, dclient.images.get(image).id, signer="bench")
                done["signed"].append(image)
    finally:
        dclient.close()
    return done


async def watch_armed(stack: Any, name: str, pod_ids: set[str], timeout_s: float = 30.0) -> bool:
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


async def undeploy_and_sweep(stack: Any, dclient: Any, name: str, *, timeout_s: float = 60.0,
                             whole_node: bool = False) -> None:
    """Undeploy ``name``; on failure terminate what runs on the stack's queue. Then remove the
    containers left: the service's on this node, or (``whole_node``) all of this node's."""
    from hms_mgmt import constants

    try:
        await asyncio.wait_for(stack.orch.undeploy(name, wait=True), timeout_s)
    except Exception as e:  # noqa: BLE001 - the sweep below removes what is left
        logging.getLogger("bench").warning("undeploy %s: %s", name, e)
        await terminate_running(stack.client, stack.settings.task_queue)
    labels = {constants.LABEL_NODE: stack.settings.node}
    if not whole_node:
        labels[constants.LABEL_SERVICE] = name
    await asyncio.to_thread(remove_containers, dclient, labels)


def sweep_node(dclient: Any, node: str | None, *extra_labels: dict[str, str]) -> None:
    """Best effort at the end of a run: remove the node's containers and any labelled ones."""
    from hms_mgmt import constants

    for labels in ([{constants.LABEL_NODE: node}] if node else []) + list(extra_labels):
        with contextlib.suppress(Exception):
            remove_containers(dclient, labels)


def require_image(dclient: Any, image: str) -> bool:
    """True if ``image`` is here; else say how to build it."""
    import sys

    try:
        dclient.images.get(image)
        return True
    except Exception as e:  # noqa: BLE001
        print(f"image {image} is missing ({e}): run `make images`", file=sys.stderr)
        return False
