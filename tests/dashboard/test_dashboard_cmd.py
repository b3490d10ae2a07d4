"""``hms dashboard`` as a process: serves on 127.0.0.1, prints a sign-in link for --token-file,
and stops cleanly on SIGINT."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request

from conftest import REPO, WorkerProcess, eventually, make_settings

from hms_mgmt import auth
from hms_mgmt.testing import free_port

APP = ("import typer; from hms_mgmt.cli.dashboard_cmd import dashboard; "
       "app = typer.Typer(); app.command()(dashboard); app()")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


async def test_hms_dashboard_serves_and_stops(temporal_env, tmp_path):
    settings = make_settings(temporal_env, tmp_path / "state", "process")
    token_file = tmp_path / "grace.token"
    token_file.write_text(auth.issue_token(settings.state_dir, user="grace", role="gov_approver") + "\n")
    port = free_port()
    env = WorkerProcess(settings, tmp_path / "log").env()
    proc = subprocess.Popen([sys.executable, "-c", APP, "--port", str(port), "--token-file", str(token_file)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def up() -> dict | None:
            try:
                health = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
            except OSError:
                return None
            # Until its first read of the fleet the dashboard answers, honestly, "not ok yet".
            return health if health["ok"] else None

        health = await eventually(up, timeout=30, what="the dashboard answering ok")
        assert health["services"] == 0
        # Another Host name is refused (DNS rebinding).
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/state", headers={"Host": "evil.example:80"})
        try:
            urllib.request.urlopen(req, timeout=2)
            raise AssertionError("a foreign Host was served")
        except urllib.error.HTTPError as e:
            assert e.code == 421
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output
    assert "grace (gov_approver)" in output and f"/#token={token_file.read_text().strip()}" in output
