"""Which iptables chains of process-pod firewalls a starting worker removes: only those whose
worker is gone (same PID namespace, no process with that pid and start time) and whose state
directory is gone too. Pure: the rules are ``iptables -S OUTPUT`` text, the processes and the
directories dicts."""

from __future__ import annotations

from pathlib import Path

from hms_mgmt.runtimes.podnet import COMMENT_MAX, jump_rule, orphans, owner_tag


def line(chain: str, comment: str = "") -> str:
    args = jump_rule(chain, 999, comment)
    return "-A " + " ".join(f'"{a}"' if " " in a else a for a in args)


RUNNING = {100: "5000", 200: "6000"}  # pid -> start time
DIRS = {"/var/lib/hms-a", "/srv/my%20state"}  # state directories still there


def gone(rules: str, own: str = "HMS-POD-mine") -> dict[str, list[list[str]]]:
    return orphans(rules, own, "7", RUNNING.get, DIRS.__contains__)


def test_only_a_gone_workers_chain_is_removed() -> None:
    rules = "\n".join([
        "-P OUTPUT ACCEPT",
        line("HMS-POD-mine", "hms-worker pid=100 start=5000 pidns=7 state=/var/lib/hms-a"),
        line("HMS-POD-live", "hms-worker pid=200 start=6000 pidns=7 state=/tmp/gone-1"),
        line("HMS-POD-dead", "hms-worker pid=300 start=1 pidns=7 state=/tmp/gone-2"),
        line("HMS-POD-reused", "hms-worker pid=200 start=42 pidns=7 state=/tmp/gone-3"),  # pid now another's
        line("HMS-POD-back", "hms-worker pid=300 start=1 pidns=7 state=/var/lib/hms-a"),  # may restart: stays
        line("HMS-POD-spaced", "hms-worker pid=300 start=1 pidns=7 state=/srv/my%2520state"),  # quoted path
        line("HMS-POD-elsewhere", "hms-worker pid=300 start=1 pidns=8 state=/tmp/gone-4"),  # another PID namespace
        line("HMS-POD-nostate", "hms-worker pid=300 start=1 pidns=7"),  # its directory did not fit
        line("HMS-POD-untagged"),  # added before the comment: its owner cannot be told
        "-A OUTPUT -p tcp -j ACCEPT",
    ])
    found = gone(rules)
    assert sorted(found) == ["HMS-POD-dead", "HMS-POD-reused"]
    assert found["HMS-POD-dead"] == [jump_rule("HMS-POD-dead", 999, "hms-worker pid=300 start=1 pidns=7 state=/tmp/gone-2")]


def test_a_chain_with_one_live_jump_stays() -> None:
    rules = "\n".join([line("HMS-POD-x", "hms-worker pid=300 start=1 pidns=7 state=/tmp/gone"),
                       line("HMS-POD-x", "hms-worker pid=100 start=5000 pidns=7 state=/tmp/gone")])
    assert gone(rules) == {}


def test_our_own_chain_is_never_an_orphan() -> None:
    assert gone(line("HMS-POD-mine", "hms-worker pid=300 start=1 pidns=7 state=/tmp/gone")) == {}


def test_the_tag_names_the_state_directory_when_it_fits(tmp_path: Path) -> None:
    tag = owner_tag(tmp_path / "a b")
    assert tag.endswith(" state=" + str((tmp_path / "a b").resolve()).replace(" ", "%20"))
    long = owner_tag(tmp_path / ("d" * 300))
    assert "state=" not in long and len(long) < COMMENT_MAX


def test_the_rule_follows_a_temporal_server_that_restarted_on_new_ports(tmp_path: Path, monkeypatch) -> None:
    from hms_mgmt.config import Settings
    from hms_mgmt.runtimes import podnet

    monkeypatch.setattr(podnet, "server_ports", lambda s: [41001, 41002])
    fw = podnet.PodFirewall(Settings(state_dir=tmp_path, node="n1"), 999)
    assert not fw.ports_changed()
    monkeypatch.setattr(podnet, "server_ports", lambda s: [41001, 43003])  # its HTTP API moved
    assert fw.ports_changed()
    assert 43003 in fw.ports and 41002 not in fw.ports
    assert any("43003" in ",".join(rule) for rule in fw.rules)


def test_the_jump_matches_the_whole_pod_uid_range() -> None:
    """A uid per pod: one jump for every pod's uid (iptables' owner match takes ``A-B``)."""
    assert jump_rule("HMS-POD-x", "1900000000-1900065535")[:5] == [
        "OUTPUT", "-m", "owner", "--uid-owner", "1900000000-1900065535"]
    rules = "-A " + " ".join(jump_rule("HMS-POD-dead", "1900000000-1900065535",
                                       "hms-worker pid=300 start=1 pidns=7 state=/tmp/gone")).replace(
        "hms-worker pid=300 start=1 pidns=7 state=/tmp/gone", '"hms-worker pid=300 start=1 pidns=7 state=/tmp/gone"')
    assert list(gone(rules)) == ["HMS-POD-dead"]
