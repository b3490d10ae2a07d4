"""The ServiceWorkflow's pure decisions about its phase and its pods: which phase may follow
which, which pods a scale-down removes, and which revision a rollback goes back to.

No Temporal, no clock: plain values in, plain values out, so the table is checked exhaustively
in unit tests and the workflow asks the same functions.

The table is the one the workflow really walks (every place it sets a phase):

- admission: Validating -> AwaitingApproval -> VerifyingImage -> Deploying, refused on the way
  as Rejected (access, approval, ticket) or Failed (an image or spec no node accepts);
- Deploying -> Running, or Failed; an undeploy while it deploys goes to Undeploying;
- supervision: Running <-> Scaling | Healing | Updating | Degraded. A scaling or rollout goes
  back to the phase it began in; a heal or a scaling may end Degraded (replacements keep
  failing, an image loses its trust); Degraded recovers to Running;
- Undeploying from any supervised phase (or a failed deploy) -> Stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import get_args

from hms_mgmt.errors import RequestRefused
from hms_mgmt.models import Phase, PodStatus, RevisionRecord

__all__ = ["PHASES", "ENDS", "TRANSITIONS", "RollbackRefused", "can_move", "reachable", "rollback_target",
           "scale_down_victims"]

PHASES: tuple[Phase, ...] = get_args(Phase)
ENDS: frozenset[Phase] = frozenset({"Rejected", "Failed", "Stopped"})

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    "Validating": frozenset({"AwaitingApproval", "VerifyingImage", "Rejected"}),
    "AwaitingApproval": frozenset({"VerifyingImage", "Rejected"}),
    "VerifyingImage": frozenset({"Deploying", "Rejected", "Failed"}),
    "Deploying": frozenset({"Running", "Failed", "Undeploying"}),
    "Running": frozenset({"Scaling", "Healing", "Updating", "Degraded", "Undeploying"}),
    # A heal that ended in an error leaves Healing with no heal running: scaling or a rollout
    # may begin there, and they return to it.
    "Healing": frozenset({"Running", "Scaling", "Updating", "Degraded", "Undeploying"}),
    "Scaling": frozenset({"Running", "Degraded", "Undeploying"}),
    "Updating": frozenset({"Running", "Healing", "Degraded"}),
    "Degraded": frozenset({"Running", "Scaling", "Updating", "Undeploying"}),
    "Undeploying": frozenset({"Stopped"}),
    # A failed deploy's run still supervises (nothing) until it is undeployed.
    "Failed": frozenset({"Undeploying"}),
    "Rejected": frozenset(),
    "Stopped": frozenset(),
}


class RollbackRefused(RequestRefused):
    """There is no revision to roll back to (none earlier, the one named is unknown or runs now)."""


def can_move(old: Phase, new: Phase) -> bool:
    """Whether the workflow may go from ``old`` to ``new``; staying in a phase is no move."""
    return old == new or new in TRANSITIONS[old]


def reachable(start: Phase) -> set[Phase]:
    """Every phase a service in ``start`` can come to (``start`` included)."""
    seen = {start}
    todo = [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def scale_down_victims(pods: Iterable[PodStatus], count: int) -> list[PodStatus]:
    """The ``count`` pods a scale-down stops: not ready first, then not healthy, then the most
    failing, then the newest (a pod never started counts as oldest)."""
    if count <= 0:
        return []
    return sorted(
        pods,
        key=lambda p: (p.ready, p.health == "healthy", -p.consecutive_failures,
                       -(p.started_at.timestamp() if p.started_at else 0)),
    )[:count]


def rollback_target(service: str, revisions: Sequence[RevisionRecord], current: int,
                    to_revision: int | None = None) -> RevisionRecord:
    """The revision a rollback goes to: ``to_revision`` when named, else the newest revision
    before ``current`` that ran (active or replaced). Raises RollbackRefused when there is none."""
    if to_revision is not None:
        found = next((r for r in revisions if r.revision == to_revision), None)
        if found is None:
            known = ", ".join(str(r.revision) for r in revisions)
            raise RollbackRefused(f"{service} has no revision {to_revision} (known: {known})")
        if found.revision == current:
            raise RollbackRefused(f"{service} already runs revision {current}")
        return found
    before = [r for r in revisions if r.revision < current and r.outcome in ("replaced", "active")]
    if not before:
        raise RollbackRefused(f"{service} has no earlier revision to roll back to")
    return before[-1]
