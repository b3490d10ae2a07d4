"""A user's script pays for every import of the client: importing the orchestrator must not load
the Docker SDK, the HTTP stack, the terminal renderer, the pod runtimes or the workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("docker", "aiohttp", "rich", "psutil", "hms_mgmt.runtimes", "hms_mgmt.clock", "activities",
         "workflows", "worker")


def test_importing_the_orchestrator_loads_none_of_the_heavy_modules() -> None:
    code = ("import json, sys; from hms_mgmt import connection, orchestrator; from hms_mgmt.config import Settings; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
            f"or any(m == h or m.startswith(h + '.') for h in {HEAVY!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_a_deploy_request_is_signed_without_loading_pyjwt(tmp_path: Path) -> None:
    """Every request of a script signs a proof with its token's holder key: that takes the
    Ed25519 key, not PyJWT (whose import loads every algorithm and cryptography's x509). The proof
    is still a JWS that PyJWT, where requests are checked, verifies for exactly that request."""
    from hms_mgmt import auth

    auth.init_keys(tmp_path)
    token = auth.issue_token(tmp_path, user="alice", role="ops_admin")
    code = ("import json, sys; from hms_mgmt import auth, connection, orchestrator; from hms_mgmt.config import Settings; "
            f"proof = auth.prove({token!r}, action='deploy', service='hms-ach', bind={{'spec': 'abc'}}); "
            "print(json.dumps({'proof': proof, 'loaded': sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'jwt' or m.startswith('cryptography.x509'))}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["loaded"] == []
    proven = auth.verify_proof(out["proof"], action="deploy", service="hms-ach", bind={"spec": "abc"},
                               state_dir=tmp_path)
    assert proven.identity.user == "alice"
    with pytest.raises(auth.ProofMismatch):
        auth.verify_proof(out["proof"], action="deploy", service="hms-ach", bind={"spec": "other"},
                          state_dir=tmp_path)
