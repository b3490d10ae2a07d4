"""The dashboard in headless Chromium (Debian's, driven by playwright; no browser download)
against a real dev server, a real worker and real process pods.

Steps share one stack (module scope) and run in order: services and pods; a pod killed with
SIGKILL and replaced while the page stays open; a viewer who gets no buttons; a gov_approver
who approves a pending deployment and sees it deploy. A screenshot of each state goes to
``tests/artifacts/``; with ``HMS_UPDATE_DOCS=1`` the last one also becomes ``docs/dashboard.png``, the README's picture."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from conftest import REPO, eventually, make_settings, seed_spec, sweep_pods, terminate_running

from dashboard import Dashboard
from hms_mgmt import auth, constants
from hms_mgmt.models import ServiceSpec
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import free_port, kill_process_pod
from hms_mgmt.wire import ServiceInput
from worker.main import HmsWorker

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


def chromium_or_skip() -> str:
    """Chromium's path; skips without it unless CI or HMS_REQUIRE_DOCKER demand the full suite."""
    path = shutil.which("chromium")
    why = None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    if path is None:
        why = "chromium is not installed (apt-get install chromium)"
    if why is None:
        return path  # type: ignore[return-value]
    if os.environ.get("CI") == "true" or os.environ.get("HMS_REQUIRE_DOCKER") == "1":
        pytest.fail(why)
    pytest.skip(why)


