"""Settings keep secrets out of their repr; an API key sent in plaintext and an HMS_* variable no
setting reads (a typo) are warned of; webhook URLs are logged as scheme://host[:port] only."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from hms_mgmt import config
from hms_mgmt.config import Settings, connect
from hms_mgmt.errors import HmsError
from hms_mgmt.events import EventSink, WebhookDelivery, shown_url


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_warned_env", set())
    monkeypatch.setattr(config, "_warned_plaintext_key", set())


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"HMS_STATE_DIR": str(tmp_path), **env})


def test_repr_hides_api_key_token_and_webhook_secret(tmp_path: Path) -> None:
    s = settings(tmp_path, HMS_TEMPORAL_API_KEY="APIKEY-123", HMS_TOKEN="TOKEN-456", HMS_WEBHOOK_SECRET="HMAC-789",
                 HMS_TEMPORAL_TLS="true")
    for shown in (repr(s), str(s)):
        assert "APIKEY-123" not in shown and "TOKEN-456" not in shown and "HMAC-789" not in shown
        assert "temporal_address" in shown
    assert (s.api_key, s.token, s.webhook_secret) == ("APIKEY-123", "TOKEN-456", "HMAC-789")
    assert s.model_dump()["api_key"] == "APIKEY-123"  # its users still read it


@pytest.mark.parametrize("typo, meant", [
    ("HMS_TEMPORAL_CA", "HMS_TEMPORAL_TLS_CA"),
    ("HMS_TEMPORAL_TLS_ENABLED", "HMS_TEMPORAL_TLS"),
    ("HMS_ROUTER_POTR", "HMS_ROUTER_PORT"),
])
def test_a_misspelt_variable_is_warned_of_once_with_the_setting_meant(tmp_path: Path, caplog, typo: str,
                                                                      meant: str) -> None:
    with caplog.at_level(logging.WARNING, logger="hms.config"):
        settings(tmp_path, **{typo: "x"})
        settings(tmp_path, **{typo: "x"})
    warned = [r.getMessage() for r in caplog.records if typo in r.getMessage()]
    assert len(warned) == 1 and f"did you mean {meant}?" in warned[0] and "ignored" in warned[0]


def test_project_and_compose_variables_are_not_warned_of(tmp_path: Path, caplog) -> None:
    project = {name: "1" for name in ("HMS_TEMPORAL_PORT", "HMS_UI_PORT", "HMS_COMPOSE_STATE", "HMS_BASE_IMAGE",
                                      "HMS_IMAGE_TAG", "HMS_REQUIRE_DOCKER", "HMS_CHAOS", "HMS_CHAOS_SEED",
                                      "HMS_FUZZ_EXAMPLES", "HMS_ROLLBACK_RUNS", "HMS_POD_ID", "HMS_SECRETS_DIR")}
    settings_ = {"HMS_TOKEN": "t", "HMS_ROUTER_PORT": "9100", "HMS_TEMPORAL_TLS_CA": "/ca.pem",
                 "HMS_TLS_CA": "/ca.pem", "HMS_SWEEP_ON_EXIT": "1", "hms_node": "n1"}
    with caplog.at_level(logging.WARNING, logger="hms.config"):
        settings(tmp_path, **project, **settings_)
    assert not [r for r in caplog.records if r.name == "hms.config"]


def test_every_settings_variable_is_read(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="hms.config"):
        config._warn_unknown_env({config.env_var(f): "1" for f in Settings.model_fields})
    assert not caplog.records


async def test_an_api_key_without_tls_is_warned_of_at_connect(tmp_path: Path, caplog) -> None:
    s = settings(tmp_path, HMS_TEMPORAL_ADDRESS="127.0.0.1:1", HMS_TEMPORAL_API_KEY="k", HMS_TEMPORAL_TLS="false",
                 HMS_TEMPORAL_CONNECT_TIMEOUT_S="1")
    with caplog.at_level(logging.WARNING, logger="hms.config"):
        for _ in range(2):
            with contextlib.suppress(HmsError):
                await connect(s)
    warned = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert len(warned) == 1 and "HMS_TEMPORAL_API_KEY" in warned[0] and "127.0.0.1:1" in warned[0]


async def test_no_plaintext_warning_with_tls_or_without_a_key(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="hms.config"):
        for env in ({"HMS_TEMPORAL_API_KEY": "k"}, {}):
            with contextlib.suppress(HmsError):
                await connect(settings(tmp_path, HMS_TEMPORAL_ADDRESS="127.0.0.1:1",
                                       HMS_TEMPORAL_CONNECT_TIMEOUT_S="1", **env))
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


@pytest.mark.parametrize("url, shown", [
    ("https://user:pw@hooks.example.com/services/T0/B0/SECRET?token=abc", "https://hooks.example.com"),
    ("http://127.0.0.1:9999/hook/SECRET", "http://127.0.0.1:9999"),
    ("http://[fd00::5]:8080/x?k=SECRET", "http://[fd00::5]:8080"),
    ("not a url SECRET", "(a webhook URL without a host)"),
])
def test_shown_url_keeps_scheme_host_and_port_only(url: str, shown: str) -> None:
    assert shown_url(url) == shown


class _Answer:
    status = 500

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Session:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def post(self, url: str, **kw: Any) -> _Answer:
        if self.error is not None:
            raise self.error
        return _Answer()


URL = "https://user:PASSWORD@hooks.example.com:8443/T0/SECRETPATH?token=SECRETQUERY"


@pytest.mark.parametrize("error", [None, ValueError(URL)])
async def test_webhook_failures_log_no_credentials_path_or_query(tmp_path: Path, caplog, error) -> None:
    delivery = WebhookDelivery(EventSink(tmp_path, webhooks=[URL]), b"secret")
    with caplog.at_level(logging.WARNING, logger="hms.events"):
        assert not await delivery._post(_Session(error), URL, "ev1", b"{}")
    text = caplog.text
    assert "https://hooks.example.com:8443" in text
    for secret in ("PASSWORD", "SECRETPATH", "SECRETQUERY", "user:"):
        assert secret not in text
