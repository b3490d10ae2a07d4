"""A user's script pays for every import of the client: importing the orchestrator must not load
the Docker SDK, the HTTP stack, the terminal renderer, the pod runtimes or the workers."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("docker", "aiohttp", "rich", "psutil", "hms_mgmt.runtimes", "hms_mgmt.clock", "activities",
         "workflows", "worker")


def test_importing_the_orchestrator_loads_none_of_the_heavy_modules() -> None:
    code = ("import json, sys; from hms_mgmt import connection, orchestrator; from hms_mgmt.config import Settings; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
            f"or any(m == h or m.startswith(h + '.') for h in {HEAVY!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
