"""The local stack of `hms up` and `hms demo`: the Temporal dev server, the worker, the demo services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.text import Text

from hms_mgmt import auth
from hms_mgmt.addresses import LOOPBACK, host_port
from hms_mgmt.cli.common import _add_cli_overrides, _cli_overrides, _settings, _signer
from hms_mgmt.cli.progress import deploy_with_progress as _deploy_with_progress
from hms_mgmt.cli.render import _pods_table, _short, _web_ui_url, err, out, shown
from hms_mgmt.config import Settings
from hms_mgmt.devserver import DevServer, port_open
from hms_mgmt.errors import HmsError, ServiceNotFound
from hms_mgmt.files import atomic_write, load_yaml_mapping, secure_state_dir
from hms_mgmt.models import ServiceSpec
from hms_mgmt.orchestrator import Orchestrator, load_spec

T = TypeVar("T")

EXAMPLE_FILES = ("hms-ach.yaml", "hms-frm.yaml", "hms-notify.yaml")
WORKER_STOP_TIMEOUT_S = 30.0
UNDEPLOY_TIMEOUT_S = 120.0
RECORDED_ADDRESS = "temporal-address.recorded"  # what `hms up` itself wrote to config.yaml: no one's choice


class _Stopper:
    """SIGINT/SIGTERM as events: the first asks to stop cleanly, the second to hurry."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()


@dataclass
class _Stack:
    server: DevServer
    settings: Settings
    orch: Orchestrator
    worker_task: asyncio.Task[None] | None
    router_url: str | None = None
    router_engine: str = "builtin"
    dashboard_url: str | None = None
    dashboard_sign_in: str | None = None  # the dashboard's link that signs a browser in as a viewer
    metrics_url: str | None = None
    listen: str = LOOPBACK  # `hms up --listen`: where Temporal, the Web UI, the router and the dashboard are
    run_node: bool = True  # False (`hms up --no-node`): the worker runs no pods here
    temporal_address: str = ""  # the dev server as others reach it (through a relay with --listen)


@dataclass
class Edge:
    """What `hms up` / `hms demo` serve besides Temporal and the worker (None: not served)."""

    router_port: int | None = None
    engine: str = "builtin"
    dashboard_port: int | None = None
    public_read: bool = False  # the dashboard's read with no token (`--public-read`)


