"""A rolling update's budget and rounds: what the DeployWorkflow's ``RollingUpdate`` runs, and
what a dry run shows before it runs. Pure: plain values in, plain values out."""

from __future__ import annotations

from hms_mgmt.models import FieldChange, RolloutPlan, RolloutRound, ServiceSpec, rollout_budget


def budget(spec: ServiceSpec, replicas: int) -> tuple[int, int]:
    """(surge, unavailable) as pod counts for ``replicas`` pods: never below ``min_replicas``
    ready, and at least one pod of surge when none may be unavailable (else no progress)."""
    unavailable = min(rollout_budget(spec.max_unavailable, replicas, round_up=False),
                      max(0, replicas - spec.min_replicas))
    surge = rollout_budget(spec.max_surge, replicas, round_up=True)
    if unavailable == 0:
        surge = max(surge, 1)
    return surge, unavailable


def step(replicas: int, surge: int, unavailable: int, new: int, old: int) -> tuple[int, int]:
    """(old pods to retire now, new pods to start now) with ``new`` and ``old`` ready.

    Old pods may go while ``replicas - unavailable`` stay ready (and must, past ``replicas``);
    then new pods start while the total stays within ``replicas + surge``."""
    ready = new + old
    k = max(0, min(old, max(ready - (replicas - unavailable), ready - replicas)))
    return k, min(replicas - new, replicas + surge - new - (old - k))


def rounds(spec: ServiceSpec, replicas: int, old: int, new: int = 0) -> list[RolloutRound]:
    """The rounds a rolling update of ``old`` ready pods to ``replicas`` pods of a new revision
    takes when every new pod comes up (a failing pod adds rounds, then rolls back)."""
    surge, unavailable = budget(spec, replicas)
    out: list[RolloutRound] = []
    while new < replicas or old:
        k, room = step(replicas, surge, unavailable, new, old)
        room = max(room, 0)
        if k == 0 and room == 0:
            break  # no budget to move: the rollout could not change anything
        old -= k
        new += room
        out.append(RolloutRound(retire=k, start=room))
    return out


def plan(spec: ServiceSpec, replicas: int, old: int) -> RolloutPlan:
    surge, unavailable = budget(spec, replicas)
    return RolloutPlan(replicas=replicas, surge=surge, unavailable=unavailable, rounds=rounds(spec, replicas, old))


def changed_fields(old: ServiceSpec, new: ServiceSpec) -> list[str]:
    """The spec fields that differ, by name."""
    return sorted(k for k in ServiceSpec.model_fields if getattr(new, k) != getattr(old, k))


def changes(old: ServiceSpec, new: ServiceSpec) -> list[FieldChange]:
    """Each changed field with its old and new value (as JSON values)."""
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    return [FieldChange(field=k, old=before.get(k), new=after.get(k)) for k in changed_fields(old, new)]
