"""``hms router``'s command function, as the app will wire it."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

import router.haproxy.process
from hms_mgmt.cli.router_cmd import router_app


def app() -> typer.Typer:
    a = typer.Typer()
    a.add_typer(router_app, name="router")
    return a


def test_haproxy_engine_without_haproxy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(router.haproxy.process.shutil, "which", lambda name: None)
    monkeypatch.setattr(router.haproxy.process, "FALLBACK_PATHS", ())
    result = CliRunner().invoke(app(), ["router", "--engine", "haproxy", "--port", "1"])
    assert result.exit_code == 1
    assert "apt-get install haproxy" in result.output


def test_unknown_engine_is_refused():
    result = CliRunner().invoke(app(), ["router", "--engine", "envoy"])
    assert result.exit_code == 2
    assert "builtin, haproxy" in result.output
