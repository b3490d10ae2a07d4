"""Issue 19: the router takes an endpoint table only for a service named as a service may be
(a DNS-1123 label): the name reaches HAProxy's services map and, elsewhere, file names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hms_mgmt import feed as wire
from hms_mgmt.config import Settings
from hms_mgmt.models import Endpoint, EndpointSet
from router.feed import EndpointTable, FeedSync
from router.names import address_problem, pod_problem, service_problem

BAD_SERVICES = ["../../etc/x", "a/b", "Svc", "a;b", "a\nb", "-a", "a.b", "", "a" * 64]


@pytest.fixture
def sync(tmp_path: Path) -> FeedSync:
    return FeedSync(Settings(state_dir=tmp_path), EndpointTable())


def push(sync: FeedSync, service: str) -> tuple[int, dict]:
    # Built without validation, as a forger would: the model itself refuses such a name.
    body = EndpointSet.model_construct(service=service, version=1, stopped=False,
                                       endpoints=[Endpoint(pod="a", address="127.0.0.1:9001")]
                                       ).model_dump_json().encode()
    return sync.accept_push(body, wire.sign(sync.settings.state_dir, body))  # the control plane signs


@pytest.mark.parametrize("service", BAD_SERVICES)
def test_a_signed_push_for_a_service_name_that_is_not_a_label_is_refused_with_400_and_logged(sync, service, caplog):
    with caplog.at_level(logging.WARNING, logger="hms.router.feed"):
        status, answer = push(sync, service)
    assert status == 400 and "DNS-1123" in answer["error"]
    assert sync.table.services == {}
    assert any("refused an endpoint feed push" in r.getMessage() for r in caplog.records)


def test_a_signed_push_for_a_good_name_is_taken(sync):
    assert push(sync, "hms-ach") == (200, {"service": "hms-ach", "version": 1, "applied": True})
    assert list(sync.table.services) == ["hms-ach"]


@pytest.mark.parametrize("service", BAD_SERVICES)
def test_the_table_refuses_a_bad_name_from_a_resync_too(service, caplog):
    table = EndpointTable()
    seen: list[EndpointSet] = []
    table.subscribe(seen.append)
    with caplog.at_level(logging.WARNING, logger="hms.router.feed"):
        assert table.apply(EndpointSet.model_construct(service=service, version=1, endpoints=[], stopped=False)) is False
    assert table.services == {} and seen == []
    assert any("refused an endpoint table" in r.getMessage() for r in caplog.records)


def test_the_rules():
    assert service_problem("hms-ach") is None and service_problem("a" * 63) is None
    assert pod_problem("0b8e6d1e-3c1f-4a55-9f57-2d4c0e5b1a9e") is None and pod_problem("pod_1.a") is None
    assert address_problem("127.0.0.1:8080") is None and address_problem("[::1]:80") is None
    assert "'a\\nb'" in (service_problem("a\nb") or "")  # a refused name is logged quoted, on one line
