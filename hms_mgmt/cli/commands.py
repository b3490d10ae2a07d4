"""The `hms` commands: each a thin client of the orchestrator or of the local stack."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from hms_mgmt import auth, names
from hms_mgmt.cli import interrupt
from hms_mgmt.cli.common import (
    _cli_errors,
    _connect,
    _quiet_temporal_core,
    _run,
    _set_cli_overrides,
    _settings,
    _setup_logging,
    _signer,
    app,
)
from hms_mgmt.cli.dashboard_cmd import dashboard
from hms_mgmt.cli.dryrun_cmd import show_verdict, verdict_exit
from hms_mgmt.cli.node_cmd import node_app
from hms_mgmt.cli.output import Format, JsonAliasOpt, OutputOpt, chosen, show, show_item
from hms_mgmt.cli.progress import ProgressOpt, deploy_with_progress, plain_wanted, with_progress
from hms_mgmt.cli.render import (
    _phase,
    _print_outcome,
    _when,
    err,
    out,
    print_records,
    shown,
)
from hms_mgmt.cli.router_cmd import router_app, routers
from hms_mgmt.cli.schedule_cmd import schedule_app
from hms_mgmt.cli.secret_cmd import secret_app
from hms_mgmt.cli.stack import Edge, _demo, _up
from hms_mgmt.durations import format_duration
from hms_mgmt.errors import HmsError, SpecError
from hms_mgmt.files import secure_state_dir
from hms_mgmt.models import DryRunVerdict, ServiceSpec, ServiceStatus
from hms_mgmt.orchestrator import load_spec

T = TypeVar("T")


auth_app = typer.Typer(help="Keys and identity tokens.", no_args_is_help=True, rich_markup_mode=None)
image_app = typer.Typer(
    help="The image trust store: only signed images may start.", no_args_is_help=True, rich_markup_mode=None
)
rollout_app = typer.Typer(help="Rolling updates: progress, history, undo.", no_args_is_help=True,
                          rich_markup_mode=None)
app.add_typer(auth_app, name="auth")
app.add_typer(image_app, name="image")
app.add_typer(rollout_app, name="rollout")
app.add_typer(node_app, name="node")
app.add_typer(secret_app, name="secret")


@app.callback()
def main(
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="State directory (overrides HMS_STATE_DIR).")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Temporal host:port (overrides HMS_TEMPORAL_ADDRESS).")
    ] = None,
) -> None:
    """Deploy, watch and operate HMS micro-services on Temporal."""
    _set_cli_overrides(
        state_dir=state_dir.expanduser().resolve() if state_dir is not None else None,
        temporal_address=address or None,
    )


PortOpt = Annotated[int, typer.Option("--port", help="Temporal gRPC port (on 127.0.0.1, or --listen).")]
UiPortOpt = Annotated[int, typer.Option("--ui-port", help="Temporal Web UI port (on 127.0.0.1, or --listen).")]
HeadlessOpt = Annotated[bool, typer.Option("--headless", help="Start the dev server without its Web UI.")]
RouterPortOpt = Annotated[int | None, typer.Option("--router-port", help="Traffic router port on 127.0.0.1 "
                                                   "(default: HMS_ROUTER_PORT or 8000).")]
EngineOpt = Annotated[str, typer.Option("--engine", help="Router engine: builtin or haproxy.")]
DashPortOpt = Annotated[int | None, typer.Option("--dashboard-port", help="Dashboard port on 127.0.0.1 "
                                                 "(default: HMS_DASHBOARD_PORT or 8088).")]
NoRouterOpt = Annotated[bool, typer.Option("--no-router", help="Do not start the traffic router.")]
NoDashOpt = Annotated[bool, typer.Option("--no-dashboard", help="Do not start the dashboard.")]
PublicReadOpt = Annotated[bool, typer.Option("--public-read", help="The dashboard's read (fleet, events) open to "
                                             "whoever reaches its port, with no token.")]
ReuseOpt = Annotated[bool, typer.Option("--reuse", help="Use a server already on --port that this state dir did "
                                        "not start and its configuration does not name (refused without).")]


def _edge(router_port: int | None, engine: str, dashboard_port: int | None, no_router: bool,
          no_dashboard: bool, public_read: bool = False) -> Edge:
    from router.server import ENGINES

    if engine not in ENGINES:
        raise typer.BadParameter(f"choose one of {', '.join(ENGINES)}", param_hint="--engine")
    s = _settings()
    return Edge(router_port=None if no_router else (router_port or s.router_port), engine=engine,
                dashboard_port=None if no_dashboard else (dashboard_port or s.dashboard_port), public_read=public_read)


@app.command()
@_cli_errors
def up(
    port: PortOpt = 7233,
    ui_port: UiPortOpt = 8233,
    headless: HeadlessOpt = False,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Only the Temporal dev server.")] = False,
    router_port: RouterPortOpt = None,
    engine: EngineOpt = "builtin",
    dashboard_port: DashPortOpt = None,
    no_router: NoRouterOpt = False,
    no_dashboard: NoDashOpt = False,
    listen: Annotated[str, typer.Option(
        "--listen", help="The IP address Temporal, its Web UI, the router and the dashboard listen on "
        "(another host's nodes and routers reach this one there).")] = "127.0.0.1",
    no_node: Annotated[bool, typer.Option(
        "--no-node", help="Run no pods on this host: the control plane, router and dashboard only.")] = False,
    reuse: ReuseOpt = False,
    public_read: PublicReadOpt = False,
) -> None:
    """Run the local stack until Ctrl-C: Temporal dev server (an earlier `hms up`'s on this state
    dir is reused), a worker, the traffic router and the dashboard."""
    from hms_mgmt.addresses import check_address

    try:
        listen = check_address(listen)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--listen") from None
    _setup_logging(logging.INFO)
    _run(_up(port, ui_port, headless, not no_worker,
             _edge(router_port, engine, dashboard_port, no_router, no_dashboard, public_read), listen=listen, run_node=not no_node,
             reuse=reuse))


@app.command()
@_cli_errors
def demo(
    port: PortOpt = 7233,
    ui_port: UiPortOpt = 8233,
    headless: HeadlessOpt = False,
    exit_after: Annotated[float | None, typer.Option("--exit-after", help="Undeploy and stop after SECONDS.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the services to run.")] = 300.0,
    router_port: RouterPortOpt = None,
    engine: EngineOpt = "builtin",
    dashboard_port: DashPortOpt = None,
    no_router: NoRouterOpt = False,
    no_dashboard: NoDashOpt = False,
    reuse: ReuseOpt = False,
    public_read: PublicReadOpt = False,
) -> None:
    """`hms up`, then deploy hms-ach, hms-frm and hms-notify; Ctrl-C undeploys them and stops everything."""
    _setup_logging(logging.WARNING)
    _quiet_temporal_core()
    _run(_demo(port, ui_port, headless, exit_after, timeout,
               _edge(router_port, engine, dashboard_port, no_router, no_dashboard, public_read), reuse=reuse))


DockerHostOpt = Annotated[str | None, typer.Option(
    "--docker-host", help="This node's Docker Engine, e.g. unix:///run/docker-2.sock (default: DOCKER_HOST).")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPUs this node offers to pods.", min=0.01)]
MemoryOpt = Annotated[int | None, typer.Option("--memory-mb", help="Memory (MB) this node offers to pods.", min=1)]
MaxPodsOpt = Annotated[int | None, typer.Option("--max-pods", help="At most this many pods on this node.", min=0)]
LabelsOpt = Annotated[str | None, typer.Option("--labels", help="Node labels for node_selector: k=v,k2=v2.")]


@app.command()
@_cli_errors
def worker(
    node: Annotated[str | None, typer.Option("--node", help="This node's name (default: HMS_NODE or the host name).")] = None,
    no_control: Annotated[bool, typer.Option("--no-control", help="Run only this node's pod activities.")] = False,
    no_node: Annotated[bool, typer.Option("--no-node", help=(
        "Run only the control plane (workflows, control activities): no pods here. Beside a "
        "`--no-control` worker on the same host, the two use a core each."))] = False,
    runtime: Annotated[str | None, typer.Option("--runtime", help="auto | docker | process")] = None,
    docker_host: DockerHostOpt = None,
    cpus: CpusOpt = None,
    memory_mb: MemoryOpt = None,
    max_pods: MaxPodsOpt = None,
    labels: LabelsOpt = None,
    node_address: Annotated[str | None, typer.Option(
        "--address", help="This node's IP address: its pods publish or bind there and are reached there "
        "(default: HMS_NODE_ADDRESS or 127.0.0.1). `hms --address` before the command is Temporal's.")] = None,
) -> None:
    """Run a worker: workflows and scheduling, plus pod activities for this node, which it
    registers with the NodeRegistry and keeps alive with heartbeats."""
    # The worker re-reads settings (settings.reload()) on every scheduling call; the overrides
    # (this node, its runtime and capacity) are kept there too.
    from hms_mgmt import nodeid
    from worker.main import main as worker_main

    if no_control and no_node:
        raise SpecError("--no-control and --no-node: a worker runs the control plane, a node, or both")
    node_overrides = _node_options(docker_host, cpus, memory_mb, max_pods, labels)
    _setup_logging(logging.INFO)
    settings = _settings(node=node or None, runtime=runtime or None, node_address=node_address or None,
                         **node_overrides)
    # A host that joined with a token is a node only: the control worker (and its keys) stay on the control host.
    control = not no_control and not nodeid.is_joined(settings.state_dir)
    if no_node and not control:
        raise SpecError("--no-node: this host joined as a node, so it runs no control plane; "
                        "run the control worker on the control host")
    if control and not nodeid.has_control_key(settings.state_dir) and not _local_temporal(settings.temporal_address):
        # Neither joined nor a control plane, against another host's Temporal: making a control
        # plane of its own here would answer that cluster's control activities with other keys.
        raise nodeid.NotJoined(f"this host has not joined the control plane at {settings.temporal_address} "
                               "(no node certificate in its state directory): run `hms node join-token` on the "
                               "control host, then `hms node join TOKEN --name NAME --address ADDR` here")
    _run(worker_main(settings, control=control, node_worker=not no_node))


def _local_temporal(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]") or address
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


@app.command()
@_cli_errors
def deploy(
    file: Annotated[Path, typer.Argument(help="A service spec (YAML or JSON).")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the service is Running.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300.0,
    progress: ProgressOpt = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the admission verdict (access, approval, image, "
                                          "placement, changes, rollout plan) and start nothing. Exit 0 when it "
                                          "would be admitted.")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Deploy a service from a spec file."""
    spec = load_spec(file)  # a bad spec fails here, with no server needed
    plain_wanted(progress)  # a bad --progress fails before anything is sent
    if output is not Format.table and not dry_run:
        raise SpecError(f"-o {output.value} shows a dry run's verdict: add --dry-run (a deploy prints its progress)")
    if dry_run:
        verdict = _run(_dry_run(spec))
        show_verdict(verdict, output)
        raise typer.Exit(verdict_exit(verdict))

    async def go() -> None:
        orch = await _connect()
        if wait:
            [result] = await deploy_with_progress(orch, [spec], timeout=timeout, mode=progress)
            st = await orch.status(spec.name)
            if result.revision is not None:
                out.print(Text.assemble((spec.name, "bold"), f": rolled out revision {result.revision}"))
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
                out.print(f"  waiting for approval: {shown(st.pending_approval.reason)}")
                out.print(f"  decide with `hms approve {spec.name}` or `hms reject {spec.name}` (role gov_approver)")
        out.print(Text.assemble(("Web UI ", "bold"), (result.web_ui_url, "cyan underline")))

    _run(go())


