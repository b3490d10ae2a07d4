"""The generated HAProxy configuration: one frontend, the control backend and a pool of empty
backends that the Runtime API fills (HAProxy 2.6 cannot create backends at run time)."""

from __future__ import annotations

from pathlib import Path

# HAProxy logs every request while the router answers fewer than this many a second, then one in k
# (k = 1 + rate / this): our process reads at most about this many lines a second, whatever the load.
LOG_LINES_PER_S = 200
# Attempts after the first. A pod that just died looks idle to ``balance random(2)`` (no request
# in flight), so every attempt prefers it, and a retry avoids only the server it just tried: with
# 2 dead pods a request can meet them in turn. Each failure counts toward its server's
# ``error-limit 3`` (router/haproxy/plan.py), so after 6 failures both are DOWN and the next
# attempt reaches a live pod: a host losing 2 pods of one service fails no idempotent request.
RETRIES = 6
CONTROL_BACKEND = "be_control"
IDEMPOTENT = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")  # RFC 9110 9.2.2
# What the services map holds from the start: ``/-/*`` (first path segment ``-``, which no service
# name can be) goes to the control backend through the same lookup that routes a service.
CONTROL_MAP = f"- {CONTROL_BACKEND}\n"
# Server weights range 1..this. ``balance random`` draws from a tree holding 16 nodes per unit of
# weight: at HAProxy's full 256 it is 4,096 nodes per pod, walked twice per request and out of the
# CPU's caches; 32 keeps it small and still gives a slow pod a thirty-second share or less.
MAX_WEIGHT = 32
# A request's head must be whole within this many seconds of its first byte (the builtin engine's too).
HEAD_TIMEOUT_S = 15


