"""The event log's pure parts: levels and overrides, filtering, archive expiry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from postroom.events import CATALOGUE, EventLog, Levels, connect_events, query_events


def test_levels_have_overrides_for_one_peer_or_domain() -> None:
    levels = Levels.from_names({"addressing": "none"})
    assert levels.level("addressing") == 0
    levels.set("addressing", "maximum", peer="192.0.2.7")
    assert levels.level("addressing", peer="192.0.2.7") == 3
    assert levels.level("addressing", peer="192.0.2.8") == 0
    levels.set("all", "medium", domain="Example.ORG")
    assert levels.level("smtp_protocol", domain="example.org") == 2
    levels.set("addressing", "none", peer="192.0.2.7")
    assert "192.0.2.7" not in levels.peers                   # nothing left: forgotten
    assert Levels.from_json(levels.as_json()).as_json() == levels.as_json()
    with pytest.raises(ValueError, match="no category"):
        levels.set("everything", "maximum")
    with pytest.raises(ValueError, match="no level"):
        levels.set("addressing", "loud")


def test_events_below_the_level_are_not_kept_but_errors_always_are(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.sqlite3", Levels.from_names(
        {c: "none" for c in ("initialization", "internal_processing")}))
    log.emit(1001, "started")                                # minimum, category at none
    log.emit(5002, "boom", reference="x")                    # an error: always kept
    log.levels.set("initialization", "minimum")
    log.emit(1001, "started again")
    log.flush()
    log.close()
    conn = connect_events(tmp_path / "events.sqlite3")
    got = query_events(conn)
    assert [(e["id"], e["text"]) for e in got] == [(5002, "boom"), (1001, "started again")]
    assert got[0]["fields"] == {"reference": "x"} and got[0]["severity"] == "error"
    assert [e["id"] for e in query_events(conn, severity="error")] == [5002]
    assert query_events(conn, newest=True, limit=1)[0]["id"] == 1001
    lines = (tmp_path / "logs" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_archive_days_past_the_limit_are_removed(tmp_path: Path) -> None:
    now = time.time()
    log = EventLog(tmp_path / "events.sqlite3", archive=tmp_path / "archive", archive_days=2,
                   clock=lambda: now)
    log.archive_copy("Q1", [b"Subject: x\r\n\r\nx\r\n"])
    old_day = time.strftime("%Y-%m-%d", time.gmtime(now - 5 * 86400))
    (tmp_path / "archive" / old_day).mkdir()
    assert log.expire_archive() == 1
    assert [p.name for p in (tmp_path / "archive").iterdir()] == [
        time.strftime("%Y-%m-%d", time.gmtime(now))]
    log.close()


def test_every_kind_has_a_known_category_level_and_severity() -> None:
    from postroom.events import CATEGORIES, LEVELS, SEVERITIES
    for kind in CATALOGUE.values():
        assert kind.category in CATEGORIES and kind.level in LEVELS[1:]
        assert kind.severity in SEVERITIES
        assert str(kind.id)[0] == str(CATEGORIES.index(kind.category) + 1)


@pytest.mark.parametrize("json_each", [True, False])
def test_a_batch_keeps_every_column_and_field_and_a_nan_does_not_lose_it(
        tmp_path: Path, json_each: bool) -> None:
    """A batch goes in as one statement (SQLite's json_each over the documents) where
    SQLite has it, else row by row; a document SQLite's JSON parser refuses (NaN is not
    JSON) sends that batch row by row, and nothing is lost."""
    log = EventLog(tmp_path / "events.sqlite3")
    log._json_each = log._json_each and json_each
    assert log._json_each == json_each               # this SQLite has json_each
    statements: list[str] = []
    log._conn.set_trace_callback(statements.append)
    log.emit(3001, "message received", queue_id="Q1", peer="192.0.2.7", size=4380,
             note="héllo \"quoted\"", nested={"a": [1, 2]})
    log.flush()
    batched = [s for s in statements if "json_each" in s]
    log.emit(3003, "deferred", queue_id="Q2", next_attempt=float("nan"))
    log.emit(5002, "boom", reference="x")
    log.flush()
    log.close()
    assert len(batched) == (1 if json_each else 0)
    got = query_events(connect_events(tmp_path / "events.sqlite3"))
    assert [(e["id"], e["severity"], e["category"], e["queue_id"], e["peer"]) for e in got] == [
        (3001, "info", "message_transfer", "Q1", "192.0.2.7"),
        (3003, CATALOGUE[3003].severity, "message_transfer", "Q2", None),
        (5002, "error", CATALOGUE[5002].category, None, None)]
    assert got[0]["text"] == "message received"
    assert got[0]["fields"] == {"size": 4380, "note": "héllo \"quoted\"", "nested": {"a": [1, 2]}}
    assert str(got[1]["fields"]["next_attempt"]) == "nan"
    assert abs(got[0]["at"] - time.time()) < 60
