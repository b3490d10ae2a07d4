"""The router's /-/health and /-/table are unauthenticated: a failed resync shows a generic text
there, not the exception (which names the Temporal address and TLS file paths); the log keeps it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from hms_mgmt.config import Settings
from hms_mgmt.errors import ConfigError
from router.feed import RESYNC_FAILED, EndpointTable, FeedSync

DETAIL = "cannot reach Temporal at 10.9.8.7:7233 (HMS_TEMPORAL_TLS_CA=/etc/hms/secret-ca.pem)"


def test_resync_error_is_generic_and_logged_in_full(tmp_path: Path, caplog) -> None:
    table = EndpointTable()
    sync = FeedSync(Settings(state_dir=tmp_path), table, interval_s=0.01)

    async def refuse() -> None:
        raise ConfigError(DETAIL)

    sync.connected = refuse  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(sync.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if table.resync_error:
                break
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="hms.router.feed"):
        asyncio.run(main())
    assert table.resync_error == RESYNC_FAILED
    shown = str(table.snapshot())
    assert "10.9.8.7" not in shown and "secret-ca.pem" not in shown and RESYNC_FAILED in shown
    assert DETAIL in caplog.text