async def _dry_run(spec: ServiceSpec) -> DryRunVerdict:
    return await (await _connect()).dry_run(spec)


@app.command()
@_cli_errors
def status(
    name: Annotated[str | None, typer.Argument(help="A service; without it, all services.")] = None,
    output: OutputOpt = Format.table,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep showing changes until Ctrl-C: redrawn on a "
                                        "terminal; otherwise a line (or a JSON object) per change.")] = False,
) -> None:
    """Services and their pods (-o json: ServiceStatus, or a list of them without NAME)."""

    async def go() -> None:
        from hms_mgmt.cli.watch import fetch, status_view, watch_status

        orch = await _connect()
        if watch:
            await watch_status(orch, name, output)
            return
        statuses = await fetch(orch, name)
        show(statuses if name is None else statuses[0], output,
             lambda: out.print(status_view(orch.settings, statuses, name)))

    try:
        _run(go())
    except KeyboardInterrupt:
        return  # the way to end --watch


@app.command()
@_cli_errors
def logs(
    service: Annotated[str, typer.Argument(help="The service.")],
    pod: Annotated[str | None, typer.Argument(help="A pod id, or a unique prefix of one (default: every pod, "
                                                   "each line prefixed with its pod and node).")] = None,
    tail: Annotated[int, typer.Option("--tail", help="How many of the last lines (0: all).")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print each new line, until the pod is "
                                                                "gone or Ctrl-C.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Print each line as the pod wrote it, control characters "
                                                    "included (for a tool that wants them; not for a terminal)."
                                      )] = False,
) -> None:
    """The last lines of a pod's log (every pod's, interleaved, without POD); -f follows them.
    Control characters a pod wrote are written out (ESC as \\x1b), unless --raw."""
    # A pod writes what it likes: on a terminal, escape sequences in its log would be obeyed.
    # The POD@NODE prefix is a pod id and a node name, which shown() leaves as they are.
    def echo(line: str) -> None:
        typer.echo(line if raw else shown(line))

    async def go() -> None:
        orch = await _connect()
        if not follow:
            for line in await orch.logs(service, pod, tail):
                echo(line)
            return
        async for line in orch.follow_logs(service, pod, tail):
            echo(line)
            sys.stdout.flush()

    try:
        _run(go())
    except KeyboardInterrupt:
        return  # the way to end -f


