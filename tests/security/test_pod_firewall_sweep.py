"""A worker killed with SIGKILL leaves its process pods' iptables chain behind; when its state
directory is gone, no worker ever replaces that chain. The next worker to start on the host
removes it, and leaves the chains of workers still running or whose state directory is still
there (they may come back). Real iptables (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.runtimes.podnet import PodFirewall, owner_tag

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables") is None,
                                reason="the pod firewall needs root and iptables")
UID = 65533  # no pod runs as this user: the rules below block nobody's traffic


def iptables(*args: str, check: bool = True) -> str:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, check=check).stdout


def add_chain(owner: str) -> str:
    chain = f"HMS-POD-t{uuid.uuid4().hex[:11]}"
    iptables("-N", chain)
    iptables("-A", chain, "-p", "tcp", "--syn", "--dport", "9", "-j", "REJECT", "--reject-with", "tcp-reset")
    iptables("-I", "OUTPUT", "-m", "owner", "--uid-owner", str(UID), "-m", "comment", "--comment", owner, "-j", chain)
    return chain


def drop_chain(chain: str) -> None:
    for line in iptables("-S", "OUTPUT").splitlines():
        if line.endswith(f"-j {chain}"):
            subprocess.run(["sh", "-c", f"iptables -w 5 -D {line[3:]}"], check=False)
    iptables("-F", chain, check=False)
    iptables("-X", chain, check=False)


def test_a_gone_workers_chain_is_removed_and_a_running_ones_stays(tmp_path):
    kept_dir = tmp_path / "kept"
    kept_dir.mkdir()
    dead = subprocess.Popen(["sleep", "60"])
    gone_tag, back_tag = owner_tag(tmp_path / "deleted", dead.pid), owner_tag(kept_dir, dead.pid)
    dead.kill()
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    # gone (state directory deleted too); gone but its state directory is there (it may come
    # back); running
    chains = [add_chain(gone_tag), add_chain(back_tag), add_chain(owner_tag(tmp_path / "deleted", alive.pid))]
    firewall = PodFirewall(Settings(state_dir=tmp_path / "state", node="sweep-test"), UID)
    try:
        firewall.install()
        rules = iptables("-S")
        assert f"-N {chains[0]}" not in rules and f"-j {chains[0]}" not in rules, "the gone worker's chain"
        for chain in chains[1:]:
            assert f"-N {chain}" in rules and f"-j {chain}" in rules, "one that may come back, and a running one"
        assert f'"{owner_tag(tmp_path / "state")}" -j {firewall.chain}' in rules, "ours, tagged with this process"
        firewall.install()  # again, as a restarted worker does: one jump, not two
        assert iptables("-S", "OUTPUT").count(f"-j {firewall.chain}") == 1
        firewall.remove()
        assert firewall.chain not in iptables("-S")
    finally:
        alive.kill()
        alive.wait()
        firewall.remove()
        for chain in chains:
            drop_chain(chain)


def test_a_worker_replacing_its_chain_never_leaves_its_pods_without_a_rule(tmp_path, monkeypatch) -> None:
    """Process pods outlive a worker; the next one replaces the chain. Each step is checked
    against the real table: from the first jump to the last step there is always one."""
    settings = Settings(state_dir=tmp_path / "state", node=f"t{uuid.uuid4().hex[:6]}")
    settings.state_dir.mkdir()
    first = PodFirewall(settings, UID)
    first.install()
    seen: list[int] = []
    real_run = PodFirewall._run

    def watched(self: PodFirewall, *args: str, check: bool = True) -> bool:
        done = real_run(self, *args, check=check)
        seen.append(sum(1 for line in iptables("-S", "OUTPUT").splitlines()
                        if f"--uid-owner {UID}" in line and self.chain in line))
        return done

    monkeypatch.setattr(PodFirewall, "_run", watched)
    try:
        second = PodFirewall(settings, UID)  # the next worker, same state directory and node
        second.install()
        assert seen and min(seen) >= 1, seen
        rules = iptables("-S", "OUTPUT")
        assert rules.count(f"-j {second.chain}\n") + rules.count(f"-j {second.chain} ") == 1
        assert second.staged not in rules and f"-N {second.staged}" not in iptables("-S")
    finally:
        monkeypatch.setattr(PodFirewall, "_run", real_run)
        first.remove()
