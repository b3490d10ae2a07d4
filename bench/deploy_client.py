"""A user's deploy script, as bench/deploy.py runs it in a fresh interpreter for each round:
import the client, connect, ``orchestrator.deploy(spec)``, exit. Settings come from the
environment (HMS_TEMPORAL_ADDRESS, HMS_TOKEN, ...), the spec as JSON in argv[1].

Prints one JSON line of wall-clock marks (unix seconds) for the benchmark's breakdown:
``started`` (first line of this file), ``imported``, ``connected``, ``returned``.
"""

import time

STARTED = time.time()

import json  # noqa: E402
import sys  # noqa: E402

from hms_mgmt import connection, orchestrator  # noqa: E402
from hms_mgmt.config import Settings  # noqa: E402


def main() -> None:
    marks = {"started": STARTED, "imported": time.time()}
    spec = json.loads(sys.argv[1])
    settings = Settings.from_env()
    # The sync API connects on first use; doing it here first only puts a mark between the two.
    connection.run(connection.shared_client(settings))
    marks["connected"] = time.time()
    orchestrator.deploy(spec, settings=settings)
    marks["returned"] = time.time()
    print(json.dumps(marks), flush=True)


if __name__ == "__main__":
    main()
