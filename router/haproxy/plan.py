"""The pure middle of the haproxy engine: what HAProxy carries + what the endpoint table wants
-> the Runtime API commands that make the one the other. No I/O, no clock (``now`` is an input).

A plan is a list of steps; a step's commands are sent in order and the step stops at the first
``add server`` or ``del server`` that did not work (:func:`router.haproxy.state.succeeded`), so
nothing is enabled that was not added and no route is removed while a server is left.

A landed service (``EndpointSet.landed_until`` set and no ready pod, as the builtin engine
decides) is also in a second runtime map, service -> the slot's end in epoch seconds, which the
frontend answers with 503 and ``Retry-After`` at that end.

Names are checked here (issue 19): a service, pod id or address outside :mod:`router.names`'
rules never becomes a command; the plan lists it in ``refused`` with the reason instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hms_mgmt.models import Endpoint, EndpointSet
from router import names
from router.haproxy.config import MAX_WEIGHT
from router.haproxy.state import Backend, Command, Op, Server

DRAIN_FORCE_S = 60.0  # a removed pod's connections are cut after this long
WEIGHT_MIN_CHANGE = 0.1  # relative change before a weight is sent again
# A server made by ``add server`` in HAProxy 2.6 keeps no idle connection unless both are given
# (a configured server gets them by default): without them every request opens a new connection
# to the pod, which costs a Python pod more than the request itself.
SERVER_POOL = "pool-max-conn -1 pool-purge-delay 5s"
SERVER_CHECK = "check inter 2s fall 2 rise 1 observe layer7 error-limit 3 on-error mark-down"

Step = tuple[Command, ...]


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why a service or endpoint is not carried

    @property
    def commands(self) -> list[Command]:
        return [c for step in self.steps for c in step]

    def lines(self) -> list[str]:
        return [c.line for c in self.commands]

    def adds(self) -> int:
        return sum(c.op == "add" for c in self.commands)


def plan_servers(backends: Sequence[Backend], wanted: Mapping[str, EndpointSet], now: float, *, map_path: str,
                 landed_path: str, first_id: int) -> Plan:
    """Servers for every wanted service (a new one takes a free backend, then its route, then its
    landed entry), and every other service's servers and route removed. New servers are numbered
    from ``first_id``."""
    out = Plan()
    ids = itertools.count(first_id)
    held = {b.service: b for b in backends if b.service is not None}
    free = (b for b in backends if b.service is None and not b.servers)
    for name, table in wanted.items():
        why = names.service_problem(name)
        if why is not None:
            out.refused.append(why)
            continue
        be = held.get(name) or next(free, None)
        if be is None:
            out.refused.append(f"no free backend for service {name}: the pool holds {len(backends)} "
                               "(restart with a larger pool)")
            continue
        eps = _routable(table, out.refused)
        out.steps += _servers(be, name, eps, now, ids)
        if not be.routed:  # servers first, then the route: no request meets an empty backend
            out.steps.append((Command("map-add", be.name, name, f"add map {map_path} {name} {be.name}"),))
        out.steps += _landing(be, name, landed_until(table, eps), landed_path)
    for name, be in held.items():
        if name not in wanted:
            out.steps.append(_retire(be, name, now, map_path, landed_path))
    return out


def plan_removals(backends: Sequence[Backend], wanted: Mapping[str, object], now: float, *, map_path: str,
                  landed_path: str) -> Plan:
    """Only the deletions still pending (a server that had connections left, a route not yet removed)."""
    out = Plan()
    for be in backends:
        if be.service is not None and be.service not in wanted:
            out.steps.append(_retire(be, be.service, now, map_path, landed_path))
            continue
        for srv in be.servers.values():
            if srv.state == "removing":
                out.steps.append(_removal(be, be.service or "", srv, now))
    return out


def plan_weights(backends: Sequence[Backend], weights: Mapping[str, Mapping[str, int]]) -> Plan:
    """``set server ... weight`` where the wanted weight (per backend, per pod) differs enough
    from the one sent last; only ready servers take weights."""
    step = []
    for be in backends:
        for pod, w in weights.get(be.name, {}).items():
            srv = be.servers.get(pod)
            if srv is None or srv.state != "ready":
                continue
            if abs(w - srv.weight) > WEIGHT_MIN_CHANGE * max(w, srv.weight):
                step.append(_cmd("weight", be, be.service or "", pod, f"set server {be.name}/{pod} weight {w}", str(w)))
    return Plan(steps=[tuple(step)] if step else [])


def landed_until(table: EndpointSet, eps: Mapping[str, Endpoint]) -> int | None:
    """The slot's end (epoch seconds) while the service is landed and no pod is ready, else None."""
    if table.landed_until is None or any(ep.state == "ready" for ep in eps.values()):
        return None
    return int(table.landed_until.timestamp())


