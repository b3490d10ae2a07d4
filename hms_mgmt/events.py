"""Events: what happened to a service and why, as pydantic models.

Written as JSON lines to ``<state>/events.jsonl`` (rotated by size: ``events.jsonl.1`` ...
``.3``) and queued to a durable spool in the state directory, from which
:class:`WebhookDelivery` POSTs each event to every configured webhook, signed and retried with
backoff. Publishing never waits for a webhook: a slow or dead receiver cannot stall a workflow.
The CLI (`hms events`) and the dashboard read the file back with :class:`EventFollower`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from hms_mgmt.files import atomic_write, open_private, private_dir

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
ROTATE_BYTES = 10 * 1024 * 1024
ROTATE_KEEP = 3
SPOOL_DIR = "spool/webhooks"
SPOOL_MAX = 50_000  # per webhook: past this the oldest undelivered events are dropped (and logged)
WEBHOOK_KEY_FILE = "webhook.key"
SIGNATURE_HEADER = "X-HMS-Signature"
EVENT_ID_HEADER = "X-HMS-Event-Id"
WRITE_TIMEOUT_S = 5.0


def _new_id() -> str:
    # Time-ordered, so spool files sort in the order events happened.
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


class Event(BaseModel):
    type: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    service: str
    reason: str
    data: dict[str, Any] = Field(default_factory=dict)
    id: str = Field(default_factory=_new_id, description="unique; a webhook receiver dedups on it")


# --- signing --------------------------------------------------------------------------------


def webhook_secret(state_dir: Path, configured: str | None = None) -> bytes:
    """The HMAC key for webhook bodies: the configured secret, else ``<state>/keys/webhook.key``
    (created 0600 on first use, so receivers can be given it once)."""
    if configured:
        return configured.encode()
    path = Path(state_dir) / "keys" / WEBHOOK_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # an existing key wins a race between two processes
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def sign(body: bytes, secret: bytes) -> str:
    """The ``X-HMS-Signature`` header value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: bytes) -> bool:
    """For receivers (and tests): constant-time check of ``X-HMS-Signature``."""
    return bool(header) and hmac.compare_digest(sign(body, secret), header or "")


