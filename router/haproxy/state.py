"""What the engine knows HAProxy carries — a pool of backends and their servers — and how one
Runtime API answer changes that knowledge. The plan reads it; :func:`record` is the only writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from router import policy
from router.haproxy.config import MAX_WEIGHT

ServerState = Literal["ready", "draining", "removing"]
Op = Literal["add", "enable-health", "enable", "drain", "ready", "maint", "shutdown", "del", "weight", "map-add",
             "map-del", "landed-add", "landed-set", "landed-del"]

# The answers that say a command did what it asked; other commands are taken as done once sent.
EXPECTED = {"add": "New server registered", "del": "Server deleted"}
STATE_AFTER: dict[str, ServerState] = {"drain": "draining", "ready": "ready", "maint": "removing"}


@dataclass
class Server:
    pod: str
    address: str
    state: ServerState = "ready"
    weight: int = MAX_WEIGHT
    removing_since: float = 0.0


@dataclass
class Backend:
    name: str
    service: str | None = None
    routed: bool = False  # the services map sends the service here
    landed: int | None = None  # what the landed map holds for the service: its slot's end, epoch seconds
    servers: dict[str, Server] = field(default_factory=dict)
    pods: dict[str, policy.PodState] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """One Runtime API command: ``line`` is what is sent; the rest says what it changes."""

    op: Op
    backend: str
    service: str
    line: str
    server: str = ""
    value: str = ""  # add: the address; weight: the weight; landed-add/-set: the slot's end


def succeeded(command: Command, answer: str) -> bool:
    expected = EXPECTED.get(command.op)
    return expected is None or expected in answer


def record(be: Backend, command: Command, answer: str, now: float) -> bool:
    """Apply ``command``'s effect to ``be`` if ``answer`` says it worked; whether it did."""
    be.service = be.service or command.service or None  # taken with its first command: never lost half-way
    if not succeeded(command, answer):
        return False
    srv = be.servers.get(command.server)
    op = command.op
    if op == "add":
        be.servers[command.server] = Server(command.server, command.value)
        be.pods[command.server] = policy.PodState(pod=command.server, address=command.value)
    elif op == "del":
        be.servers.pop(command.server, None)
        be.pods.pop(command.server, None)
    elif op == "map-add":
        be.routed = True
    elif op == "map-del":
        be.service, be.routed = None, False
        be.pods.clear()
    elif op in ("landed-add", "landed-set"):
        be.landed = int(command.value)
    elif op == "landed-del":
        be.landed = None
    elif srv is not None and op in ("drain", "ready", "maint"):
        srv.state = STATE_AFTER[op]
        if op == "maint":
            srv.removing_since = now
        elif command.server in be.pods:
            be.pods[command.server].draining = op == "drain"
    elif srv is not None and op == "weight":
        srv.weight = int(command.value)
    return True
