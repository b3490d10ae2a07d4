"""Secrets end to end (issue 21), with a real Temporal server and a worker process: a pod gets
the file (process: ``$HMS_SECRETS_DIR``; docker: ``/run/secrets`` on a tmpfs), 0400, its user's;
and the value is in no workflow history, event, status, rollout history, dashboard view,
``docker inspect``, pod environment or worker log. Admission refuses a missing secret and an
``env`` value equal to a stored one; ``hms secret rm`` is refused while a running spec names it."""

from __future__ import annotations

import base64
import json
import os
import secrets as random
import stat
import uuid
from pathlib import Path

import pytest
from conftest import eventually, seed_spec, wait_phase, worker_process
from outsider import outsider
from temporalio.exceptions import ApplicationError

from dashboard.server import service_view
from hms_mgmt import secrets as store
from hms_mgmt.errors import HmsError, SpecError
from hms_mgmt.orchestrator import Orchestrator

pytestmark = pytest.mark.timeout(240)


def _forms(value: bytes) -> list[bytes]:
    """The value, and its base64 forms (as a payload or a JSON string would carry it)."""
    return [value, base64.b64encode(value), base64.urlsafe_b64encode(value).rstrip(b"=")]


def _assert_absent(value: bytes, where: str, data: bytes) -> None:
    for form in _forms(value):
        assert form not in data, f"the secret's value is in {where}"


async def _histories(client, task_queue: str) -> dict[str, bytes]:  # noqa: ANN001 - temporalio Client
    out = {}
    async for wf in client.list_workflows(f'TaskQueue = "{task_queue}"'):
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        out[f"{wf.id}/{wf.run_id}"] = b"".join(e.SerializeToString() for e in history.events) + history.to_json().encode()
    return out


def _pod_view(runtime: str, pod_id: str, file: str) -> tuple[bytes, int, int, bytes, bytes]:
    """(content, mode, uid, the pod's environment, what the engine shows of it) from the node."""
    if runtime == "docker":
        import docker

        client = docker.from_env()
        try:
            ct = client.containers.list(filters={"label": f"hms.pod={pod_id}"})[0]
            code, content = ct.exec_run(["cat", f"/run/secrets/{file}"])
            assert code == 0, content
            _, st = ct.exec_run(["stat", "-c", "%a %u", f"/run/secrets/{file}"])
            _, mounts = ct.exec_run(["cat", "/proc/mounts"])
            assert any(line.split()[1:3] == ["/run/secrets", "tmpfs"] for line in mounts.decode().splitlines())
            mode, uid = st.decode().split()
            attrs = client.api.inspect_container(ct.id)
            # Mounted from the engine's root, which no host account but root passes through.
            [source] = [m["Source"] for m in attrs["Mounts"] if m["Destination"] == "/run/secrets"]
            assert Path(source).parent == store.ENGINE_ROOT, source
            inspect = json.dumps(attrs).encode()
            _, env = ct.exec_run(["cat", "/proc/1/environ"])
            return content, int(mode, 8), int(uid), env, inspect
        finally:
            client.close()
    pid = next(p for p in os.listdir("/proc") if p.isdigit() and _is_pod(p, pod_id))
    env = Path(f"/proc/{pid}/environ").read_bytes()
    sdir = dict(kv.split(b"=", 1) for kv in env.split(b"\0") if b"=" in kv)[b"HMS_SECRETS_DIR"].decode()
    path = Path(sdir) / file
    st = path.stat()
    assert store._on_tmpfs(path)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, env, b""


def _is_pod(pid: str, pod_id: str) -> bool:
    try:
        return f"HMS_POD_ID={pod_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


async def _refused_at_admission(orch: Orchestrator, value: bytes) -> None:
    """A missing secret, and a secret's value pasted into env, are refused; nothing starts."""
    with pytest.raises(HmsError, match="no secret other"):
        await orch.deploy(seed_spec(name="hms-bad", min_replicas=1, max_replicas=1, secrets=["other"]))
    with pytest.raises(HmsError, match="env: a value is a stored secret's.*secrets:"):
        await orch.deploy(seed_spec(name="hms-env", min_replicas=1, max_replicas=1, env={"LOG_LEVEL": value.decode()}))


async def _outsider_refused(client, settings, st) -> None:  # noqa: ANN001 - Client, Settings, ServiceStatus
    """An outsider asking the control worker to seal the secrets (for a pod of their own) is refused."""
    ask = {"service": "hms-ach", "revision": st.revision, "spec": st.spec.model_dump(mode="json"),
           "image_id": "", "ticket": "", "pod_id": str(uuid.uuid4()), "node": settings.node}
    async with outsider(client) as them:
        with pytest.raises(ApplicationError, match="not a workflow of service hms-ach") as refused:
            await them.run("seal_secrets", ask, settings.task_queue, wf_id=f"svc-hms-ach-heal-{uuid.uuid4()}")
        assert refused.value.type == "AccessDenied"


