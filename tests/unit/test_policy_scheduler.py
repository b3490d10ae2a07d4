"""Pod placement: spread a service across nodes, then pack by free capacity."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hms_mgmt.policy.scheduler import NodeUsage, PlacementRequest, node_fits, pick_nodes

PROPS = settings(max_examples=200, deadline=None)


def node(name: str, cpu: float = 4.0, memory_mb: int = 4096, max_pods: int = 64, **kw: object) -> NodeUsage:
    return NodeUsage(name=name, cpu=cpu, memory_mb=memory_mb, max_pods=max_pods, **kw)


# --- examples --------------------------------------------------------------------------


def test_spreads_before_packing() -> None:
    nodes = [node("a", cpu=8), node("b", cpu=2)]
    assert pick_nodes(nodes, PlacementRequest(cpu=0.5), 4) == ["b", "a", "b", "a"]


def test_packs_into_the_fullest_node_among_equally_spread() -> None:
    nodes = [node("a", used_cpu=1.0), node("b", used_cpu=3.0), node("c")]
    assert pick_nodes(nodes, PlacementRequest(cpu=0.5), 1) == ["b"]


def test_then_least_free_memory_then_name() -> None:
    nodes = [node("c"), node("b", used_memory_mb=100), node("a", used_memory_mb=100)]
    assert pick_nodes(nodes, PlacementRequest(), 1) == ["a"]


def test_existing_pods_of_the_service_count_for_spreading() -> None:
    nodes = [node("a", service_pods=2), node("b", service_pods=0, cpu=16)]
    assert pick_nodes(nodes, PlacementRequest(cpu=1), 2) == ["b", "b"]


def test_each_limit_is_respected() -> None:
    assert pick_nodes([node("a", max_pods=1)], PlacementRequest(), 2) == ["a", None]
    assert pick_nodes([node("a", cpu=1.0)], PlacementRequest(cpu=0.6), 2) == ["a", None]
    assert pick_nodes([node("a", memory_mb=512)], PlacementRequest(memory_mb=256), 3) == ["a", "a", None]


def test_float_cpu_requests_fill_a_node_exactly() -> None:
    assert pick_nodes([node("a", cpu=0.3)], PlacementRequest(cpu=0.1), 4) == ["a", "a", "a", None]


def test_nothing_fits_gives_none() -> None:
    assert pick_nodes([], PlacementRequest(), 2) == [None, None]
    assert pick_nodes([node("a", max_pods=0)], PlacementRequest(), 1) == [None]


def test_zero_count_and_negative_count() -> None:
    assert pick_nodes([node("a")], PlacementRequest(), 0) == []
    with pytest.raises(ValueError):
        pick_nodes([node("a")], PlacementRequest(), -1)


def test_input_is_not_changed() -> None:
    nodes = [node("a"), node("b")]
    before = [n.model_copy() for n in nodes]
    pick_nodes(nodes, PlacementRequest(cpu=1, memory_mb=10), 3)
    assert nodes == before


def test_node_fits() -> None:
    assert node_fits(node("a", cpu=1.0, used_cpu=0.5), PlacementRequest(cpu=0.5))
    assert not node_fits(node("a", cpu=1.0, used_cpu=0.6), PlacementRequest(cpu=0.5))
    assert not node_fits(node("a", max_pods=2, used_pods=2), PlacementRequest())


def test_models_are_strict() -> None:
    with pytest.raises(ValidationError):
        NodeUsage(name="a", cpu=1, memory_mb=1, max_pods=1, zone="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        PlacementRequest(cpu=-1)


# --- properties ------------------------------------------------------------------------


@st.composite
def a_node(draw: st.DrawFn, name: str) -> NodeUsage:
    cpu = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0, 8.0]))
    memory_mb = draw(st.sampled_from([0, 256, 1024, 4096]))
    max_pods = draw(st.integers(0, 8))
    return NodeUsage(
        name=name,
        cpu=cpu,
        memory_mb=memory_mb,
        max_pods=max_pods,
        used_pods=draw(st.integers(0, max_pods)),
        used_cpu=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])) * cpu,
        used_memory_mb=draw(st.integers(0, memory_mb)),
        service_pods=draw(st.integers(0, 3)),
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeUsage]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=6))
    return [draw(a_node(n)) for n in names]


requests = st.builds(
    PlacementRequest,
    cpu=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 3.0]),
    memory_mb=st.sampled_from([0, 64, 256, 1024]),
)


def apply(nodes: list[NodeUsage], request: PlacementRequest, placed: list[str | None]) -> list[NodeUsage]:
    counts = Counter(p for p in placed if p is not None)
    return [
        n.model_copy(
            update={
                "used_pods": n.used_pods + counts[n.name],
                "used_cpu": n.used_cpu + counts[n.name] * request.cpu,
                "used_memory_mb": n.used_memory_mb + counts[n.name] * request.memory_mb,
                "service_pods": n.service_pods + counts[n.name],
            }
        )
        for n in nodes
    ]


@PROPS
@given(nodes=clusters(), request=requests, count=st.integers(0, 30))
def test_never_exceeds_any_node_capacity(nodes: list[NodeUsage], request: PlacementRequest, count: int) -> None:
    placed = pick_nodes(nodes, request, count)
    assert len(placed) == count
    assert set(placed) - {None} <= {n.name for n in nodes}
    for n in apply(nodes, request, placed):
        original = next(o for o in nodes if o.name == n.name)
        if n.used_pods == original.used_pods:
            continue  # nothing placed here; pre-existing usage is not ours to judge
        assert n.used_pods <= n.max_pods
        assert n.used_cpu <= n.cpu + 1e-9
        assert n.used_memory_mb <= n.memory_mb


@PROPS
@given(nodes=clusters(), request=requests, count=st.integers(0, 30))
def test_none_only_when_nothing_fits(nodes: list[NodeUsage], request: PlacementRequest, count: int) -> None:
    placed = pick_nodes(nodes, request, count)
    if None in placed:
        first = placed.index(None)
        assert placed[first:] == [None] * (count - first)
        after = apply(nodes, request, placed)
        assert not any(node_fits(n, request) for n in after)


@PROPS
@given(
    n_nodes=st.integers(1, 6),
    max_pods=st.integers(0, 10),
    cpu=st.sampled_from([1.0, 2.0, 4.0]),
    request=requests,
    count=st.integers(0, 40),
)
def test_spreads_evenly_across_equal_nodes(
    n_nodes: int, max_pods: int, cpu: float, request: PlacementRequest, count: int
) -> None:
    nodes = [node(f"n{i}", cpu=cpu, memory_mb=4096, max_pods=max_pods) for i in range(n_nodes)]
    placed = pick_nodes(nodes, request, count)
    per_node = Counter(p for p in placed if p is not None)
    counts = [per_node[n.name] for n in nodes]
    assert max(counts) - min(counts) <= 1
    if None in placed:
        assert not any(node_fits(n, request) for n in apply(nodes, request, placed))


@PROPS
@given(nodes=clusters(), request=requests, count=st.integers(0, 20))
def test_deterministic_whatever_the_node_order(nodes: list[NodeUsage], request: PlacementRequest, count: int) -> None:
    assert pick_nodes(nodes, request, count) == pick_nodes(list(reversed(nodes)), request, count)


# --- node_selector ---------------------------------------------------------------------


def test_selector_places_only_on_matching_nodes() -> None:
    nodes = [node("a", labels={"zone": "a"}), node("b", labels={"zone": "b", "disk": "ssd"}), node("c")]
    assert pick_nodes(nodes, PlacementRequest(node_selector={"zone": "b"}), 2) == ["b", "b"]
    assert pick_nodes(nodes, PlacementRequest(node_selector={"zone": "b", "disk": "ssd"}), 1) == ["b"]


def test_selector_spreads_among_matching_nodes() -> None:
    nodes = [node("a", labels={"tier": "x"}), node("b", labels={"tier": "x"}), node("c")]
    assert Counter(pick_nodes(nodes, PlacementRequest(node_selector={"tier": "x"}), 4)) == {"a": 2, "b": 2}


def test_selector_nothing_matches_or_matching_node_full() -> None:
    nodes = [node("a", labels={"zone": "a"}, max_pods=1), node("b")]
    assert pick_nodes(nodes, PlacementRequest(node_selector={"zone": "z"}), 1) == [None]
    assert pick_nodes(nodes, PlacementRequest(node_selector={"zone": "a"}), 2) == ["a", None]
    assert pick_nodes(nodes, PlacementRequest(node_selector={"zone": "A"}), 1) == [None], "values match exactly"


def test_empty_selector_matches_every_node() -> None:
    assert node_fits(node("a", labels={"x": "1"}), PlacementRequest())
    assert not node_fits(node("a"), PlacementRequest(node_selector={"x": "1"}))
