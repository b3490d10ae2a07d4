"""The process runtime's exit events: a health monitor learns of a dead pod from one watcher
thread (a pidfd per pod), not by polling every pod several times a second. Real processes.
About 5 s."""

from __future__ import annotations

import os
import queue
import signal
import uuid
from pathlib import Path

import pytest
from conftest import EXAMPLE_IMAGE, seed_spec

from hms_mgmt.models import ServiceSpec
from hms_mgmt.runtimes import PodLaunch
from hms_mgmt.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux >= 5.3)")


def launch(node: str, pod_id: str | None = None) -> PodLaunch:
    spec = ServiceSpec(**seed_spec(name="exits", image=EXAMPLE_IMAGE, min_replicas=1, max_replicas=1))
    return PodLaunch(pod_id=pod_id or str(uuid.uuid4()), service=spec.name, revision=1, node=node, spec=spec)


def next_exit(events: queue.Queue[str], timeout: float = 10.0) -> str:
    try:
        return events.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no exit event within {timeout:g}s") from None


def test_exits_are_reported_once_for_started_adopted_and_restarted_pods(tmp_path: Path) -> None:
    node = f"x{uuid.uuid4().hex[:6]}"
    first = ProcessRuntime(node, tmp_path)
    adopted = first.start(launch(node))
    # A restarted worker: a new runtime on the same records; the adopted pod is not its child.
    rt = ProcessRuntime(node, tmp_path)
    events: queue.Queue[str] = queue.Queue()
    unsubscribe = rt.subscribe_exits(events.put)
    assert unsubscribe is not None
    try:
        own = rt.start(launch(node))
        os.kill(int(adopted.extra["pid"]), signal.SIGKILL)
        assert next_exit(events) == adopted.pod_id
        os.kill(int(own.extra["pid"]), signal.SIGKILL)
        assert next_exit(events) == own.pod_id

        # The same pod id started again (an idempotent retry after its process died) is watched anew.
        again = rt.start(launch(node, own.pod_id))
        assert again.extra["pid"] != own.extra["pid"] and again.running
        os.kill(int(again.extra["pid"]), signal.SIGKILL)
        assert next_exit(events) == own.pod_id

        # Dead pods keep their records until stopped: still, each exit is reported once.
        with pytest.raises(AssertionError):
            next_exit(events, timeout=2.5)

        unsubscribe()
        late = rt.start(launch(node))
        os.kill(int(late.extra["pid"]), signal.SIGKILL)
        with pytest.raises(AssertionError):
            next_exit(events, timeout=1.5)
    finally:
        for h in rt.list():
            rt.stop(h.pod_id, 0)
        rt.close()
        first.close()
