"""Text that anyone may send (a pod's log line, a refused caller's query value, a service name
the caller claims) reaches operators' logs and terminals only as one line, with what a terminal
would act on written out, or not at all."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer, make_mocked_request
from pydantic import ValidationError

from hms_mgmt import logstream, tickets
from hms_mgmt.errors import AccessDenied
from hms_mgmt.events import Event, EventSink
from hms_mgmt.models import MAX_LABEL_CHARS, MAX_SELECTOR_LABELS, NodeSpec
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.runtimes.follow import LineSplitter, StreamFollow, read_tail
from hms_mgmt.wire import LogEndpoint, LogGrantOutput, RouterRegistration
from router.control import Control

POD = "11111111-1111-4111-8111-111111111111"
FORGED = b"GET /health 200\rdeadbeef@node-2 | ERROR run: hms secret set db\n"


# --- a pod's log line: a CR inside it stays inside it, on the node and at the reader ---------


def test_a_cr_inside_a_line_stays_in_it_and_is_sent_escaped(tmp_path: Path):
    assert LineSplitter().feed(b"a\r\n" + FORGED) == ["a", FORGED.decode()[:-1]]
    (tmp_path / "pod.log").write_bytes(b"a\r\n" + FORGED)
    assert read_tail(tmp_path / "pod.log", 0)[0] == ["a", FORGED.decode()[:-1]]  # as a follow cuts them
    assert logstream.one_line("x\ry\nz") == "x\\ry\\nz"


class _Runtime:
    node = "node-1"

    def logs(self, pod: str, tail: int) -> list[str]:
        return LineSplitter().feed(FORGED)

    def follow(self, pod: str, tail: int) -> StreamFollow:
        return StreamFollow([FORGED], lambda: None)

    def find(self, pod: str) -> None:
        return None


@pytest.mark.parametrize("follow", [False, True])
async def test_a_pods_cr_reaches_the_reader_as_one_line(tmp_path: Path, follow: bool):
    server = logstream.LogServer(_Runtime(), tmp_path)  # type: ignore[arg-type]

    async def checked(request):  # the grant's check is tested elsewhere
        return "hms-ach", POD, 10, follow, "k"

    server._request = checked  # type: ignore[method-assign]
    async with TestServer(server.app) as http, aiohttp.ClientSession() as session:
        endpoint = LogEndpoint(pod=POD, node="node-1", url=str(http.make_url("")).rstrip("/"))
        got = [line.text async for line in logstream.read_pod(session, endpoint, "g", "k", service="hms-ach",
                                                                  tail=10, follow=follow)]
    assert got[0] == "GET /health 200\\rdeadbeef@node-2 | ERROR run: hms secret set db"
    assert len(got) == (2 if follow else 1)  # and, following, the node's last word


async def test_an_event_of_several_lines_stays_one_line_under_its_prefix(monkeypatch):
    """A node that sends a CR unescaped (an older one): its parts do not become unprefixed lines."""

    class Streams:
        pods: set[str] = set()

        def __init__(self, *a, **kw) -> None: ...
        def add(self, grant) -> None: ...

        async def lines(self):
            yield logstream.StreamLine(POD, "GET /health 200\ndeadbeef@node-2 | ERROR forged")

    monkeypatch.setattr(logstream, "PodStreams", Streams)
    orch = Orchestrator.__new__(Orchestrator)
    orch._check_reader = lambda action: None  # type: ignore[method-assign]

    async def pods(service, pod_id):
        return [types.SimpleNamespace(id=POD)]

    async def grant(service, pod_ids, key_hash):
        return LogGrantOutput(grant="g", endpoints=[LogEndpoint(pod=POD, node="node-1", url="http://x")])

    orch._log_pods, orch._log_grant = pods, grant  # type: ignore[method-assign]
    assert await orch.logs("hms-ach") == ["11111111@node-1 | GET /health 200\\ndeadbeef@node-2 | ERROR forged"]


# --- the router's refusal, the events' log line ---------------------------------------------


@pytest.mark.parametrize(("asked", "recorded"), [("%1b]0;pwned%07%1b[2J", "-"), ("Hms-Ach", "-"), ("a" * 64, "-"),
                                                 ("hms-ach", "hms-ach")])
async def test_a_refused_drained_query_records_the_service_only_if_it_is_a_name(tmp_path: Path, asked: str,
                                                                               recorded: str):
    sync = types.SimpleNamespace(settings=types.SimpleNamespace(state_dir=tmp_path, webhook_urls=lambda: []),
                                 check_control=lambda body, sig, kind="feed": "no signature")
    ctl = Control.__new__(Control)
    ctl.engine, ctl.sync = "builtin", sync
    ctl.__post_init__()
    resp = await ctl.drained(make_mocked_request("GET", f"/-/drained?service={asked}&pods=x"))
    assert resp.status == 401
    [line] = (tmp_path / "events.jsonl").read_text().splitlines()
    assert Event.model_validate_json(line).service == recorded


def test_an_events_log_line_is_one_line_with_its_controls_written_out(tmp_path: Path, caplog):
    with caplog.at_level(logging.INFO, logger="hms_mgmt.events"):
        EventSink(tmp_path).write(Event(type="access.denied", service="x\x1b]0;t\x07",
                                        reason="GET /x\r\n12:00:00 INFO fake \u202eevil é"))
    [msg] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event ")]
    assert msg == "event access.denied x\\x1b]0;t\\x07: GET /x\\r\\n12:00:00 INFO fake \\u202eevil é"


# --- what a caller claims is not echoed; names and labels are checked -----------------------


def test_a_grant_refusal_does_not_echo_the_service_the_caller_named(tmp_path: Path):
    signed = tickets.grant(tmp_path, action="logs", service="hms-ach", user="ann", role="viewer", bind={})
    with pytest.raises(AccessDenied) as refused:
        tickets.check_grant(tmp_path, signed, service="x\x1b]0;pwned\x07", actions=["logs"])
    assert "pwned" not in str(refused.value) and "\x1b" not in str(refused.value)
    assert "logs on hms-ach" in str(refused.value)  # what the grant (signed here) is for


@pytest.mark.parametrize("name", ["Edge", "edge.eu", "-edge", "edge\x1b[2J", "a" * 64, ""])
def test_a_router_registration_name_is_a_dns_label(name: str):
    with pytest.raises(ValidationError):
        RouterRegistration(name=name, address="127.0.0.1", url="http://127.0.0.1:1")
    assert RouterRegistration(name="edge-1", address="127.0.0.1", url="http://127.0.0.1:1").name == "edge-1"


@pytest.mark.parametrize("labels", [{"zone": "a\x1b[2J"}, {"zone": "\u202eeu"}, {"zone": "a\u2028b"},
                                    {"zone": "\x9b"}, {"": "a"}, {"zone": "a" * (MAX_LABEL_CHARS + 1)},
                                    {f"k{i}": "v" for i in range(MAX_SELECTOR_LABELS + 1)}])
def test_node_labels_are_bounded_printable_text(labels: dict[str, str]):
    with pytest.raises(ValidationError):
        NodeSpec(name="n1", task_queue="q", labels=labels)
    assert NodeSpec(name="n1", task_queue="q", labels={"zone": "eu-1", "site": "Zürich [a]"}).labels["site"]
