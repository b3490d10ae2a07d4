"""An outsider's own worker and workflow, on their own task queue, against the real dev server.

They hold no hms token and no key, but reach Temporal: they run any activity of ours, by name,
on our task queues (``hms-control``, ``hms-node-<name>``) from a workflow of theirs. The
workflow id is theirs to choose, so it mimics our children's (``svc-<name>-...``)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker


@workflow.defn(name="OutsiderWorkflow")
class OutsiderWorkflow:
    @workflow.run
    async def run(self, args: dict[str, Any]) -> Any:
        return await workflow.execute_activity(
            args["activity"], args["input"], task_queue=args["task_queue"],
            start_to_close_timeout=timedelta(seconds=30), retry_policy=RetryPolicy(maximum_attempts=1))


class Outsider:
    def __init__(self, client: Client, queue: str) -> None:
        self.client = client
        self.queue = queue

    async def run(self, activity: str, inp: Any, task_queue: str, *, wf_id: str | None = None) -> Any:
        """What the activity returned; raises the ApplicationError it failed with."""
        try:
            return await self.client.execute_workflow(
                OutsiderWorkflow.run, {"activity": activity, "input": inp, "task_queue": task_queue},
                id=wf_id or f"outsider-{uuid.uuid4().hex[:8]}", task_queue=self.queue,
                execution_timeout=timedelta(seconds=60))
        except WorkflowFailureError as e:
            cause = e.cause.cause if isinstance(e.cause, ActivityError) else e.cause
            if isinstance(cause, ApplicationError):
                raise cause from None
            raise


@contextlib.asynccontextmanager
async def outsider(client: Client) -> AsyncIterator[Outsider]:
    """Their worker, polling only their own task queue."""
    queue = f"outsider-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[OutsiderWorkflow],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        yield Outsider(client, queue)
