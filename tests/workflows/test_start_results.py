"""A start is believed only as its node's word. Anyone who reaches Temporal can poll a node's
task queue, take a ``start_pod`` task and answer it: its ticket, stamp and sealed secrets are
bound to that pod and node and are of no use to them, but the answer names the pod's address,
which the routers would be sent. The control worker checks the node's signature on every
start's result before the service records the pod (``check_started_pod``).

Real dev server and the real workflows; the node queue is polled by an outsider's stand-in
that answers, unsigned, with an address of its own; the check is the control worker's own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from conftest import eventually, seed_spec
from temporalio import activity
from test_service_logic import FakeCluster, as_user, fake_cluster

from activities.enrolment import NodeTrustActivities
from hms_mgmt import nodeid, tickets
from hms_mgmt.events import EventSink, read_events
from hms_mgmt.models import PodStatus
from hms_mgmt.wire import PodReportCheck, StartPodInput

EVIL = "127.0.0.1:9"  # the outsider's address


@dataclass
class HijackedNode(FakeCluster):
    trust: NodeTrustActivities | None = None

    @activity.defn(name="start_pod")
    async def start_pod(self, inp: StartPodInput) -> PodStatus:
        self.started.append(inp.pod_id)
        return PodStatus(id=inp.pod_id, node=inp.node, endpoint=EVIL, revision=inp.revision, image=inp.spec.image,
                         ready=True, health="healthy", started_at=datetime.now(UTC))

    @activity.defn(name="check_started_pod")
    async def check_started_pod(self, inp: PodReportCheck) -> None:
        assert self.trust is not None
        await self.trust.check_started_pod(inp)


async def test_a_start_answered_by_an_outsider_on_the_node_queue_routes_nothing(temporal_env, tmp_path):
    async with fake_cluster(temporal_env, tmp_path, HijackedNode) as (cluster, settings):
        assert isinstance(cluster, HijackedNode)
        tickets.ensure_control_key(settings.state_dir)
        nodeid.node_identity(settings.state_dir, settings.node, "127.0.0.1")  # the node is enrolled; its key is not theirs
        cluster.trust = NodeTrustActivities(lambda: settings, EventSink(settings.state_dir))
        alice = as_user(temporal_env, settings, "t-alice")
        await alice.deploy(seed_spec())

        def refusals() -> list[str]:
            return [e.reason for e in read_events(settings.state_dir)
                    if e.type == "access.denied" and "without that node's word" in e.reason]

        await eventually(lambda: refusals() and cluster.started, timeout=60,
                         what="a start answered by the outsider and refused")
        await asyncio.sleep(1.0)  # what the service made of it
        assert all("no signature by node" in r for r in refusals()), refusals()
        st = await alice.status("hms-ach")
        assert not [p for p in st.pods if p.endpoint == EVIL], st.pods
        assert st.ready_replicas == 0
        assert not [e for t in cluster.tables for e in t.endpoints if EVIL in str(e)], "the routers were sent their address"
