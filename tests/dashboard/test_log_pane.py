"""The dashboard's live log pane in headless Chromium, against a real dev server, worker and
process pod: a click on a pod opens its log, a line the pod writes afterwards shows, the pane
says when the pod is gone; the relay refuses a caller without a viewer's token."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from conftest import make_settings, seed_spec, sweep_pods, terminate_running
from test_browser import CHROMIUM_ARGS, TIMEOUT_MS, chromium_or_skip

from dashboard import Dashboard
from hms_mgmt import auth
from hms_mgmt.orchestrator import Orchestrator
from worker.main import HmsWorker


@pytest_asyncio.fixture(loop_scope="session")
async def pane(temporal_env, tmp_path) -> AsyncIterator[tuple[Any, Dashboard, Orchestrator]]:
    chromium = chromium_or_skip()
    from playwright.async_api import async_playwright

    settings = make_settings(temporal_env, tmp_path / "state", "process")
    errors: list[str] = []
    try:
        async with HmsWorker(temporal_env.client, settings), async_playwright() as pw:
            dash = Dashboard(temporal_env.client, settings, refresh_s=0.5, sample_s=1.0)
            await dash.start(port=0)
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1440, "height": 900})
                page.set_default_timeout(TIMEOUT_MS)
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(dash.url)
                await page.click("#signin-open")
                await page.fill("#token", auth.issue_token(settings.state_dir, user="val", role="viewer"))
                await page.click("#signin-submit")
                await page.wait_for_selector('#who[data-role="viewer"]')
                yield page, dash, Orchestrator(temporal_env.client, settings)
            finally:
                await browser.close()
                await dash.stop()
    finally:
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
    assert not errors, errors


def status_of(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_a_click_on_a_pod_opens_its_live_log(pane):
    page, dash, orch = pane
    await orch.deploy(seed_spec(min_replicas=1, max_replicas=2, health_interval_s=1.0), wait=True, timeout=90)
    (pod,) = (await orch.status("hms-ach")).pods
    await page.click(f'button[data-logs="{pod.id}"]')
    await page.wait_for_selector("#log-state >> text=live")
    marker = f"pane-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(urllib.request.urlopen, f"http://{pod.endpoint}/?marker={marker}", None, 5)
    await page.wait_for_selector(f"#log-lines >> text={marker}", timeout=10_000)

    url = f"{dash.url}/api/services/hms-ach/pods/{pod.id}/logs"
    assert await asyncio.to_thread(status_of, url, None) == 401
    assert await asyncio.to_thread(status_of, url, "forged.token.value") == 401

    await orch.undeploy("hms-ach")
    await page.wait_for_selector("#log-state >> text=ended")
    assert f"pod {pod.id} is gone" in await page.inner_text("#log-lines .log-end")
    await page.click("#log-close")
    assert await page.locator("#logpane").is_hidden()
