"""One Temporal runtime and one event-loop thread per process, shut down in order at exit.

Why this exists: the SDK's Rust core runs its own threads. When a ``Client`` (or the default
``Runtime``) is still alive when the interpreter finalizes — a local kept alive by a reference
cycle, a module global — it is dropped during finalization, and a core thread that then
touches Python aborts the process (``Fatal Python error: PyGILState_Release ... finalizing``,
SIGABRT or a segfault; about 1 short-lived script in 5 on these machines). So every client this
package makes uses the runtime owned here, and an ``atexit`` hook — which runs while the
interpreter is still whole — drops the clients, collects garbage, stops the loop thread and
drops the runtime. Nothing of Temporal's is left for finalization to free.

The synchronous API (``orchestrator.deploy`` ...) runs its coroutines on the loop thread, so it
works the same from plain scripts, from threads, and from code that already runs an event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import gc
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from temporalio.client import Client
    from temporalio.runtime import Runtime

    from hms_mgmt.config import Settings

T = TypeVar("T")

_lock = threading.Lock()
_runtime: Runtime | None = None
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_clients: dict[tuple[Any, ...], Client] = {}
_registered = False


def runtime() -> Runtime:
    """The process's Temporal runtime (created on first use, dropped at exit)."""
    global _runtime
    with _lock:
        _register_shutdown()
        if _runtime is None:
            from temporalio.runtime import Runtime, TelemetryConfig

            _runtime = Runtime(telemetry=TelemetryConfig())
        return _runtime


def set_runtime(new: Runtime) -> None:
    """Use ``new`` for clients made from now on (the CLI quiets the core's logging this way)."""
    global _runtime
    with _lock:
        _register_shutdown()
        _runtime = new


def _register_shutdown() -> None:
    global _registered
    if not _registered:
        atexit.register(shutdown)
        _registered = True


def _key(settings: Settings) -> tuple[Any, ...]:
    from hms_mgmt.config import TEMPORAL_TLS_SETTINGS

    return (settings.temporal_address, settings.namespace, *(getattr(settings, f) for f in TEMPORAL_TLS_SETTINGS))


def _loop_thread() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        _register_shutdown()
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            # A daemon thread: the interpreter does not wait for it before running our atexit hook,
            # which stops it in order.
            thread = threading.Thread(target=loop.run_forever, name="hms-temporal-client", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


async def shared_client(settings: Settings) -> Client:
    """A client for ``settings`` on the loop thread, made once and reused by every sync call."""
    from hms_mgmt.config import connect

    key = _key(settings)
    client = _clients.get(key)
    if client is None:
        client = await connect(settings)
        _clients[key] = client
    return client


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the loop thread and return its result (or raise its error)."""
    loop = _loop_thread()
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise
    except concurrent.futures.CancelledError as e:
        raise asyncio.CancelledError() from e


def iterate(agen: AsyncIterator[T]) -> Iterator[T]:
    """Iterate ``agen`` on the loop thread, one item per step; stopping early (``break``,
    Ctrl-C, ``close()``) closes it there."""
    it = agen.__aiter__()

    async def step() -> tuple[bool, T | None]:
        try:
            return True, await it.__anext__()
        except StopAsyncIteration:
            return False, None

    async def close() -> None:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()

    try:
        while True:
            more, item = run(step())
            if not more:
                return
            yield item  # type: ignore[misc]
    finally:
        run(close())


def shutdown() -> None:
    """Drop every client, stop the loop thread, drop the runtime — before finalization starts."""
    global _loop, _thread, _runtime
    loop, thread = _loop, _thread
    if loop is not None and thread is not None and thread.is_alive():

        async def drop_clients() -> None:
            _clients.clear()
            gc.collect()

        try:
            asyncio.run_coroutine_threadsafe(drop_clients(), loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down regardless
            _clients.clear()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()
    _clients.clear()
    _loop = _thread = None
    _runtime = None
    gc.collect()
