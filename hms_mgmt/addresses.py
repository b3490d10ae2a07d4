"""Where a node's pods are reached and where the stack listens: IP addresses, checked once.

A node's address is what its pods publish or bind on and what goes into their endpoints, so a
router on another host dials that host and not its own loopback. It must be an address a peer
can dial: an IP literal, not a name (a name can resolve differently on each host) and not the
unspecified ``0.0.0.0`` / ``::`` (listening everywhere is not an address to dial).
"""

from __future__ import annotations

import ipaddress

LOOPBACK = "127.0.0.1"


def check_address(value: str) -> str:
    """``value`` as a canonical IP address, or ValueError saying why it is not one to dial."""
    text = str(value).strip()
    try:
        ip = ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (e.g. 10.0.0.5 or 127.0.0.1)") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{value!r} cannot be dialled: give the host's own address (e.g. 10.0.0.5)")
    return str(ip)


def host_port(address: str, port: int) -> str:
    """``10.0.0.5:8080``, ``[fd00::5]:8080``: an endpoint as routers and probes dial it."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


def within(address: str, networks: list[str] | tuple[str, ...]) -> bool:
    """Whether ``address`` (a peer's, as a socket gives it; an IPv4-mapped IPv6 address counts as
    its IPv4 one) lies in one of ``networks``. Anything that is not an address lies in none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)
