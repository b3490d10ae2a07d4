"""Temporal over TLS through a real TLS front: HAProxy in ``mode tcp`` (``ssl crt``, ``alpn h2``;
``ca-file ... verify required`` for mTLS) before the session's dev server, with a CA and
certificates made here. The worker and the ``hms`` CLI are real processes; every failure is a
clear error within a bound, and a half-done setting stops a process at start, naming it."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import make_settings, temporal_address, worker_process
from temporalio.testing import WorkflowEnvironment
from test_cli import clean_env, hms, ok

from hms_mgmt.config import Settings, connect
from hms_mgmt.errors import HmsError
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.testing import Pki, TlsFront, make_pki

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")

SERVER_NAME = "temporal.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA whose server certificate names 127.0.0.1, and a client certificate it signed."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def named_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA whose server certificate names only temporal.test."""
    return make_pki(tmp_path_factory.mktemp("named-pki"), server_names=(SERVER_NAME,))


@pytest.fixture(scope="module")
def fronts(temporal_env: WorkflowEnvironment, pki: Pki, named_pki: Pki,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TlsFront]]:
    """``tls``: server TLS; ``mtls``: a client certificate from ``pki``'s CA required;
    ``named``: a certificate for temporal.test only."""
    work = tmp_path_factory.mktemp("haproxy")
    target = temporal_address(temporal_env)
    started: dict[str, TlsFront] = {}
    try:
        for name, pem, client_ca in (("tls", pki.server, None), ("mtls", pki.server, pki.ca),
                                     ("named", named_pki.server, None)):
            started[name] = TlsFront(target=target, server_pem=pem, client_ca=client_ca, work_dir=work / name)
            started[name].start()
        yield started
    finally:
        for front in started.values():
            front.stop()


def through(s: Settings, front: TlsFront, **tls: object) -> Settings:
    return s.model_copy(update={"temporal_address": front.address, "temporal_connect_timeout_s": 3.0, **tls})