@app.command()
@_cli_errors
def undeploy(
    name: Annotated[str, typer.Argument(help="The service.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until every pod is stopped.")] = True,
    progress: ProgressOpt = "auto",
) -> None:
    """Stop a service's pods and end its workflow."""
    plain_wanted(progress)

    async def go() -> None:
        orch = await _connect()
        final = await with_progress(orch, [name], orch.undeploy(name, wait=wait), mode=progress, console=out) \
            if wait else await orch.undeploy(name, wait=False)
        if final is None:
            out.print(f"undeploying {name}")
        else:
            out.print(Text.assemble(f"undeployed {name}: ", _phase(final.phase)))

    _run(go())


@app.command()
@_cli_errors
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events as they are written.")] = False,
    service: Annotated[str | None, typer.Option("--service", help="Only this service's events.")] = None,
    type_: Annotated[list[str] | None, typer.Option("--type", help="Only events of this type (pod.started) or "
                                                    "family (pod. or pod.*); repeatable.")] = None,
    output: OutputOpt = Format.table,
) -> None:
    """What happened to the services and why, one line per event (-o json: JSON Lines)."""
    from hms_mgmt.cli.watch import event_line
    from hms_mgmt.events import read_events

    settings = _settings()
    try:
        # A Ctrl-C the interpreter swallowed (during imports, under load) still ends --follow.
        for ev in read_events(settings.state_dir, service=service, follow=follow, types=type_ or [],
                              stop=interrupt.interrupted.is_set):
            show_item(ev, output, lambda ev=ev: typer.echo(event_line(ev)))
    except KeyboardInterrupt:
        return  # the way to end --follow


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why; recorded with the decision.")]


