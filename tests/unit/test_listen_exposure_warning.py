"""`hms up --listen ADDR` relays the unauthenticated plaintext dev server: on a non-loopback
address it says so on stderr (and still does it: the multi-host setup relies on it)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from hms_mgmt import relay
from hms_mgmt.cli import stack


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_no_warning_on_loopback(listen: str) -> None:
    assert relay.exposure_warning(listen, 7233) is None


@pytest.mark.parametrize("listen", ["10.0.0.5", "192.168.1.20", "fd00::5", "203.0.113.7"])
def test_warning_names_what_the_network_can_do(listen: str) -> None:
    text = relay.exposure_warning(listen, 7233)
    assert text is not None and listen in text and "7233" in text
    for words in ("no authentication", "no TLS", "read every workflow history", "start, signal",
                  "poll the task queues", "production Temporal cluster"):
        assert words in text


def test_listen_on_a_network_address_warns_on_stderr_and_relays(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    started: list[tuple[Any, ...]] = []

    async def fake_relay(*args: Any) -> Any:
        started.append(args)
        return SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(relay, "start_relay", fake_relay)
    server = SimpleNamespace(host="127.0.0.1", address="127.0.0.1:7233", ui_url="http://127.0.0.1:8233")
    relays: list[Any] = []
    address, _ = asyncio.run(stack._listen_on("10.0.0.5", server, relays, port=7233, ui_port=8233,  # type: ignore[arg-type]
                                              headless=False))
    assert address == "10.0.0.5:7233" and len(started) == 2
    captured = capsys.readouterr()
    assert "no authentication" in captured.err and "no authentication" not in captured.out
