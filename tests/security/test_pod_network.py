"""A process pod cannot connect to the Temporal frontend or the control plane's other ports
(issue 19, item 8). The attack: code in a pod opens a connection to Temporal on 127.0.0.1 and,
the dev server having no authentication, starts workflows and sends signals at will.

Only where the sandbox runs: a root worker whose process pods run as uids of their own (the rule
matches the whole range, ``--uid-owner A-B``), with iptables. Real dev server, real worker, a real
process pod; about 10 s."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.request

import pytest
from conftest import make_settings, seed_spec, sweep_pods, temporal_address, terminate_running

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes.podnet import chain_name, server_ports
from worker.main import HmsWorker

SYSTEM_PYTHON = "/usr/bin/python3"  # one the pod user can run (the runtime falls back to it too)
pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("iptables") is None or not os.path.exists(SYSTEM_PYTHON),
        reason="process pods run as their own user only under a root worker, and the rule needs iptables",
    ),
    # The pod uid range is one for the whole machine: another test's node firewall, running at the
    # same time, would answer for it. Alone, the "no rule yet" step sees only this test's rules.
    pytest.mark.serial,
]

CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(type(e).__name__)
"""


def connect_as_pod_user(port: int, uid: int | None = None) -> str:
    """What a pod's code gets when it dials ``port``: run as a pod uid (default: the range's last,
    which no pod of this test has), with no groups, as the runtime runs pods."""
    if uid is None:
        defaults = Settings()
        uid = defaults.pod_uid_base + defaults.pod_uid_count - 1
    done = subprocess.run([SYSTEM_PYTHON, "-c", CONNECT, str(port)], user=uid, group=uid,
                          extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() or done.stderr.strip()


def iptables_rules() -> str:
    return subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True, check=True).stdout


async def test_a_process_pod_cannot_reach_temporal_but_the_router_reaches_it(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    temporal_port = int(temporal_address(temporal_env).rsplit(":", 1)[1])
    # The dev server's other ports (its HTTP API, metrics, internal gRPC) are as open as the frontend.
    others = [p for p in server_ports(settings) if p != temporal_port]
    assert others, "the dev server listens on more than its frontend port"
    chain = chain_name(settings.state_dir, settings.node)
    assert await asyncio.to_thread(connect_as_pod_user, temporal_port) == "connected"  # no rule yet
    try:
        async with HmsWorker(temporal_env.client, settings):
            orch = Orchestrator(temporal_env.client, settings)
            await orch.deploy(seed_spec(name="hms-netguard", min_replicas=1, max_replicas=1), wait=True, timeout=90)
            [pod] = (await orch.status("hms-netguard")).pods

            assert await asyncio.to_thread(connect_as_pod_user, temporal_port) == "refused"
            record = json.loads((settings.state_dir / "pods" / settings.node / f"{pod.id}.json").read_text())
            assert record["own_uid"] and record["uid"] >= settings.pod_uid_base  # the pod's own uid, in the range
            assert await asyncio.to_thread(connect_as_pod_user, temporal_port, record["uid"]) == "refused"
            for port in others:
                assert await asyncio.to_thread(connect_as_pod_user, port) == "refused", port
            # Narrow: the pod user still reaches what is not the control plane's (here, a pod).
            assert await asyncio.to_thread(connect_as_pod_user, int(pod.endpoint.rsplit(":", 1)[1])) == "connected"
            # The router (the worker's user) still reaches the pod, and the pod answers it.
            with urllib.request.urlopen(f"http://{pod.endpoint}/health", timeout=5) as resp:
                assert resp.status == 200
            assert chain in iptables_rules()
            assert f"--uid-owner {settings.pod_uid_base}-{settings.pod_uid_base + settings.pod_uid_count - 1}" \
                in iptables_rules()
        # The worker stopped (a restart, say) and its pod runs on: the rule stays with it.
        assert chain in iptables_rules()
        assert await asyncio.to_thread(connect_as_pod_user, temporal_port) == "refused"
        async with HmsWorker(temporal_env.client, settings):  # the next worker adopts the pod
            await Orchestrator(temporal_env.client, settings).undeploy("hms-netguard", wait=True, timeout=60)
        # Removed at a stop that leaves no pod.
        assert chain not in iptables_rules()
        assert await asyncio.to_thread(connect_as_pod_user, temporal_port) == "connected"
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
