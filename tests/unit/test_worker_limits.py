"""A node's worker sized for the pods it may hold: activity slots for one watch per service, and
an open-files limit raised past a shell's soft 1024 (a pidfd and a probe socket per pod)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from worker.main import CONTROL_ACTIVITY_SLOTS, node_activity_slots

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("max_pods", [64, 500, 1000, 4000])
def test_node_slots_outnumber_its_watches(tmp_path: Path, max_pods: int) -> None:
    # One single-pod service per pod slot: each holds a watch_pods the whole time, and a heal's
    # start_pod must still find a slot.
    s = Settings(state_dir=tmp_path, node_max_pods=max_pods)
    assert node_activity_slots(s) >= max_pods + 100
    assert CONTROL_ACTIVITY_SLOTS >= 4000  # one watch_cpu per autoscaling service


def test_worker_raises_a_soft_open_files_limit() -> None:
    # As a worker started from a shell with `ulimit -Sn 256` would be: the node raises it to the hard limit.
    code = ("import resource; from worker.main import raise_open_files_limit; "
            "n = raise_open_files_limit(1000); print(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run(["prlimit", "--nofile=256:4096", "--", sys.executable, "-c", code], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["4096", "4096"]


def test_worker_warns_when_the_hard_limit_is_short() -> None:
    code = "from worker.main import raise_open_files_limit; print(raise_open_files_limit(1000))"
    out = subprocess.run(["prlimit", "--nofile=256:1024", "--", sys.executable, "-c", code], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["1024"]
    assert "short of" in out.stderr and "node_max_pods=1000" in out.stderr
