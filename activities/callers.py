"""Who runs an activity, by what the Temporal server records, never by what the caller says.

Anyone who reaches Temporal can run any activity of ours from a workflow of their own, on their
own task queue, under a workflow id of their choosing (``svc-hms-ach-heal-...``). What they
cannot choose is what the server records about that run: its type and its task queue. A run on
our control queue runs our code (a worker of ours took its workflow task), so a control activity
that acts believes a caller only when the server says it is the ``ServiceWorkflow`` of that
service, or a child of that ``ServiceWorkflow`` run, both on our control queue.

A run's type, queue and parent never change, so each run is described once (cached by run id).

A run made by ``temporal workflow reset`` acts for nobody, nor do its children: it replays the
results its history already holds (the deployer's grant, an approval, the revision's admission
ticket) without asking again, so a reset to before an undeploy, a rollback or a scale-down would
undo them with no token. The server records the reset on the new run (``last_reset_time``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NoReturn

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from hms_mgmt import names
from hms_mgmt.errors import AccessDenied, ActivityErrorType
from hms_mgmt.events import Event, EventSink

CHILD_WORKFLOWS = frozenset({names.DEPLOY_WORKFLOW, names.SCALE_WORKFLOW, names.HEAL_WORKFLOW})
CACHE_RUNS = 4096


@dataclass(frozen=True)
class Caller:
    """A workflow run as the server records it."""

    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    parent_id: str | None = None
    parent_run_id: str | None = None
    reset: bool = False  # made by a workflow reset

    def __str__(self) -> str:
        how = ", a reset run" if self.reset else ""
        return f"workflow {self.workflow_id} ({self.workflow_type} on task queue {self.task_queue}{how})"

    def data(self) -> dict[str, str]:
        """What an ``access.denied`` event records about the caller."""
        return {"workflow": self.workflow_id, "run_id": self.run_id, "workflow_type": self.workflow_type,
                "task_queue": self.task_queue}


class Callers:
    """Describes calling runs (once each) and says whether one is entitled to act for a service."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._runs: OrderedDict[str, Caller] = OrderedDict()
        self._describing: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def current(self) -> Caller:
        """The run that scheduled the running activity."""
        info = activity.info()
        return await self.describe(info.workflow_id or "", info.workflow_run_id or "")

    async def describe(self, workflow_id: str, run_id: str) -> Caller:
        known = self._runs.get(run_id)
        if known is not None and known.workflow_id == workflow_id:
            self._runs.move_to_end(run_id)
            return known
        # The pods of one rollout ask at the same moment: one describe for all of them.
        key = (workflow_id, run_id)
        pending = self._describing.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.client.get_workflow_handle(workflow_id, run_id=run_id).describe())
            self._describing[key] = pending
            pending.add_done_callback(lambda _: self._describing.pop(key, None))
        desc = await asyncio.shield(pending)
        caller = Caller(workflow_id=desc.id, run_id=desc.run_id, workflow_type=desc.workflow_type,
                        task_queue=desc.task_queue, parent_id=desc.parent_id, parent_run_id=desc.parent_run_id,
                        reset=desc.raw_description.workflow_extended_info.HasField("last_reset_time"))
        self._runs[run_id] = caller
        while len(self._runs) > CACHE_RUNS:
            self._runs.popitem(last=False)
        return caller

    async def entitled(self, service: str, control_queue: str) -> Caller:
        """The calling run if it is ``svc-<service>``'s ServiceWorkflow, or a child of that run,
        on ``control_queue``; else AccessDenied naming it."""
        caller = await self.current()
        if await self.serves(caller, service, control_queue):
            return caller
        if caller.reset or (caller.parent_id and caller.parent_run_id
                            and (await self.describe(caller.parent_id, caller.parent_run_id)).reset):
            raise AccessDenied(f"{caller} comes of a workflow reset, which replays grants it was given without "
                               "asking again: a reset run acts for nobody (undeploy, then deploy again)")
        raise AccessDenied(f"{caller} is not a workflow of service {service or '(none)'} on {control_queue}")

    async def serves(self, caller: Caller, service: str, control_queue: str) -> bool:
        if not service or caller.task_queue != control_queue or caller.reset:
            return False
        own_id = names.service_workflow_id(service)
        if caller.workflow_type == names.SERVICE_WORKFLOW:
            return caller.workflow_id == own_id
        if caller.workflow_type not in CHILD_WORKFLOWS or caller.parent_id != own_id or not caller.parent_run_id:
            return False
        parent = await self.describe(caller.parent_id, caller.parent_run_id)
        return parent.workflow_type == names.SERVICE_WORKFLOW and parent.task_queue == control_queue and not parent.reset

    async def runs_our_code(self, control_queue: str) -> Caller | None:
        """The calling run if a worker of ours runs it (one of our workflow types on our control
        queue), whatever service it is for; else None."""
        caller = await self.current()
        ours = {names.SERVICE_WORKFLOW, names.NODE_REGISTRY_WORKFLOW, *CHILD_WORKFLOWS}
        return caller if caller.task_queue == control_queue and caller.workflow_type in ours and not caller.reset \
            else None


async def deny(sink: EventSink, service: str, action: str, reason: str, **data: object) -> NoReturn:
    """Record the refusal (``access.denied``) and fail the activity for good with it."""
    await sink.publish(Event(type="access.denied", service=service, reason=reason, data={"action": action, **data}))
    raise ApplicationError(reason, type=ActivityErrorType.ACCESS_DENIED, non_retryable=True)

