"""The traffic router: ``/<service>/<path>`` to the healthiest ready pod of that service.

The control side is ours — the endpoint feed (:mod:`router.feed`) and the policy
(:mod:`router.policy`); the data side is an engine: :mod:`router.builtin` (aiohttp, the default)
or :mod:`router.haproxy` (Debian's HAProxy driven through its Runtime API).
"""

from router.server import ENGINES, RouterProcess, run, serve

__all__ = ["ENGINES", "RouterProcess", "run", "serve"]
