"""What the benchmarks in ``bench/`` share.

- :mod:`bench.lib.source` — which product code a benchmark measures (:func:`use_source`);
- :mod:`bench.lib.stack` — the local stack (from :mod:`hms_mgmt.testing`), access, cleanup;
- :mod:`bench.lib.stats` — medians, quantiles and one summary of a column;
- :mod:`bench.lib.ports` — free ports and the host ports of labelled containers;
- :mod:`bench.lib.poll` — the one health poller both sides of a benchmark use;
- :mod:`bench.lib.cpu` — CPU seconds and memory of processes;
- :mod:`bench.lib.history` — where the time went, read from workflow histories;
- :mod:`bench.lib.results` — ``bench/results/<name>.json`` with machine info, tables, ``run_main``.

Nothing here imports the product at import time: :func:`use_source` must run first.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO))

EXAMPLE_IMAGE = "registry.gov/hms-ach:1.4"