@app.command()
@_cli_errors
def scale(
    name: Annotated[str, typer.Argument(help="The service.")],
    replicas: Annotated[int, typer.Argument(help="Desired number of pods.", min=0)],
    reason: ReasonOpt = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the service runs with N ready pods.")]
    = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300.0,
    progress: ProgressOpt = "auto",
) -> None:
    """Set a service's replicas by hand (within min..max of its spec)."""
    plain_wanted(progress)

    async def go() -> None:
        orch = await _connect()

        async def work() -> ServiceStatus:
            result = await orch.scale(name, replicas, reason=reason)
            return await orch.wait_for(name, timeout=timeout) if wait else result

        _print_outcome(f"scale {name} to {replicas}",
                       await with_progress(orch, [name], work(), mode=progress, console=out, totals={name: replicas}))

    _run(go())


PrintSignalOpt = Annotated[bool, typer.Option(
    "--print-signal",
    help="Do not send: print the signal input (a one-time proof naming the service, revision and spec hash) "
         "and the `temporal workflow signal` command, for the Temporal CLI or the Web UI's Send a signal form.")]
ValidOpt = Annotated[str, typer.Option("--valid", help="With --print-signal: how long the input stays usable "
                                                        "(at most 1h).")]


def _decide(kind: str, name: str, reason: str, print_signal: bool, valid: str) -> None:
    async def go() -> None:
        orch = await _connect()
        if not print_signal:
            _print_outcome(f"{kind} {name}", await (orch.approve if kind == "approve" else orch.reject)(
                name, reason=reason))
            return
        approval = await orch.approval(kind, name, reason=reason, ttl_s=auth.parse_ttl(valid))
        payload = json.dumps(approval.model_dump(include={"proof", "reason"}), separators=(",", ":"))
        s = orch.settings
        command = ["temporal", "workflow", "signal", "--address", s.temporal_address, "--namespace", s.namespace,
                   "--workflow-id", f"svc-{name}", "--name", kind, "--input", payload]
        typer.echo(payload)
        typer.echo(shlex.join(command))
        err.print(f"good once, for {name} as it awaits approval now, for {valid}: paste the first line as the "
                  f"input of a {kind!r} signal to svc-{name} (Web UI: Send a signal), or run the second")

    _run(go())


