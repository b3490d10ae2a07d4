"""Deterministic workflow code only: no I/O, no clock, no randomness but ``workflow.*``."""

from __future__ import annotations

from workflows.deploy import DeployWorkflow
from workflows.guard import MessageGuard
from workflows.heal import HealWorkflow
from workflows.logs import PodLogsWorkflow
from workflows.nodes import NodeRegistry
from workflows.scale import ScaleWorkflow
from workflows.service import ServiceWorkflow

ALL_WORKFLOWS = [ServiceWorkflow, DeployWorkflow, HealWorkflow, ScaleWorkflow, PodLogsWorkflow, NodeRegistry]

__all__ = ["ALL_WORKFLOWS", "DeployWorkflow", "MessageGuard", "HealWorkflow", "NodeRegistry", "PodLogsWorkflow", "ScaleWorkflow", "ServiceWorkflow"]
