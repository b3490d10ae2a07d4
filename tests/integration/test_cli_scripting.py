"""The `hms` command line as a script runs it (issue 24): stdout piped, every `-o json` parsed
back into the Python API's models, plain progress lines, a word on every wait, watching, and
one exit code per kind of outcome. Real dev server, real worker process, process pods."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml
from conftest import EXAMPLE_IMAGE, eventually
from temporalio.testing import WorkflowEnvironment
from test_cli import REPO, cli, hms, hms_command, ok  # noqa: F401 - cli is a fixture

from hms_mgmt.events import Event
from hms_mgmt.models import RevisionRecord, RolloutStatus, ServiceStatus
from hms_mgmt.nodes import NodeView
from hms_mgmt.orchestrator import Orchestrator
from hms_mgmt.trust import TrustRecord, TrustStore


def _as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Piped:
    """An `hms` process whose stdout is a pipe, read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        # As from a terminal: Ctrl-C at its default. A test runner's worker may ignore SIGINT, a
        # child inherits that, and Python (so `hms events --follow`) then keeps ignoring it.
        self.proc = subprocess.Popen([*hms_command(), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    async def line(self, pred: Callable[[str], bool], *, timeout: float, what: str) -> tuple[float, str]:
        async def found() -> tuple[float, str] | None:
            return next(((t, line) for t, line in self.lines if pred(line)), None)

        return await eventually(found, timeout=timeout, what=what)

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C, as a user ends --watch or --follow. A command still running 20 s later is
        asked where it is (``kill -USR1``: every thread's stack, on its stderr) and fails the test
        with that."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, stderr = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            self.proc.kill()
            _, stderr = self.proc.communicate(timeout=10)
            raise AssertionError(f"{' '.join(self.proc.args[1:])} still ran 20 s after Ctrl-C; its stderr:\n{stderr}") from None
        finally:
            self.proc.kill()
        self.reader.join(timeout=5)
        return self.proc.returncode, stderr

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def spec_file(tmp_path: Path, name: str, **fields: object) -> Path:
    values = {"name": name, "image": EXAMPLE_IMAGE, "min_replicas": 1, "max_replicas": 3, "cpu_target": 60,
              "drain_s": 0.5, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


async def test_piped_deploy_of_an_unsigned_image_says_how_to_sign_it_then_completes(
        temporal_env: WorkflowEnvironment, cli, tmp_path: Path):  # noqa: F811 - the fixture
    s, env = cli
    name = f"cli-sig-{uuid.uuid4().hex[:6]}"
    assert TrustStore(s.state_dir).revoke(EXAMPLE_IMAGE)
    deploy = Piped("deploy", str(spec_file(tmp_path, name)), "--timeout", "120", env=env)
    _, line = await deploy.line(lambda line: f"hms image sign {EXAMPLE_IMAGE}" in line and "awaiting_signature" in line,
                                timeout=30, what="the awaiting-signature line")
    # Said while the deploy waits (it waits minutes for the signature), not once it has given up.
    assert deploy.proc.poll() is None, deploy.text()
    assert "before" in line, line
    st = await Orchestrator(temporal_env.client, s).status(name)
    assert st.phase == "VerifyingImage" and st.waiting_for is not None
    assert st.waiting_for.kind == "image_signature" and st.waiting_for.command == f"hms image sign {EXAMPLE_IMAGE}"
    assert st.waiting_for.until is not None
    events = [Event.model_validate_json(x) for x in (s.state_dir / "events.jsonl").read_text().splitlines()]
    [waiting] = [e for e in events if e.type == "image.awaiting_signature" and e.service == name]
    assert waiting.data["command"] == f"hms image sign {EXAMPLE_IMAGE}" and waiting.data["deadline"]

    ok(await hms("image", "sign", "--runtime", "process", EXAMPLE_IMAGE, env=env))
    await asyncio.to_thread(deploy.proc.wait, 120)
    deploy.reader.join(timeout=10)  # stdout is the reader's: every line is in deploy.lines
    assert deploy.proc.returncode == 0, deploy.proc.stderr.read() if deploy.proc.stderr else ""
    assert f"{name} is Running: 1/1 pods ready" in deploy.text()
    # One line per change, each with a time, the service and its phase: never silent.
    progress = [x for _, x in deploy.lines if f"  {name}  " in x]
    assert any("VerifyingImage" in x for x in progress) and any("Running  1/1 ready" in x for x in progress)
    assert (await Orchestrator(temporal_env.client, s).status(name)).waiting_for is None

    await every_output_parses(s, env, name)
    await watch_and_follow(env, name)
    ok(await hms("undeploy", name, "--progress", "plain", env=env))


async def every_output_parses(s, env: dict[str, str], name: str) -> None:
    st = ServiceStatus.model_validate_json(ok(await hms("status", name, "-o", "json", env=env)))
    assert st.name == name and st.phase == "Running"
    listed = [ServiceStatus.model_validate(x) for x in json.loads(ok(await hms("status", "-o", "json", env=env)))]
    assert name in [x.name for x in listed]
    assert ServiceStatus.model_validate(yaml.safe_load(ok(await hms("status", name, "-o", "yaml", env=env)))).name == name
    nodes = [NodeView.model_validate(x) for x in json.loads(ok(await hms("nodes", "-o", "json", env=env)))]
    again = [NodeView.model_validate(x) for x in json.loads(ok(await hms("nodes", "--json", env=env)))]
    assert nodes and [n.spec for n in nodes] == [n.spec for n in again]  # a heartbeat may come between the two
    lines = ok(await hms("events", "--service", name, "-o", "json", env=env)).splitlines()
    events = [Event.model_validate(json.loads(line)) for line in lines]  # JSON Lines, as `jq` reads them
    assert {"image.awaiting_signature", "image.verified", "service.deployed"} <= {e.type for e in events}
    only = ok(await hms("events", "--service", name, "--type", "image.", "-o", "json", env=env)).splitlines()
    assert {Event.model_validate_json(x).type for x in only} == {"image.awaiting_signature", "image.verified"}
    rollout = json.loads(ok(await hms("rollout", "status", name, "-o", "json", env=env)))
    assert rollout is None or RolloutStatus.model_validate(rollout)
    history = [RevisionRecord.model_validate(x)
               for x in json.loads(ok(await hms("rollout", "history", name, "-o", "json", env=env)))]
    assert [r.revision for r in history] == [1]
    images = [TrustRecord.model_validate(x) for x in json.loads(ok(await hms("image", "list", "-o", "json", env=env)))]
    assert EXAMPLE_IMAGE in [r.image for r in images]


async def watch_and_follow(env: dict[str, str], name: str) -> None:
    watch = Piped("status", name, "--watch", env=env)
    watch_json = Piped("status", name, "--watch", "-o", "json", env=env)
    follow = Piped("events", "--follow", "--service", name, "--type", "service.scaled", "-o", "json", env=env)
    try:
        await watch.line(lambda x: "Running  1/1 ready" in x, timeout=30, what="the first watch line")
        ok(await hms("scale", name, "2", "--wait", "--progress", "plain", env=env))
        await watch.line(lambda x: "Running  2/2 ready" in x, timeout=30, what="a watch line for the change")
        await follow.line(lambda x: json.loads(x)["type"] == "service.scaled", timeout=30, what="a followed event")
        await watch_json.line(lambda x: ServiceStatus.model_validate_json(x).ready_replicas == 2, timeout=30,
                              what="a JSON line for the change")
    finally:
        results = [watch.interrupt(), watch_json.interrupt(), follow.interrupt()]
    for code, stderr in results:
        assert code == 0 and "Traceback" not in stderr, stderr
    assert len([x for x in watch_json.text().splitlines() if x]) >= 2  # the first state, then the change


async def test_every_wait_is_in_status_and_each_outcome_has_its_exit_code(
        temporal_env: WorkflowEnvironment, cli, tmp_path: Path):  # noqa: F811 - the fixture
    s, env = cli
    name = f"cli-gov-{uuid.uuid4().hex[:6]}"
    spec = spec_file(tmp_path, name, max_replicas=20)  # over the governance limit: waits for approval
    result = await hms("deploy", str(spec), "--timeout", "3", env=env)
    assert result.returncode == 5 and "error: " in result.stderr, result  # timed out
    assert f"run `hms approve {name}`" in result.stdout, result.stdout
    st = ServiceStatus.model_validate_json(ok(await hms("status", name, "-o", "json", env=env)))
    assert st.phase == "AwaitingApproval" and st.waiting_for is not None
    assert st.waiting_for.kind == "approval" and st.waiting_for.command == f"hms approve {name}"
    assert st.waiting_for.until is not None and st.waiting_for.since is not None

    result = await hms("approve", name, env=env)  # alice is ops_admin, not gov_approver
    assert result.returncode == 3, result  # refused
    result = await hms("status", f"cli-none-{uuid.uuid4().hex[:6]}", env=env)
    assert result.returncode == 4, result  # not found
    result = await hms("deploy", str(spec_file(tmp_path, "bad", cpu_target=150)), env=env)
    assert result.returncode == 2, result  # invalid input
    ok(await hms("undeploy", name, env=env))  # done: 0
