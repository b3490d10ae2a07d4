"""What a pod is told about its caller, and how long a caller may take to send a request head,
with either engine. A pod that builds redirect URLs or decides that a request came over TLS from
``X-Forwarded-Proto``/``X-Forwarded-Host`` gets the router's word, never the caller's; and a
caller that sends its head a byte at a time is cut off, so a few thousand such connections cannot
hold every slot of the router.

The pod is the test's own raw server, behind a table pushed as the feed pushes it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from router_helpers import RawPodServer, engine, json_answer, push_table, routed  # noqa: F401 - fixtures

from hms_mgmt.models import Endpoint

pytestmark = pytest.mark.timeout(180)


class EchoPod(RawPodServer):
    """Answers every request with the request's header lines, as JSON (name -> values)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            seen: dict[str, list[str]] = {}
            for line in head.split("\r\n")[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    seen.setdefault(name.strip().lower(), []).append(value.strip())
            writer.write(json_answer(seen))
            await writer.drain()


async def test_the_pod_is_told_the_routers_word_on_proto_and_host_not_the_callers(routed):  # noqa: F811
    pod = EchoPod()
    try:
        await push_table(routed, routed.settings.state_dir, "echo", [Endpoint(pod="echo-1", address=await pod.start())])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{routed.url}/echo/orders", headers={
                    "Host": "shop.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}) as r:
                assert r.status == 200, await r.text()
                seen = await r.json()
        assert seen["x-forwarded-proto"] == ["http"], seen
        assert seen["x-forwarded-host"] == ["shop.example"], seen
        assert seen["x-forwarded-for"][-1].split(",")[-1].strip() == "127.0.0.1", seen
    finally:
        pod.close()


async def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(routed):  # noqa: F811
    reader, writer = await asyncio.open_connection("127.0.0.1", int(routed.url.rsplit(":", 1)[1]))
    writer.write(b"GET /echo/orders HTTP/1.1\r\nHost: a\r\n")
    await writer.drain()
    began = time.monotonic()
    closed_after: float | None = None
    try:
        while time.monotonic() - began < 40:
            try:
                got = await asyncio.wait_for(reader.read(4096), timeout=2.0)
            except TimeoutError:
                writer.write(b"X")  # one more byte of a header that never ends
                await writer.drain()
                continue
            if not got or got.startswith(b"HTTP/1.1 408"):
                closed_after = time.monotonic() - began
                break
    except ConnectionError:
        closed_after = time.monotonic() - began
    finally:
        writer.close()
    assert closed_after is not None, "still connected after 40 s of a head sent a byte every 2 s"
    assert closed_after < 30, closed_after