@app.command()
@_cli_errors
def approve(
    name: Annotated[str, typer.Argument(help="The service awaiting approval.")], reason: ReasonOpt = "",
    print_signal: PrintSignalOpt = False, valid: ValidOpt = "15m",
) -> None:
    """Approve a deployment waiting in AwaitingApproval (role gov_approver, not the requester)."""
    _decide("approve", name, reason, print_signal, valid)


@app.command()
@_cli_errors
def reject(
    name: Annotated[str, typer.Argument(help="The service awaiting approval.")], reason: ReasonOpt = "",
    print_signal: PrintSignalOpt = False, valid: ValidOpt = "15m",
) -> None:
    """Reject a deployment waiting in AwaitingApproval: no pod of it starts."""
    _decide("reject", name, reason, print_signal, valid)


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
    """Create the key pairs in the state directory (once): one signs images, the other tokens."""
    settings = _settings()
    path = auth.init_keys(settings.state_dir, force=force)
    out.print(f"image signing key: {path} (public: {path.with_name(auth.PUBLIC_KEY_FILE)})")
    out.print(f"token key:         {path.with_name(auth.TOKEN_KEY_FILE)} "
              f"(public: {path.with_name(auth.TOKEN_PUB_FILE)}; workers need only the public half)")


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
    """Issue a signed identity token (printed alone on stdout, for `export HMS_TOKEN=$(...)`).

    Only on the control host, by whoever can read its token key (<state>/keys/token.pem, 0600):
    without that file nothing can issue a token."""
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
    out.print(Text.assemble(("expires ", "bold"), f"{_when(identity.expires_at)} (in {format_duration(max(0.0, left))})"))


# --- images -----------------------------------------------------------------------------------


@image_app.command("sign")
@_cli_errors
def image_sign(
    image: Annotated[str, typer.Argument(help="Image reference, e.g. registry.gov/hms-ach:1.4.")],
    runtime: Annotated[str | None, typer.Option("--runtime", help="auto | docker | process")] = None,
) -> None:
    """Mark an image signed and safe, bound to its current content."""
    from hms_mgmt.runtimes import make_runtime
    from hms_mgmt.trust import TrustStore, sign_from

    settings = _settings(runtime=runtime)
    if not (auth.keys_dir(settings.state_dir) / auth.PRIVATE_KEY_FILE).exists():
        raise HmsError(f"no image signing key here ({auth.keys_dir(settings.state_dir) / auth.PRIVATE_KEY_FILE}): "
                       "images are signed on the control host, where `hms up` runs (its state directory), "
                       "and every node learns of it at each pod start (on a new single host, `hms up` or "
                       "`hms auth init` makes the keys first)")
    rt = make_runtime(settings.runtime, node=settings.node, state_dir=settings.state_dir)
    try:
        record = sign_from(TrustStore(settings.state_dir), rt, image, signer=_signer(settings))
    finally:
        rt.close()
    out.print(f"signed {record.image}")
    out.print(f"  content {record.content_id} ({rt.name} runtime)")
    out.print(f"  digest {record.repo_digest}" if record.repo_digest else
              "  digest - (not pushed to a registry: only nodes that hold this content can run it)")
    out.print(f"  by {record.signer} at {_when(record.signed_at)}")