def _q(s: str) -> str:
    """An HAProxy double-quoted string (lf-string)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(*, host: str, port: int, socket_path: Path, map_path: Path, landed_path: Path, control_socket: Path,
                  log_port: int, pool_size: int, connect_timeout_s: float = 1.0, read_timeout_s: float = 30.0,
                  balance: str = "random(2)", log_lines_per_s: int = LOG_LINES_PER_S) -> str:
    """The whole configuration: one frontend, the control backend and ``pool_size`` empty backends."""
    lines = (_head(socket_path, log_port, connect_timeout_s, read_timeout_s)
             + _frontend(host, port, map_path, landed_path, log_lines_per_s)
             + _control_backend(control_socket))
    for i in range(pool_size):
        lines += [
            "",
            f"backend be_{i}",
            f"    balance {balance}",
            "    option forwardfor",
            # The router's word on how and for which host the caller came, never the caller's.
            "    http-request set-header X-Forwarded-Proto http",
            "    http-request set-header X-Forwarded-Host %[req.hdr(host)] if { req.hdr(host) -m found }",
            "    http-request del-header X-Forwarded-Host unless { req.hdr(host) -m found }",
            # /<service>/<rest> -> /<rest> (the query kept): a field cut, no regex per request.
            "    http-request set-path /%[path,field(3,/,0)]",
            "    http-response set-header X-HMS-Pod %s",
        ]
    return "\n".join(lines) + "\n"


def _control_backend(control_socket: Path) -> list[str]:
    """Our control server, on a unix socket only the router's user reaches; it is told who asked
    in ``X-Forwarded-For``, set here (the caller's own is dropped): a router answers its pods'
    addresses to callers in ``router_inspect_from`` alone (router/control.py)."""
    return ["", f"backend {CONTROL_BACKEND}", "    no log",
            "    http-request set-header X-Forwarded-For %[src]",
            f"    server control {control_socket}"]


def _head(socket_path: Path, log_port: int, connect_timeout_s: float, read_timeout_s: float) -> list[str]:
    """``global`` and ``defaults``: the admin socket, the request log to our UDP port, timeouts,
    retries on another server, and JSON error bodies."""
    no_pod = _q('{"error":"no ready pod","service":"%[var(txn.svc)]",'
                '"reason":"no ready pod: none in the endpoint table, or all draining or failing"}')
    bad_gw = _q('{"error":"bad gateway: the pod failed","service":"%[var(txn.svc)]","reached_pod":true}')
    timeout = _q('{"error":"the pod did not answer in time","service":"%[var(txn.svc)]","reached_pod":true}')
    return [
        "global",
        f"    stats socket {socket_path} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        f"    log 127.0.0.1:{log_port} len 2048 format raw local0",
        "    maxconn 4000",  # about 2 file descriptors each: fits a default ulimit
        "",
        "defaults",
        "    mode http",
        "    log global",
        '    log-format "%b %s %ST %Ta %Tr %rc %[var(txn.lk)]"',
        f"    timeout connect {int(connect_timeout_s * 1000)}ms",
        "    timeout client 60s",
        f"    timeout http-request {HEAD_TIMEOUT_S}s",  # a head sent a byte at a time holds no slot for long
        f"    timeout server {int(read_timeout_s * 1000)}ms",
        "    timeout http-keep-alive 30s",
        "    option redispatch 1",
        f"    retries {RETRIES}",  # a lost host's pods: each retry goes to another server (redispatch)
        "    retry-on conn-failure empty-response response-timeout 502 503",
        f"    http-error status 503 content-type application/json lf-string {no_pod} hdr Retry-After 1",
        f"    http-error status 502 content-type application/json lf-string {bad_gw}",
        f"    http-error status 504 content-type application/json lf-string {timeout}",
    ]


def _frontend(host: str, port: int, map_path: Path, landed_path: Path, log_lines_per_s: int) -> list[str]:
    """The service is the first path segment, looked up in the runtime map, which also sends
    ``/-/*`` to the control backend (its first segment ``-`` is no service's name, see
    :data:`CONTROL_MAP`); ``/metrics`` goes there too. A service in the landed map (landed by a
    time slot, no ready pod) is answered 503 with ``Retry-After`` at its slot's end, as the
    builtin engine does. Every rule runs on every request: they are kept few, and each reads a
    variable or the path once."""
    unknown = _q('{"error":"unknown service","service":"%[var(txn.svc)]"}')
    until = "%[var(txn.landed),utime(%Y-%m-%dT%H:%M:%S+00:00)]"
    landed = _q(f'{{"error":"landed","service":"%[var(txn.svc)]","until":"{until}",'
                f'"reason":"landed by a time slot until {until}: no pod runs"}}')
    return [
        "",
        "frontend fe_router",
        f"    bind {host}:{port}",
        # Log one request in k, k = 1 + (request rate / LOG_LINES_PER_S); each line carries its k.
        f"    http-request set-var(txn.lk) fe_req_rate,div({log_lines_per_s}),add(1)",
        "    http-request set-log-level silent unless { rand,mod(txn.lk) -m int eq 0 }",
        # A request a pod took and dropped is sent again only when its method is idempotent (as
        # the builtin engine does): a payment POST that reached a pod is never replayed on another.
        # Connection failures (nothing sent) are still retried for every method.
        f"    http-request disable-l7-retry unless {{ method {' '.join(IDEMPOTENT)} }}",
        "    http-request set-var(txn.svc) path,field(2,/)",
        # One map lookup per request: its backend, which the 404, the landed check and the routing use.
        f"    http-request set-var(txn.be) var(txn.svc),map({map_path})",
        f"    http-request set-var(txn.be) str({CONTROL_BACKEND}) if {{ var(txn.svc) -m str metrics }} {{ path /metrics }}",
        # A caller's id is kept when it is one (1..128 bytes, as the builtin engine keeps), else replaced.
        "    http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id) -m len 1:128 }",
        "    http-request set-var(txn.rid) req.hdr(x-request-id)",
        "    http-response set-header X-Request-Id %[var(txn.rid)]",
        f"    http-request return status 404 content-type application/json lf-string {unknown} unless {{ var(txn.be) -m found }}",
        f"    http-request set-var(txn.landed) var(txn.svc),map({landed_path}) unless {{ var(txn.be) -m str {CONTROL_BACKEND} }}",
        "    http-request return status 503 content-type application/json"
        f' hdr Retry-After "%[var(txn.landed),http_date]" lf-string {landed} if {{ var(txn.landed) -m found }}',
        "    use_backend %[var(txn.be)]",
    ]
