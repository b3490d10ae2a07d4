"""Issue 18, part 1 on separate hosts: host A runs ``hms up --listen A --no-node`` (Temporal, the
Web UI, the control worker, the router and the dashboard, no pods); host B runs
``hms node join TOKEN --name b --address B`` with a token from A, then ``hms worker``. A service's pods run on B at B's address, and a GET through
A's router reaches them there — never a decoy on A's loopback at a pod's port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from hms_mgmt.config import Settings
from hms_mgmt.orchestrator import Orchestrator

from .conftest import Network, hms_argv, sign_image, start_control, start_node, tails, wait_until

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(240)]

IMAGE = "registry.gov/hms-ach:1.4"
SERVICE = "hms-mh"
TEMPORAL_PORT, UI_PORT, ROUTER_PORT, DASHBOARD_PORT = 7233, 8233, 8000, 8088

# A server on host A's loopback at a pod's port: if the router ever dialled its own 127.0.0.1,
# this would answer (with a 200, which passive ejection would count as a success).
DECOY = """
import http.server, sys
port, hits, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        open(hits, "a").write(self.path + "\\n")
        self.send_response(200); self.send_header("X-HMS-Pod", "decoy"); self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
open(ready, "w").close()
srv.serve_forever()
"""


def get(url: str) -> tuple[int, str | None]:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        resp.read()
        return resp.status, resp.headers.get("X-HMS-Pod")


def listeners(host, port: int) -> set[str]:
    """The local addresses listening on ``port`` inside ``host``'s network namespace."""
    out = subprocess.run(["ip", "netns", "exec", host.netns, "ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    return {line.split()[3].rpartition(":")[0] for line in out.splitlines() if line.strip()}


async def test_pods_on_b_are_reached_at_b_through_the_router_on_a(network: Network, tmp_path: Path) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    log_a, log_b = tmp_path / "a-up.log", tmp_path / "b-worker.log"
    logs = [log_a, log_b]

    # Host A: the control plane, router and dashboard on A's address; no node.
    up = start_control(a, log_a, logs=logs)
    for port in (ROUTER_PORT, DASHBOARD_PORT):  # ... and only there
        assert listeners(a, port) == {a.address}, (port, listeners(a, port))
    for port in (TEMPORAL_PORT, UI_PORT):  # the dev server itself on A's loopback (hms_mgmt/relay.py)
        assert listeners(a, port) == {a.address, "127.0.0.1"}, (port, listeners(a, port))
    assert get(f"http://{a.address}:{UI_PORT}/")[0] == 200  # the Web UI, through A's address
    sign_image(a, IMAGE)

    # Host B joins with a token from A, then runs its worker (node-only: it joined) at B's address.
    start_node(a, b, "b", log_b, procs=[up], logs=logs)

    # Deploy from this (root) namespace, as an operator would from a laptop, with A's config.
    settings = Settings.from_env(env={"HMS_STATE_DIR": str(a.state_dir)})
    assert settings.temporal_address == f"{a.address}:{TEMPORAL_PORT}"
    orch = await Orchestrator.connect(settings)
    nodes = a.run(hms_argv("nodes", "--json"), env=a.env())
    assert nodes.returncode == 0, nodes.stderr
    assert [(n["spec"]["name"], n["spec"]["address"]) for n in json.loads(nodes.stdout)] == [("b", b.address)]
    try:
        await orch.deploy({"name": SERVICE, "image": IMAGE, "min_replicas": 2, "max_replicas": 2, "cpu_target": 60}, wait=True,
                          timeout=120)
        status = await orch.status(SERVICE)
        assert status.ready_replicas == 2  # ready: B's probe reached each pod where A's router dials
        pod_ids = {p.id for p in status.pods}
        pod_ports = []
        for pod in status.pods:
            host, _, port = (pod.endpoint or "").rpartition(":")
            assert (pod.node, host) == ("b", b.address), pod
            pod_ports.append(int(port))

        # Decoys on A's loopback at every pod's port.
        decoys = []
        for port in pod_ports:
            ready, hits = tmp_path / f"decoy-{port}.ready", tmp_path / f"decoy-{port}.hits"
            decoys.append(hits)
            a.start(["python3", "-c", DECOY, str(port), str(hits), str(ready)], env=a.env(), log=tmp_path / "decoy.log")
            wait_until(ready.exists, timeout=15, what=f"the decoy on A's 127.0.0.1:{port}", logs=logs)

        url = f"http://{a.address}:{ROUTER_PORT}/{SERVICE}/health"

        def all_reach_pods() -> bool:
            try:
                seen = [get(url) for _ in range(4)]
            except OSError:
                return False
            return all(code == 200 and pod in pod_ids for code, pod in seen)

        await asyncio.to_thread(wait_until, all_reach_pods, timeout=30, what="A's router to route to B's pods",
                                logs=logs)
        answers = [await asyncio.to_thread(get, url) for _ in range(40)]
        assert {code for code, _ in answers} == {200}
        assert {pod for _, pod in answers} <= pod_ids, answers  # B's pods, never the decoy
        for hits in decoys:
            assert not hits.exists(), f"the router dialled its own loopback: {hits.read_text()}"

        final = await orch.undeploy(SERVICE, wait=True, timeout=60)
        assert final is not None and final.phase == "Stopped"
    except BaseException:
        print(tails(logs))  # shown with the failure
        raise
