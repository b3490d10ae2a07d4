"""A router's membership: register with the RouterRegistry, then heartbeat, both signed with
the router's own key (its certificate from ``hms router join``, or self-enrolled on the control
plane's host). The registry then sends it the feed and asks it before every drain ends; a
router that stops heartbeating is dropped from both (workflows/routers.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from temporalio.service import RPCError, RPCStatusCode

from hms_mgmt import constants, names
from hms_mgmt.addresses import LOOPBACK, check_address, host_port
from hms_mgmt.config import Settings
from hms_mgmt.errors import AccessDenied
from hms_mgmt.joining import join_registry, new_request_id
from hms_mgmt.nodeid import NodeIdentity, node_identity
from hms_mgmt.wire import RouterRecord, RouterRegistration, RouterRegistryInput

log = logging.getLogger("hms.router.registration")

REGISTER_TIMEOUT_S = 30.0
REFUSED_RETRY_S = 30.0  # after the registry refused us (revoked, another key): try again this late


def router_name(settings: Settings, port: int) -> str:
    """``router_name`` (``hms router join --name``), else ``<host name>-<port>``."""
    return settings.router_name or f"{settings.node}-{port}"[:63]


def advertised_address(settings: Settings, host: str) -> str:
    """The address this router is reached at: the one it listens on, unless that is every address."""
    try:
        return check_address(host)
    except ValueError:
        return settings.router_address or LOOPBACK


def router_identity(settings: Settings, *, host: str, port: int) -> NodeIdentity:
    """This router's key and certificate (NotJoined if it neither joined nor runs on the control host)."""
    return node_identity(settings.state_dir, router_name(settings, port), advertised_address(settings, host),
                         role="router")


class RouterAgent:
    """Keeps this router in the RouterRegistry while it runs."""

    def __init__(self, settings: Settings, identity: NodeIdentity, *, address: str, port: int, engine: str,
                 client: object) -> None:
        self.settings = settings
        self.identity = identity
        self.client = client
        self.registry_id = constants.router_registry_id(settings.task_queue)
        self.registration = RouterRegistration(
            name=identity.node, address=address, url=f"http://{host_port(address, port)}", engine=engine,
            worker=f"{socket.gethostname()}:{os.getpid()}", cert=identity.cert)
        self.registered = asyncio.Event()

    def _signed(self, kind: str) -> RouterRegistration:
        reg = self.registration
        return reg.model_copy(update={"proof": self.identity.say(f"router-{kind}", reg.signed_part())})

    async def register(self) -> RouterRecord:
        """Join (signal-with-start: the first router starts the registry) and wait for the answer."""
        s = self.settings
        signed = self._signed("register").model_copy(update={"request_id": new_request_id()})
        answer = await join_registry(
            self.client, workflow=names.ROUTER_REGISTRY_WORKFLOW, registry_id=self.registry_id, task_queue=s.task_queue,
            start_input=RouterRegistryInput(lost_after_s=s.node_lost_after_s, control_task_queue=s.task_queue),
            registration=signed, summary="the routers that take the endpoint feed")
        assert answer.router is not None
        return answer.router

    async def run(self) -> None:
        """Register, then heartbeat every ``node_heartbeat_s`` until cancelled."""
        while True:
            pause = self.settings.node_heartbeat_s
            try:
                if not self.registered.is_set():
                    async with asyncio.timeout(REGISTER_TIMEOUT_S):  # unlike wait_for, never eats a cancel
                        rec = await self.register()
                    self.registered.set()
                    log.info("router %s registered at %s (%s)", rec.name, rec.url, self.registry_id)
                else:
                    await self.client.get_workflow_handle(self.registry_id).signal(  # type: ignore[attr-defined]
                        names.RR.HEARTBEAT, self._signed("heartbeat"))
            except asyncio.CancelledError:
                raise
            except AccessDenied as e:
                log.error("router %s: registration refused: %s", self.identity.node, e)
                pause = REFUSED_RETRY_S
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:  # the registry ended: start it again
                    self.registered.clear()
                log.warning("router %s: registry not reached: %s", self.identity.node, e)
            except Exception as e:  # noqa: BLE001 - keep routing; try again next beat
                log.warning("router %s: registration failed: %s", self.identity.node, e)
            await asyncio.sleep(pause)
