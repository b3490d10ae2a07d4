"""`hms node ...`: a host joins the control plane with a token, as Swarm and kubeadm hosts do
(``docker swarm join-token``, ``kubeadm token create --print-join-command``), and leaves it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
import yaml

from hms_mgmt import constants, names, nodeid
from hms_mgmt.cli.common import _cli_errors, _connect, _run, _settings
from hms_mgmt.cli.render import out
from hms_mgmt.errors import AccessDenied, HmsError

node_app = typer.Typer(help="Hosts: join one to the control plane with a token, or remove it.",
                       no_args_is_help=True, rich_markup_mode=None)


def _control_host(state_dir: Path) -> None:
    """A control host's state directory: its control key, or its identity-token key (`hms auth init`)."""
    from hms_mgmt import auth

    if not nodeid.has_control_key(state_dir) and not (auth.keys_dir(state_dir) / auth.TOKEN_KEY_FILE).exists():
        raise HmsError(f"{state_dir} holds no control plane key: run this on the control host "
                       "(where `hms up` runs), or point --state-dir / HMS_STATE_DIR at its state directory")


TtlOpt = Annotated[str, typer.Option("--ttl", help="How long the token may be used: 30m, 24h, 2d.")]
RotateOpt = Annotated[bool, typer.Option("--rotate", help="Invalidate every earlier join token of this role.")]


def print_join_token(role: str, ttl: str, rotate: bool) -> None:
    """Make a join token for ``role`` (node or router), print it last with the command to run."""
    from hms_mgmt.auth import parse_ttl

    settings = _settings()
    _control_host(settings.state_dir)
    token = nodeid.make_join_token(settings.state_dir, temporal_address=settings.temporal_address,
                                   task_queue=settings.task_queue, ttl_s=parse_ttl(ttl), rotate=rotate, role=role)
    fp = nodeid.pem_fingerprint(nodeid.control_public_pem(settings.state_dir))
    out.print(f"control plane at {settings.temporal_address}, key {fp[:23]}..., {role} token valid {ttl}"
              + (f" (earlier {role} tokens no longer work)" if rotate else ""), soft_wrap=True)
    out.print("On the new host run:", soft_wrap=True)
    out.print(f"  hms {role} join {token} --name NAME --address ADDR", soft_wrap=True, highlight=False)
    typer.echo(token)


@node_app.command("join-token")
@_cli_errors
def join_token(ttl: TtlOpt = "24h", rotate: RotateOpt = False) -> None:
    """Print a join token (the last line of the output) and the command a new host runs."""
    print_join_token("node", ttl, rotate)


_TLS_PATHS = ("tls_cert", "tls_key", "tls_ca")  # files: kept absolute in a joined host's config


def joined_tls(settings) -> dict[str, object]:
    """The Temporal TLS settings as given for the join, for the joined host's config (its worker
    connects alike): certificate and key paths made absolute, since the worker may start from
    another directory."""
    from hms_mgmt.config import TEMPORAL_TLS_SETTINGS

    return {k: str(Path(v).resolve()) if k in _TLS_PATHS and v else v
            for k in TEMPORAL_TLS_SETTINGS if (v := getattr(settings, k)) is not None}


def _write_node_config(state_dir: Path, values: dict[str, object]) -> Path:
    from hms_mgmt.config import CONFIG_FILE
    from hms_mgmt.files import atomic_write, load_yaml_mapping

    path = state_dir / CONFIG_FILE
    current = load_yaml_mapping(path, what="setting to value")
    current.update({k: v for k, v in values.items() if v is not None})
    atomic_write(path, yaml.safe_dump(current, sort_keys=True), mode=0o600)
    return path


async def _enrol(settings, token: nodeid.JoinToken, request: str):  # -> EnrolOutput
    from temporalio.client import WithStartWorkflowOperation
    from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

    from hms_mgmt.config import connect
    from hms_mgmt.wire import EnrolInput, EnrolOutput, NodeRegistryInput, RouterRegistryInput

    client = await connect(settings)
    if token.role == "router":
        workflow, wid, summary = names.ROUTER_REGISTRY_WORKFLOW, constants.router_registry_id(token.task_queue), \
            "the routers that take the endpoint feed"
        inp: object = RouterRegistryInput(lost_after_s=settings.node_lost_after_s, control_task_queue=token.task_queue)
    else:
        workflow, wid, summary = names.NODE_REGISTRY_WORKFLOW, constants.node_registry_id(token.task_queue), \
            "the nodes pods may run on"
        inp = NodeRegistryInput(lost_after_s=settings.node_lost_after_s, control_task_queue=token.task_queue)
    start = WithStartWorkflowOperation(
        workflow, inp, id=wid, task_queue=token.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=summary,
    )
    return await client.execute_update_with_start_workflow(names.NR.ENROL, EnrolInput(request=request),
                                                           start_workflow_operation=start, result_type=EnrolOutput)