async def _first(*aws: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Wait until the first of ``aws`` finishes; cancel the helpers this created."""
    futs = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in aws]
    done, pending = await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
    for f, a in zip(futs, aws, strict=True):
        if f in pending and f is not a:
            f.cancel()
    return done


@contextlib.asynccontextmanager
async def _local_stack(*, port: int, ui_port: int, headless: bool, run_worker: bool,
                       edge: Edge | None = None, listen: str = LOOPBACK, run_node: bool = True,
                       reuse: bool = False) -> AsyncIterator[_Stack]:
    """Temporal dev server + operator token + an in-process worker, the traffic router and the
    dashboard, all reached on ``listen``; torn down in reverse. Without ``run_node`` the worker is
    the control plane only: this host runs no pods."""
    from hms_mgmt.config import connect, temporal_tls

    settings = _settings()
    if temporal_tls(settings) is not False:
        raise HmsError(
            "`hms up` runs a local dev server without TLS, but the HMS_TEMPORAL_TLS_* or HMS_TEMPORAL_API_KEY "
            "settings ask for TLS: unset them, or run `hms worker` against your cluster instead"
        )
    secure_state_dir(settings.state_dir)
    server = DevServer(
        port=port, ui_port=ui_port, headless=headless, state_dir=settings.state_dir, namespace=settings.namespace,
        reuse=reuse, named=_names_server(settings.state_dir, port, listen),
    )
    await server.start()
    relays: list[asyncio.Server] = []
    try:
        address, ui_url = await _listen_on(listen, server, relays, port=port, ui_port=ui_port, headless=headless)
        if edge is not None and edge.router_port is not None and settings.routers == [
                f"http://{LOOPBACK}:{settings.router_port}"]:  # the feed goes where the router listens
            _add_cli_overrides(routers=[f"http://{host_port(listen, edge.router_port)}"])
        settings = _record_address(settings, address, ui_url)
        auth.ensure_local_operator(settings)
        client = await connect(settings)
        async with _in_process_worker(client, settings, run=run_worker, run_node=run_node) as task:
            stack = _Stack(server=server, settings=settings, orch=Orchestrator(client, settings), worker_task=task,
                           listen=listen, run_node=run_node, temporal_address=address)
            if task is not None and settings.metrics_port:
                stack.metrics_url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
            async with _edge(stack, client, edge or Edge()):
                yield stack
    finally:
        for relay in relays:
            relay.close()
        server.stop()


async def _listen_on(listen: str, server: DevServer, relays: list[asyncio.Server], *, port: int, ui_port: int,
                     headless: bool) -> tuple[str, str]:
    """(Temporal address, Web UI URL) as other hosts reach them. With ``hms up --listen`` the dev
    server stays on 127.0.0.1 and is relayed (hms_mgmt/relay.py says why); ``relays`` collects
    the relays for the caller to close."""
    if listen == LOOPBACK:
        return server.address, server.ui_url
    from hms_mgmt.relay import exposure_warning, start_relay

    if warning := exposure_warning(listen, port):
        err.print(Text(warning, style="yellow"))
    for p in [port] + ([] if headless else [ui_port]):
        try:
            relays.append(await start_relay(listen, p, server.host, p))
        except OSError as e:
            raise HmsError(f"cannot listen on {host_port(listen, p)}: {e}") from e
    return host_port(listen, port), f"http://{host_port(listen, ui_port)}"


def _record_address(settings: Settings, address: str, ui_url: str) -> Settings:
    """This server, for every Settings this command builds from now on (the worker's reloads
    included) and in the config file, so `hms status` in another shell with this state dir finds
    it; a Web UI URL set in the environment is kept (a proxy in front of the UI)."""
    ui_url = os.environ.get("HMS_WEB_UI_URL") or ui_url
    _add_cli_overrides(temporal_address=address, web_ui_url=ui_url)
    settings.write_config(temporal_address=address, web_ui_url=ui_url)
    atomic_write(settings.state_dir / RECORDED_ADDRESS, address + "\n", mode=0o600)
    return _settings()


@contextlib.asynccontextmanager
async def _in_process_worker(client: Any, settings: Settings, *, run: bool,
                             run_node: bool) -> AsyncIterator[asyncio.Task[None] | None]:
    """The worker as a task of this process (None without ``run``), stopped on the way out."""
    if not run:
        yield None
        return
    from worker.main import HmsWorker

    worker = HmsWorker(client, settings, node=run_node, settings_loader=settings.reload,
                       metrics=bool(settings.metrics_port))
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        if not task.done():
            with contextlib.suppress(Exception):
                await worker.stop()
        try:
            await asyncio.wait_for(task, WORKER_STOP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - report, and still stop the server
            err.print(Text(f"warning: the worker stopped with an error: {shown(str(e))}", style="yellow"))


@contextlib.asynccontextmanager
async def _edge(stack: _Stack, client: Any, edge: Edge) -> AsyncIterator[None]:
    """The router and the dashboard, in this process, on the stack's address (127.0.0.1 by default)."""
    router_task: asyncio.Task[None] | None = None
    async with contextlib.AsyncExitStack() as stop:
        if edge.router_port is not None:
            from router.server import serve as serve_router

            if not _port_free(edge.router_port, stack.listen):
                raise HmsError(f"port {edge.router_port} is taken: the router needs it (--router-port, or --no-router)")
            from hms_mgmt import tickets

            # The control key signs the local router's certificate (it enrols itself), made here
            # if the worker has not made it yet.
            tickets.ensure_control_key(stack.settings.state_dir)
            ready = asyncio.Event()
            router_task = asyncio.create_task(serve_router(stack.settings, port=edge.router_port, engine=edge.engine,
                                                           ready=ready, client=client, host=stack.listen))
            await _first(ready.wait(), router_task)
            if router_task.done():
                router_task.result()  # its error, say why
            stack.router_url = f"http://{host_port(stack.listen, edge.router_port)}"
            stack.router_engine = edge.engine

            async def stop_router() -> None:
                router_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await router_task

            stop.push_async_callback(stop_router)
        if edge.dashboard_port is not None:
            from dashboard import running_dashboard

            if not _port_free(edge.dashboard_port, stack.listen):
                raise HmsError(f"port {edge.dashboard_port} is taken: the dashboard needs it "
                               "(--dashboard-port, or --no-dashboard)")
            dash = await stop.enter_async_context(running_dashboard(
                client, stack.settings, port=edge.dashboard_port, host=stack.listen, public_read=edge.public_read,
                token=None if edge.public_read else _viewer_token(stack.settings)))
            stack.dashboard_url = dash.url
            stack.dashboard_sign_in = dash.sign_in_url
        yield


# --- hms up --reuse (issue 19): a server already on the port is used only if someone chose it -------


def _names_server(state_dir: Path, port: int, listen: str) -> bool:
    """Whether the operator named a Temporal server on ``port`` of this host on purpose: with
    HMS_TEMPORAL_ADDRESS, ``hms --address`` or config.yaml; not config.yaml's value that an
    earlier ``hms up`` recorded there itself (``RECORDED_ADDRESS``)."""
    config = state_dir / "config.yaml"
    from_file = load_yaml_mapping(config, what="setting to value").get("temporal_address") if config.exists() else None
    try:
        recorded = (state_dir / RECORDED_ADDRESS).read_text().strip()
    except OSError:
        recorded = None
    chosen = [os.environ.get("HMS_TEMPORAL_ADDRESS"), _cli_overrides.get("temporal_address"),
              from_file if from_file != recorded else None]
    here = {f"{h}:{port}" for h in (LOOPBACK, "localhost", listen)}
    return any(isinstance(a, str) and a.strip() in here for a in chosen)


# ---


def _viewer_token(settings: Settings) -> str | None:
    """A viewer's token for the dashboard's sign-in link (reading needs one: issue 19)."""
    try:
        return auth.issue_token(settings.state_dir, user=os.environ.get("USER") or "operator", role="viewer")
    except HmsError:
        return None


def _port_free(port: int, host: str = LOOPBACK) -> bool:
    return not port_open(host, port)


def _print_stack(stack: _Stack) -> None:
    s = stack.settings
    how = "reused" if stack.server.reused else "started"
    out.print(Text.assemble(("Temporal  ", "bold"), f"{stack.temporal_address} ({how}, namespace {s.namespace})"))
    if stack.server.headless and not stack.server.reused:
        out.print(Text.assemble(("Web UI    ", "bold"), "off (--headless)"))
    else:
        out.print(Text.assemble(("Web UI    ", "bold"), (s.web_ui_url, "cyan underline")))
    out.print(Text.assemble(("state     ", "bold"), str(s.state_dir)))
    if stack.worker_task is not None and not stack.run_node:
        out.print(Text.assemble(("worker    ", "bold"), f"control plane only (--no-node), task queue {s.task_queue}"))
    elif stack.worker_task is not None:
        from hms_mgmt.runtimes import resolve_runtime_name

        out.print(
            Text.assemble(
                ("worker    ", "bold"),
                f"node {s.node} at {s.node_address} ({resolve_runtime_name(s.runtime)} runtime), "
                f"task queue {s.task_queue}",
            )
        )
    if stack.router_url:
        out.print(Text.assemble(("router    ", "bold"), (f"{stack.router_url}/<service>/<path>", "cyan underline"),
                                f" ({stack.router_engine} engine)"))
    if stack.dashboard_url:
        out.print(Text.assemble(("dashboard ", "bold"), (stack.dashboard_url, "cyan underline")))
    if stack.dashboard_sign_in:
        out.print(Text.assemble(("sign in   ", "bold"), stack.dashboard_sign_in, (" (a viewer, for 8 hours)", "dim")),
                  soft_wrap=True)
    if stack.metrics_url:
        out.print(Text.assemble(("metrics   ", "bold"), stack.metrics_url))


def _check_alive(stack: _Stack, done: set[asyncio.Future[Any]], server_exit: asyncio.Future[Any]) -> None:
    if stack.worker_task is not None and stack.worker_task in done:
        exc = stack.worker_task.exception()
        raise HmsError(f"the worker stopped: {exc}" if exc else "the worker stopped")
    if server_exit in done:
        raise HmsError(f"the Temporal dev server exited; {stack.server.log_path}:\n{stack.server.log_tail()}")


async def _up(port: int, ui_port: int, headless: bool, run_worker: bool, edge: Edge | None = None, *,
              listen: str = LOOPBACK, run_node: bool = True, reuse: bool = False) -> None:
    stopper = _Stopper()
    stopper.install()
    async with _local_stack(port=port, ui_port=ui_port, headless=headless, run_worker=run_worker,
                            edge=edge if run_worker else None, listen=listen, run_node=run_node,
                            reuse=reuse) as stack:
        _print_stack(stack)
        out.print("ready: Ctrl-C stops " + ("the worker and " if run_worker else "") + "the server")
        server_exit = asyncio.ensure_future(stack.server.wait_exit())
        waits: list[Awaitable[Any]] = [stopper.stop.wait(), server_exit]
        if stack.worker_task is not None:
            waits.append(stack.worker_task)
        try:
            done = await _first(*waits)
            _check_alive(stack, done, server_exit)
        finally:
            server_exit.cancel()
        err.print("stopping ...")


# --- demo ----------------------------------------------------------------------------------


def _examples_dir() -> Path:
    for candidate in (Path.cwd() / "examples", Path(__file__).resolve().parents[2] / "examples"):
        if all((candidate / f).exists() for f in EXAMPLE_FILES):
            return candidate
    raise HmsError(f"the example specs ({', '.join(EXAMPLE_FILES)}) are not in ./examples: run from the checkout")


def _sign_images(settings: Settings, images: list[str]) -> list[str]:
    """Vouch for the example images so an image-trust gate lets them start."""
    from hms_mgmt.runtimes import make_runtime
    from hms_mgmt.runtimes.base import PodRuntimeError
    from hms_mgmt.trust import TrustStore, sign_from

    store = TrustStore(settings.state_dir)
    signer = _signer(settings)
    runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    signed = []
    try:
        for image in images:
            try:
                sign_from(store, runtime, image, signer=signer)
            except PodRuntimeError:
                continue  # not built here: the deploy will say so, with the fix
            signed.append(image)
    finally:
        runtime.close()
    return signed


async def _undeploy_all(orch: Orchestrator, names: list[str], stopper: _Stopper) -> None:
    async def one(name: str) -> None:
        try:
            final = await orch.undeploy(name, wait=True, timeout=UNDEPLOY_TIMEOUT_S)
        except ServiceNotFound:
            return
        out.print(f"undeployed {name}" + (f" ({final.phase})" if final is not None else ""))

    job = asyncio.ensure_future(asyncio.gather(*(one(n) for n in names), return_exceptions=True))
    done = await _first(job, stopper.hurry.wait())
    if job not in done:
        job.cancel()
        err.print(Text("warning: stopped waiting for the undeploy (second Ctrl-C)", style="yellow"))
        return
    for name, result in zip(names, job.result(), strict=True):
        if isinstance(result, BaseException):
            err.print(Text(f"warning: undeploy of {name} failed: {shown(str(result))}", style="yellow"))


async def _name_the_others(orch: Orchestrator, names: list[str]) -> None:
    """Services deployed into the demo's stack by someone else stay deployed (the demo undeploys
    its own): say which, and what becomes of their pods."""
    try:
        others = [st for st in await orch.list() if st.name not in names]
    except Exception as e:  # noqa: BLE001 - the stack is stopping anyway: say it, do not fail the exit
        err.print(Text(f"warning: could not list the other services: {shown(str(e))}", style="yellow"))
        return
    for st in others:
        err.print(Text(
            f"left deployed: {st.name} ({len(st.pods)} pod(s)), not one of the demo's: its pods keep running, "
            f"unsupervised until the next `hms demo` or `hms up` on {orch.settings.state_dir} takes them back; "
            f"`hms undeploy {st.name}` there removes them", style="yellow"))


def _sweep_leftovers(settings: Settings, names: list[str]) -> None:
    """The demo promises to leave nothing running; say so loudly if the undeploy did not."""
    from hms_mgmt.runtimes import make_runtime

    runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        left = [h for h in runtime.list() if h.service in names]
        for handle in left:
            runtime.stop(handle.pod_id, 0)
    finally:
        runtime.close()
    if left:
        err.print(
            Text(
                f"warning: {len(left)} pod(s) were still there after the undeploy and were stopped: "
                + ", ".join(f"{h.service}/{_short(h.pod_id)}" for h in left),
                style="yellow",
            )
        )


async def _demo_run(
    stack: _Stack,
    specs: list[ServiceSpec],
    stopper: _Stopper,
    server_exit: asyncio.Future[Any],
    *,
    exit_after: float | None,
    timeout: float,
) -> None:
    """Deploy, show, wait; returns early when interrupted (the caller undeploys either way)."""
    orch, settings = stack.orch, stack.settings
    assert stack.worker_task is not None
    names = [s.name for s in specs]
    out.print(f"deploying {', '.join(names)} ...")
    # Start all three before anything may interrupt: a start cancelled mid-RPC could still
    # create its workflow after our undeploy looked for it, and leave its pods running.
    started = await asyncio.gather(*(orch.deploy(s, timeout=timeout) for s in specs), return_exceptions=True)
    for result in started:
        if isinstance(result, BaseException):
            raise result
    if stopper.stop.is_set():
        err.print("interrupted: undeploying ...")
        return
    deploy = asyncio.ensure_future(_deploy_with_progress(orch, specs, timeout=timeout))
    done = await _first(deploy, stopper.stop.wait(), stack.worker_task, server_exit)
    if deploy not in done:
        deploy.cancel()
        with contextlib.suppress(BaseException):
            await deploy
        _check_alive(stack, done, server_exit)
        err.print("interrupted: undeploying ...")
        return
    deploy.result()
    statuses = [await orch.status(n) for n in names]
    out.print(_pods_table(statuses, title="pods"))
    for st in statuses:
        out.print(Text.assemble((f"{st.name:<12}", "bold"), (_web_ui_url(settings, st), "cyan underline")))
    all_url = f"{settings.web_ui_url.rstrip('/')}/namespaces/{settings.namespace}/workflows"
    out.print(Text.assemble(("all services ", "bold"), (all_url, "cyan underline")))
    if stack.router_url:
        out.print(Text.assemble(("try         ", "bold"), f"curl {stack.router_url}/{names[0]}/"))
    if stack.dashboard_url:
        out.print(Text.assemble(("dashboard   ", "bold"), (stack.dashboard_url, "cyan underline")))
    waits: list[Awaitable[Any]] = [stopper.stop.wait(), stack.worker_task, server_exit]
    if exit_after is not None:
        out.print(f"running for {exit_after:g} s, then undeploying (--exit-after)")
        waits.append(asyncio.sleep(exit_after))
    else:
        out.print("running: Ctrl-C undeploys the example services and stops")
    done = await _first(*waits)
    _check_alive(stack, done, server_exit)
    out.print("undeploying ...")


async def _demo(port: int, ui_port: int, headless: bool, exit_after: float | None, timeout: float,
                edge: Edge | None = None, *, reuse: bool = False) -> None:
    examples = _examples_dir()
    specs = [load_spec(examples / f) for f in EXAMPLE_FILES]  # a broken example fails before anything starts
    names = [s.name for s in specs]
    stopper = _Stopper()
    stopper.install()
    async with _local_stack(port=port, ui_port=ui_port, headless=headless, run_worker=True, edge=edge,
                            reuse=reuse) as stack:
        _print_stack(stack)
        assert stack.worker_task is not None
        server_exit = asyncio.ensure_future(stack.server.wait_exit())
        await asyncio.to_thread(_sign_images, stack.settings, [s.image for s in specs])
        try:
            await _demo_run(stack, specs, stopper, server_exit, exit_after=exit_after, timeout=timeout)
        finally:
            alive = not stack.worker_task.done() and not server_exit.done()
            server_exit.cancel()
            if alive:
                await _undeploy_all(stack.orch, names, stopper)
                await asyncio.to_thread(_sweep_leftovers, stack.settings, names)
                await _name_the_others(stack.orch, names)
            else:
                err.print(
                    Text(
                        "warning: cannot undeploy without the worker and server; pods are adopted by the next `hms up`",
                        style="yellow",
                    )
                )
    out.print("stopped: worker and Temporal dev server")


# --- commands --------------------------------------------------------------------------------
