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
