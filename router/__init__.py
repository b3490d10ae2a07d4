"""The traffic router: ``/<service>/<path>`` to the healthiest ready pod of that service.

The control side is ours — the endpoint feed (:mod:`router.feed`) and the policy
(:mod:`router.policy`); the data side is an engine: :mod:`router.builtin` (the default, on
:mod:`router.http1`) or :mod:`router.haproxy` (Debian's HAProxy driven through its Runtime API).
"""

from typing import Any

__all__ = ["ENGINES", "RouterProcess", "run", "serve"]


def __getattr__(name: str) -> Any:
    """Imported on first use: a builtin worker process (:mod:`router.workers`) starts without
    the Temporal client the server needs."""
    if name in __all__:
        import router.server

        return getattr(router.server, name)
    raise AttributeError(f"module 'router' has no attribute {name!r}")
