"""The SQLite spool's queue-round queries use their indexes: each runs every round of
the queue manager, so a scan of every recipient costs in proportion to the queue (W3's
deferred mail: a fifth of the server's CPU before the notices' index)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from postroom.spool.sqlite import OWED, SqliteSpool


def plan(db: Path, query: str, *args: object) -> str:
    conn = sqlite3.connect(db)
    try:
        return " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", args))
    finally:
        conn.close()


def test_the_owed_notices_are_read_through_their_own_index(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    spool.close()
    got = plan(tmp_path / "spool.sqlite3", OWED, 100)
    assert "USING INDEX recipients_owed" in got, got
    assert "recipients_message" not in got, got


def test_a_spool_made_before_the_index_gets_it(tmp_path: Path) -> None:
    db = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(db)
    spool.close()
    conn = sqlite3.connect(db)
    conn.executescript("DROP INDEX recipients_owed; CREATE INDEX recipients_notice ON "
                       "recipients (notice) WHERE notice != '';")
    conn.close()
    SqliteSpool(db).close()
    conn = sqlite3.connect(db)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert "recipients_owed" in names and "recipients_notice" not in names
