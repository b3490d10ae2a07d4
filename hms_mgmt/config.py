"""Configuration from the environment and an optional ``config.yaml`` in the state directory.

Environment variables win over the file; the file holds the same keys in lower case without
the ``HMS_`` prefix (``temporal_address: ...``), plus ``nodes:`` (a list of node specs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hms_mgmt import constants
from hms_mgmt.errors import ConfigError
from hms_mgmt.models import NodeSpec

_ENV_KEYS = {
    "temporal_address": "HMS_TEMPORAL_ADDRESS",
    "namespace": "HMS_NAMESPACE",
    "tls_cert": "HMS_TEMPORAL_TLS_CERT",
    "tls_key": "HMS_TEMPORAL_TLS_KEY",
    "tls_ca": "HMS_TEMPORAL_TLS_CA",
    "api_key": "HMS_TEMPORAL_API_KEY",
    "runtime": "HMS_RUNTIME",
    "token": "HMS_TOKEN",
    "task_queue": "HMS_TASK_QUEUE",
    "node_queue_prefix": "HMS_NODE_QUEUE_PREFIX",
    "node": "HMS_NODE",
    "web_ui_url": "HMS_WEB_UI_URL",
    "event_webhook": "HMS_EVENT_WEBHOOK",
    "router_port": "HMS_ROUTER_PORT",
    "routers": "HMS_ROUTERS",
    "dashboard_port": "HMS_DASHBOARD_PORT",
    "node_max_pods": "HMS_NODE_MAX_PODS",
    "capacity_retry_max_s": "HMS_CAPACITY_RETRY_MAX_S",
    "watch_max_s": "HMS_WATCH_MAX_S",
    "history_threshold": "HMS_HISTORY_THRESHOLD",
    # nodes (issue 12): this worker's node, and when the registry calls a node lost
    "docker_host": "HMS_DOCKER_HOST",
    "node_cpus": "HMS_NODE_CPUS",
    "node_memory_mb": "HMS_NODE_MEMORY_MB",
    "node_labels": "HMS_NODE_LABELS",
    "node_heartbeat_s": "HMS_NODE_HEARTBEAT_S",
    "node_lost_after_s": "HMS_NODE_LOST_AFTER_S",
    "sweep_on_exit": "HMS_SWEEP_ON_EXIT",
}


CPU_LIMIT_OVERCOMMIT = 8


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temporal_address: str = constants.DEFAULT_TEMPORAL_ADDRESS
    namespace: str = constants.DEFAULT_NAMESPACE
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    api_key: str | None = None
    runtime: Literal["auto", "docker", "process"] = "auto"
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".hms")
    token: str | None = None
    task_queue: str = constants.CONTROL_TASK_QUEUE
    node_queue_prefix: str = constants.NODE_TASK_QUEUE_PREFIX
    node: str = "local"
    node_max_pods: int = 64
    capacity_retry_max_s: float = 30.0
    watch_max_s: float = 1800.0
    history_threshold: int | None = None
    nodes: list[dict[str, Any]] = Field(default_factory=list)
    web_ui_url: str = f"http://localhost:{constants.DEFAULT_UI_PORT}"
    event_webhook: str | None = None
    router_port: int = constants.DEFAULT_ROUTER_PORT
    dashboard_port: int = constants.DEFAULT_DASHBOARD_PORT
    # This worker's node (``hms worker --node``) and the NodeRegistry's timing.
    docker_host: str | None = None  # e.g. unix:///run/docker-2.sock: the node's own Docker Engine
    node_cpus: float | None = None  # CPUs offered to pods (default: cores x CPU_LIMIT_OVERCOMMIT)
    node_memory_mb: int | None = None  # default: the machine's memory
    node_labels: dict[str, str] = Field(default_factory=dict)  # HMS_NODE_LABELS=zone=a,disk=ssd
    node_heartbeat_s: float = Field(default=5.0, gt=0)
    node_lost_after_s: float = Field(default=30.0, gt=0)
    sweep_on_exit: bool = False  # the worker stops its node's pods when it stops (docker-compose down)

    @field_validator("node_labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        return parse_labels(v) if isinstance(v, str) else v
    # Routers the endpoint feed pushes to (``POST <url>/-/feed``); default: the local one.
    routers: list[str] = Field(default_factory=list)

    @field_validator("routers", mode="before")
    @classmethod
    def _routers_from_text(cls, v: Any) -> Any:
        """``HMS_ROUTERS=http://a:8000,http://b:8000`` (an empty string means none but the default)."""
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @model_validator(mode="after")
    def _default_router(self) -> Settings:
        if not self.routers:
            self.routers = [f"http://127.0.0.1:{self.router_port}"]
        return self

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        state_dir = Path(env.get("HMS_STATE_DIR") or overrides.get("state_dir") or Path.home() / ".hms")
        values: dict[str, Any] = {}
        config_file = state_dir / "config.yaml"
        if config_file.exists():
            try:
                loaded = yaml.safe_load(config_file.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{config_file}: not valid YAML: {e}") from e
            if not isinstance(loaded, dict):
                raise ConfigError(f"{config_file}: expected a mapping of settings")
            values.update(loaded)
        for key, var in _ENV_KEYS.items():
            if env.get(var):
                values[key] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["state_dir"] = state_dir
        try:
            return cls(**values)
        except ValidationError as e:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in e.errors())
            raise ConfigError(f"invalid configuration ({fields}): {e}") from e

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
        )

    def node_task_queue(self, node: str | None = None) -> str:
        return constants.node_task_queue(node or self.node, self.node_queue_prefix)

    def web_ui_link(self, workflow_id: str) -> str:
        return f"{self.web_ui_url.rstrip('/')}/namespaces/{self.namespace}/workflows/{workflow_id}"

    def write_config(self, **values: Any) -> Path:
        """Merge ``values`` into the config file (used by ``hms auth`` and ``hms up``)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "config.yaml"
        current: dict[str, Any] = {}
        if path.exists():
            current = yaml.safe_load(path.read_text()) or {}
        current.update(values)
        path.write_text(yaml.safe_dump(current, sort_keys=True))
        path.chmod(0o600)
        return path


def parse_labels(text: str) -> dict[str, str]:
    """``zone=a,disk=ssd`` -> {"zone": "a", "disk": "ssd"}."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


async def connect(settings: Settings | None = None):  # -> temporalio.client.Client
    """A Temporal client with the pydantic converter, TLS and API key from settings."""
    from temporalio.client import Client, TLSConfig
    from temporalio.contrib.pydantic import pydantic_data_converter

    settings = settings or Settings.from_env()
    tls: bool | TLSConfig = False
    if settings.tls_cert and settings.tls_key:
        tls = TLSConfig(
            client_cert=Path(settings.tls_cert).read_bytes(),
            client_private_key=Path(settings.tls_key).read_bytes(),
            server_root_ca_cert=Path(settings.tls_ca).read_bytes() if settings.tls_ca else None,
        )
    elif settings.api_key:
        tls = True
    from hms_mgmt import connection

    try:
        return await Client.connect(
            settings.temporal_address,
            runtime=connection.runtime(),
            namespace=settings.namespace,
            data_converter=pydantic_data_converter,
            tls=tls,
            api_key=settings.api_key,
        )
    except Exception as e:  # noqa: BLE001 - turn a connection failure into one clear error
        from hms_mgmt.errors import HmsError

        raise HmsError(
            f"cannot reach Temporal at {settings.temporal_address} (namespace {settings.namespace}): {e}. "
            "Start it with `hms up` (or `make demo`), or set HMS_TEMPORAL_ADDRESS."
        ) from e
