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


def test_with_a_loop_lines_are_written_by_the_loop_in_batches(tmp_path: Path) -> None:
    """Attached to an event loop, the lines of a moment are written together by the
    loop itself (no writer thread), from the loop's thread or any other, in order; what
    is still waiting when the loop ends is written then."""
    import asyncio
    import threading

    log_file = tmp_path / "postroom.log"
    writes: list[str] = []

    def lines() -> list[str]:
        return [line.split(" ", 4)[4] for line in log_file.read_text().splitlines()]

    async def main() -> tuple[list[str], list[str]]:
        observability.attach_loop(asyncio.get_running_loop())
        assert observability._handler is not None
        real = observability._handler._write
        observability._handler._write = lambda batch: (  # type: ignore[method-assign]
            writes.append(threading.current_thread().name), real(batch))
        log = logging.getLogger("postroom.test")
        log.info("one")
        other = threading.Thread(target=log.info, args=("two, from a thread",))
        other.start()
        other.join()
        log.info("three")
        before = lines()                        # nothing written yet: they wait
        await asyncio.sleep(observability.FLUSH_EVERY * 3)
        after = lines()
        log.info("four, when the loop ends")
        observability.attach_loop(None)
        return before, after

    observability.setup_logging(tmp_path, stderr=False)
    try:
        before, after = asyncio.run(main())
        assert before == []
        assert after == ["one", "two, from a thread", "three"]
        assert lines()[-1] == "four, when the loop ends"
        logging.getLogger("postroom.test").info("five, with no loop: at once")
        assert lines()[-1] == "five, with no loop: at once"
        # one write for the first three, by the loop's thread
        assert writes[0] == threading.main_thread().name and len(writes) == 3
        assert [t for t in threading.enumerate() if t.name.startswith("log-")] == []
    finally:
        observability.stop_logging()
