"""A dry run's plan, from plain values: what a deploy of a spec would change on the running
service, where the Scheduler would put its new pods, and when its time slots turn. The same
functions the real paths use (``pick_nodes``, the rollout budget, the slot clock) do the work."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from hms_mgmt.models import NodePlan, ServiceSpec, ServiceStatus, SlotEdges, SpecChange
from hms_mgmt.policy import rollout
from hms_mgmt.policy import slots as clock
from hms_mgmt.policy.scheduler import NodeUsage, pick_nodes, placement_request


def heading_to(status: ServiceStatus) -> ServiceSpec:
    """The spec a service is heading to: the newest revision admitted and still rolling out, else
    the one it runs. A deploy is compared with this, so deploying the old spec again while a
    rollout runs replaces the rollout (it is no no-op), and deploying the new one again is."""
    rolling = [r for r in status.revisions if r.outcome == "rolling" and r.revision > status.revision]
    return rolling[-1].spec if rolling else status.spec


def plan_change(status: ServiceStatus, spec: ServiceSpec) -> SpecChange:
    """What deploying ``spec`` would do to the running service: nothing, an in-place change (no
    pod field changed), or a rolling update of its ready pods with surge and rounds."""
    current = heading_to(status)
    change = SpecChange(from_revision=status.revision, phase=status.phase, changes=rollout.changes(current, spec))
    if spec == current:
        change.no_op = True
    elif spec.pod_template() == status.spec.pod_template() and all(p.revision == status.revision
                                                                   for p in status.pods):
        change.in_place = True
    else:
        old = sum(1 for p in status.pods if p.ready)
        change.rollout = rollout.plan(spec, status.desired_replicas, old)
    return change


def plan_placement(spec: ServiceSpec, usage: dict[str, NodeUsage],
                   count: int) -> tuple[list[NodePlan], list[str | None]]:
    """(each node with the new pods ``pick_nodes`` puts there and the room left after them,
    each new pod's node in the order they are placed: None where it fits nowhere)."""
    request = placement_request(spec)
    picked = pick_nodes(list(usage.values()), request, count)
    per = Counter(p for p in picked if p is not None)
    plans = [
        NodePlan(node=u.name, pods=per[u.name], pods_left=u.max_pods - u.used_pods - per[u.name],
                 cpu_left=round(u.cpu - u.used_cpu - per[u.name] * request.cpu, 6),
                 memory_left_mb=u.memory_mb - u.used_memory_mb - per[u.name] * request.memory_mb)
        for u in sorted(usage.values(), key=lambda u: u.name)
    ]
    return plans, picked


def first_replicas(spec: ServiceSpec, now: datetime) -> int:
    """The replica count a first deploy at ``now`` starts with: ``min_replicas``, within the bounds
    of the time slot on now that wins (as the service takes the clock at its first deploy)."""
    slot = clock.winner([s for s in spec.time_slots if s.name in clock.on_now(spec.time_slots, now)],
                        spec.max_replicas)
    bounds = (spec.min_replicas, spec.max_replicas) if slot is None else clock.slot_bounds(slot, spec.max_replicas)
    return clock.clamp(spec.min_replicas, bounds)


def slot_edges(spec: ServiceSpec, now: datetime) -> list[SlotEdges]:
    """Each time slot of the spec: on now, and its next start and end."""
    out = []
    for slot in spec.time_slots:
        start, end = clock.next_edges(slot, now)
        out.append(SlotEdges(name=slot.name, on=clock.is_on(slot, now), next_start=start, next_end=end))
    return out