@image_app.command("list")
@_cli_errors
def image_list(output: OutputOpt = Format.table) -> None:
    """The trust store's records (-o json: a list of TrustRecord)."""
    from hms_mgmt.trust import TrustStore

    records = TrustStore(_settings().state_dir).list()

    def table() -> None:
        print_records(("image", "content", "signer", "signed at"),
                      ((r.image, r.content_id[:19], r.signer, _when(r.signed_at)) for r in records),
                      empty="no signed images (sign one with `hms image sign IMAGE`)")

    show(records, output, table)


@image_app.command("revoke")
@_cli_errors
def image_revoke(image: Annotated[str, typer.Argument(help="Image reference.")]) -> None:
    """Remove an image's trust record: no new pod of it may start (heals and scale-ups included);
    services running it turn Degraded with the reason. Running pods are not killed."""
    from hms_mgmt.trust import TrustStore

    settings = _settings()
    if not TrustStore(settings.state_dir).revoke(image):
        raise HmsError(f"no trust record for {image}")
    out.print(f"revoked {image}")

    async def tell_services() -> list[str]:
        orch = await _connect(settings)
        told = []
        for st in await orch.list():
            if st.spec.image == image:
                # A hint: each service checks the trust store itself before it marks anything.
                await orch.client.get_workflow_handle(st.workflow_id).signal(names.S.IMAGE_REVOKED, image)
                told.append(st.name)
        return told

    try:
        told = _run(tell_services())
    except HmsError as e:
        err.print(Text(f"warning: services were not told ({shown(str(e))}); they learn at their next pod start",
                       style="yellow"))
        return
    if told:
        out.print(f"services running it, now Degraded: {', '.join(told)}")


# --- rollouts ---------------------------------------------------------------------------------


@rollout_app.command("status")
@_cli_errors
def rollout_status(name: Annotated[str, typer.Argument(help="The service.")], output: OutputOpt = Format.table) -> None:
    """The rolling update in progress, or the last one (-o json: RolloutStatus, null before any)."""

    async def go() -> None:
        st = await (await _connect()).status(name)
        r = st.rollout
        if output is not Format.table:
            show(r, output, lambda: None)
            return
        out.print(Text.assemble((st.name, "bold"), "  ", _phase(st.phase), f"  revision {st.revision}  {st.spec.image}"))
        out.print(f"  image id {st.image_id or '-'}")
        if r is None:
            out.print("  no rollout yet")
            return
        out.print(f"  rollout {r.from_revision} -> {r.to_revision}: {shown(r.state)}, {r.updated}/{r.desired} pods updated, "
                  f"started {_when(r.started_at)}")

    _run(go())


@rollout_app.command("history")
@_cli_errors
def rollout_history(name: Annotated[str, typer.Argument(help="The service.")], output: OutputOpt = Format.table) -> None:
    """Every revision: image, pinned content, who deployed it and when, how it ended (-o json: a
    list of RevisionRecord)."""

    async def go() -> None:
        records = await (await _connect()).rollout_history(name)
        table = Table()
        for col in ("revision", "image", "image id", "by", "at", "outcome", "reason"):
            table.add_column(col, no_wrap=col != "reason")
        for r in records:
            pinned = ", ".join(f"secret {ref.name} v{ref.version}" for ref in r.spec.secrets if ref.version)
            table.add_row(str(r.revision), r.spec.image, shown(r.image_id[:19]) or "-", shown(r.deployed_by) or "-",
                          _when(r.deployed_at), shown(r.outcome), shown("; ".join(x for x in (pinned, r.reason) if x)))
        show(records, output, lambda: out.print(table))

    _run(go())