def enrol_here(token: str, role: str, name: str | None, address: str | None, state_dir: Path | None,
               config: Callable[[str, str], dict[str, object]]) -> tuple[Path, str, str, Path]:
    """``hms node join`` / ``hms router join``: make this host's key for ``role``, have the control
    plane sign it (through Temporal), write the state directory. (state dir, name, address, config path)."""
    from hms_mgmt.addresses import check_address
    from hms_mgmt.files import atomic_write, private_dir

    parsed = nodeid.parse_join_token(token)
    if parsed.role != role:
        raise HmsError(f"this is a {parsed.role} join token: run `hms {parsed.role} join` with it, or print a "
                       f"{role} token with `hms {role} join-token` on the control host")
    overrides = {"state_dir": state_dir.expanduser().resolve() if state_dir else None,
                 "temporal_address": parsed.temporal_address}
    settings = _settings(**{k: v for k, v in overrides.items() if v is not None})
    name = name or settings.node
    address = check_address(address or (settings.node_address if role == "node" else settings.router_address))
    sdir = private_dir(settings.state_dir)
    if nodeid.has_control_key(sdir):
        raise HmsError(f"{sdir} is a control plane's state directory: its own {role}s need no token "
                       "(join another host, or give --state-dir)")
    key = nodeid.ensure_node_key(sdir, name, role)
    request = nodeid.enrol_request(parsed, node=name, address=address, public_key=nodeid.raw_public(key))
    answer = _run(_enrol(settings, parsed, request))
    pub = answer.control_pub.encode()
    got = nodeid.pem_fingerprint(pub)
    if got != parsed.control_fingerprint:
        raise AccessDenied(f"the control plane at {parsed.temporal_address} has key {got}, not the "
                           f"{parsed.control_fingerprint} the token names: not joined")
    (sdir / "keys").mkdir(exist_ok=True, mode=0o700)
    atomic_write(sdir / "keys" / "control.pub", pub, mode=0o644)
    claims = nodeid.open_cert(sdir, answer.cert, role)  # signed by that very key, for this key and name
    if claims["node"] != name or nodeid.pub_of(claims) != nodeid.raw_public(key) or claims["addr"] != address:
        raise AccessDenied(f"the certificate the control plane sent is not for this {role}'s key, name and address")
    atomic_write(nodeid.node_cert_path(sdir, name, role), answer.cert + "\n", mode=0o644)
    tls = joined_tls(settings)
    path = _write_node_config(sdir, {**tls, "temporal_address": parsed.temporal_address,
                                     "task_queue": parsed.task_queue, **config(name, address)})
    out.print(f"{role} {name} joined the control plane at {parsed.temporal_address} (address {address})")
    out.print(f"  key and certificate in {sdir / 'keys'}, settings in {path}"
              + (" (with the Temporal API key it joined with; the file is 0600)" if tls.get("api_key") else ""))
    return sdir, name, address, path


@node_app.command("join")
@_cli_errors
def join(
    token: Annotated[str, typer.Argument(help="The token `hms node join-token` printed on the control host.")],
    name: Annotated[str | None, typer.Option("--name", help="This node's name (default: the host name).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="This host's IP address, where its pods are "
                                                "reached (default: 127.0.0.1).")] = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="docker | process")] = None,
    cpus: Annotated[float | None, typer.Option("--cpu", "--cpus", help="CPUs offered to pods.")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="Memory offered to pods, MB.")] = None,
    max_pods: Annotated[int | None, typer.Option("--max-pods", help="Pods at most.")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="This node's state directory "
                                                   "(default: HMS_STATE_DIR or ~/.hms).")] = None,
) -> None:
    """Join this host to a control plane: make this node's key, have the control plane sign it
    into a node certificate (through Temporal), write this node's state directory. Then run
    `hms worker` here."""
    sdir, _, _, _ = enrol_here(token, "node", name, address, state_dir, lambda node, addr: {
        "node": node, "node_address": addr, "runtime": runtime, "node_cpus": cpus, "node_memory_mb": memory_mb,
        "node_max_pods": max_pods})
    out.print(f"  now run: HMS_STATE_DIR={sdir} hms worker" if os.environ.get("HMS_STATE_DIR") != str(sdir)
              else "  now run: hms worker", soft_wrap=True)


@node_app.command("remove")
@_cli_errors
def remove(name: Annotated[str, typer.Argument(help="The node.")]) -> None:
    """Revoke a node: its certificate is no longer accepted and its pods are replaced elsewhere,
    as a lost node's are. It may join again with a token made after this (`hms node join-token`)."""
    settings = _settings()
    _control_host(settings.state_dir)
    if not nodeid.revoke(settings.state_dir, name):
        raise HmsError(f"node {name} is not enrolled here (or was removed already)")

    async def tell() -> None:
        orch = await _connect(settings)
        await orch.client.get_workflow_handle(constants.node_registry_id(settings.task_queue)).signal(
            names.NR.REMOVE, name)

    _run(tell())
    out.print(f"removed node {name}: its certificate is revoked; its pods are replaced on other nodes")