@pytest_asyncio.fixture(loop_scope="session")
async def base(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[Settings]:
    yield make_settings(temporal_env, tmp_path / "state", "process")


async def reaches(s: Settings) -> list[str]:
    """Connect with ``s`` (a new connection, not a cached one) and list the services."""
    client = await connect(s)
    return [st.name for st in await Orchestrator(client, s).list()]


async def refused(s: Settings, *words: str, within_s: float = 10.0) -> str:
    started = time.monotonic()
    with pytest.raises(HmsError) as e:
        await reaches(s)
    assert time.monotonic() - started < within_s, "a refused connection must fail fast, not hang"
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


async def test_worker_and_cli_over_server_tls_with_a_ca_only(temporal_env: WorkflowEnvironment, base: Settings,
                                                             fronts: dict[str, TlsFront], pki: Pki,
                                                             tmp_path: Path) -> None:
    s = through(base, fronts["tls"], tls_ca=str(pki.ca))
    async with worker_process(temporal_env, s, tmp_path / "worker.log") as worker:
        env = {**worker.env(), "COLUMNS": "200"}
        assert env["HMS_TEMPORAL_ADDRESS"] == fronts["tls"].address and env["HMS_TEMPORAL_TLS_CA"] == str(pki.ca)
        out = ok(await hms("deploy", "examples/hms-ach.yaml", "--wait", env=env))
        assert "hms-ach is Running: 2/2 pods ready" in out
        assert "hms-ach" in ok(await hms("status", env=env))
        # The front speaks only TLS: the same command in plaintext is refused, and says why.
        plain = {k: v for k, v in env.items() if k != "HMS_TEMPORAL_TLS_CA"}
        result = await hms("status", env=plain)
        assert result.returncode == 1 and "if it requires TLS, set HMS_TEMPORAL_TLS_CA" in result.stderr, result
        ok(await hms("undeploy", "hms-ach", "--wait", env=env))
    assert "worker ready" in (tmp_path / "worker.log").read_text()


async def test_mtls_needs_the_client_certificate(base: Settings, fronts: dict[str, TlsFront], pki: Pki,
                                                 named_pki: Pki) -> None:
    mtls = through(base, fronts["mtls"], tls_ca=str(pki.ca))
    await refused(mtls, f"TLS, server verified against {pki.ca}",
                  "client certificate", "set HMS_TEMPORAL_TLS_CERT and HMS_TEMPORAL_TLS_KEY")
    stranger = mtls.model_copy(update={"tls_cert": str(named_pki.client_cert), "tls_key": str(named_pki.client_key)})
    await refused(stranger, "refused our client certificate (HMS_TEMPORAL_TLS_CERT)")
    good = mtls.model_copy(update={"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)})
    assert isinstance(await reaches(good), list)


async def test_cli_and_worker_over_mtls(temporal_env: WorkflowEnvironment, base: Settings,
                                        fronts: dict[str, TlsFront], pki: Pki, tmp_path: Path) -> None:
    s = through(base, fronts["mtls"], tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    async with worker_process(temporal_env, s, tmp_path / "worker.log") as worker:
        env = {**worker.env(), "COLUMNS": "200"}
        out = ok(await hms("deploy", "examples/hms-ach.yaml", "--wait", env=env))
        assert "hms-ach is Running" in out
        ok(await hms("undeploy", "hms-ach", "--wait", env=env))


async def test_a_server_name_override(base: Settings, fronts: dict[str, TlsFront], named_pki: Pki) -> None:
    s = through(base, fronts["named"], tls_ca=str(named_pki.ca))
    await refused(s, "NotValidForName", 'DnsName(\\"temporal.test\\")', "set HMS_TEMPORAL_TLS_SERVER_NAME")
    assert isinstance(await reaches(s.model_copy(update={"tls_server_name": SERVER_NAME})), list)


async def test_a_wrong_ca_fails_at_once_and_says_so(base: Settings, fronts: dict[str, TlsFront], pki: Pki) -> None:
    await refused(through(base, fronts["tls"], tls_ca=str(pki.other_ca)),
                  f"not signed by the CA in HMS_TEMPORAL_TLS_CA ({pki.other_ca})")


async def test_an_api_key_with_a_private_ca_and_without(base: Settings, fronts: dict[str, TlsFront], pki: Pki) -> None:
    # The dev server ignores the key; what is shown is that the key goes over TLS.
    assert isinstance(await reaches(through(base, fronts["tls"], api_key="k", tls_ca=str(pki.ca))), list)
    # Without a CA the system's roots are used, which do not know this CA: TLS was on.
    await refused(through(base, fronts["tls"], api_key="k"), "not signed by a CA this machine trusts")


async def test_tls_to_a_plaintext_server_says_so(temporal_env: WorkflowEnvironment, base: Settings, pki: Pki) -> None:
    s = base.model_copy(update={"tls_ca": str(pki.ca), "temporal_connect_timeout_s": 3.0})
    assert s.temporal_address == temporal_address(temporal_env)
    await refused(s, "The server does not speak TLS there")


async def test_a_server_that_never_answers_is_bounded(base: Settings) -> None:
    """A listener that accepts and says nothing (a black hole after the TCP handshake)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host, port = silent.getsockname()
        s = base.model_copy(update={"temporal_address": f"{host}:{port}", "temporal_tls": True,
                                    "temporal_connect_timeout_s": 1.0})
        message = await refused(s, within_s=8.0)
    assert "cannot reach Temporal" in message


@pytest.mark.parametrize("variables, named", [
    ({"HMS_TEMPORAL_TLS_CERT": "{client_cert}"}, "HMS_TEMPORAL_TLS_CERT is set but HMS_TEMPORAL_TLS_KEY is not"),
    ({"HMS_TEMPORAL_TLS_KEY": "{client_key}"}, "HMS_TEMPORAL_TLS_KEY is set but HMS_TEMPORAL_TLS_CERT is not"),
    ({"HMS_TEMPORAL_TLS_CA": "/nonexistent/ca.pem"}, "HMS_TEMPORAL_TLS_CA: cannot read /nonexistent/ca.pem"),
    ({"HMS_TEMPORAL_TLS_CA": "{client_key}"}, "HMS_TEMPORAL_TLS_CA: "),
    ({"HMS_TEMPORAL_TLS_SERVER_NAME": SERVER_NAME}, "HMS_TEMPORAL_TLS_SERVER_NAME is set but TLS is not on"),
], ids=["cert-without-key", "key-without-cert", "missing-ca", "ca-not-pem", "server-name-without-tls"])
async def test_half_done_settings_stop_each_process_at_start(fronts: dict[str, TlsFront], pki: Pki, tmp_path: Path,
                                                             variables: dict[str, str], named: str) -> None:
    paths = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    env = clean_env(HMS_STATE_DIR=str(tmp_path / "state"), HMS_TEMPORAL_ADDRESS=fronts["tls"].address,
                    HMS_METRICS_PORT="0", **{k: v.format(**paths) for k, v in variables.items()})
    for command in (("worker", "--node", "tls-test"), ("status",)):
        result = await hms(*command, env=env, timeout=60)
        assert result.returncode == 1 and named in result.stderr, (command, result)
        assert "Traceback" not in result.stderr


async def test_the_router_refuses_a_half_done_setting_at_start(base: Settings, pki: Pki) -> None:
    from router.server import serve

    s = base.model_copy(update={"tls_cert": str(pki.client_cert)})
    with pytest.raises(HmsError, match="HMS_TEMPORAL_TLS_KEY is not"):
        await asyncio.wait_for(serve(s, port=0), 5)
