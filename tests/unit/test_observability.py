"""The log handler's own fast paths write the same lines as logging's general ones."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from postroom import observability
from postroom.observability import FORMAT, _Formatter


def record(msg: str, args: tuple[object, ...], exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("postroom.smtp", logging.INFO, __file__, 1, msg, args, info)


def test_a_line_is_what_logging_would_have_written() -> None:
    ours = _Formatter(FORMAT)
    theirs = logging.Formatter(FORMAT)
    theirs.formatTime = ours.formatTime      # type: ignore[method-assign]
    for r in (record("session=%s connect from [%s]:%d", ("abc", "127.0.0.1", 4000)),
              record("100% plain, no args", ()), record("a traceback", (), exc=True)):
        assert ours.format(r) == theirs.format(r)
    assert "ValueError: boom" in ours.format(record("a traceback", (), exc=True))


def test_lines_reach_the_file_and_a_filter_still_applies(tmp_path: Path) -> None:
    observability.setup_logging(tmp_path, stderr=False)
    try:
        log = logging.getLogger("postroom.test")
        handler = observability._handler
        assert handler is not None
        handler.addFilter(lambda r: "secret" not in r.getMessage())
        log.info("queue_id=%s delivered", "Q1")
        log.info("a secret line")
        log.warning("to=<%s> deferred", "a@b.test")
    finally:
        observability.stop_logging()
    lines = (tmp_path / "postroom.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "INFO postroom.test queue_id=Q1 delivered",
        "WARNING postroom.test to=<a@b.test> deferred"]
