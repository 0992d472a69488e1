"""Logging set-up: human-readable lines on stderr and in ``<data_dir>/logs/postroom.log``.

Log lines carry ``key=value`` pairs (session, queue_id, from, to) so that one grep
follows a message. Passwords and AUTH exchanges are never logged.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

__all__ = ["setup_logging"]

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


def setup_logging(log_dir: Path | None, *, level: int = logging.INFO, stderr: bool = True) -> None:
    root = logging.getLogger("postroom")
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT)
    if stderr:
        h = logging.StreamHandler()
        h.setFormatter(formatter)
        root.addHandler(h)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fh = _LogFile(
            log_dir / "postroom.log", maxBytes=50 * 1024 * 1024, backupCount=5, encoding="utf-8")
        fh.setFormatter(formatter)
        root.addHandler(fh)
    root.propagate = False
