"""Which iptables chains of process-pod firewalls a starting worker removes: only those whose
worker is gone (same PID namespace, no process with that pid and start time). Pure: the rules
are ``iptables -S OUTPUT`` text, the processes a dict."""

from __future__ import annotations

from hms_mgmt.runtimes.podnet import jump_rule, orphans


def line(chain: str, comment: str = "") -> str:
    args = jump_rule(chain, 999, comment)
    return "-A " + " ".join(f'"{a}"' if " " in a else a for a in args)


RUNNING = {100: "5000", 200: "6000"}  # pid -> start time


def started(pid: int) -> str | None:
    return RUNNING.get(pid)


def test_only_a_gone_workers_chain_is_removed() -> None:
    rules = "\n".join([
        "-P OUTPUT ACCEPT",
        line("HMS-POD-mine", "hms-worker pid=100 start=5000 pidns=7"),
        line("HMS-POD-live", "hms-worker pid=200 start=6000 pidns=7"),
        line("HMS-POD-dead", "hms-worker pid=300 start=1 pidns=7"),
        line("HMS-POD-reused", "hms-worker pid=200 start=42 pidns=7"),  # its pid now another process's
        line("HMS-POD-elsewhere", "hms-worker pid=300 start=1 pidns=8"),  # another PID namespace
        line("HMS-POD-untagged"),  # added before the comment: its owner cannot be told
        "-A OUTPUT -p tcp -j ACCEPT",
    ])
    gone = orphans(rules, "HMS-POD-mine", "7", started)
    assert sorted(gone) == ["HMS-POD-dead", "HMS-POD-reused"]
    assert gone["HMS-POD-dead"] == [jump_rule("HMS-POD-dead", 999, "hms-worker pid=300 start=1 pidns=7")]


def test_a_chain_with_one_live_jump_stays() -> None:
    rules = "\n".join([line("HMS-POD-x", "hms-worker pid=300 start=1 pidns=7"),
                       line("HMS-POD-x", "hms-worker pid=100 start=5000 pidns=7")])
    assert orphans(rules, "HMS-POD-mine", "7", started) == {}


def test_our_own_chain_is_never_an_orphan() -> None:
    rules = line("HMS-POD-mine", "hms-worker pid=300 start=1 pidns=7")  # a worker before us, same state dir
    assert orphans(rules, "HMS-POD-mine", "7", started) == {}
