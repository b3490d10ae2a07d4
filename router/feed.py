"""The router's side of the endpoint feed: the table of routable pods per service.

Two inputs keep it current:
- **pushes**: each ``ServiceWorkflow`` publishes its table on every change (activity
  ``publish_endpoints``), ``POST /-/feed`` signed with the control plane's key (the router holds
  only its public half, ``keys/control.pub``; see :mod:`hms_mgmt.feed`);
- **resync**: at start and every ``interval_s`` the router lists the running ServiceWorkflows
  through Temporal visibility and queries each one's ``endpoints``, so a restarted router
  recovers on its own and a missed push heals.

A table replaces the one held only if its version is newer, and only for a service named as a
service may be (a DNS-1123 label, :func:`router.names.service_problem`): the name reaches engines'
configuration (HAProxy's services map) and, elsewhere, file names. Engines subscribe to changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from hms_mgmt import feed as wire
from hms_mgmt import names
from hms_mgmt.config import Settings, connect
from hms_mgmt.models import Endpoint, EndpointSet, ServiceStatus
from hms_mgmt.nodeid import NodeIdentity
from router.names import service_problem

log = logging.getLogger("hms.router.feed")

RESYNC_INTERVAL_S = 5.0
# Versions are milliseconds since the epoch (workflows/service/feed.py): one further ahead of this
# router's clock than a push's signature may be (MAX_SKEW_S) is refused, so no table can pin itself.
MAX_VERSION_AHEAD_MS = int(wire.MAX_SKEW_S * 1000)
QUERY_TIMEOUT_S = 3.0
PUSH_GRACE_S = 15.0  # a pushed service missing from a listing is kept this long (visibility lags)
RESYNC_FAILED = "cannot reach Temporal (the router's log has the detail)"  # /-/health, /-/table

Listener = Callable[[EndpointSet], None]


class EndpointTable:
    """Current :class:`EndpointSet` per service; calls listeners on every applied change."""

    def __init__(self) -> None:
        self.services: dict[str, EndpointSet] = {}
        # A forgotten service's last version, kept while a push of it could still be replayed
        # (its signature's life): an old table of a stopped service never comes back.
        self.gone: dict[str, tuple[int, float]] = {}
        self.pushed_at: dict[str, float] = {}
        self.listeners: list[Listener] = []
        self.last_resync: float | None = None
        self.resync_error: str | None = None

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)
        for table in list(self.services.values()):
            listener(table)

    def apply(self, table: EndpointSet, *, pushed: bool = False) -> bool:
        """Take ``table`` if it is newer than the one held; True if anything changed."""
        why = service_problem(table.service)
        if why is not None:
            log.warning("refused an endpoint table: %s", why)
            return False
        if table.version > time.time() * 1000 + MAX_VERSION_AHEAD_MS:
            log.warning("refused an endpoint table of %s: version %d is in the future", table.service, table.version)
            return False
        held = self.services.get(table.service)
        if held is not None and table.version <= held.version:
            return False
        gone = self.gone.get(table.service)
        if gone is not None and table.version <= gone[0] and time.monotonic() < gone[1]:
            return False
        if pushed:
            self.pushed_at[table.service] = time.monotonic()
        if table.stopped:
            if held is None:
                return False
            self.forget(table.service, table)
            return True
        self.services[table.service] = table
        self._notify(table)
        return True

    def put(self, table: EndpointSet) -> None:
        """Take ``table`` as it is (a worker process mirroring its primary's checked table)."""
        if table.stopped:
            self.forget(table.service, table)
            return
        self.services[table.service] = table
        self._notify(table)

    def forget(self, service: str, tombstone: EndpointSet | None = None) -> None:
        held = self.services.pop(service, None)
        version = max(held.version if held else 0, tombstone.version if tombstone else 0)
        now = time.monotonic()
        self.gone = {name: mark for name, mark in self.gone.items() if mark[1] > now}
        self.gone[service] = (version, now + wire.MAX_SKEW_S)
        self._notify(tombstone or EndpointSet(service=service, stopped=True))

    def _notify(self, table: EndpointSet) -> None:
        for listener in self.listeners:
            try:
                listener(table)
            except Exception:  # noqa: BLE001 - one engine's bug must not stop the feed
                log.exception("endpoint table listener failed for %s", table.service)

    def snapshot(self) -> dict[str, Any]:
        return {
            "services": {name: t.model_dump(mode="json") for name, t in sorted(self.services.items())},
            "last_resync_age_s": None if self.last_resync is None else round(time.monotonic() - self.last_resync, 1),
            "resync_error": self.resync_error,
        }


def _from_status(st: ServiceStatus) -> EndpointSet:
    """For a ServiceWorkflow that predates the ``endpoints`` query: its ready pods, version 0
    (any published table wins over it)."""
    return EndpointSet(service=st.name, version=0, endpoints=[
        Endpoint(pod=p.id, address=p.endpoint, node=p.node, revision=p.revision)
        for p in st.pods if p.ready and p.endpoint and p.health != "exited"
    ])


class FeedSync:
    """Keeps an :class:`EndpointTable` in step with the running ServiceWorkflows."""

    def __init__(self, settings: Settings, table: EndpointTable, *, interval_s: float = RESYNC_INTERVAL_S,
                 client: Any = None, identity: NodeIdentity | None = None) -> None:
        self.settings = settings
        self.table = table
        self.interval_s = interval_s
        self.client = client
        self.identity = identity  # this router's key: it signs its drain answers
        self.synced = asyncio.Event()
        # Pushes signed before this router started are refused: a restarted router holds no
        # versions yet, so a recorded push (still within its signature's minutes) would pass;
        # the resync reads each service's current table instead.
        self.started_at = time.time()
        self._connecting = asyncio.Lock()

    async def connected(self) -> Any:
        """The Temporal client (connected on first use)."""
        async with self._connecting:  # the resync and the registration share one client
            if self.client is None:
                self.client = await connect(self.settings)
        return self.client

    def check_control(self, body: bytes, signature: str | None, kind: str = "feed",
                      signed_since: float | None = None) -> str | None:
        """None if the control plane signed ``body`` as ``kind``, else why not."""
        return wire.verify(self.settings.state_dir, body, signature, kind=kind, signed_since=signed_since)

    # --- pushes ----------------------------------------------------------------------------

    def accept_push(self, body: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) for ``POST /-/feed``."""
        why = self.check_control(body, signature, signed_since=self.started_at)
        if why is not None:
            log.warning("refused an endpoint feed push: %s", why)
            return 401, {"error": f"feed push refused: {why}"}
        try:
            raw = json.loads(body)
            # The name first: it reaches file names and HAProxy's maps, and a refusal is logged.
            why = service_problem(raw.get("service") if isinstance(raw, dict) else None)
            if why is not None:
                log.warning("refused an endpoint feed push: %s", why)
                raise ValueError(why)
            table = EndpointSet.model_validate(raw)
        except ValueError as e:
            return 400, {"error": f"not an endpoint table: {e}"}
        applied = self.table.apply(table, pushed=True)
        return 200, {"service": table.service, "version": table.version, "applied": applied}

    # --- resync ------------------------------------------------------------------------------

    async def resync_once(self) -> int:
        """Load every running service's table; returns how many services were seen."""
        client = await self.connected()
        query = names.running_services_query(self.settings.task_queue)
        ids = [wf.id async for wf in client.list_workflows(query)]

        async def one(wf_id: str) -> EndpointSet | None:
            handle = self.client.get_workflow_handle(wf_id)
            timeout = timedelta(seconds=QUERY_TIMEOUT_S)
            try:
                return await handle.query(names.Q.ENDPOINTS, result_type=EndpointSet, rpc_timeout=timeout)
            except Exception as e:  # noqa: BLE001 - an older workflow, or a worker that is down
                try:
                    return _from_status(await handle.query(names.Q.STATUS, result_type=ServiceStatus, rpc_timeout=timeout))
                except Exception:  # noqa: BLE001
                    log.info("endpoint resync: %s did not answer: %s", wf_id, e)
                    return None

        tables = await asyncio.gather(*(one(i) for i in ids))
        seen = set()
        for t in tables:
            if t is None:
                continue
            seen.add(t.service)
            if t.stopped:
                continue
            held = self.table.services.get(t.service)
            if t.version == 0 and held is not None and held.version == 0 and not t.same_pods(held):
                del self.table.services[t.service]  # both read from status(): the newer read wins
            self.table.apply(t)
        now = time.monotonic()
        for name in list(self.table.services):
            if name not in seen and now - self.table.pushed_at.get(name, 0.0) > PUSH_GRACE_S:
                log.info("endpoint resync: %s is no longer running", name)
                self.table.forget(name)
        self.table.last_resync = now
        self.table.resync_error = None
        self.synced.set()
        return len(seen)

    async def run(self) -> None:
        """Resync at once and every ``interval_s`` until cancelled; errors are logged and kept
        for ``/-/table`` (the router keeps routing on the table it has)."""
        while True:
            try:
                await self.resync_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.table.resync_error = RESYNC_FAILED  # served unauthenticated: no address, path or key
                log.warning("endpoint resync failed: %s", e)
            await asyncio.sleep(self.interval_s)
