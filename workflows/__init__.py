"""Deterministic workflow code only: no I/O, no clock, no randomness but ``workflow.*``.

Running executions replay on new code: a change to the commands a workflow issues (activities,
timers, children, their order) goes behind ``workflow.patched("...")``, and
``tests/replay/test_replay.py`` fails on one that does not (README: "Changing workflow code
safely")."""

from __future__ import annotations

from workflows.deploy import DeployWorkflow
from workflows.guard import MessageGuard
from workflows.heal import HealWorkflow
from workflows.logs import PodLogsWorkflow
from workflows.nodes import NodeRegistry
from workflows.routers import RouterRegistry
from workflows.scale import ScaleWorkflow
from workflows.service import ServiceWorkflow
from workflows.slot_edge import SlotEdgeWorkflow

ALL_WORKFLOWS = [ServiceWorkflow, DeployWorkflow, HealWorkflow, ScaleWorkflow, PodLogsWorkflow, NodeRegistry, RouterRegistry]
# Started by Temporal Schedules (a time slot's edges), not by a service: recorded apart.
SCHEDULED_WORKFLOWS = [SlotEdgeWorkflow]

__all__ = ["ALL_WORKFLOWS", "SCHEDULED_WORKFLOWS", "SlotEdgeWorkflow", "DeployWorkflow", "MessageGuard", "HealWorkflow", "NodeRegistry", "RouterRegistry", "PodLogsWorkflow", "ScaleWorkflow", "ServiceWorkflow"]
