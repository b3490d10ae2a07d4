"""Configuration: one ``Settings`` object, built once and handed down.

Sources, highest first: keyword arguments (the CLI's flags), ``HMS_*`` environment variables,
``<state_dir>/config.yaml`` (the same keys in lower case without the prefix, e.g.
``temporal_address: ...``, plus ``nodes:``, a list of node specs), then the defaults. The state
directory itself comes from the ``state_dir`` argument, else ``HMS_STATE_DIR``, else ``~/.hms``.

Code that must see configuration changes while it runs (the worker's Scheduler picks up new
nodes from config.yaml) calls ``settings.reload()``, which reads the sources again with the
same keyword arguments; nothing writes ``os.environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AliasChoices, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from hms_mgmt import constants
from hms_mgmt.addresses import LOOPBACK, LOOPBACK_NETWORKS, check_address
from hms_mgmt.errors import ConfigError
from hms_mgmt.files import atomic_write, load_yaml_mapping, private_dir
from hms_mgmt.models import NodeSpec

if TYPE_CHECKING:  # the runtimes package (and its event sink) only when a worker asks for pod limits
    from hms_mgmt.runtimes.base import PodLimits

log = logging.getLogger("hms.config")

ENV_PREFIX = "HMS_"
CONFIG_FILE = "config.yaml"
CPU_LIMIT_OVERCOMMIT = 8

# The environment ``Settings.from_env(env=...)`` reads instead of os.environ (for the duration of
# one construction only).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("hms_settings_environ", default=None)


def default_state_dir() -> Path:
    return Path.home() / ".hms"


def default_node_name() -> str:
    """This host's name as a node name (a DNS label), as Swarm and Kubernetes name nodes."""
    import re
    import socket

    label = socket.gethostname().split(".")[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:63].strip("-")
    return label or "local"


