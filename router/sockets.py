"""Cut this host's TCP connections to pods that left the endpoint table.

A host that lost power answers nothing, not even a reset: a request already sent to one of
its pods waits out the proxy's read timeout (30 s). Destroying the socket (``ss -K``, the
kernel's SOCK_DESTROY: root or CAP_NET_ADMIN, and a kernel with ``CONFIG_INET_DIAG_DESTROY``)
fails that request at once, and the proxy retries it on another pod (HAProxy: ``retry-on
empty-response``). Without the privilege nothing happens, and those requests wait as before.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

log = logging.getLogger("hms.router.sockets")

_refused = False  # said once: no privilege to destroy sockets here


async def destroy_connections(addresses: set[str]) -> None:
    """``ss -K dst ADDR`` for each ``host:port`` (best effort, never raises)."""
    global _refused
    ss = shutil.which("ss")
    if not addresses or ss is None:
        return
    for address in sorted(addresses):
        try:
            proc = await asyncio.create_subprocess_exec(ss, "-K", "dst", address, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 5)
        except (OSError, TimeoutError) as e:
            log.debug("ss -K dst %s: %s", address, e)
            continue
        if b"Operation not permitted" in err and not _refused:
            _refused = True
            log.warning("cannot cut connections to pods that left the table (needs CAP_NET_ADMIN): "
                        "a request in flight to a lost host waits out the read timeout")
