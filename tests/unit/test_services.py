"""Example services run as real subprocesses: the same way the orchestrator runs process pods.

Only stdlib HTTP clients here, so a failure points at the service, not at a client library.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """A service subprocess plus a tiny JSON client bound to its port."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 5.0, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(payload) if payload else None
        finally:
            conn.close()


def _start(module: str, log_dir: Path, wait: bool = True, **env: str) -> Pod:
    port = _free_port()
    log = log_dir / f"{module}-{port}.log"
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "HMS_POD_ID": f"pod-{port}", **env}
    # stderr to a file, not a pipe: an unread pipe fills up with access-log lines and blocks the service.
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{module}"],
            cwd=REPO,
            env=full_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    pod = Pod(proc, port, log)
    if wait:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{module} exited with {proc.returncode}: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{module} did not listen: {log.read_text()}") from None
                time.sleep(0.02)
    return pod


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Pod]]:
    pods: list[Pod] = []

    def _spawn(module: str, wait: bool = True, **env: str) -> Pod:
        pod = _start(module, tmp_path, wait=wait, **env)
        pods.append(pod)
        return pod

    yield _spawn
    for pod in pods:
        if pod.proc.poll() is None:
            pod.proc.kill()
            pod.proc.wait(timeout=5)


def test_health_root_and_pod_header(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach")
    status, headers, body = pod.request("GET", "/health")
    assert status == 200
    assert body == {"status": "ok", "service": "hms-ach", "pod": f"pod-{pod.port}"}
    assert headers["X-HMS-Pod"] == f"pod-{pod.port}"
    status, _, body = pod.request("GET", "/")
    assert status == 200 and body["service"] == "hms-ach" and body["version"] == "1.4"
    status, headers, body = pod.request("GET", "/nope")
    assert status == 404 and "error" in body
    assert headers["X-HMS-Pod"] == f"pod-{pod.port}"


def test_health_switch(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach")
    assert pod.request("POST", "/admin/health", {"failing": True})[0] == 200
    status, _, body = pod.request("GET", "/health")
    assert status == 503 and body["service"] == "hms-ach"
    assert pod.request("POST", "/admin/health", {"failing": False})[0] == 200
    assert pod.request("GET", "/health")[0] == 200
    assert pod.request("POST", "/admin/health?failing=1")[0] == 200
    assert pod.request("GET", "/health")[0] == 503
    status, _, body = pod.request("POST", "/admin/health", {"failing": "maybe"})
    assert status == 400 and body["field"] == "failing"


def test_fail_health_env(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_frm", HMS_FAIL_HEALTH="1")
    assert pod.request("GET", "/health")[0] == 503


def test_hang_switch_makes_health_time_out(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_notify")
    assert pod.request("POST", "/admin/hang", {"hang": True})[0] == 200
    with pytest.raises(TimeoutError):
        pod.request("GET", "/health", timeout=1.0)
    # A hung pod still answers the admin surface, so a demo can heal it.
    assert pod.request("POST", "/admin/hang", {"hang": False})[0] == 200
    assert pod.request("GET", "/health", timeout=2.0)[0] == 200


@pytest.mark.serial
def test_cpu_burn(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach")
    proc = psutil.Process(pod.proc.pid)
    assert pod.request("POST", "/admin/cpu", {"percent": 80})[0] == 200
    proc.cpu_percent(None)
    time.sleep(1.5)
    busy = proc.cpu_percent(None)
    assert busy > 20, busy  # 80 % asked; a loaded 2-core machine still shows well above idle
    status, _, body = pod.request("POST", "/admin/cpu", {"percent": 0})
    assert status == 200 and body["cpu_percent"] == 0
    time.sleep(0.2)
    proc.cpu_percent(None)
    time.sleep(1.0)
    idle = proc.cpu_percent(None)
    assert idle < 20, idle
    status, _, body = pod.request("POST", "/admin/cpu", {"percent": 150})
    assert status == 400 and body["field"] == "percent"


def test_payments(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach")
    status, headers, body = pod.request("POST", "/payments", {"amount": 125.5, "account": "ACC-1234"})
    assert status == 202
    assert body["status"] == "accepted" and body["pod"] == f"pod-{pod.port}"
    assert body["payment_id"].startswith("pay_") and len(body["payment_id"]) == 4 + 32
    status, _, got = pod.request("GET", f"/payments/{body['payment_id']}")
    assert status == 200 and got["status"] == "accepted" and got["amount"] == 125.5
    assert pod.request("GET", "/payments/pay_unknown")[0] == 404


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"account": "ACC-1234"}, "amount"),
        ({"amount": 10}, "account"),
        ({"amount": "ten", "account": "ACC-1234"}, "amount"),
        ({"amount": -5, "account": "ACC-1234"}, "amount"),
        ({"amount": 10, "account": "ACC-1234", "currency": "dollars"}, "currency"),
    ],
)
def test_payments_bad_input_names_field(spawn: Callable[..., Pod], payload: dict[str, Any], field: str) -> None:
    pod = spawn("hms_ach")
    status, _, body = pod.request("POST", "/payments", payload)
    assert status == 400
    assert body["field"] == field and field in body["error"]


def test_bad_json_is_400(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach")
    status, _, body = pod.request("POST", "/payments", raw=b"{not json")
    assert status == 400 and body["field"] == "body"
    status, _, body = pod.request("POST", "/payments", raw=b"[1, 2]")
    assert status == 400 and body["field"] == "body"


def test_frm_validate(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_frm")
    status, _, body = pod.request("POST", "/documents/validate", {"applicant_id": "A-17", "document_type": "passport"})
    assert status == 200 and body["valid"] is True and body["errors"] == []
    status, _, body = pod.request("POST", "/documents/validate", {"document_type": "selfie"})
    assert status == 200 and body["valid"] is False
    assert {e["field"] for e in body["errors"]} == {"applicant_id", "document_type"}
    assert pod.request("POST", "/documents/validate", raw=b"nope")[0] == 400


def test_notify_sms(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_notify", HMS_SMS_SEND_DELAY_S="0")
    status, _, body = pod.request("POST", "/sms", {"to": "+15551234567", "message": "hello"})
    assert status == 202 and body["status"] == "queued" and body["sms_id"].startswith("sms_")
    status, _, got = pod.request("GET", f"/sms/{body['sms_id']}")
    assert status == 200 and got["status"] == "sent"
    status, _, err = pod.request("POST", "/sms", {"to": "5551234", "message": "hello"})
    assert status == 400 and err["field"] == "to"
    status, _, err = pod.request("POST", "/sms", {"to": "+15551234567"})
    assert status == 400 and err["field"] == "message"


def test_sigterm_exits_promptly_even_with_a_hung_request(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach")
    pod.request("POST", "/admin/hang", {"hang": True})
    outcome: list[object] = []

    def probe() -> None:
        try:
            outcome.append(pod.request("GET", "/health", timeout=5)[0])
        except OSError as exc:  # connection closed by the exiting pod, or the client timeout
            outcome.append(exc)

    hung = threading.Thread(target=probe)
    hung.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    pod.proc.send_signal(signal.SIGTERM)
    assert pod.proc.wait(timeout=3) == 0
    assert time.monotonic() - t0 < 3
    hung.join(timeout=6)
    assert outcome and outcome[0] != 200


def test_sigterm_during_startup_delay(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_frm", wait=False, HMS_STARTUP_DELAY_S="30")
    deadline = time.monotonic() + 20
    while "starting in 30 s" not in pod.log.read_text():  # its SIGTERM handler is in place
        assert pod.proc.poll() is None and time.monotonic() < deadline, pod.log.read_text()
        time.sleep(0.05)
    pod.proc.send_signal(signal.SIGTERM)
    assert pod.proc.wait(timeout=3) == 0


def test_exit_at_start(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_ach", wait=False, HMS_EXIT_AT_START="3")
    assert pod.proc.wait(timeout=5) == 3


def test_admin_exit(spawn: Callable[..., Pod]) -> None:
    pod = spawn("hms_notify")
    status, _, body = pod.request("POST", "/admin/exit", {"code": 7})
    assert status == 200 and body["exiting"] == 7
    assert pod.proc.wait(timeout=3) == 7
