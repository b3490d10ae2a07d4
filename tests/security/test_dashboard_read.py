"""The dashboard's read is not for whoever reaches its port (issue 19, item 7).

With identities configured (``keys/token.pub``), ``/api/state``, ``/api/events`` and the event
stream need a token that may ``status`` (a viewer's); the stream, an ``EventSource`` that cannot
send a header, takes a one-connection ticket from ``POST /api/stream-ticket``. ``public_read``
(``hms dashboard --public-read``) opens reading as before. At most 64 pages stream at once.
The attacks are plain HTTP requests, as from any local process or a page that reaches the port.
A real dev server; about 5 s."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from conftest import make_settings, temporal_address

from dashboard import Dashboard
from dashboard.server import REFUSALS_PER_MINUTE
from hms_mgmt import auth, testing
from hms_mgmt.events import read_events


@contextlib.asynccontextmanager
async def dashboard(temporal_env, settings, **kw) -> AsyncIterator[Dashboard]:
    dash = Dashboard(temporal_env.client, settings, refresh_s=0.5, router_url="http://127.0.0.1:9/-/stats", **kw)
    await dash.start(port=0)
    try:
        yield dash
    finally:
        await dash.stop()


async def first_event(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """Open the stream; its status and the first event's name (empty when refused)."""
    async with http.get(url) as resp:
        if resp.status != 200:
            return resp.status, (await resp.json())["error"]
        async for line in resp.content:
            if line.startswith(b"event:"):
                return resp.status, line.decode().split(":", 1)[1].strip()
    return resp.status, ""


async def test_reading_needs_a_viewer_token(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process", trusted=False)
    viewer = auth.issue_token(settings.state_dir, user="vic", role="viewer")
    bearer = {"Authorization": f"Bearer {viewer}"}
    async with dashboard(temporal_env, settings) as dash, aiohttp.ClientSession(dash.url) as http:
        for path in ("/api/state", "/api/events", "/api/stream"):
            async with http.get(path) as resp:
                assert resp.status == 401, f"{path} answered {resp.status} with no token"
                assert "viewer token" in (await resp.json())["error"] or "ticket" in (await resp.json())["error"]
        async with http.get("/api/state", headers={"Authorization": "Bearer forged.token~value"}) as resp:
            assert resp.status == 401
        async with http.post("/api/stream-ticket") as resp:
            assert resp.status == 401
        assert (await first_event(http, "/api/stream?ticket=forged.ticket"))[0] == 401

        async with http.get("/api/state", headers=bearer) as resp:
            assert resp.status == 200 and "services" in await resp.json()
        async with http.post("/api/stream-ticket", headers=bearer) as resp:
            ticket = (await resp.json())["ticket"]
        assert await first_event(http, f"/api/stream?ticket={ticket}") == (200, "init")
        assert (await first_event(http, f"/api/stream?ticket={ticket}"))[0] == 401  # good for one stream
        async with http.get("/healthz") as resp:  # liveness stays open
            assert resp.status == 200
    # Each of the 7 refusals is an access.denied event; what was answered is not.
    refusals = [e for e in read_events(settings.state_dir) if e.type == "access.denied"]
    assert [(e.data["path"], e.data["status"]) for e in refusals] == [
        ("/api/state", 401), ("/api/events", 401), ("/api/stream", 401), ("/api/state", 401),
        ("/api/stream-ticket", 401), ("/api/stream", 401), ("/api/stream", 401)], refusals
    assert all(e.data["action"] == "dashboard" and "refused (401)" in e.reason for e in refusals)
    assert "viewer token" in refusals[0].reason


async def test_a_flood_of_refusals_is_recorded_within_a_bound(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process", trusted=False)
    auth.issue_token(settings.state_dir, user="vic", role="viewer")  # identities exist: reading is closed
    async with dashboard(temporal_env, settings) as dash, aiohttp.ClientSession(dash.url) as http:
        for _ in range(REFUSALS_PER_MINUTE + 10):
            async with http.get("/api/state", headers={"Authorization": "Bearer forged.token~value"}) as resp:
                assert resp.status == 401
    refusals = [e for e in read_events(settings.state_dir) if e.type == "access.denied"]
    assert len(refusals) == REFUSALS_PER_MINUTE, len(refusals)


async def test_public_read_keeps_reading_open(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process", trusted=False)
    async with dashboard(temporal_env, settings, public_read=True) as dash, aiohttp.ClientSession(dash.url) as http:
        async with http.get("/api/state") as resp:
            assert resp.status == 200
        assert await first_event(http, "/api/stream") == (200, "init")


async def test_the_65th_stream_is_refused(temporal_env, tmp_path):
    # No identities here (no keys): reading is open, so 65 pages need no tickets.
    settings = testing.local_settings(temporal_address(temporal_env), tmp_path / "state", "process")
    async with dashboard(temporal_env, settings) as dash, \
            aiohttp.ClientSession(dash.url, connector=aiohttp.TCPConnector(limit=0)) as http:
        opened = []
        try:
            for _ in range(64):
                resp = await http.get("/api/stream")
                opened.append(resp)
                assert resp.status == 200
                await resp.content.readline()  # the stream is being served
            await asyncio.sleep(0.2)
            async with http.get("/api/stream") as resp:
                assert resp.status == 503, f"the 65th stream got {resp.status}"
                assert "too many live pages (64" in (await resp.json())["error"]
        finally:
            for resp in opened:
                resp.close()
        await asyncio.sleep(0.5)  # the server notices they left
        assert await first_event(http, "/api/stream") == (200, "init")


async def test_what_an_outsider_sends_is_refused_recorded_and_escaped(temporal_env, tmp_path):
    """A rebinding page's foreign Host (421), bytes that are no token (401, never a 500), and a path
    of control characters: each refusal is an event, and the event holds the path escaped."""
    settings = make_settings(temporal_env, tmp_path / "state", "process", trusted=False)
    auth.issue_token(settings.state_dir, user="vic", role="viewer")  # identities exist: reading is closed
    async with dashboard(temporal_env, settings) as dash:
        port = int(dash.url.rsplit(":", 1)[1])
        answers = []
        for head in (b"GET /api/state HTTP/1.1\r\nHost: evil.example\r\n",
                     b"GET /api/me HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe.\xff\xfe.x~y\r\n",
                     b"GET /api/services/x%1b%5b2J%0a%e2%80%aeFAKE/pods/y/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"Connection: close\r\n\r\n")
            answers.append(int((await reader.read()).split(b" ", 2)[1]))
            writer.close()
        assert answers == [421, 401, 401], answers
    refusals = [e for e in read_events(settings.state_dir) if e.type == "access.denied"]
    assert [e.data["status"] for e in refusals] == [421, 401, 401], refusals
    raw = (settings.state_dir / "events.jsonl").read_text()
    assert "\x1b" not in raw and "\u202e" not in raw and "\\x1b[2J" in refusals[2].data["path"], refusals[2]
