"""The dev server `hms up` runs keeps its sqlite file in write-ahead-log mode (synced at
checkpoints): with sqlite's default rollback journal, an fsync per write, one health watch's
heartbeat a second per service saturates the disk near a hundred services. Real server; ~5 s."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hms_mgmt.devserver import DevServer, dev_environment, free_port


def journal_mode(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


async def test_hms_up_dev_server_writes_its_sqlite_file_through_a_wal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = DevServer(port=free_port(), state_dir=state)
    await server.start()
    try:
        assert journal_mode(state / "temporal.db") == "wal"
        assert (state / "temporal.db-wal").exists()
        assert (state / "temporal.db-wal").stat().st_mode & 0o077 == 0  # private, as the file itself
    finally:
        server.stop()


async def test_a_kit_dev_server_on_a_file_too(tmp_path: Path) -> None:
    db = tmp_path / "temporal.db"
    env = await dev_environment(dev_server_database_filename=str(db))
    try:
        assert journal_mode(db) == "wal"
    finally:
        await env.shutdown()
