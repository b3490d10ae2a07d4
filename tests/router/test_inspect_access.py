"""Who may read a router's ``/-/table``, ``/-/stats`` and ``/metrics`` (pod addresses and traffic),
on both engines: callers in ``router_inspect_from``, or a read the control plane signed. Here the
router is told that only 10.255.255.0/24 may read unsigned, so this test's loopback caller is an
outsider: it holds no key, may send any header, and must learn no pod address."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from conftest import eventually
from router_helpers import RawPodServer, Routed, engine, json_answer, push_table, routed_stack  # noqa: F401 - fixtures

from hms_mgmt import feed, tickets
from hms_mgmt.events import read_events
from hms_mgmt.models import Endpoint

pytestmark = pytest.mark.timeout(180)

ONLY = "10.255.255.0/24"  # a network this test's caller is not in


class OkPod(RawPodServer):
    async def serve(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(json_answer({"ok": True}))
            await writer.drain()


@pytest_asyncio.fixture(loop_scope="session")
async def guarded(temporal_env, tmp_path: Path, engine: str) -> AsyncIterator[Routed]:  # noqa: F811
    async with routed_stack(temporal_env, tmp_path, engine, router_inspect_from=ONLY) as r:
        assert r.settings.router_inspect_from == [ONLY]
        yield r


async def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=headers) as r:
        return r.status, await r.text()


async def test_an_outsider_reads_no_pod_address_and_a_signed_read_does(guarded: Routed, tmp_path: Path) -> None:
    pod = OkPod()
    try:
        address = await pod.start()
        state = guarded.settings.state_dir
        await push_table(guarded, state, "svc-a", [Endpoint(pod="svc-a-1", address=address)])
        other = tmp_path / "other"  # another control plane's key: its signature is no signature here
        other.mkdir()
        tickets.ensure_control_key(other)
        for path in feed.INSPECT_PATHS:
            url = f"{guarded.url}{path}"
            tries = {
                "unsigned": {},
                "a forwarded address inside the allowed network": {"X-Forwarded-For": "10.255.255.7",
                                                                    "X-Real-IP": "10.255.255.7"},
                "a feed signature (another kind)": {feed.SIGNATURE_HEADER: feed.sign(state, feed.inspect_query(path))},
                "a signed read of another path": feed.inspect_headers(state, "/-/health"),
                "another control plane's key": feed.inspect_headers(other, path),
                "an identity token": {"Authorization": f"Bearer {guarded.settings.token}"},
            }
            for what, headers in tries.items():
                for method in ("GET", "HEAD"):
                    status, body = await _get(url, headers, method)
                    assert status == 401, (path, what, method, status, body)
                    assert address not in body and "svc-a" not in body, (path, what, body)
            status, body = await _get(url, feed.inspect_headers(state, path))
            assert status == 200, (path, body)
        status, body = await _get(f"{guarded.url}/-/table", feed.inspect_headers(state, "/-/table"))
        assert address in body  # what the outsider was refused: the pod's address
        # Health stays public (load balancers ask it), traffic flows.
        assert (await _get(f"{guarded.url}/-/health"))[0] == 200
        assert (await _get(f"{guarded.url}/svc-a/x"))[0] == 200
        # Each refusal is an access.denied event, naming the path and the caller.
        await eventually(lambda: any(e.type == "access.denied" and e.data.get("action") == "router_inspect"
                                     and "/-/table refused" in e.reason for e in read_events(state)),
                         timeout=10, what="an access.denied event for the refused /-/table")
        refused = [e for e in read_events(state) if e.data.get("action") == "router_inspect"]
        assert {e.data.get("remote") for e in refused} == {"127.0.0.1"}, refused
    finally:
        pod.close()


def test_the_setting_names_a_bad_network() -> None:
    from hms_mgmt.config import Settings
    from hms_mgmt.errors import ConfigError

    with pytest.raises(ConfigError, match="router_inspect_from.*'10.0.0.0/33' is not an IP network"):
        Settings(router_inspect_from="127.0.0.0/8,10.0.0.0/33")
    assert Settings(router_inspect_from="10.0.5.7, ::1").router_inspect_from == ["10.0.5.7/32", "::1/128"]
    assert Settings().router_inspect_from == ["127.0.0.0/8", "::1/128"]
