"""How a node's worker or a router joins its registry (the NodeRegistry, the RouterRegistry):
the signed registration goes as the ``join`` signal, with signal-with-start so that whichever
member comes first starts the registry, and the answer is asked for with the ``joined`` query
until the registry's run loop has checked it.

A signal, not an update: see ``workflows.registry.Joins``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy

from hms_mgmt.errors import AccessDenied
from hms_mgmt.names import NR
from hms_mgmt.wire import JoinAnswer

FIRST_ASK_S = 0.02  # the check is one activity: most answers are there within tens of ms
MAX_ASK_S = 0.5


def new_request_id() -> str:
    return uuid.uuid4().hex


async def join_registry(client: Client, *, workflow: str, registry_id: str, task_queue: str, start_input: Any,
                        registration: Any, summary: str) -> JoinAnswer:
    """Send ``registration`` (signed, with its ``request_id``) and wait for the registry's
    answer; a refusal raises ``AccessDenied`` with the registry's reason. The caller bounds
    the wait (an answer lost to a restart is asked for again with a new join)."""
    await client.start_workflow(
        workflow, start_input, id=registry_id, task_queue=task_queue, start_signal=NR.JOIN,
        start_signal_args=[registration], id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=summary)
    handle = client.get_workflow_handle(registry_id)
    pause = FIRST_ASK_S
    while True:
        answer = await handle.query(NR.JOINED, registration.request_id, result_type=JoinAnswer | None)  # type: ignore[arg-type]
        if answer is not None:
            if answer.refused:
                raise AccessDenied(answer.refused)
            return answer
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_ASK_S)
