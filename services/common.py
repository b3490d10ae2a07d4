"""Shared HTTP plumbing for the example HMS micro-services.

Stdlib only: the images are a bare Debian bookworm rootfs with python3 and no pip.
Each service declares its business routes; this module adds /health, /, the admin
switches used by demos and tests (failing health, CPU burn, hang, exit) and a
SIGTERM-aware main loop so `docker stop` returns promptly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_VERSION = "1.4"
MAX_BODY_BYTES = 1 << 20
# A hung pod must look hung to any sane probe timeout, yet still be releasable.
HANG_SECONDS = 3600.0
MAX_DELAY_S = 30.0
# Bound on waiting for in-flight requests after SIGTERM; docker stop waits 10 s by default.
SHUTDOWN_GRACE_S = 2.0

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def pod_id() -> str:
    """Pod identity for X-HMS-Pod; the container hostname is the natural default."""
    return os.environ.get("HMS_POD_ID") or socket.gethostname()


class HttpError(Exception):
    """Raised by handlers to produce a JSON error response naming the offending field."""

    def __init__(self, status: int, error: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.payload: dict[str, Any] = {"error": error}
        if field is not None:
            self.payload["field"] = field
        self.payload.update(extra)


@dataclass
class Request:
    """What a route handler sees; body parsing is lazy so GETs never touch it."""

    method: str
    path: str
    query: dict[str, str]
    raw_body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        """Body as a JSON object; an empty body counts as {} so query-only admin calls work."""
        if not self.raw_body.strip():
            return {}
        try:
            data = json.loads(self.raw_body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"invalid JSON body: {exc}", field="body") from None
        if not isinstance(data, dict):
            raise HttpError(400, "JSON body must be an object", field="body")
        return data


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


def route(method: str, path_regex: str, handler: Handler) -> Route:
    """Anchored regex route; named groups become Request.params."""
    return Route(method.upper(), re.compile(f"^{path_regex}$"), handler)


def parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise HttpError(400, f"{name} must be a boolean", field=name)


def parse_number(value: Any, name: str, lo: float, hi: float) -> float:
    # bool is an int subclass; `true` as a percentage is a client bug, not 1 %.
    if isinstance(value, bool):
        raise HttpError(400, f"{name} must be a number", field=name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be a number", field=name) from None
    if not (lo <= number <= hi):
        raise HttpError(400, f"{name} must be between {lo:g} and {hi:g}", field=name)
    return number


def require(data: dict[str, Any], name: str) -> Any:
    """Fetch a mandatory field; absent, null and blank strings all count as missing."""
    value = data.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise HttpError(400, f"missing required field: {name}", field=name)
    return value


def _arg(req: Request, data: dict[str, Any], name: str) -> Any:
    """Admin switches accept the value in the JSON body or in the query string."""
    if name in data:
        return data[name]
    return req.query.get(name)


class CpuBurner:
    """Busy-loops one thread with a duty cycle so the process uses ~percent % of a core."""

    PERIOD_S = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._percent = 0.0
        self._stop: threading.Event | None = None

    @property
    def percent(self) -> float:
        return self._percent

    def set(self, percent: float) -> None:
        with self._lock:
            self._percent = percent
            if percent <= 0:
                if self._stop is not None:
                    self._stop.set()
                    self._stop = None
                return
            if self._stop is None:
                self._stop = threading.Event()
                threading.Thread(target=self._run, args=(self._stop,), name="cpu-burner", daemon=True).start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            busy = self.PERIOD_S * min(self._percent, 100.0) / 100.0
            deadline = time.perf_counter() + busy
            while time.perf_counter() < deadline:
                pass
            idle = self.PERIOD_S - busy
            if idle > 0:
                stop.wait(idle)


class ServiceState:
    """Mutable switches shared by all request threads."""

    def __init__(self) -> None:
        self.failing = False
        self.unhung = threading.Event()
        self.unhung.set()
        self.cpu = CpuBurner()
        self.started_at = time.time()
        self._inflight = 0
        self._inflight_lock = threading.Lock()

    @property
    def hanging(self) -> bool:
        return not self.unhung.is_set()

    def enter(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        return self._inflight

    def snapshot(self) -> dict[str, Any]:
        return {"failing": self.failing, "hang": self.hanging, "cpu_percent": self.cpu.percent}


class Service:
    """A named service: business routes plus the common health/admin surface."""

    def __init__(self, name: str, routes: list[Route]) -> None:
        self.name = name
        self.version = os.environ.get("HMS_VERSION") or DEFAULT_VERSION
        self.pod = pod_id()
        self.state = ServiceState()
        self.routes = [
            route("GET", "/health", self._health),
            route("GET", "/", self._root),
            route("GET", "/admin", self._admin_state),
            route("POST", "/admin/health", self._admin_health),
            route("POST", "/admin/cpu", self._admin_cpu),
            route("POST", "/admin/hang", self._admin_hang),
            route("POST", "/admin/exit", self._admin_exit),
            route("GET", r"/delay/(?P<seconds>[0-9]+(?:\.[0-9]+)?)", self._delay),
            *routes,
        ]

    # -- common endpoints -------------------------------------------------

    def _health(self, req: Request) -> Response:
        if self.state.hanging:
            # Not counted as in-flight: a hung probe must not delay SIGTERM shutdown.
            self.state.leave()
            try:
                self.state.unhung.wait(HANG_SECONDS)
            finally:
                self.state.enter()
        body = {"status": "ok", "service": self.name, "pod": self.pod}
        if self.state.failing:
            body["status"] = "failing"
            return Response(503, body)
        return Response(200, body)

    def _root(self, req: Request) -> Response:
        return Response(200, {"service": self.name, "version": self.version, "pod": self.pod})

    def _delay(self, req: Request) -> Response:
        """A request that takes ``seconds`` (at most MAX_DELAY_S) to answer: a long call in flight."""
        seconds = float(req.params["seconds"])
        if seconds > MAX_DELAY_S:
            raise HttpError(400, f"delay: at most {MAX_DELAY_S:g} seconds", field="seconds")
        time.sleep(seconds)
        return Response(200, {"service": self.name, "pod": self.pod, "delayed_s": seconds})

    def _admin_state(self, req: Request) -> Response:
        return Response(200, {"service": self.name, "pod": self.pod, **self.state.snapshot()})

    def _admin_health(self, req: Request) -> Response:
        data = req.json()
        value = _arg(req, data, "failing")
        if value is None:
            raise HttpError(400, "missing required field: failing", field="failing")
        self.state.failing = parse_bool(value, "failing")
        return Response(200, {"pod": self.pod, **self.state.snapshot()})

    def _admin_cpu(self, req: Request) -> Response:
        data = req.json()
        value = _arg(req, data, "percent")
        if value is None:
            raise HttpError(400, "missing required field: percent", field="percent")
        self.state.cpu.set(parse_number(value, "percent", 0, 100))
        return Response(200, {"pod": self.pod, **self.state.snapshot()})

    def _admin_hang(self, req: Request) -> Response:
        data = req.json()
        value = _arg(req, data, "hang")
        hang = True if value is None else parse_bool(value, "hang")
        if hang:
            self.state.unhung.clear()
        else:
            self.state.unhung.set()
        return Response(200, {"pod": self.pod, **self.state.snapshot()})

    def _admin_exit(self, req: Request) -> Response:
        data = req.json()
        value = _arg(req, data, "code")
        code = 1 if value is None else int(parse_number(value, "code", 0, 255))
        # The handler answers first and then calls os._exit, so the caller sees a reply.
        return Response(200, {"pod": self.pod, "exiting": code}, {"X-HMS-Exit": str(code)})

    # -- dispatch ---------------------------------------------------------

    def dispatch(self, req: Request) -> Response:
        allowed: list[str] = []
        for r in self.routes:
            m = r.pattern.match(req.path)
            if not m:
                continue
            if r.method != req.method:
                allowed.append(r.method)
                continue
            req.params = m.groupdict()
            return r.handler(req)
        if allowed:
            methods = sorted(set(allowed))
            raise HttpError(405, f"method {req.method} not allowed", allow=methods)
        raise HttpError(404, f"no route for {req.path}")


class Records:
    """A pod's in-memory records (payments, messages), keyed by their id field; thread-safe.
    ``get`` of an unknown id is a 404 that names the field."""

    def __init__(self, id_field: str) -> None:
        self.id_field = id_field
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._items[record[self.id_field]] = record
        return record

    def get(self, key: str) -> dict[str, Any]:
        with self._lock:
            record = self._items.get(key)
        if record is None:
            raise HttpError(404, f"unknown {self.id_field}", field=self.id_field)
        return record


class PodHandler(BaseHTTPRequestHandler):
    """One pod's HTTP handler; ``_make_handler`` binds it to its ``Service``."""

    service: Service
    access_log = True
    # HTTP/1.1 keep-alive matters for a proxy in front of the pods; every reply sets Content-Length.
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections must not pin threads forever.
    timeout = 60

    def end_headers(self) -> None:
        # Here rather than in _send so error pages from BaseHTTPRequestHandler carry it too.
        self.send_header("X-HMS-Pod", self.service.pod)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.access_log:
            sys.stderr.write(f"{self.service.name} {self.service.pod} {self.address_string()} {format % args}\n")
            sys.stderr.flush()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, "bad Content-Length", field="Content-Length") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise HttpError(413, "body too large", field="body")
        return self.rfile.read(n)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                self.close_connection = True
                raise HttpError(400, "bad chunked encoding", field="body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise HttpError(413, "body too large", field="body")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send(self, resp: Response) -> None:
        payload = json.dumps(resp.body, separators=(",", ":")).encode() + b"\n"
        self.send_response(resp.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        if not hasattr(self, "_headers_buffer"):  # HTTP/0.9: no headers at all
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
            return
        # Headers and body in one write: a pod killed mid-reply sends all of it or nothing,
        # never headers without their body (which no proxy can retry once it has passed them on).
        self.send_header("X-HMS-Pod", self.service.pod)
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(payload)
        self.flush_headers()
        self.wfile.flush()

    def _handle(self) -> None:
        self.service.state.enter()
        try:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            try:
                body = self._read_body()
                method = "GET" if self.command == "HEAD" else self.command
                req = Request(method, url.path or "/", query, body)
                resp = self.service.dispatch(req)
            except HttpError as err:
                resp = Response(err.status, err.payload)
                if err.status == 405:
                    resp.headers["Allow"] = ", ".join(err.payload.get("allow", []))
            except Exception as exc:  # a demo service should answer 500, not drop the socket
                resp = Response(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            exit_code = resp.headers.get("X-HMS-Exit")
            if exit_code is not None:
                self.close_connection = True
            self._send(resp)
            if exit_code is not None:
                sys.stderr.write(f"{self.service.name} {self.service.pod} exiting with code {exit_code} (admin)\n")
                sys.stderr.flush()
                os._exit(int(exit_code))
        finally:
            self.service.state.leave()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


def _make_handler(service: Service) -> type[BaseHTTPRequestHandler]:
    access_log = os.environ.get("HMS_ACCESS_LOG", "1").strip().lower() not in _FALSE
    return type("Handler", (PodHandler,), {"service": service, "access_log": access_log,
                                           "server_version": service.name})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Load tests open dozens of connections at once; the default backlog of 5 drops them.
    request_queue_size = 128


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        sys.stderr.write(f"ignoring {name}={raw!r}: not a number\n")
        return None


def _exit_after_serving() -> None:
    """``HMS_EXIT_AFTER_S``: a pod that answers, then crashes (exit 3) this long after it starts serving."""
    exit_after = _env_float("HMS_EXIT_AFTER_S")
    if exit_after is not None:
        crash = threading.Timer(exit_after, os._exit, args=(3,))
        crash.daemon = True
        crash.start()


def run(service: Service) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    exit_at_start = _env_float("HMS_EXIT_AT_START")
    if exit_at_start is not None:
        # A crash-looping image: die before doing anything a probe could observe.
        sys.stderr.write(f"{service.name} {service.pod} HMS_EXIT_AT_START={int(exit_at_start)}: exiting\n")
        sys.stderr.flush()
        os._exit(int(exit_at_start))

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    # Installed before the startup delay so a slow-starting pod still stops at once.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    delay = _env_float("HMS_STARTUP_DELAY_S")
    if delay and delay > 0:
        sys.stderr.write(f"{service.name} {service.pod} HMS_STARTUP_DELAY_S={delay:g}: starting in {delay:g} s\n")
        sys.stderr.flush()
    if delay and delay > 0 and stop.wait(delay):
        return 0

    if os.environ.get("HMS_FAIL_HEALTH", "").strip().lower() in _TRUE:
        service.state.failing = True
    burn = _env_float("HMS_BURN_CPU")
    if burn:
        service.state.cpu.set(max(0.0, min(100.0, burn)))

    host = os.environ.get("HOST") or "0.0.0.0"
    port = int(os.environ.get("PORT") or 8080)
    server_cls = _Server
    if ":" in host:
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = server_cls((host, port), _make_handler(service))
    bound_port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    sys.stderr.write(
        f"{service.name} {service.version} pod={service.pod} listening on {host}:{bound_port} (pid {os.getpid()})\n"
    )
    sys.stderr.flush()
    _exit_after_serving()

    # Polling wait: the main thread must return to the interpreter for signal handlers to run.
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    service.state.cpu.set(0)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while service.state.inflight > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sys.stderr.write(f"{service.name} {service.pod} stopped\n")
    sys.stderr.flush()
    return 0


def main(service: Service) -> None:
    raise SystemExit(run(service))
