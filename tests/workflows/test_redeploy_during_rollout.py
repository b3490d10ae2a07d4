"""A deploy while a rolling update runs is compared with the revision the service is heading
to, not the one it still runs: the same new spec again changes nothing, and the old spec again
replaces the rollout (a new revision) instead of being ignored while the rollout carries on."""

from __future__ import annotations

import pytest
from conftest import EXAMPLE_IMAGE, V2_IMAGE, node_pods, seed_spec


@pytest.mark.parametrize("runtime_name", ["process"])
async def test_redeploying_during_a_rollout_targets_the_revision_in_flight(hms, settings):
    # Pods take 2 s to answer, one surge pod at a time: the rollout is still running below.
    v1 = seed_spec(min_replicas=2, max_replicas=2, health_interval_s=1.0, drain_s=0.5, min_ready_s=0.5, max_surge=1,
                   env={"HMS_STARTUP_DELAY_S": "2"})
    await hms.deploy(v1, wait=True, timeout=120)
    to_v2 = await hms.deploy({**v1, "image": V2_IMAGE})
    assert to_v2.revision == 2
    again = await hms.deploy({**v1, "image": V2_IMAGE})
    assert again.already_running and again.revision is None, "the spec in flight again started another revision"
    back = await hms.deploy(v1)
    assert back.revision == 3, "deploying v1 during the v1 -> v2 rollout was ignored"
    st = await hms.wait_for_revision("hms-ach", 3, timeout=180)
    assert st.spec.image == EXAMPLE_IMAGE and st.ready_replicas == 2
    assert {p.revision for p in st.pods} == {3}
    assert sorted(h.pod_id for h in node_pods(settings, "hms-ach")) == sorted(p.id for p in st.pods)
    await hms.undeploy("hms-ach")
