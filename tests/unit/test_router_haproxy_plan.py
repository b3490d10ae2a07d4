"""The haproxy engine's plan: HAProxy's servers + the endpoint table -> Runtime API commands.
Pure, so every case is a few lines; a fake HAProxy (answers only) stands in for the socket."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hms_mgmt.models import Endpoint, EndpointSet
from router.haproxy.config import MAX_WEIGHT, RETRIES, render_config
from router.haproxy.plan import DRAIN_FORCE_S, SERVER_CHECK, Plan, plan_removals, plan_servers, plan_weights
from router.haproxy.runtime import apply
from router.haproxy.state import Backend

MAP, LANDED = "/state/services.map", "/state/landed.map"
A, B = "127.0.0.1:9001", "127.0.0.1:9002"


def pool(n: int = 2) -> list[Backend]:
    return [Backend(f"be_{i}") for i in range(n)]


def table(service: str, *eps: Endpoint, landed_until: datetime | None = None) -> dict[str, EndpointSet]:
    # Built without validation, as a forged table arrives: the plan checks every name itself.
    return {service: EndpointSet.model_construct(service=service, version=1, endpoints=list(eps), stopped=False,
                                                 landed_until=landed_until)}


def ep(pod: str, address: str = A, state: str = "ready") -> Endpoint:
    return Endpoint(pod=pod, address=address, state=state)  # type: ignore[arg-type]


def plan(backends: list[Backend], wanted: dict[str, EndpointSet], now: float = 0.0) -> Plan:
    return plan_servers(backends, wanted, now, map_path=MAP, landed_path=LANDED, first_id=1001)


def removals(backends: list[Backend], wanted: dict[str, EndpointSet], now: float) -> Plan:
    return plan_removals(backends, wanted, now, map_path=MAP, landed_path=LANDED)


def short(p: Plan) -> list[str]:
    """Each command without the add server options."""
    return [line.split(" weight ")[0] if line.startswith("add server") else line for line in p.lines()]


class FakeHAProxy:
    """Answers as HAProxy does; ``busy`` servers have connections, so ``del server`` is refused."""

    def __init__(self, busy: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.busy = set(busy)
        self.sent: list[str] = []

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator:
        async def ask(line: str) -> str:
            self.sent.append(line)
            if line.startswith("add server"):
                return "New server registered."
            if line.startswith("del server"):
                sid = line.split()[-1]
                return "Server still has connections attached to it, cannot remove it." if sid in self.busy \
                    else "Server deleted."
            return ""

        yield ask


async def carry(backends: list[Backend], p: Plan, haproxy: FakeHAProxy | None = None, now: float = 0.0) -> list[str]:
    h = haproxy or FakeHAProxy()
    await apply(h, p, backends, now)  # type: ignore[arg-type]
    return h.sent


# --- what is planned, in which order ----------------------------------------------------------


def test_a_new_service_gets_its_servers_added_and_enabled_then_its_route():
    p = plan(pool(), table("svc", ep("a", A), ep("b", B, "draining")))
    assert short(p) == [
        f"add server be_0/a {A}", "enable health be_0/a", "enable server be_0/a",
        f"add server be_0/b {B}", "enable health be_0/b", "enable server be_0/b", "set server be_0/b state drain",
        f"add map {MAP} svc be_0",
    ]
    add = p.lines()[0]
    assert " id 1001 " in add and " id 1002 " in p.lines()[3] and p.adds() == 2
    assert "pool-max-conn -1" in add and "observe layer7" in add and not p.refused


async def test_once_carried_the_same_table_plans_nothing():
    backends, wanted = pool(), table("svc", ep("a", A), ep("b", B, "draining"))
    await carry(backends, plan(backends, wanted))
    assert backends[0].service == "svc" and backends[0].routed
    assert backends[0].servers["b"].state == "draining" and backends[0].pods["b"].draining
    assert plan(backends, wanted).steps == []
    assert removals(backends, wanted, 0.0).steps == []
    assert plan_weights(backends, {"be_0": {"a": MAX_WEIGHT, "b": 10}}).steps == []


async def test_ready_and_draining_pods_change_state_only():
    backends = pool()
    await carry(backends, plan(backends, table("svc", ep("a", A), ep("b", B))))
    assert short(plan(backends, table("svc", ep("a", A, "draining"), ep("b", B)))) == ["set server be_0/a state drain"]
    await carry(backends, plan(backends, table("svc", ep("a", A, "draining"), ep("b", B))))
    assert short(plan(backends, table("svc", ep("a", A), ep("b", B)))) == ["set server be_0/a state ready"]


async def test_a_gone_pod_is_put_in_maintenance_before_it_is_deleted_and_cut_only_after_the_grace():
    backends, haproxy = pool(), FakeHAProxy(busy={"be_0/a"})
    await carry(backends, plan(backends, table("svc", ep("a", A), ep("b", B))))
    p = plan(backends, table("svc", ep("b", B)), now=100.0)
    assert short(p) == ["set server be_0/a state maint", "del server be_0/a"]
    await carry(backends, p, haproxy, now=100.0)  # it still has connections: deferred
    assert backends[0].servers["a"].state == "removing"
    assert removals(backends, table("svc", ep("b", B)), 100.0 + DRAIN_FORCE_S).lines() == [
        "del server be_0/a"]
    late = removals(backends, table("svc", ep("b", B)), 100.0 + DRAIN_FORCE_S + 1)
    assert late.lines() == ["shutdown sessions server be_0/a", "del server be_0/a"]
    haproxy.busy.clear()
    await carry(backends, late, haproxy)
    assert set(backends[0].servers) == {"b"} and set(backends[0].pods) == {"b"}


async def test_a_moved_pod_is_removed_at_once_then_added_at_its_new_address_and_not_if_the_old_one_stays():
    backends = pool()
    await carry(backends, plan(backends, table("svc", ep("a", A))))
    p = plan(backends, table("svc", ep("a", B)))
    assert short(p) == ["set server be_0/a state maint", "shutdown sessions server be_0/a", "del server be_0/a",
                        f"add server be_0/a {B}", "enable health be_0/a", "enable server be_0/a"]
    sent = await carry(backends, p, FakeHAProxy(busy={"be_0/a"}))
    assert sent[-1] == "del server be_0/a"  # the step stops: nothing enables the old server again
    assert backends[0].servers["a"].address == A and backends[0].servers["a"].state == "removing"


async def test_a_gone_service_loses_every_server_then_its_route_and_frees_its_backend():
    backends, haproxy = pool(), FakeHAProxy(busy={"be_0/a"})
    await carry(backends, plan(backends, table("svc", ep("a", A), ep("b", B))))
    p = plan(backends, {})
    assert p.lines() == ["set server be_0/a state maint", "set server be_0/b state maint", "del server be_0/a",
                         "del server be_0/b", f"del map {MAP} svc"]
    await carry(backends, p, haproxy)
    assert backends[0].service == "svc" and backends[0].routed  # a server is left: the route stays
    haproxy.busy.clear()
    await carry(backends, removals(backends, {}, 1.0), haproxy)
    assert backends[0] == Backend("be_0")
    assert short(plan(backends, table("other", ep("c"))))[-1] == f"add map {MAP} other be_0"


async def test_weights_go_to_ready_servers_only_and_only_when_they_change_enough():
    backends = pool()
    await carry(backends, plan(backends, table("svc", ep("a", A), ep("b", B, "draining"))))
    assert plan_weights(backends, {"be_0": {"a": MAX_WEIGHT - 2, "b": 10}}).steps == []  # within 10 %, and b drains
    p = plan_weights(backends, {"be_0": {"a": 12}})
    assert p.lines() == ["set server be_0/a weight 12"]
    await carry(backends, p)
    assert backends[0].servers["a"].weight == 12 and plan_weights(backends, {"be_0": {"a": 12}}).steps == []


# --- a landed service: the landed map says until when --------------------------------------------

END = datetime(2026, 12, 24, 21, 0, tzinfo=UTC)
END_S = int(END.timestamp())


async def test_a_landed_service_gets_its_route_then_its_landed_entry_set_as_the_slot_moves_then_deleted():
    backends = pool()
    p = plan(backends, table("svc", landed_until=END))
    assert p.lines() == [f"add map {MAP} svc be_0", f"add map {LANDED} svc {END_S}"]
    await carry(backends, p)
    assert backends[0].landed == END_S and plan(backends, table("svc", landed_until=END)).steps == []
    later = END + timedelta(hours=1)
    p = plan(backends, table("svc", landed_until=later))
    assert p.lines() == [f"set map {LANDED} svc {END_S + 3600}"]  # add map would add a second entry
    await carry(backends, p)
    p = plan(backends, table("svc", ep("a", A)))  # it took off: the pod first, then no landed answer
    assert short(p) == [f"add server be_0/a {A}", "enable health be_0/a", "enable server be_0/a",
                        f"del map {LANDED} svc"]
    await carry(backends, p)
    assert backends[0].landed is None and plan(backends, table("svc", ep("a", A))).steps == []


async def test_a_landed_service_with_a_ready_pod_is_not_answered_landed_but_one_with_only_draining_pods_is():
    backends = pool()
    assert f"add map {LANDED} svc {END_S}" not in plan(backends, table("svc", ep("a"), landed_until=END)).lines()
    assert plan(backends, table("svc", ep("a", state="draining"), landed_until=END)).lines()[-1] == \
        f"add map {LANDED} svc {END_S}"


async def test_a_gone_landed_service_loses_its_landed_entry_before_its_route():
    backends = pool()
    await carry(backends, plan(backends, table("svc", landed_until=END)))
    p = plan(backends, {})
    assert p.lines() == [f"del map {LANDED} svc", f"del map {MAP} svc"]
    await carry(backends, p)
    assert backends[0] == Backend("be_0")


def test_a_full_pool_refuses_a_new_service_and_says_why():
    backends = [Backend("be_0", service="one", routed=True)]
    p = plan(backends, {**table("one"), **table("two", ep("a"))})
    assert p.steps == [] and p.refused == [
        "no free backend for service two: the pool holds 1 (restart with a larger pool)"]


# --- issue 19: nothing from a table reaches the Runtime API unchecked -------------------------------

BAD_PODS = ["x;shutdown sessions server", "a\nshutdown sessions server be_0/b", "a b", "", "a/b", "a:b", "é",
            "x" * 129]
BAD_ADDRESSES = ["127.0.0.1:80;shutdown sessions server", "127.0.0.1:80\nshow info", "127.0.0.1", ":80",
                 "127.0.0.1:0", "127.0.0.1:65536", "host name:80", "fe80::1%a;b:80", "[::1]:80 check", "a_b:80"]
BAD_SERVICES = ["Svc", "a;b", "a\nb", "-a", "a-", "a.b", "../x", "", "a" * 64]


@pytest.mark.parametrize("pod", BAD_PODS)
def test_a_pod_id_outside_haproxy_name_rules_never_reaches_a_command(pod):
    p = plan(pool(), table("svc", ep(pod), ep("good", B)))
    assert short(p) == [f"add server be_0/good {B}", "enable health be_0/good", "enable server be_0/good",
                        f"add map {MAP} svc be_0"]
    assert len(p.refused) == 1 and "pod id" in p.refused[0] and "\n" not in p.refused[0]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_an_address_that_is_not_host_port_never_reaches_a_command(address):
    p = plan(pool(), table("svc", ep("a", address)))
    assert p.lines() == [f"add map {MAP} svc be_0"]
    assert len(p.refused) == 1 and "is not host:port" in p.refused[0]


@pytest.mark.parametrize("service", BAD_SERVICES)
def test_a_service_name_that_is_not_a_dns_label_is_refused_whole(service):
    p = plan(pool(), table(service, ep("a")))
    assert p.steps == [] and len(p.refused) == 1 and "DNS-1123" in p.refused[0]


@pytest.mark.parametrize("address", ["127.0.0.1:8080", "10.0.0.7:1", "node-2.example:65535", "[::1]:8080", "::1:80"])
def test_addresses_of_pods_are_accepted(address):
    assert not plan(pool(), table("svc", ep("0b8e6d1e-3c1f-4a55-9f57-2d4c0e5b1a9e", address))).refused


def text_or(good: str, max_size: int) -> st.SearchStrategy[str]:
    """Any text, or a good value (so that the other fields are what is refused)."""
    return st.one_of(st.just(good), st.text(max_size=max_size), st.text(alphabet=";\n\r :/a1.-_[]%", max_size=20))


@given(service=text_or("svc", 70), pod=text_or("a", 140), address=text_or(A, 40))
def test_every_command_is_one_line_with_no_separator_whatever_the_table_holds(service, pod, address):
    p = plan(pool(), {service: EndpointSet.model_construct(service=service, version=0, endpoints=[ep(pod, address)],
                                                         stopped=False)})
    for line in p.lines():
        assert not set(line) & {";", "\n", "\r", "#", "\x00"}, line
        assert line.isascii() and line.isprintable()
    assert len(p.steps) + len(p.refused) >= 1


def test_one_request_retries_long_enough_to_take_two_dead_pods_out():
    """A dead pod looks idle to ``random(2)`` and a retry avoids only the server just tried: a
    request may meet a lost host's 2 pods in turn. Its own failures must be enough to put both
    DOWN (``error-limit`` each) before its attempts run out, so that one attempt reaches a live pod."""
    limit = int(re.search(r"error-limit (\d+)", SERVER_CHECK).group(1))  # type: ignore[union-attr]
    assert "on-error mark-down" in SERVER_CHECK
    assert RETRIES >= 2 * limit
    config = render_config(host="127.0.0.1", port=1, socket_path=MAP, map_path=MAP, landed_path=LANDED,  # type: ignore[arg-type]
                           control_socket=MAP, log_port=3, pool_size=1)
    assert f"    retries {RETRIES}\n" in config and "    option redispatch 1\n" in config
