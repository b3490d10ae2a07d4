"""ServiceWorkflow (id ``svc-<name>``), the one writer of a service's state, as a package:
``workflow`` (messages and the run loop) over ``state`` (what a run carries), with one helper
module per concern: ``access``, ``approvals``, ``admission``, ``updates`` (and the rollout),
``supervision`` (watch, heal, scale), ``lifecycle`` (deploy, undeploy) and ``feed`` (the
routers' endpoint feed)."""

from __future__ import annotations

from workflows.service.state import refuse
from workflows.service.workflow import ServiceWorkflow

__all__ = ["ServiceWorkflow", "refuse"]
