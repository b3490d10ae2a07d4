"""A ``node_lost`` signal is believed only for a node the NodeRegistry holds as Lost *and evicted*.
In a full disruption the registry marks every node Lost but keeps their pods (``pods_kept``): a
signal sent by anyone then must not replace them either."""

from activities.control import evicted
from hms_mgmt.models import NodeRecord, NodeSpec


def rec(name: str, state: str, kept: bool = False) -> NodeRecord:
    return NodeRecord(spec=NodeSpec(name=name, task_queue=f"hms-node-{name}"), state=state, pods_kept=kept)


def test_only_a_lost_node_whose_pods_the_registry_replaces_counts():
    nodes = [rec("a", "Ready"), rec("b", "Lost"), rec("c", "Lost", kept=True)]
    assert evicted(nodes, "b")
    assert not evicted(nodes, "a")  # Ready
    assert not evicted(nodes, "c")  # Lost with every node at once: its pods stay
    assert not evicted(nodes, "d")  # unknown