def _landing(be: Backend, service: str, until: int | None, landed_path: str) -> list[Step]:
    """The service's landed entry made to say ``until`` (``add map`` once, ``set map`` after: an
    added key is added again, not replaced), or deleted."""
    if until == be.landed:
        return []
    if until is None:
        return [(_landed_del(be, service, landed_path),)]
    if be.landed is None:
        return [(Command("landed-add", be.name, service, f"add map {landed_path} {service} {until}", value=str(until)),)]
    return [(Command("landed-set", be.name, service, f"set map {landed_path} {service} {until}", value=str(until)),)]


def _landed_del(be: Backend, service: str, landed_path: str) -> Command:
    return Command("landed-del", be.name, service, f"del map {landed_path} {service}")


def _routable(table: EndpointSet, refused: list[str]) -> dict[str, Endpoint]:
    """The endpoints whose pod id and address may reach HAProxy, by pod."""
    out = {}
    for ep in table.endpoints:
        why = names.pod_problem(ep.pod) or names.address_problem(ep.address)
        if why is None:
            out[ep.pod] = ep
        else:
            refused.append(f"service {table.service}: {why}")
    return out


def _servers(be: Backend, service: str, eps: Mapping[str, Endpoint], now: float, ids: Iterator[int]) -> list[Step]:
    steps = []
    for pod, ep in eps.items():
        srv = be.servers.get(pod)
        if srv is not None and srv.address != ep.address:  # the pod moved: the old server goes first
            steps.append(_removal(be, service, srv, now, force=True) + _addition(be, service, ep, next(ids)))
        elif srv is None:
            steps.append(_addition(be, service, ep, next(ids)))
        elif ep.state != srv.state:
            op: Op = "drain" if ep.state == "draining" else "ready"
            steps.append((_cmd(op, be, service, pod, f"set server {be.name}/{pod} state {op}"),))
    for srv in be.servers.values():
        if srv.pod not in eps:
            steps.append(_removal(be, service, srv, now))
    return steps


def _addition(be: Backend, service: str, ep: Endpoint, server_id: int) -> Step:
    """Add, then enable its health check and the server; a draining pod is drained at once.
    The explicit id: HAProxy 2.6 gives dynamic servers ids that collide in the consistent-hash
    tree behind ``balance random``, and one pod then never gets a request."""
    sid = f"{be.name}/{ep.pod}"
    add = f"add server {sid} {ep.address} weight {MAX_WEIGHT} id {server_id} {SERVER_POOL} {SERVER_CHECK}"
    step = (_cmd("add", be, service, ep.pod, add, ep.address),
            _cmd("enable-health", be, service, ep.pod, f"enable health {sid}"),
            _cmd("enable", be, service, ep.pod, f"enable server {sid}"))
    if ep.state == "draining":
        step += (_cmd("drain", be, service, ep.pod, f"set server {sid} state drain"),)
    return step


def _removal(be: Backend, service: str, srv: Server, now: float, *, force: bool = False) -> Step:
    """Maintenance first (nothing new), then ``del server``, which HAProxy refuses while the
    server has connections; they are cut when ``force``d or after ``DRAIN_FORCE_S``."""
    return _take_out(be, service, srv) + _cut(be, service, srv, now, force) + (_delete(be, service, srv),)


def _retire(be: Backend, service: str, now: float, map_path: str, landed_path: str) -> Step:
    """A service no longer wanted: every server out of rotation, then deleted, then its landed
    entry and its route. All maintenance commands come before the first ``del``, which may be deferred."""
    servers = list(be.servers.values())
    return (tuple(c for s in servers for c in _take_out(be, service, s))
            + tuple(c for s in servers for c in _cut(be, service, s, now, False))
            + tuple(_delete(be, service, s) for s in servers)
            + ((_landed_del(be, service, landed_path),) if be.landed is not None else ())
            + (Command("map-del", be.name, service, f"del map {map_path} {service}"),))


def _take_out(be: Backend, service: str, srv: Server) -> Step:
    if srv.state == "removing":
        return ()
    return (_cmd("maint", be, service, srv.pod, f"set server {be.name}/{srv.pod} state maint"),)


def _cut(be: Backend, service: str, srv: Server, now: float, force: bool) -> Step:
    if force or (srv.state == "removing" and now - srv.removing_since > DRAIN_FORCE_S):
        return (_cmd("shutdown", be, service, srv.pod, f"shutdown sessions server {be.name}/{srv.pod}"),)
    return ()


def _delete(be: Backend, service: str, srv: Server) -> Command:
    return _cmd("del", be, service, srv.pod, f"del server {be.name}/{srv.pod}")


def _cmd(op: Op, be: Backend, service: str, pod: str, line: str, value: str = "") -> Command:
    return Command(op, be.name, service, line, server=pod, value=value)