# --- the event log and the spool --------------------------------------------------------------


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def shown_url(url: str) -> str:
    """A webhook URL as logs show it: ``scheme://host[:port]``. Its user, password, path and query
    (where a receiver's token usually is) stay out of the logs."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "(a webhook URL that does not parse)"
    if not host:
        return "(a webhook URL without a host)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _printable(text: str) -> str:
    """``text`` for a log line: each character that is not printable (controls, line breaks,
    bidi overrides) as its escape, ``\\x1b``; the rest as it is."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class EventSink:
    """Appends each event to ``events.jsonl`` (rotated by size) and to the spool of each webhook.

    Safe for concurrent appenders (one ``O_APPEND`` write per line; rotation under a lock).
    """

    def __init__(
        self,
        state_dir: Path,
        webhook: str | None = None,
        *,
        webhooks: list[str] | None = None,
        rotate_bytes: int = ROTATE_BYTES,
        keep: int = ROTATE_KEEP,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / EVENTS_FILE
        urls = list(webhooks or [])
        if webhook and webhook not in urls:
            urls.append(webhook)
        self.webhooks = urls
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.listeners: list[Callable[[Event], None]] = []  # e.g. metrics; must not block

    @property
    def webhook(self) -> str | None:
        """The first webhook (what this attribute meant before there could be several)."""
        return self.webhooks[0] if self.webhooks else None

    def spool_dir(self, url: str) -> Path:
        return self.state_dir / SPOOL_DIR / _url_key(url)

    def write(self, event: Event) -> None:
        """Record the event and queue it for every webhook (no network here).

        The append to ``events.jsonl`` and the spool entries are made under one lock, and each
        spool file is named by a sequence taken under it: webhooks receive events in exactly the
        order the log holds them, even when several threads or workers write at once.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = event.model_dump_json()
        with self._locked():
            self._rotate_if_due()
            fd = open_private(self.path)
            try:
                os.write(fd, (body + "\n").encode())  # one write of a line under O_APPEND
            finally:
                os.close(fd)
            if self.webhooks:
                seq = max(time.time_ns(), EventSink._last_seq + 1)
                EventSink._last_seq = seq
                for url in self.webhooks:
                    self._enqueue(url, f"{seq:020d}.{event.id}", body)
        # A refused caller's words (a path, a query value) may be the service or the reason:
        # in a log line, what is not printable is written out (whatever handler prints it).
        log.info("event %s %s: %s", *(_printable(x) for x in (event.type, event.service, event.reason)))
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener must not lose the event
                log.exception("event listener failed")

    _last_seq = 0  # within one process the sequence never repeats, even if the clock steps back

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.state_dir)
        lock = open_private(self.state_dir / ".events.lock", os.O_WRONLY | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)

    def _enqueue(self, url: str, name: str, body: str) -> None:
        spool = self.spool_dir(url)
        spool.mkdir(parents=True, exist_ok=True)
        if not (spool / "url").exists():
            atomic_write(spool / "url", url)  # which URL this directory is for, for an operator
        atomic_write(spool / f"{name}.json", body)  # the delivery side sees whole files only

    def _rotate_if_due(self) -> None:
        """Called under the lock."""
        try:
            if self.path.stat().st_size < self.rotate_bytes:
                return
        except FileNotFoundError:
            return
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{EVENTS_FILE}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{EVENTS_FILE}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{EVENTS_FILE}.1"))

    async def publish(self, event: Event) -> None:
        """Write without ever raising or hanging the caller (an activity that a heal waits on):
        a failing disk is logged, not retried forever."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.write, event), WRITE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the workflow goes on; the log says what was lost
            log.error("could not record event %s %s (%s): %s", event.type, event.service, event.reason, e)


class RefusalLog:
    """``access.denied`` events for the refusals of an HTTP door anyone may knock on (the
    dashboard, a router's control port): at most ``per_minute`` are written a minute, so a flood
    of bad requests cannot fill the event log; the next one written names how many were not
    (``data.not_recorded_before``)."""

    def __init__(self, sink: EventSink, per_minute: int = 30) -> None:
        self.sink = sink
        self.per_minute = per_minute
        self._minute = 0.0  # this minute's start (monotonic)
        self._seen = 0
        self._dropped = 0

    async def record(self, service: str, reason: str, **data: Any) -> bool:
        """Write one refusal; False when this minute's share is spent (it is counted)."""
        now = time.monotonic()
        if now - self._minute >= 60:
            self._minute, self._seen = now, 0
        self._seen += 1
        if self._seen > self.per_minute:
            self._dropped += 1
            return False
        if self._dropped:
            data["not_recorded_before"], self._dropped = self._dropped, 0
        await self.sink.publish(Event(type="access.denied", service=service or "-", reason=reason, data=data))
        return True


def rotated_files(state_dir: Path, keep: int = ROTATE_KEEP) -> list[Path]:
    """The event log's files, oldest first."""
    base = Path(state_dir) / EVENTS_FILE
    older = [base.with_name(f"{EVENTS_FILE}.{n}") for n in range(keep, 0, -1)]
    return [p for p in older if p.exists()] + ([base] if base.exists() else [])


def _parse(line: str, service: str | None) -> Event | None:
    try:
        event = Event.model_validate_json(line)
    except ValueError:
        return None
    if service is not None and event.service != service:
        return None
    return event


class EventFollower:
    """Tails ``events.jsonl`` across rotations: ``poll()`` returns what was appended since the
    last call. Starts with the whole log, oldest first; at the end (``from_start=False``); or
    with about the last ``tail_bytes`` of the current file (a page's recent events)."""

    def __init__(
        self, state_dir: Path, *, service: str | None = None, from_start: bool = True, tail_bytes: int | None = None
    ) -> None:
        self.path = Path(state_dir) / EVENTS_FILE
        self.state_dir = Path(state_dir)
        self.service = service
        self._f: Any = None
        self._ino: int | None = None
        self._partial = ""
        self._backlog: list[Path] = (
            [p for p in rotated_files(state_dir) if p != self.path] if from_start and tail_bytes is None else []
        )
        self._from_start = from_start
        self._tail_bytes = tail_bytes

    def _open_current(self) -> bool:
        try:
            f = open(self.path)  # noqa: SIM115 - kept open between polls
        except FileNotFoundError:
            return False
        self._f = f
        self._ino = os.fstat(f.fileno()).st_ino
        if self._tail_bytes is not None:
            size = os.fstat(f.fileno()).st_size
            if size > self._tail_bytes:
                f.seek(size - self._tail_bytes)
                f.readline()  # the rest of a line cut in two
        elif not self._from_start:
            f.seek(0, os.SEEK_END)
        self._from_start, self._tail_bytes = True, None  # a later (rotated-in) file is read from its start
        return True

    def _drain(self, out: list[Event]) -> None:
        while True:
            chunk = self._f.readline()
            if not chunk:
                return
            if not chunk.endswith("\n"):
                self._partial += chunk  # a line being written: finish it next time
                return
            line, self._partial = self._partial + chunk, ""
            event = _parse(line, self.service)
            if event is not None:
                out.append(event)

    def poll(self) -> list[Event]:
        out: list[Event] = []
        while self._backlog:
            path = self._backlog.pop(0)
            with contextlib.suppress(FileNotFoundError), open(path) as f:
                for line in f:
                    event = _parse(line, self.service)
                    if event is not None:
                        out.append(event)
        if self._f is None and not self._open_current():
            return out
        self._drain(out)
        try:
            rotated = os.stat(self.path).st_ino != self._ino
        except FileNotFoundError:
            rotated = True
        if rotated:
            self._drain(out)  # the rest of the old file, written just before the rotation
            self._f.close()
            self._f, self._partial = None, ""
            if self._open_current():
                self._drain(out)
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def type_matches(event_type: str, wanted: Iterable[str]) -> bool:
    """An exact type (``pod.started``) or a family (``pod.`` or ``pod.*``); nothing wanted: all."""
    wanted = list(wanted)
    return not wanted or any(
        event_type == w or (w.endswith((".", "*")) and event_type.startswith(w.rstrip("*"))) for w in wanted)


def read_events(
    state_dir: Path, *, service: str | None = None, follow: bool = False, poll_s: float = 0.5,
    types: Iterable[str] = (), stop: Callable[[], bool] = lambda: False,
) -> Iterator[Event]:
    """Every recorded event, oldest first (rotated files too); with ``follow``, then new ones
    until ``stop()`` says so; only those of ``types`` (see :func:`type_matches`) when given."""
    follower = EventFollower(state_dir, service=service)
    types = list(types)
    try:
        while True:
            yield from (ev for ev in follower.poll() if type_matches(ev.type, types))
            if not follow or stop():
                return
            time.sleep(poll_s)
    finally:
        follower.close()


# --- delivery -----------------------------------------------------------------------------


class WebhookDelivery:
    """POSTs spooled events to each webhook, in order, each until it is accepted (2xx).

    One task per URL; a failure backs off exponentially (``initial_s`` doubling to ``max_s``)
    and blocks only that URL's queue. Delivery is at least once; ``X-HMS-Event-Id`` lets a
    receiver drop the rare duplicate (a 2xx lost on the way back).
    """

    def __init__(
        self,
        sink: EventSink,
        secret: bytes,
        *,
        initial_s: float = 0.5,
        max_s: float = 60.0,
        timeout_s: float = 5.0,
        idle_poll_s: float = 0.25,
        on_result: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.sink = sink
        self.secret = secret
        self.initial_s = initial_s
        self.max_s = max_s
        self.timeout_s = timeout_s
        self.idle_poll_s = idle_poll_s
        self.on_result = on_result
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for url in self.sink.webhooks:
            self._tasks.append(asyncio.create_task(self._run(url), name=f"webhook {shown_url(url)}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def __aenter__(self) -> WebhookDelivery:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def pending(self, url: str | None = None) -> int:
        """Events not yet accepted (by one webhook, or all of them)."""
        urls = [url] if url else self.sink.webhooks
        return sum(len(self._queued(self.sink.spool_dir(u))) for u in urls)

    @staticmethod
    def _queued(spool: Path) -> list[Path]:
        try:
            return sorted(p for p in spool.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _trim(self, files: list[Path], url: str) -> list[Path]:
        if len(files) <= SPOOL_MAX:
            return files
        drop = files[: len(files) - SPOOL_MAX]
        for p in drop:
            p.unlink(missing_ok=True)
        log.error("webhook %s: spool over %d events, dropped the %d oldest", shown_url(url), SPOOL_MAX, len(drop))
        return files[len(drop):]

    async def _own(self, spool: Path) -> int:
        """One deliverer per spool, even with several workers on one state directory: wait for
        the spool's lock (held until this process stops or is cancelled)."""
        spool.mkdir(parents=True, exist_ok=True)
        fd = os.open(spool / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                await asyncio.sleep(2.0)
            except BaseException:
                os.close(fd)
                raise

    async def _run(self, url: str) -> None:
        spool = self.sink.spool_dir(url)
        lock = await self._own(spool)
        try:
            await self._deliver(url, spool)
        finally:
            os.close(lock)  # releases the lock

    async def _deliver(self, url: str, spool: Path) -> None:
        import aiohttp

        delay = self.initial_s
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                files = self._trim(await asyncio.to_thread(self._queued, spool), url)
                if not files:
                    await asyncio.sleep(self.idle_poll_s)
                    continue
                for path in files:
                    try:
                        body = await asyncio.to_thread(path.read_bytes)
                    except FileNotFoundError:
                        continue
                    while not await self._post(session, url, _spooled_id(path), body):
                        await asyncio.sleep(delay)
                        delay = min(self.max_s, delay * 2)
                    delay = self.initial_s
                    path.unlink(missing_ok=True)

    async def _post(self, session: Any, url: str, event_id: str, body: bytes) -> bool:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self.secret),
            EVENT_ID_HEADER: event_id,
            "User-Agent": "hms-mgmt-webhook",
        }
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                ok = 200 <= resp.status < 300
                if not ok:
                    log.warning("webhook %s answered %s for event %s; retrying", shown_url(url), resp.status, event_id)
        except Exception as e:  # noqa: BLE001 - any failure is a retry
            why = (str(e) or type(e).__name__).replace(url, shown_url(url))  # an InvalidURL's text is the URL
            log.warning("webhook %s unreachable for event %s (%s); retrying", shown_url(url), event_id, why)
            ok = False
        if self.on_result is not None:
            self.on_result(url, ok)
        return ok


def _spooled_id(path: Path) -> str:
    """The event id of a spool file named ``<sequence>.<event id>.json``."""
    return path.stem.partition(".")[2] or path.stem


def body_event(body: bytes) -> dict[str, Any]:
    """A webhook body back as a dict (for receivers written in Python)."""
    return json.loads(body)
