"""The haproxy engine: our process owns an HAProxy instance and drives it with no reload.

HAProxy 2.6 (Debian) cannot create backends at run time, so the generated configuration holds
a pool of empty backends (``be_0`` .. ``be_<N-1>``, ``balance random(2)``); a service is given
one the first time the feed names it, through the runtime map ``services.map`` (``add map``),
which the frontend reads to choose the backend from the first path segment (a service landed
by a time slot is also in ``landed.map``, service -> the slot's end in epoch seconds, and the
frontend answers it itself: 503, ``Retry-After`` at that end, ``{"error": "landed", ...}``).
Everything after that goes through the Runtime API on a unix socket (``stats socket ... level admin``):

- a pod appears        ``add server be_N/<pod> ADDR check ... observe layer7 error-limit 3
                       on-error mark-down``, ``enable health``, ``enable server``;
- a pod drains         ``set server be_N/<pod> state drain`` (no new requests; in-flight ones finish);
- a pod is gone        ``set server ... state maint``, then ``del server`` once its connections closed;
- twice a second       ``set server ... weight N`` (1..32) from our score; the latency in it comes from
                       HAProxy's request log (each request's server response time), so a slow
                       pod gets less than HAProxy's connection count alone would give it.

Retries: ``retry-on conn-failure empty-response response-timeout 502 503`` with ``retries 6`` (see
:data:`router.haproxy.config.RETRIES`) and
``option redispatch 1`` (each retry on another server). HAProxy's request log goes to a UDP
socket of ours (``format raw``): per-request status and time feed ``/-/stats`` and ``/metrics``.
Under load it is sampled (one request in k, k written in the line and counted back), so our
process reads about ``LOG_LINES_PER_S`` lines a second however busy HAProxy is; per-pod request,
retry and 5xx counters that are exact at any rate come from ``show stat``.
``/-/*`` and ``/metrics`` are forwarded to our control server on an internal port.

The package, as observe -> plan -> act: :mod:`~router.haproxy.plan` (pure: what HAProxy carries +
the endpoint table -> Runtime API commands, names checked), :mod:`~router.haproxy.state` (our record
of HAProxy's servers, changed only by answers), :mod:`~router.haproxy.runtime` (the socket; sending
a plan), :mod:`~router.haproxy.process` and :mod:`~router.haproxy.config` (the process and its
configuration), :mod:`~router.haproxy.logs` and :mod:`~router.haproxy.metrics` (what it reports), and
:mod:`~router.haproxy.engine` (the loop that ties them).
"""

from __future__ import annotations

from router.haproxy.config import LOG_LINES_PER_S, render_config
from router.haproxy.engine import MAX_SAMPLES_PER_TICK, POOL_SIZE, TICK_S, HAProxyEngine, run_haproxy
from router.haproxy.plan import DRAIN_FORCE_S, SERVER_POOL, WEIGHT_MIN_CHANGE, Plan
from router.haproxy.process import FALLBACK_PATHS, INSTALL_HINT, haproxy_binary
from router.haproxy.runtime import RuntimeAPI, parse_stat
from router.haproxy.state import Backend, Command, Server

__all__ = [
    "DRAIN_FORCE_S", "FALLBACK_PATHS", "INSTALL_HINT", "LOG_LINES_PER_S", "MAX_SAMPLES_PER_TICK", "POOL_SIZE",
    "SERVER_POOL", "TICK_S", "WEIGHT_MIN_CHANGE", "Backend", "Command", "HAProxyEngine", "Plan", "RuntimeAPI",
    "Server", "haproxy_binary", "parse_stat", "render_config", "run_haproxy",
]
