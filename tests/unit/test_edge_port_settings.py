"""`hms router` listens on HMS_ROUTER_PORT and `hms dashboard` on HMS_DASHBOARD_PORT unless
--port says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import hms_mgmt.cli.dashboard_cmd as dashboard_cmd
import router.server
from hms_mgmt.cli.commands import app


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, int, int]]:
    monkeypatch.setenv("HMS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HMS_ROUTER_PORT", "9100")
    monkeypatch.setenv("HMS_DASHBOARD_PORT", "9200")
    seen: list[tuple[str, int, int]] = []

    def fake_router(settings: Any, *, port: int, **kw: Any) -> None:
        seen.append(("router", port, settings.router_port))

    async def fake_dashboard(settings: Any, *, port: int, **kw: Any) -> None:
        seen.append(("dashboard", port, settings.dashboard_port))

    monkeypatch.setattr(router.server, "run", fake_router)
    monkeypatch.setattr(dashboard_cmd, "run_dashboard_until_signal", fake_dashboard)
    return seen


def test_the_settings_give_the_default_port(calls: list[tuple[str, int, int]]) -> None:
    for command in ("router", "dashboard"):
        result = CliRunner().invoke(app, [command])
        assert result.exit_code == 0, result.output
    assert calls == [("router", 9100, 9100), ("dashboard", 9200, 9200)]


def test_port_overrides_the_setting(calls: list[tuple[str, int, int]]) -> None:
    for command, port in (("router", "9101"), ("dashboard", "9201")):
        result = CliRunner().invoke(app, [command, "--port", port])
        assert result.exit_code == 0, result.output
    assert calls == [("router", 9101, 9101), ("dashboard", 9201, 9200)]