async def _rotate(orch: Orchestrator, settings) -> bytes:  # noqa: ANN001 - Settings
    """A new value rolls the service as a new revision that pins it; its pod reads the new value."""
    rotated = random.token_hex(16).encode()
    info = await orch.set_secret("bank-key", rotated)
    assert (info.version, info.used_by) == (2, ["hms-ach"])

    async def rolled() -> bool:
        now = await orch.status("hms-ach")
        return now.phase == "Running" and now.revision == 2 and bool(now.pods) and all(
            p.revision == 2 and p.ready for p in now.pods)

    await eventually(rolled, timeout=120, what="the rollout onto bank-key v2")
    new_pod = (await orch.status("hms-ach")).pods[0]
    assert _pod_view(settings.runtime, new_pod.id, "b.pem")[0] == rotated
    history = await orch.rollout_history("hms-ach")
    assert [(r.revision, [(x.name, x.version) for x in r.spec.secrets]) for r in history][-1] == (
        2, [("bank-key", 2), ("bank-key", 2)])
    assert (await orch.list_secrets())[0].used_by == ["hms-ach"]
    return rotated


async def test_a_secret_reaches_its_pod_as_a_file_and_nowhere_else(temporal_env, settings, tmp_path):
    value = random.token_hex(16).encode()  # 32 random characters
    orch = Orchestrator(temporal_env.client, settings)
    info = await orch.set_secret("bank-key", value)
    assert (info.name, info.version, info.set_by) == ("bank-key", 1, "alice")
    log_path = tmp_path / "worker.log"
    async with worker_process(temporal_env, settings, log_path):
        await _refused_at_admission(orch, value)
        spec = seed_spec(min_replicas=1, max_replicas=1, secrets=["bank-key", {"name": "bank-key", "target": "b.pem"}])
        await orch.deploy(spec)
        st = await wait_phase(orch, "hms-ach", {"Running"}, timeout=120)
        pod = st.pods[0]
        for file in ("bank-key", "b.pem"):
            content, mode, uid, env, inspect = _pod_view(settings.runtime, pod.id, file)
            assert content == value and mode == 0o400
            if settings.runtime == "process" and os.geteuid() == 0:
                # the pod's own uid (pod_user: auto), from the range no account uses
                assert settings.pod_uid_base <= uid < settings.pod_uid_base + settings.pod_uid_count
            _assert_absent(value, "the pod's environment", env)
            _assert_absent(value, "docker inspect", inspect)

        await _outsider_refused(temporal_env.client, settings, st)
        with pytest.raises(SpecError, match="named by running service"):  # rm, while a running spec names it
            await orch.remove_secret("bank-key")

        places = {
            "status": (await orch.status("hms-ach")).model_dump_json().encode(),
            "rollout history": json.dumps([r.model_dump(mode="json") for r in await orch.rollout_history("hms-ach")]
                                          ).encode(),
            "dashboard view": json.dumps(service_view(await orch.status("hms-ach")), default=str).encode(),
            "secret list": json.dumps([i.model_dump(mode="json") for i in await orch.list_secrets()]).encode(),
            **await _histories(temporal_env.client, settings.task_queue),
        }
        assert any(b"seal_secrets" in data for data in places.values())  # the value travelled sealed

        rotated = await _rotate(orch, settings)
        places["status after rotation"] = (await orch.status("hms-ach")).model_dump_json().encode()
        places.update({f"{k} (after rotation)": v for k, v in (await _histories(temporal_env.client,
                                                                                 settings.task_queue)).items()})
        await orch.undeploy("hms-ach")
    places["events.jsonl"] = b"".join(p.read_bytes() for p in settings.state_dir.glob("events.jsonl*"))
    places["worker log"] = log_path.read_bytes()
    places["secrets.json (at rest)"] = (settings.state_dir / "secrets.json").read_bytes()
    for where, data in places.items():
        _assert_absent(value, where, data)
        _assert_absent(rotated, where, data)
    assert b"bank-key" in places["status"]  # names travel; values do not
    assert not store.pod_dir(pod.id).exists()  # gone with its pod
    assert not store.pod_dir(pod.id, engine=True).exists()
    await orch.remove_secret("bank-key")
    assert await orch.list_secrets() == []