class _EnvSource(EnvSettingsSource):
    """``HMS_*`` variables from os.environ, or from the mapping ``from_env(env=...)`` was given."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        if environ is None:
            return super()._load_env_vars()
        return {
            (k if self.case_sensitive else k.lower()): v
            for k, v in environ.items()
            if not (self.env_ignore_empty and v == "")
        }


class _YamlSource(YamlConfigSettingsSource):
    """``<state_dir>/config.yaml``, read with the one YAML loader (errors name the file)."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = load_yaml_mapping(file_path, what="setting to value (e.g. 'temporal_address: host:7233')")
        if "state_dir" in data:
            raise ConfigError(f"{file_path}: state_dir cannot be set in the file that lives in it; "
                              "use HMS_STATE_DIR or --state-dir")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # HMS_TOKEN= means unset, as it always did
        extra="forbid",  # a misspelt key in config.yaml is an error, not silently ignored
        validate_by_name=True,
        validate_by_alias=True,
    )

    temporal_address: str = constants.DEFAULT_TEMPORAL_ADDRESS
    namespace: str = constants.DEFAULT_NAMESPACE
    # The Temporal connection's TLS (see temporal_tls()). None: on when any setting below asks
    # for it; True: on, with the system's roots unless tls_ca says otherwise; False: plaintext.
    temporal_tls: bool | None = None
    # Five fields whose variable is not HMS_<FIELD>.
    tls_cert: str | None = Field(default=None, validation_alias=AliasChoices("HMS_TEMPORAL_TLS_CERT"))
    tls_key: str | None = Field(default=None, validation_alias=AliasChoices("HMS_TEMPORAL_TLS_KEY"))
    tls_ca: str | None = Field(default=None, validation_alias=AliasChoices("HMS_TEMPORAL_TLS_CA"))
    tls_server_name: str | None = Field(default=None, validation_alias=AliasChoices("HMS_TEMPORAL_TLS_SERVER_NAME"))
    api_key: str | None = Field(default=None, validation_alias=AliasChoices("HMS_TEMPORAL_API_KEY"), repr=False)
    temporal_connect_timeout_s: float = Field(default=10.0, gt=0)
    runtime: Literal["auto", "docker", "process"] = "auto"
    state_dir: Path = Field(default_factory=default_state_dir)
    token: str | None = Field(default=None, repr=False)
    task_queue: str = constants.CONTROL_TASK_QUEUE
    node_queue_prefix: str = constants.NODE_TASK_QUEUE_PREFIX
    node: str = Field(default_factory=default_node_name)  # HMS_NODE; default: the host name
    node_max_pods: int = 64
    capacity_retry_max_s: float = 30.0
    watch_max_s: float = 1800.0
    history_threshold: int | None = None
    nodes: list[dict[str, Any]] = Field(default_factory=list)
    web_ui_url: str = f"http://localhost:{constants.DEFAULT_UI_PORT}"
    event_webhook: str | None = None  # one more webhook URL (kept from before `webhooks`)
    webhooks: Annotated[list[str], NoDecode] = Field(default_factory=list)  # env: comma-separated
    webhook_secret: str | None = Field(default=None, repr=False)  # HMAC key; default: <state_dir>/keys/webhook.key
    metrics_port: int | None = 9464  # the worker's Prometheus /metrics on 127.0.0.1; 0 turns it off
    router_port: int = constants.DEFAULT_ROUTER_PORT
    router_procs: int | None = Field(default=None, ge=1)  # the builtin engine's processes; default: one per CPU
    # This router's name and address (``hms router join --name/--address`` writes them; default:
    # ``<host name>-<port>`` and where it listens).
    router_name: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    router_address: str = LOOPBACK
    # Who may read a router's /-/table, /-/stats and /metrics without the control plane's signature
    # (pod addresses and traffic figures): these networks, comma-separated. Default: loopback only.
    router_inspect_from: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(LOOPBACK_NETWORKS))
    dashboard_port: int = constants.DEFAULT_DASHBOARD_PORT
    # This worker's node (``hms worker --node``) and the NodeRegistry's timing.
    docker_host: str | None = None  # e.g. unix:///run/docker-2.sock: the node's own Docker Engine
    node_cpus: float | None = None  # CPUs offered to pods (default: cores x CPU_LIMIT_OVERCOMMIT)
    node_memory_mb: int | None = None  # default: the machine's memory
    node_labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)  # HMS_NODE_LABELS=zone=a,disk=ssd
    # Where this node's pods are reached (``hms worker --address``): its own IP on a network of hosts.
    node_address: str = LOOPBACK
    # The node's log stream (``hms logs -f``) listens on node_address:log_port; 0 picks a free port
    # (the node advertises it in its registration), -1 serves none.
    log_port: int = Field(default=0, ge=-1, le=65535)
    # A node heartbeats every node_heartbeat_s; silent for node_lost_after_s, it is Lost and its
    # pods are replaced elsewhere (README "Losing a host"). Keep the grace at 3 heartbeats or more.
    node_heartbeat_s: float = Field(default=2.0, gt=0, description="seconds between a node's heartbeats")
    node_lost_after_s: float = Field(default=6.0, gt=0, description="a node silent this long is Lost")
    # A pod whose service has no running ServiceWorkflow (terminated, ended, never there) is removed
    # by its node this long after the node first saw it so (worker/nodes.py).
    orphan_grace_s: float = Field(default=60.0, gt=0)
    # How long a workflow task waits for the control worker's sticky queue before it goes to the
    # control queue (worker/main.py: why 1 s and not the SDK's 10 s).
    sticky_timeout_s: float = Field(default=1.0, gt=0, le=60)
    sweep_on_exit: bool = False  # the worker stops its node's pods when it stops (docker-compose down)

    @field_validator("node_labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return parse_labels(v) if isinstance(v, str) else v

    @field_validator("node_address", "router_address")
    @classmethod
    def _node_address(cls, v: str) -> str:
        return check_address(v)

    # Deprecated: routers register themselves (RouterRegistry). URLs here also get the feed
    # (``POST <url>/-/feed``) and drain questions; their answers count only if signed by an
    # enrolled router. Default: the local one. NoDecode: HMS_ROUTERS is comma-separated text.
    routers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # What this node imposes on every pod, whatever its spec says (SECURITY.md).
    pod_memory_mb: int = Field(default=512, ge=16, description="memory limit of a pod whose spec sets none")
    pod_pids_limit: int = Field(default=256, ge=16, description="processes and threads per pod")
    pod_nofile_limit: int = Field(default=4096, ge=64, description="open files per process-pod process")
    pod_firewall: bool = Field(default=True, description="process pods of a root worker may not connect to the "
                               "control plane's ports (iptables; hms_mgmt/runtimes/podnet.py)")
    pod_user: str = Field(default="auto", description="process pods run as: auto (when the worker is root, a uid of "
                          "its own per pod, from pod_uid_base/pod_uid_count), a user name, or 'worker' for the "
                          "worker's own user")
    # The per-pod uids (pod_user: auto, root worker): above every 16-bit id (system, regular, systemd's
    # DynamicUser 61184-65519, nobody), useradd's subordinate ids (/etc/subuid: 100000-600100000) and
    # systemd-nspawn's container ranges (524288-1879048191); below systemd's foreign range (2147352576)
    # and 2^31 (tools that take uids as signed ints). No /etc/passwd entry is needed to run as a number.
    pod_uid_base: int = Field(default=1_900_000_000, ge=65_536, le=2**31 - 2,
                              description="first uid of the range process pods get a uid of their own from")
    pod_uid_count: int = Field(default=65_536, ge=1, description="how many uids that range holds (at most as many "
                               "process pods run at once on this host, all nodes and workers together)")

    @field_validator("router_inspect_from", mode="before")
    @classmethod
    def _networks_from_text(cls, v: Any) -> Any:
        """``HMS_ROUTER_INSPECT_FROM=127.0.0.0/8,10.0.5.7`` (an address alone is one host)."""
        return [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else v

    @field_validator("router_inspect_from")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for net in v:
            try:
                out.append(str(ipaddress.ip_network(net, strict=False)))
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network (like 10.0.5.0/24) nor an address") from None
        return out

    @field_validator("routers", "webhooks", mode="before")
    @classmethod
    def _urls_from_text(cls, v: Any) -> Any:
        """``HMS_ROUTERS=http://a:8000,http://b:8000`` (an empty string means none but the default)."""
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @model_validator(mode="after")
    def _heartbeat_within_grace(self) -> Settings:
        if self.node_lost_after_s < 2 * self.node_heartbeat_s:
            raise ValueError(f"node_lost_after_s ({self.node_lost_after_s:g}) must be at least twice "
                             f"node_heartbeat_s ({self.node_heartbeat_s:g}): one late heartbeat would lose the node")
        return self

    @model_validator(mode="after")
    def _pod_uid_range(self) -> Settings:
        last = self.pod_uid_base + self.pod_uid_count - 1
        if last > 2**31 - 2:
            raise ValueError(f"pod_uid_base + pod_uid_count - 1 ({last}) must be at most {2**31 - 2}: uids from 2^31 "
                             "on break tools that take them as signed ints")
        return self

    @model_validator(mode="after")
    def _default_router(self) -> Settings:
        if not self.routers:
            self.routers = [f"http://127.0.0.1:{self.router_port}"]
        return self

    # What this object was built from, so reload() reads the same sources again.
    _overrides: dict[str, Any] = PrivateAttr(default_factory=dict)
    _environ: Mapping[str, str] | None = PrivateAttr(default=None)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(f"invalid configuration: {_describe(e)}") from e
        self._overrides = dict(values)
        self._environ = _ENVIRON.get()
        _warn_unknown_env(os.environ if self._environ is None else self._environ)

    def webhook_urls(self) -> list[str]:
        """Every webhook events go to: ``webhooks`` plus ``event_webhook``."""
        urls = list(self.webhooks)
        if self.event_webhook and self.event_webhook not in urls:
            urls.append(self.event_webhook)
        return urls

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _EnvSource(settings_cls)
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        state_dir = init_kwargs.get("state_dir") or env.env_vars.get(f"{ENV_PREFIX}STATE_DIR".lower())
        yaml_file = Path(state_dir or default_state_dir()).expanduser() / CONFIG_FILE
        return (init_settings, env, _YamlSource(settings_cls, yaml_file=yaml_file))

    @field_validator("state_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default: os.environ) and the config file, with ``overrides``
        (``None`` values are ignored: an unset CLI flag) on top."""
        with _reading_environ(env):
            return cls(**{k: v for k, v in overrides.items() if v is not None})

    def reload(self) -> Settings:
        """The same sources read again (config.yaml may have changed), with the same overrides."""
        with _reading_environ(self._environ):
            return type(self)(**self._overrides)

    def node_specs(self) -> list[NodeSpec]:
        """The nodes pods may be placed on: from the config file, else this machine."""
        if self.nodes:
            specs = []
            for raw in self.nodes:
                raw = dict(raw)
                raw.setdefault("task_queue", constants.node_task_queue(raw.get("name", ""), self.node_queue_prefix))
                try:
                    specs.append(NodeSpec(**raw))
                except ValidationError as e:
                    raise ConfigError(f"invalid node in config: {e}") from e
            return specs
        return [self.this_node()]

    def this_node(self, runtime: str | None = None) -> NodeSpec:
        """The node this worker serves: its ``nodes:`` entry if listed, else from the node flags."""
        for raw in self.nodes:
            if raw.get("name") == self.node:
                return next(n for n in self.node_specs() if n.name == self.node)
        import psutil

        return NodeSpec(
            name=self.node,
            runtime=runtime or ("docker" if self.runtime == "docker" else "process"),  # type: ignore[arg-type]
            # A pod's cpu_limit is a cap, not a reservation: offer limits up to 8x the
            # cores, as clusters overcommit limits. Set --cpus or nodes: in config.yaml to change it.
            cpu=self.node_cpus or float(os.cpu_count() or 1) * CPU_LIMIT_OVERCOMMIT,
            memory_mb=self.node_memory_mb or int(psutil.virtual_memory().total // (1024 * 1024)),
            max_pods=self.node_max_pods,
            task_queue=constants.node_task_queue(self.node, self.node_queue_prefix),
            labels=self.node_labels,
            address=self.node_address,
        )

    def pod_limits(self) -> PodLimits:
        from hms_mgmt.runtimes.base import PodLimits

        return PodLimits(memory_mb=self.pod_memory_mb, pids=self.pod_pids_limit, nofile=self.pod_nofile_limit,
                         pod_user=self.pod_user, uid_base=self.pod_uid_base, uid_count=self.pod_uid_count)

    def node_task_queue(self, node: str | None = None) -> str:
        return constants.node_task_queue(node or self.node, self.node_queue_prefix)

    def web_ui_link(self, workflow_id: str) -> str:
        return f"{self.web_ui_url.rstrip('/')}/namespaces/{self.namespace}/workflows/{workflow_id}"

    def write_config(self, **values: Any) -> Path:
        """Merge ``values`` into the config file (used by ``hms auth`` and ``hms up``)."""
        private_dir(self.state_dir)
        path = self.state_dir / CONFIG_FILE
        current = load_yaml_mapping(path, what="setting to value")
        current.update(values)
        import yaml

        atomic_write(path, yaml.safe_dump(current, sort_keys=True), mode=0o600)
        return path


@contextlib.contextmanager
def _reading_environ(env: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(None if env is None else dict(env))
    try:
        yield
    finally:
        _ENVIRON.reset(token)


# field -> where it is set from, for error messages
_ALIASES = {
    alias: name
    for name, info in Settings.model_fields.items()
    if isinstance(info.validation_alias, AliasChoices)
    for alias in info.validation_alias.choices
    if isinstance(alias, str)
}


def env_var(field: str) -> str:
    """The environment variable of a setting: ``tls_cert`` -> ``HMS_TEMPORAL_TLS_CERT``."""
    info = Settings.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return f"{ENV_PREFIX}{field.upper()}"


# ``HMS_*`` variables that are no setting but that the project reads or sets itself: docker-compose's
# (README, "The whole stack in containers"), test and benchmark switches, what a pod is given and
# what the example services read. Any other is most likely a misspelt setting.
NOT_SETTINGS = frozenset({
    "HMS_TEMPORAL_PORT", "HMS_UI_PORT", "HMS_COMPOSE_STATE", "HMS_BASE_IMAGE", "HMS_IMAGE_TAG",
    "HMS_REQUIRE_DOCKER", "HMS_CHAOS", "HMS_CHAOS_SEED", "HMS_FUZZ_EXAMPLES", "HMS_BENCH_RAW", "HMS_UPDATE_DOCS",
    "HMS_HISTORY_SET", "HMS_SKIP_PULL", "HMS_REBUILD_BASE", "HMS_DEBIAN_MIRROR", "HMS_SECRET_TEST",
    "HMS_POD_ID", "HMS_SERVICE", "HMS_REVISION", "HMS_SECRETS_DIR", "HMS_VERSION", "HMS_SERVICE_MODULE",
    "HMS_STARTUP_DELAY_S", "HMS_FAIL_HEALTH", "HMS_BURN_CPU", "HMS_ACCESS_LOG", "HMS_SMS_SEND_DELAY_S",
    "HMS_EXIT_AFTER_S", "HMS_EXIT_AT_START",
})
_NOT_SETTINGS_PREFIXES = ("HMS_ROLLBACK_",)  # tests/chaos/test_rollback_repeat.py's knobs
_warned_env: set[str] = set()


def _warn_unknown_env(environ: Mapping[str, str]) -> None:
    """Warn, once a process per name, of ``HMS_*`` variables no setting reads (``HMS_TEMPORAL_CA``
    for ``HMS_TEMPORAL_TLS_CA``): they are ignored, which a typo in a TLS setting makes costly."""
    known = sorted(env_var(f) for f in Settings.model_fields)
    read = {*known, *(f"{ENV_PREFIX}{f.upper()}" for f in Settings.model_fields)}  # HMS_TLS_CA is read too
    unknown = sorted(
        name for name in (k.upper() for k in environ)
        if name.startswith(ENV_PREFIX) and name not in read and name not in NOT_SETTINGS
        and not name.startswith(_NOT_SETTINGS_PREFIXES) and name not in _warned_env
    )
    if not unknown:
        return
    _warned_env.update(unknown)
    named = []
    for name in unknown:
        # HMS_TEMPORAL_TLS_ENABLED: the setting it starts with, else the nearest spelling
        close = sorted((k for k in known if name.startswith(k + "_")), key=len)[-1:] or \
            difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        named.append(f"{name} (did you mean {close[0]}?)" if close else name)
    log.warning("%s %s ignored (README, \"Configuration\", lists the settings)", ", ".join(named),
                "is not a setting and is" if len(unknown) == 1 else "are not settings and are")


def _describe(e: ValidationError) -> str:
    problems = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        field = _ALIASES.get(loc[0], loc[0]) if loc else "(root)"
        where = ".".join([field, *loc[1:]])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown setting {field!r}")
        elif field in Settings.model_fields:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where} ({env_var(field)}): {msg} (got {err.get('input')!r})")
        else:
            problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def parse_labels(text: str) -> dict[str, str]:
    """``zone=a,disk=ssd`` -> {"zone": "a", "disk": "ssd"}."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


# Every setting that decides how connect() reaches Temporal, besides address and namespace.
TEMPORAL_TLS_SETTINGS = ("temporal_tls", "tls_cert", "tls_key", "tls_ca", "tls_server_name", "api_key")
# The settings that only make sense with TLS, in the order errors name them.
_TLS_FIELDS = ("tls_cert", "tls_key", "tls_ca", "tls_server_name")
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def temporal_tls(settings: Settings):  # -> bool | temporalio.client.TLSConfig
    """``Client.connect``'s ``tls=`` for ``settings``, after checking them: a half-done or
    contradictory TLS setting is a ConfigError that names it, never a plaintext connection.

    TLS is on when ``HMS_TEMPORAL_TLS`` says so or, unset, when a CA, a client certificate or an
    API key is set (Temporal Cloud takes API keys over TLS only); without ``HMS_TEMPORAL_TLS_CA``
    the server is verified against the system's CAs. An API key in plaintext takes
    ``HMS_TEMPORAL_TLS=false``.
    """
    from temporalio.client import TLSConfig

    s = settings
    if bool(s.tls_cert) != bool(s.tls_key):
        have, missing = ("tls_cert", "tls_key") if s.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(f"{env_var(have)} is set but {env_var(missing)} is not: "
                          "a client certificate (mTLS) needs both the certificate and its key")
    if s.temporal_tls is False:
        given = [env_var(f) for f in _TLS_FIELDS if getattr(s, f)]
        if given:
            raise ConfigError(f"HMS_TEMPORAL_TLS is false but {' and '.join(given)} "
                              f"{'is' if len(given) == 1 else 'are'} set: unset one or the other")
        return False
    if not (s.temporal_tls or s.tls_cert or s.tls_ca or s.api_key):
        if s.tls_server_name:
            raise ConfigError("HMS_TEMPORAL_TLS_SERVER_NAME is set but TLS is not on: set HMS_TEMPORAL_TLS_CA "
                              "(a private CA) or HMS_TEMPORAL_TLS=true (the system's CAs) as well")
        return False
    if s.tls_server_name is not None and not _valid_server_name(s.tls_server_name):
        raise ConfigError(f"HMS_TEMPORAL_TLS_SERVER_NAME: {s.tls_server_name!r} is not a host name or IP address "
                          "(no scheme, no port)")
    client_cert = client_key = None
    if s.tls_cert and s.tls_key:
        client_cert, client_key = _client_pair(s.tls_cert, s.tls_key)
    return TLSConfig(
        server_root_ca_cert=_pem_certificates("tls_ca", s.tls_ca)[0] if s.tls_ca else None,
        domain=s.tls_server_name,
        client_cert=client_cert,
        client_private_key=client_key,
    )


def describe_temporal_tls(settings: Settings) -> str:
    """How ``connect`` reaches Temporal, in words, for logs and errors (the settings are checked)."""
    tls = temporal_tls(settings)
    if tls is False:
        how = "plaintext"
    else:
        how = f"TLS, server verified against {settings.tls_ca or 'the system CAs'}"
        if settings.tls_server_name:
            how += f" as {settings.tls_server_name}"
        if settings.tls_cert:
            how += f", client certificate {settings.tls_cert}"
    return how + (", API key" if settings.api_key else "")


def _valid_server_name(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(name))


def _read_setting(field: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ConfigError(f"{env_var(field)}: cannot read {path}: {e.strerror or e}") from e


def _pem_certificates(field: str, path: str):  # -> (bytes, [x509.Certificate])
    from cryptography import x509

    data = _read_setting(field, path)
    try:
        return data, x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{env_var(field)}: {path} holds no PEM certificate "
                          "(a '-----BEGIN CERTIFICATE-----' block)") from e


def _client_pair(cert_path: str, key_path: str) -> tuple[bytes, bytes]:
    """The client certificate and its key, checked: PEM, unencrypted, the key of that
    certificate, and the certificate not expired."""
    import datetime

    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    cert_pem, certs = _pem_certificates("tls_cert", cert_path)
    key_pem = _read_setting("tls_key", key_path)
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError as e:
        raise ConfigError(f"HMS_TEMPORAL_TLS_KEY: {key_path} is encrypted; the Temporal client needs it unencrypted "
                          "(openssl pkey -in KEY -out PLAIN, kept private)") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"HMS_TEMPORAL_TLS_KEY: {key_path} holds no PEM private key "
                          "(a '-----BEGIN ... PRIVATE KEY-----' block)") from e
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise ConfigError(f"HMS_TEMPORAL_TLS_KEY: {key_path} is not the key of the certificate in "
                          f"HMS_TEMPORAL_TLS_CERT ({cert_path})")
    expires = certs[0].not_valid_after_utc
    if expires < datetime.datetime.now(datetime.UTC):
        raise ConfigError(f"HMS_TEMPORAL_TLS_CERT: the certificate in {cert_path} expired at {expires:%Y-%m-%d %H:%M} UTC")
    return cert_pem, key_pem


# What the Temporal client's connect errors mean, for the operator (rustls and tonic's words).
def _connect_hint(settings: Settings, error: str) -> str:
    tls_on = temporal_tls(settings) is not False
    if "UnknownIssuer" in error or "BadSignature" in error:
        if settings.tls_ca:
            return f"The server's certificate is not signed by the CA in HMS_TEMPORAL_TLS_CA ({settings.tls_ca})"
        return ("The server's certificate is not signed by a CA this machine trusts: set HMS_TEMPORAL_TLS_CA "
                "to the CA that signed it")
    if "NotValidForName" in error:
        return ("The server's certificate does not carry the name dialled: set HMS_TEMPORAL_TLS_SERVER_NAME "
                "to a name it carries (listed above as 'presented')")
    if "CertificateRequired" in error:
        return "The server requires a client certificate: set HMS_TEMPORAL_TLS_CERT and HMS_TEMPORAL_TLS_KEY"
    if any(alert in error for alert in ("BadCertificate", "UnknownCA", "CertificateUnknown", "AccessDenied")):
        return "The server refused our client certificate (HMS_TEMPORAL_TLS_CERT): is it signed by a CA it trusts?"
    if tls_on and ("InvalidContentType" in error or "CorruptMessage" in error):
        return ("The server does not speak TLS there (the dev server does not): unset the TLS settings, "
                "or use the TLS port")
    if "Unauthenticated" in error or "PermissionDenied" in error:
        return "The server refused the credentials (HMS_TEMPORAL_API_KEY or the client certificate)"
    if "error after connection" in error:
        # The server closed the connection after it was set up. In TLS 1.3 the client's side of
        # the handshake is done before the server has judged its certificate, so a refusal of
        # the client certificate often arrives as a broken pipe rather than as the alert.
        if not tls_on:
            return ("The server accepted the connection and then dropped it: if it requires TLS, set "
                    "HMS_TEMPORAL_TLS_CA (a private CA) or HMS_TEMPORAL_TLS=true (a public one)")
        if not settings.tls_cert:
            return ("The server dropped the connection after the TLS handshake: if it requires a client "
                    "certificate, set HMS_TEMPORAL_TLS_CERT and HMS_TEMPORAL_TLS_KEY")
        return ("The server dropped the connection after the TLS handshake: it may have refused our client "
                "certificate (HMS_TEMPORAL_TLS_CERT): is it signed by a CA it trusts?")
    return "Start it with `hms up` (or `make demo`), or set HMS_TEMPORAL_ADDRESS."


_warned_plaintext_key: set[str] = set()  # the addresses connect() warned of an API key in plaintext to


async def connect(settings: Settings | None = None):  # -> temporalio.client.Client
    """A Temporal client with the pydantic converter, TLS and API key from ``settings``; a bad
    TLS setting is refused before dialling, and an unreachable server fails within
    ``temporal_connect_timeout_s``. Every client of hms (worker, CLI, router, dashboard, node
    join) connects here."""
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter

    from hms_mgmt import connection
    from hms_mgmt.errors import HmsError

    settings = settings or Settings.from_env()
    tls = temporal_tls(settings)
    if tls is False and settings.api_key and settings.temporal_address not in _warned_plaintext_key:
        _warned_plaintext_key.add(settings.temporal_address)
        log.warning("HMS_TEMPORAL_API_KEY is sent to %s without TLS (HMS_TEMPORAL_TLS=false): anyone on the "
                    "network path can read it and use it; turn TLS on unless that path is this host",
                    settings.temporal_address)
    timeout = settings.temporal_connect_timeout_s
    try:
        return await asyncio.wait_for(
            Client.connect(
                settings.temporal_address,
                runtime=connection.runtime(),
                namespace=settings.namespace,
                data_converter=pydantic_data_converter,
                tls=tls,
                api_key=settings.api_key,
                connect_timeout=timedelta(seconds=timeout),
            ),
            # connect_timeout bounds the dial and handshake; this, the first call after it too.
            timeout * 2,
        )
    except Exception as e:  # noqa: BLE001 - turn a connection failure into one clear error
        reason = str(e) or f"no answer within {timeout * 2:g} s"
        raise HmsError(
            f"cannot reach Temporal at {settings.temporal_address} (namespace {settings.namespace}, "
            f"{describe_temporal_tls(settings)}): {reason}. {_connect_hint(settings, reason)}"
        ) from e