class StubRouter:
    """Stands in for the router's ``GET /-/stats`` (the router is built in parallel)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stats: dict[str, Any] = {"services": {}}
        self.runner: web.AppRunner | None = None

    async def serve_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/-/stats", self.serve_stats)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Stack:
    def __init__(self, settings, orch: Orchestrator, dash: Dashboard, page: Any, router: StubRouter) -> None:
        self.settings = settings
        self.orch = orch
        self.dash = dash
        self.page = page
        self.router = router

    def token(self, user: str, role: str) -> str:
        return auth.issue_token(self.settings.state_dir, user=user, role=role)

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"dashboard-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def sign_in(self, token: str, role: str) -> None:
        page = self.page
        if await page.locator("#signout").is_visible():
            await page.click("#signout")
        await page.click("#signin-open")
        await page.fill("#token", token)
        await page.click("#signin-submit")
        await page.wait_for_selector(f'#who[data-role="{role}"]', timeout=TIMEOUT_MS)

    async def post(self, path: str, token: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """From a thread: the dashboard answers on this test's event loop."""
        return await asyncio.to_thread(self._post, path, token, body)

    def _post(self, path: str, token: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.dash.url + path, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(temporal_env, tmp_path_factory) -> AsyncIterator[Stack]:
    chromium = chromium_or_skip()
    from playwright.async_api import async_playwright

    settings = make_settings(temporal_env, tmp_path_factory.mktemp("dash") / "state", "process")
    errors: list[str] = []
    router = StubRouter(free_port())
    try:
        async with HmsWorker(temporal_env.client, settings):
            dash = Dashboard(temporal_env.client, settings, refresh_s=0.5, sample_s=1.0, history=90,
                             router_url=f"http://127.0.0.1:{router.port}/-/stats")
            await dash.start(port=0)
            try:
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                    try:
                        page = await browser.new_page(viewport={"width": 1440, "height": 900})
                        page.set_default_timeout(TIMEOUT_MS)
                        page.on("pageerror", lambda e: errors.append(str(e)))
                        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                        await page.goto(dash.url)
                        stk = Stack(settings, Orchestrator(temporal_env.client, settings), dash, page, router)
                        await stk.sign_in(stk.token("val", "viewer"), "viewer")  # reading needs a viewer
                        yield stk
                    finally:
                        await browser.close()
            finally:
                await dash.stop()
    finally:
        await router.stop()
        await terminate_running(temporal_env, settings)
        sweep_pods(settings)
    assert not [e for e in errors if "401" not in e and "403" not in e], errors  # refused sign-ins are expected


def burn(endpoint: str, percent: int) -> None:
    """Ask an example pod to burn CPU (its /admin/cpu endpoint)."""
    req = urllib.request.Request(f"http://{endpoint}/admin/cpu", data=json.dumps({"percent": percent}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def pod_rows(service: str) -> str:
    return f'article[data-service="{service}"] tr[data-pod]'


async def healthy_pod_ids(page, service: str) -> list[str]:
    return await page.eval_on_selector_all(
        pod_rows(service) + '[data-health="healthy"]', "rows => rows.map(r => r.dataset.pod)")


async def test_sees_services_and_pods(stack: Stack):
    page = stack.page
    await stack.orch.deploy(seed_spec(scale_interval_s=2.0), wait=True, timeout=90)
    await page.wait_for_selector('article[data-service="hms-ach"] [data-phase="Running"]')

    async def two_healthy() -> list[str] | None:
        ids = await healthy_pod_ids(page, "hms-ach")
        return ids if len(ids) == 2 else None

    ids = await eventually(two_healthy, timeout=30, what="2 healthy pods on the page")
    status = await stack.orch.status("hms-ach")
    assert sorted(ids) == sorted(p.id for p in status.pods)
    await page.wait_for_selector('article[data-service="hms-ach"] [data-ready="2"]')
    head = await page.inner_text('article[data-service="hms-ach"] .svc-head')
    assert "registry.gov/hms-ach:1.4" in head and "2 / 2" in head
    assert await page.inner_text('article[data-service="hms-ach"] [data-traffic]') == "no router"
    link = await page.get_attribute('article[data-service="hms-ach"] a.svc-link', "href")
    assert link == status.web_ui_url
    await page.wait_for_function("() => document.querySelectorAll('#events li[data-event=\"pod.started\"]').length >= 2")
    await stack.shot("fleet")


async def test_killed_pod_is_replaced_without_reload(stack: Stack):
    page = stack.page
    await page.evaluate("window.__sameDocument = true")
    before = await healthy_pod_ids(page, "hms-ach")
    assert len(before) == 2
    victim = before[0]
    kill_process_pod(stack.settings, victim)

    async def replaced() -> bool:
        ids = await healthy_pod_ids(page, "hms-ach")
        return len(ids) == 2 and victim not in ids

    await eventually(replaced, timeout=60, what="the killed pod replaced on the page")
    assert await page.evaluate("window.__sameDocument === true"), "the page reloaded"
    await page.wait_for_selector('#events li[data-event="pod.replaced"]')
    await page.wait_for_selector(f'article[data-service="hms-ach"] .decisions a.wf-link[href$="/workflows/svc-hms-ach-heal-{victim}"]')
    await stack.shot("healed")


async def test_scale_shows_in_charts_and_links_its_workflow(stack: Stack):
    page = stack.page
    st = await stack.orch.status("hms-ach")
    await asyncio.to_thread(burn, st.pods[0].endpoint, 50)  # something for the CPU chart to draw
    await stack.orch.scale("hms-ach", 3, reason="pre-scale for the evening batch")
    await page.wait_for_selector('article[data-service="hms-ach"] [data-ready="3"]')
    await page.wait_for_selector('article[data-service="hms-ach"] .decisions a.wf-link[href$="/workflows/svc-hms-ach-scale-1"]')
    await page.wait_for_selector('#events li[data-event="service.scaled"]')
    points = await page.get_attribute('article[data-service="hms-ach"] svg.chart polyline.line-ready', "points")
    assert len(points.split()) >= 2  # the replicas chart has samples

    # The router answers: its numbers replace "no router".
    # The router answers (its own format): its numbers replace "no router", its view of each pod
    # shows in the pod table.
    st = await stack.orch.status("hms-ach")
    first, second = st.pods[0].id, st.pods[1].id
    stack.router.stats = {"engine": "builtin", "services": {"hms-ach": {
        "requests": 2550, "requests_per_s": 42.5, "errors": 31, "error_rate": 0.012, "p50_ms": 3.2, "p99_ms": 18.4,
        "pods": {first: {"state": "ready", "outstanding": 2, "latency_ms": 3.1, "ejected": False},
                 second: {"state": "ready", "outstanding": 0, "latency_ms": 40.0, "ejected": True}}}}}
    await stack.router.start()
    traffic = 'article[data-service="hms-ach"] [data-traffic="live"]'
    await page.wait_for_selector(traffic)
    text = await page.inner_text(traffic)
    assert "42.5 req/s" in text and "1.2%" in text and "p99 18 ms" in text
    assert "2 in flight" in await page.inner_text(f'tr[data-pod="{first}"] [data-routed="ready"]')
    await page.wait_for_selector(f'tr[data-pod="{second}"] [data-routed="ejected"]')


async def test_viewer_gets_no_buttons(stack: Stack):
    page = stack.page
    await stack.orch.deploy(seed_spec(name="hms-big", min_replicas=1, max_replicas=12))
    card = 'div[data-approval="hms-big"]'
    await page.wait_for_selector(card)
    assert await page.locator(f"{card} button").count() == 0  # a viewer (reading needs one)
    viewer = stack.token("vic", "viewer")
    await stack.sign_in(viewer, "viewer")
    await page.wait_for_selector(f"{card} >> text=may not approve")
    assert await page.locator(f"{card} button").count() == 0
    await stack.shot("viewer")

    # The API refuses them too, whatever the page shows.
    assert (await stack.post("/api/services/hms-big/approve", None, {}))[0] == 401
    assert (await stack.post("/api/services/hms-big/approve", "forged.token.value", {}))[0] == 401
    assert (await stack.post("/api/services/hms-big/approve", viewer, {"reason": "x"}))[0] == 403
    assert (await stack.post("/api/services/hms-big/reject", stack.token("alice", "ops_admin"), {}))[0] == 403
    assert (await stack.orch.status("hms-big")).phase == "AwaitingApproval"


async def test_gov_approver_approves_and_sees_it_deploy(stack: Stack):
    page = stack.page
    await stack.sign_in(stack.token("grace", "gov_approver"), "gov_approver")
    card = 'div[data-approval="hms-big"]'
    await page.wait_for_selector(f'{card} button[data-action="approve"]')
    await stack.shot("approver")
    await page.fill(f"{card} input", "surge for <script>alert(1)</script> season")
    await page.click(f'{card} button[data-action="approve"]')
    await page.wait_for_selector('article[data-service="hms-big"] [data-phase="Running"]')
    await page.wait_for_selector('#events li[data-event="approval.granted"]')
    granted = await page.inner_text('#events li[data-event="approval.granted"]')
    assert "grace" in granted and "<script>alert(1)</script>" in granted  # shown as text, not markup
    await page.wait_for_selector("#approvals-section", state="hidden")
    st = await stack.orch.status("hms-big")
    assert st.approved_by == "grace"
    await page.wait_for_timeout(1500)  # a couple more chart samples for the picture
    path = await stack.shot("approved")
    if os.environ.get("HMS_UPDATE_DOCS") == "1":  # the README's picture; a test run leaves the checkout alone
        shutil.copyfile(path, REPO / "docs" / "dashboard.png")


async def test_the_sign_in_link_signs_in_with_a_real_token(stack: Stack):
    """`hms dashboard --token-file` prints `URL/#token=TOKEN`; every token holds a `~`, which a
    link may also carry percent-encoded. Opening the link signs in and takes the token out of
    the address bar; a link with something that is not a token signs nobody in."""
    page = stack.page
    token = stack.token("lin", "viewer")
    assert "~" in token
    for link in (f"{stack.dash.url}/#token={token}", f"{stack.dash.url}/#token={token.replace('~', '%7E')}"):
        await page.goto("about:blank")
        await page.goto(link)
        await page.wait_for_selector('#who[data-role="viewer"]', timeout=TIMEOUT_MS)
        assert "lin" in await page.inner_text("#who")
        assert "token" not in page.url
        await page.click("#signout")
    await page.goto("about:blank")
    await page.goto(f"{stack.dash.url}/#token=<script>x</script>")
    await page.wait_for_timeout(500)
    assert await page.get_attribute("#who", "data-role") in (None, "")
    assert "token" not in page.url


@pytest.mark.serial
async def test_holds_up_with_fifty_services(stack: Stack):
    """Services (no pods: min_replicas 0) added to those already there up to 50: all shown, filter works.
    Started straight through the client: this is about the page, not about deploy's admission wait."""
    page = stack.page
    orch = stack.orch
    await stack.sign_in(stack.token("val", "viewer"), "viewer")  # the sign-in link test left nobody signed in
    # Beside whatever earlier tests of this module left deployed (none when this test runs alone).
    expected = 50
    for n in range(expected - len(await orch.list())):
        spec = ServiceSpec.model_validate(seed_spec(name=f"svc-{n:02d}", min_replicas=0, max_replicas=2))
        await orch.client.start_workflow(
            "ServiceWorkflow", ServiceInput(spec=spec, placement=orch._placement(),
                                            proof=orch._prove("deploy", spec.name, spec=spec.digest())),
            id=constants.service_workflow_id(spec.name), task_queue=orch.settings.task_queue)

    async def all_shown() -> bool:
        return await page.locator("article[data-service]").count() == expected

    await eventually(all_shown, timeout=120, what=f"{expected} services on the page")
    await page.fill("#filter", "svc-07")
    await page.wait_for_function("() => document.querySelectorAll('article[data-service]').length === 1")
    await page.fill("#filter", "")
    assert await page.inner_text('[data-tile="services"] .v') == str(expected)
    await stack.shot("fifty")
