"""Logging set-up: human-readable lines on stderr and in ``<data_dir>/logs/postroom.log``.

Log lines carry ``key=value`` pairs (session, queue_id, from, to) so that one grep
follows a message. Passwords and AUTH exchanges are never logged.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from pathlib import Path

__all__ = ["setup_logging", "stop_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _LogFile(logging.handlers.RotatingFileHandler):
    """The log file; when it cannot be written (a full disk), says so once on stderr
    instead of printing a traceback per line."""

    _complained = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - stdlib name
        if not self._complained:
            self._complained = True
            sys.stderr.write(f"postroom: cannot write the log file {self.baseFilename} "
                             "(disk full?); log lines are lost until it can be written again\n")
            sys.stderr.write(self.format(record) + "\n")


_listener: logging.handlers.QueueListener | None = None


def setup_logging(log_dir: Path | None, *, level: int = logging.INFO, stderr: bool = True,
                  rotate: bool = True) -> None:
    """Log lines are formatted where they happen and written by a background thread, so
    that neither the event loop nor the spool writer waits for the log file."""
    global _listener
    stop_logging()
    root = logging.getLogger("postroom")
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    if stderr:
        h = logging.StreamHandler()
        h.setFormatter(formatter)
        handlers.append(h)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One process rotates; the others (SMTP front ends) follow the file by name.
        fh: logging.Handler = _LogFile(
            log_dir / "postroom.log", maxBytes=50 * 1024 * 1024, backupCount=5,
            encoding="utf-8") if rotate else logging.handlers.WatchedFileHandler(
            log_dir / "postroom.log", encoding="utf-8")
        fh.setFormatter(formatter)
        handlers.append(fh)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    qh = logging.handlers.QueueHandler(records)
    root.addHandler(qh)
    _listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    _listener.start()
    atexit.register(stop_logging)
    root.propagate = False


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread (idempotent)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None
