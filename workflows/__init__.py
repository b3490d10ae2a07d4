"""Deterministic workflow code only: no I/O, no clock, no randomness but ``workflow.*``."""

from __future__ import annotations

from workflows.deploy import DeployWorkflow
from workflows.logs import PodLogsWorkflow
from workflows.service import ServiceWorkflow

ALL_WORKFLOWS = [ServiceWorkflow, DeployWorkflow, PodLogsWorkflow]

__all__ = ["ALL_WORKFLOWS", "DeployWorkflow", "PodLogsWorkflow", "ServiceWorkflow"]
