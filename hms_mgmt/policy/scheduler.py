"""Where new pods go: only nodes whose labels match the service's ``node_selector``; among
those, spread a service across nodes first, then pack by free capacity.

Spreading first means losing one node costs a service as few replicas as possible; packing
among equally spread nodes keeps whole nodes free for services with large requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from hms_mgmt.models import ServiceSpec

# Requests like 0.1 + 0.2 CPUs must fit a 0.3-CPU node despite float rounding.
_CPU_SLACK = 1e-9


class NodeUsage(BaseModel):
    """A node's capacity and what is already placed on it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    cpu: float = Field(ge=0, allow_inf_nan=False)
    memory_mb: int = Field(ge=0)
    max_pods: int = Field(ge=0)
    used_pods: int = Field(default=0, ge=0)
    used_cpu: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    used_memory_mb: int = Field(default=0, ge=0)
    service_pods: int = Field(default=0, ge=0, description="pods of the service being placed")
    labels: dict[str, str] = Field(default_factory=dict)


class PlacementRequest(BaseModel):
    """What one pod of the service reserves; 0 means no limit set, so it only takes a slot."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    memory_mb: int = Field(default=0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict, description="labels a node must carry, all of them")


def placement_request(spec: ServiceSpec) -> PlacementRequest:
    """What one pod of ``spec`` reserves."""
    return PlacementRequest(cpu=spec.cpu_limit or 0.0, memory_mb=spec.memory_mb or 0, node_selector=spec.node_selector)


def selector_matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Every ``key=value`` of the selector is among the node's labels (an empty selector matches all)."""
    return all(labels.get(k) == v for k, v in selector.items())


def node_fits(node: NodeUsage, request: PlacementRequest) -> bool:
    """True when one more pod with ``request`` stays within every limit of ``node``."""
    return (
        selector_matches(node.labels, request.node_selector)
        and node.used_pods < node.max_pods
        and node.used_cpu + request.cpu <= node.cpu + _CPU_SLACK
        and node.used_memory_mb + request.memory_mb <= node.memory_mb
    )


def pick_nodes(nodes: list[NodeUsage], request: PlacementRequest, count: int) -> list[str | None]:
    """Place ``count`` pods one at a time; entry i is pod i's node, or ``None`` if nothing fits.

    Among the nodes that fit (selector, pod slots, CPU, memory): fewest pods of this service, then least free CPU after
    placing, then least free memory, then name, so the same input always gives the same
    placement.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    usage = [n.model_copy() for n in nodes]
    placed: list[str | None] = []
    for _ in range(count):
        fitting = [n for n in usage if node_fits(n, request)]
        if not fitting:
            placed.append(None)
            continue
        best = min(
            fitting,
            key=lambda n: (
                n.service_pods,
                n.cpu - n.used_cpu - request.cpu,
                n.memory_mb - n.used_memory_mb - request.memory_mb,
                n.name,
            ),
        )
        best.used_pods += 1
        best.used_cpu += request.cpu
        best.used_memory_mb += request.memory_mb
        best.service_pods += 1
        placed.append(best.name)
    return placed
