"""A worker killed between spawning a process pod and recording its pid leaves the pod's intent
record (no pid) and a live process no record names. The next start of that pod id, or its stop,
finds that process by the pod id in its environment and kills it: one process per pod, never two,
and none after a stop. The on-disk state is made as the kill leaves it (a real pod, its record
rewritten to the intent record), since the kill itself cannot be timed to that millisecond."""

from __future__ import annotations

import json
import uuid

from chaos_helpers import process_table
from conftest import EXAMPLE_IMAGE

from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch
from hms_mgmt.runtimes.process import ProcessRuntime


def interrupted_start(tmp_path, service: str) -> tuple[ProcessRuntime, PodLaunch, int]:
    rt = ProcessRuntime("n-interrupted", tmp_path / "state")
    spec = ServiceSpec(name=service, image=EXAMPLE_IMAGE, min_replicas=1, max_replicas=1, cpu_target=60)
    req = PodLaunch(pod_id=str(uuid.uuid4()), service=service, revision=1, node=rt.node, spec=spec)
    first = rt.start(req)
    path = rt.records / f"{req.pod_id}.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "pid": 0, "create_time": 0.0}))  # what the kill leaves
    rt.close()
    return ProcessRuntime("n-interrupted", tmp_path / "state"), req, int(first.extra["pid"])


def test_a_start_cut_short_leaves_one_process_after_the_retry_and_none_after_a_stop(tmp_path):
    service = f"chaos-{uuid.uuid4().hex[:6]}"
    rt, req, stray = interrupted_start(tmp_path, service)  # a restarted worker's runtime
    try:
        assert process_table({service})[service] == {req.pod_id: 1}
        handle = rt.start(req)  # the retried start_pod activity
        assert handle.running and int(handle.extra["pid"]) != stray
        assert process_table({service})[service] == {req.pod_id: 1}, "two processes for one pod"
        assert [h.pod_id for h in rt.list(service)] == [req.pod_id]
        assert rt.stop(req.pod_id, 0)
        assert process_table({service})[service] == {}
    finally:
        for h in rt.list():
            rt.stop(h.pod_id, 0)
        rt.close()


def test_a_stop_of_a_start_cut_short_kills_the_unrecorded_process(tmp_path):
    service = f"chaos-{uuid.uuid4().hex[:6]}"
    rt, req, _ = interrupted_start(tmp_path, service)
    try:
        assert rt.list(service)[0].state == "exited"  # no pid on record: not known to run
        assert rt.stop(req.pod_id, 0)  # an undeploy's sweep, or the heal of a failed start
        assert process_table({service})[service] == {}
        assert rt.list(service) == []
    finally:
        for h in rt.list():
            rt.stop(h.pod_id, 0)
        rt.close()
