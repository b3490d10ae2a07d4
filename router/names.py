"""What the router accepts as a service name, a pod id and a pod address (issue 19).

These names reach HAProxy's Runtime API (``;``-separated commands, one line each), map keys and
log lines: anything outside the rules is refused with a reason, never escaped and sent. Each
check returns ``None`` when the value is fine, else why it is not.
"""

from __future__ import annotations

import ipaddress
import re

SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a DNS-1123 label, as ServiceSpec.name
MAX_SERVICE_NAME = 63
# HAProxy's name characters (letters, digits, '-', '_', '.'), without its ':'; a pod id is a UUID.
SERVER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_SERVER_NAME = 128
HOST_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*")
MAX_HOST_NAME = 253
ADDRESS_CHARS = re.compile(r"[A-Za-z0-9.:\[\]-]+")  # ip_address() alone lets an IPv6 scope id hold anything


def _shown(value: object) -> str:
    """A refused value as a log may show it: quoted (newlines escaped) and cut short."""
    return repr(str(value)[:80])


def service_problem(name: object) -> str | None:
    if not isinstance(name, str) or len(name) > MAX_SERVICE_NAME or not SERVICE_NAME.fullmatch(name):
        return (f"service name {_shown(name)} is not a DNS-1123 label (lowercase letters, digits and '-', "
                f"at most {MAX_SERVICE_NAME})")
    return None


def pod_problem(pod: object) -> str | None:
    if not isinstance(pod, str) or len(pod) > MAX_SERVER_NAME or not SERVER_NAME.fullmatch(pod):
        return f"pod id {_shown(pod)} is not a server name (letters, digits, '-', '_', '.', at most {MAX_SERVER_NAME})"
    return None


def address_problem(address: object) -> str | None:
    """``host:port``: an IPv4 address, a bracketed IPv6 address or a host name, and a port 1-65535."""
    host, sep, port = str(address).rpartition(":")
    bad = f"address {_shown(address)} is not host:port"
    if not isinstance(address, str) or not ADDRESS_CHARS.fullmatch(address) or not sep or not port.isdigit():
        return bad
    if len(port) > 5 or not 0 < int(port) < 65536:
        return bad
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > MAX_HOST_NAME or not HOST_NAME.fullmatch(host):
            return bad
    return None
