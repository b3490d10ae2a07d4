"""Events reach other systems: every event once, signed, in order, across a receiver outage,
and a dead receiver never holds up a heal. Also the worker's Prometheus ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import aiohttp
from aiohttp import web
from conftest import eventually, make_settings, seed_spec, sweep_pods, terminate_running
from prometheus_client.parser import text_string_to_metric_families

from hms_mgmt.events import EVENT_ID_HEADER, SIGNATURE_HEADER, read_events, verify_signature, webhook_secret
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import free_port, kill_process_pod
from worker.main import HmsWorker


class Receiver:
    """A webhook receiver on 127.0.0.1 that can go down and come back on the same port."""

    def __init__(self, port: int, secret: bytes) -> None:
        self.port = port
        self.secret = secret
        self.received: list[dict[str, Any]] = []  # each event once: deduplicated on its id, as receivers do
        self.deliveries = 0
        self.bad_signatures = 0
        self.runner: web.AppRunner | None = None

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), self.secret):
            self.bad_signatures += 1
            return web.Response(status=401)
        event = json.loads(body)
        assert request.headers[EVENT_ID_HEADER] == event["id"]
        self.deliveries += 1
        if all(e["id"] != event["id"] for e in self.received):
            self.received.append(event)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def test_webhook_gets_every_event_once_signed_across_an_outage(temporal_env, tmp_path):
    port = free_port()
    settings = make_settings(temporal_env, tmp_path / "state", "process",
                             webhooks=[f"http://127.0.0.1:{port}/hook"])
    receiver = Receiver(port, webhook_secret(settings.state_dir))
    await receiver.start()
    try:
        async with HmsWorker(temporal_env.client, settings):
            hms = Orchestrator(temporal_env.client, settings)
            await hms.deploy(seed_spec(min_replicas=1), wait=True, timeout=60)
            await eventually(lambda: any(e["type"] == "service.deployed" for e in receiver.received),
                             timeout=30, what="service.deployed delivered")

            await receiver.stop()  # down: the heal must not wait for it
            st = await hms.status("hms-ach")
            kill_process_pod(settings, st.pods[0].id)
            await eventually(lambda: [e for e in read_events(settings.state_dir) if e.type == "pod.replaced"],
                             timeout=60, what="the heal, with the webhook down")
            await hms.scale("hms-ach", 2, reason="more")
            await eventually(lambda: [e for e in read_events(settings.state_dir) if e.type == "service.scaled"],
                             timeout=60, what="a scale, with the webhook down")
            missed = len(list(read_events(settings.state_dir))) - len(receiver.received)
            assert missed >= 3  # pod.exited, pod.replaced, service.scaled at least

            await receiver.start()
            await hms.undeploy("hms-ach")

            def all_delivered() -> bool:
                return {e["id"] for e in receiver.received} >= {e.id for e in read_events(settings.state_dir)}

            await eventually(all_delivered, timeout=60, what="every event delivered")
            await asyncio.sleep(1.0)  # nothing more arrives: no duplicates
            recorded = [e.id for e in read_events(settings.state_dir)]
            ids = [e["id"] for e in receiver.received]
            assert ids == recorded  # each once, in order
            assert receiver.bad_signatures == 0
            # At least once: a retry after an answer lost on the way back is the only duplicate.
            assert receiver.deliveries - len(ids) <= 2, (receiver.deliveries, len(ids))
            assert {"pod.exited", "pod.replaced", "service.scaled", "service.undeployed"} <= {
                e["type"] for e in receiver.received}
    finally:
        await receiver.stop()
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed with prometheus_client's parser: sample name -> labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_move_as_pods_die_and_scale(temporal_env, tmp_path):
    port = free_port()
    settings = make_settings(temporal_env, tmp_path / "state", "process", metrics_port=port)
    worker = HmsWorker(temporal_env.client, settings, metrics=True)
    worker.metrics.fleet_interval_s = 0.3
    try:
        async with worker:
            hms = Orchestrator(temporal_env.client, settings)

            async def metric(name: str, **labels: str) -> float | None:
                values = (await asyncio.to_thread(scrape, port)).get(name, {})
                return values.get(tuple(sorted(labels.items())))

            await hms.deploy(seed_spec(min_replicas=1), wait=True, timeout=60)
            svc = {"service": "hms-ach"}

            async def running() -> bool:
                return await metric("hms_services", phase="Running") == 1

            await eventually(running, timeout=30, what="hms_services{phase=Running} 1")
            assert await metric("hms_service_ready_replicas", **svc) == 1
            assert await metric("hms_pods", health="healthy", **svc) == 1
            assert await metric("hms_heals_total", **svc) == 0
            started = await metric("hms_activity_duration_seconds_count", activity="start_pod", outcome="completed")
            assert started and started >= 1
            assert await metric("hms_events_total", type="pod.started") == 1

            st = await hms.status("hms-ach")
            kill_process_pod(settings, st.pods[0].id)

            async def healed() -> bool:
                return await metric("hms_heals_total", **svc) == 1 and await metric(
                    "hms_pods", health="healthy", **svc) == 1

            await eventually(healed, timeout=60, what="hms_heals_total to count the heal")

            async def replaced_event() -> bool:  # written as the heal finishes, after the new pod counts
                return await metric("hms_events_total", type="pod.replaced") == 1

            await eventually(replaced_event, timeout=30, what="hms_events_total{type=pod.replaced} 1")

            await hms.scale("hms-ach", 3, reason="load")

            async def scaled() -> bool:
                return await metric("hms_scale_decisions_total", **svc) == 1 and await metric(
                    "hms_service_ready_replicas", **svc) == 3

            await eventually(scaled, timeout=60, what="the scale in the metrics")
            assert await metric("hms_pods_total", health="healthy") == 3
            assert await metric("hms_fleet_up") == 1
            await hms.undeploy("hms-ach")

            async def gone() -> bool:
                return await metric("hms_services", phase="Running") == 0

            await eventually(gone, timeout=30, what="the undeployed service gone from hms_services")
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
    # The server is gone with the worker: the port is free again.
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            raise AssertionError(f"metrics still served after the worker stopped ({resp.status})")
    except aiohttp.ClientConnectionError:
        pass
