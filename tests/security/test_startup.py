"""`hms up` does not talk to a Temporal server it did not start unless someone chose it (issue
19, item 4). The attack: a local user starts their own server on the port first; `hms up` used
to take it silently and hand it every request proof, pod report and grant.

Real Temporal dev servers and a real `hms up --no-worker` (about 15 s)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from hms_mgmt.devserver import DevServer, free_port, port_open

UP_TIMEOUT_S = 45.0


def hms_env(state: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    env.update(COLUMNS="200", PYTHONPATH=str(REPO), HMS_STATE_DIR=str(state), HMS_METRICS_PORT="0", **values)
    return env


def start_dev_server(port: int, state_dir: Path) -> subprocess.Popen[bytes]:
    """A dev server on ``port`` with its sqlite file in ``state_dir``, as the launcher starts one."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    server = DevServer(port=port, state_dir=state_dir)
    asyncio.run(server.start())
    assert server.proc is not None and not server.reused
    return server.proc


@pytest.fixture
def foreign_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Somebody else's Temporal server (their own state) on a port `hms up` is told to use."""
    port = free_port()
    proc = start_dev_server(port, tmp_path / "theirs")
    try:
        yield port, proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def hms_up(state: Path, port: int, *args: str, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run `hms up --no-worker` until it says it is ready (then Ctrl-C) or exits; its exit code
    (None: it never got ready nor exited) and its output."""
    log = state.parent / f"up-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        cmd = [str(Path(sys.executable).parent / "hms"), "up", "--port", str(port), "--ui-port", str(free_port()),
               "--headless", "--no-worker", *args]
        proc = subprocess.Popen(cmd, env=env or hms_env(state), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + UP_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if "ready: Ctrl-C" in log.read_text(errors="replace"):
                proc.send_signal(signal.SIGINT)
                proc.wait(30)
                break
            time.sleep(0.1)
    finally:
        hung = proc.poll() is None
        if hung:
            proc.kill()
            proc.wait(10)
    return None if hung else proc.returncode, log.read_text(errors="replace")


def test_hms_up_refuses_a_server_it_did_not_start(tmp_path: Path, foreign_server) -> None:
    port, proc = foreign_server
    state = tmp_path / "state"
    code, output = hms_up(state, port)
    assert code == 1, f"hms up used somebody else's server (exit {code}):\n{output}"
    flat = " ".join(output.split())
    assert f"port {port}" in flat and "--reuse" in flat and f"pid {proc.pid}" in flat, output
    assert "ready" not in output

    # Chosen on purpose: --reuse, or HMS_TEMPORAL_ADDRESS naming it.
    code, output = hms_up(state, port, "--reuse")
    assert code == 0 and "(reused" in output, output
    code, output = hms_up(state, port, env=hms_env(state, HMS_TEMPORAL_ADDRESS=f"127.0.0.1:{port}"))
    assert code == 0 and "(reused" in output, output

    # Those runs recorded the address in config.yaml; that record is not a choice.
    assert f"127.0.0.1:{port}" in (state / "config.yaml").read_text()
    code, output = hms_up(state, port)
    assert code == 1 and "--reuse" in output, output
    assert proc.poll() is None  # never stopped: not ours

    # An operator who writes the address into config.yaml themselves chose it.
    text = (state / "config.yaml").read_text().replace(f"127.0.0.1:{port}", f"localhost:{port}")
    (state / "config.yaml").write_text(text)
    code, output = hms_up(state, port)
    assert code == 0 and "(reused" in output, output


def test_hms_up_reuses_the_server_an_earlier_hms_up_left_on_its_state_dir(tmp_path: Path) -> None:
    """A demo killed with SIGKILL leaves its dev server (its own session) on var/temporal.db:
    the next `make demo` takes it back, as `make clean` finds it, by its --db-filename."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    port = free_port()
    left = start_dev_server(port, state)
    try:
        code, output = hms_up(state, port)
        assert code == 0 and "(reused" in output, output
        assert left.poll() is None
    finally:
        os.killpg(left.pid, signal.SIGKILL)
        left.wait(10)


PROXY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def handle(reader, writer):
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[-1]))
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[-2]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def test_a_command_line_that_names_our_db_is_not_our_server(tmp_path: Path, foreign_server) -> None:
    """Anyone can write a command line: a proxy to somebody else's server, started with
    ``start-dev --db-filename <our state>/temporal.db`` in its arguments, is not the server an
    earlier `hms up` left there (it does not hold that file open)."""
    target, _server = foreign_server
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, "start-dev", "--db-filename", str(state / "temporal.db"),
                              str(port), str(target)], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            assert proxy.poll() is None and time.monotonic() < deadline, "the proxy did not listen"
            time.sleep(0.1)
        code, output = hms_up(state, port)
        assert code == 1, f"hms up took a proxy to somebody else's server for its own (exit {code}):\n{output}"
        assert f"pid {proxy.pid}" in " ".join(output.split()) and "--reuse" in output, output
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait(10)