@rollout_app.command("undo")
@_cli_errors
def rollout_undo(
    name: Annotated[str, typer.Argument(help="The service.")],
    to_revision: Annotated[int | None, typer.Option("--to-revision", help="Default: the one before.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it runs everywhere.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300.0,
    progress: ProgressOpt = "auto",
) -> None:
    """Roll back to an earlier revision and its pinned image (as a new revision)."""
    plain_wanted(progress)

    async def go() -> None:
        orch = await _connect()
        work = orch.rollback(name, to_revision, wait=wait, timeout=timeout)
        outcome = await (with_progress(orch, [name], work, mode=progress, console=out) if wait else work)
        what = "in place" if outcome.in_place else f"as revision {outcome.revision}"
        out.print(f"rolled back {name} {what}: {outcome.status.spec.image}")

    _run(go())



# --- nodes (issue 12): options of `hms worker --node`, and `hms nodes` -----------------------


def _node_options(docker_host: str | None, cpus: float | None, memory_mb: int | None, max_pods: int | None,
                  labels: str | None) -> dict[str, object]:
    """The node flags, as settings overrides (the worker's re-read settings keep them)."""
    from hms_mgmt.config import parse_labels

    values: dict[str, object] = {"docker_host": docker_host, "node_cpus": cpus, "node_memory_mb": memory_mb,
                                 "node_max_pods": max_pods}
    if labels is not None:
        try:
            values["node_labels"] = parse_labels(labels)
        except ValueError as e:
            raise SpecError(f"--labels: {e}") from None
    return {k: v for k, v in values.items() if v is not None}


@app.command()
@_cli_errors
def nodes(output: OutputOpt = Format.table, as_json: JsonAliasOpt = False) -> None:
    """The nodes pods may run on: capacity, use, pods and state (Ready, or Lost after a silence).
    -o json: a list of NodeView."""
    from hms_mgmt.nodes import list_nodes

    async def go():
        orch = await _connect()
        return await list_nodes(orch.client, orch.settings)

    views = _run(go())
    show(views, chosen(output, as_json), lambda: _nodes_table(views))


def _nodes_table(views: list) -> None:
    if not views:
        out.print("no nodes (start one with `hms worker --node NAME`)")
        return
    table = Table()
    for col in ("node", "address", "state", "runtime", "pods", "cpu", "memory MB", "labels", "services",
                "last heartbeat"):
        table.add_column(col, no_wrap=col not in ("services", "labels"))
    for v in views:
        style = {"Ready": "green", "Lost": "red", "Removed": "red"}.get(v.state, "yellow")
        table.add_row(
            v.spec.name,
            shown(v.spec.address),
            Text(shown(v.state), style=style),
            v.spec.runtime,
            f"{v.pods}/{v.spec.max_pods}",
            f"{v.cpu_used:g}/{v.spec.cpu:g}",
            f"{v.memory_used_mb}/{v.spec.memory_mb}",
            shown(",".join(f"{k}={val}" for k, val in sorted(v.spec.labels.items()))) or "-",
            shown(", ".join(f"{name} x{n}" for name, n in sorted(v.services.items()))) or "-",
            _when(v.last_heartbeat) if v.last_heartbeat else "-",
        )
    out.print(table)



@app.command("init")
@_cli_errors
def init_state(
    sign: Annotated[list[str] | None, typer.Option("--sign", help="Sign this image (repeatable).")] = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="auto | docker | process")] = None,
) -> None:
    """Make a state directory usable by another machine's client (docker-compose's init):
    keys, an ops_admin token and the Temporal address in its config.yaml, signed images."""
    from hms_mgmt.cli.stack import _sign_images

    settings = _settings(runtime=runtime)
    secure_state_dir(settings.state_dir)
    values = {k: v for k, v in (("temporal_address", os.environ.get("HMS_TEMPORAL_ADDRESS")),
                                ("web_ui_url", os.environ.get("HMS_WEB_UI_URL"))) if v}
    if values:
        settings.write_config(**values)
    auth.ensure_local_operator(settings)
    from hms_mgmt import tickets

    tickets.ensure_control_key(settings.state_dir)  # the local router enrols itself with it
    signed = _sign_images(settings, list(sign or []))
    missing = sorted(set(sign or []) - set(signed))
    out.print(f"state {settings.state_dir}: config.yaml with an ops_admin token; signed {len(signed)} image(s)")
    if missing:
        raise HmsError(f"cannot sign {', '.join(missing)}: not found by the {settings.runtime} runtime")


if __name__ == "__main__":
    app()


app.add_typer(router_app, name="router")
app.command("routers")(routers)
app.add_typer(schedule_app, name="schedule")
app.command()(dashboard)
