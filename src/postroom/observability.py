"""Logging set-up: human-readable lines on stderr and in ``<data_dir>/logs/postroom.log``.

Log lines carry ``key=value`` pairs (session, queue_id, from, to) so that one grep
follows a message. Passwords and AUTH exchanges are never logged.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

__all__ = ["attach_loop", "setup_logging", "stop_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


FLUSH_EVERY = 0.05          # seconds a batch of log lines waits for company
MAX_BYTES = 50 * 1024 * 1024
BACKUPS = 5


class _LogFile:
    """``postroom.log``, written a batch at a time. The process that rotates counts
    what it wrote and renames the file past MAX_BYTES (``.1`` ... ``.5``); the others
    (SMTP front ends) reopen it by name once a batch when it was renamed. When it cannot
    be written (a full disk), says so once on stderr instead of once per line."""

    def __init__(self, path: Path, rotate: bool) -> None:
        self.path = path
        self.rotate = rotate
        self._complained = False
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _renamed(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev)

    def _rollover(self) -> None:
        os.close(self._fd)
        for i in range(BACKUPS - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write(self, data: bytes) -> None:
        try:
            if self.rotate and self._size and self._size + len(data) > MAX_BYTES:
                self._rollover()
            elif not self.rotate and self._renamed():
                os.close(self._fd)
                self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._size += len(data)
        except OSError as exc:
            if not self._complained:
                self._complained = True
                sys.stderr.write(f"postroom: cannot write the log file {self.path} "
                                 f"({exc.strerror or exc}; disk full?); log lines are lost "
                                 "until it can be written again\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Formatter(logging.Formatter):
    """logging's format, with the time text made once a second, not once a line."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """FORMAT, written out: logging's general path (a dict of the record's fields,
        %-formatting, the usesTime checks) cost more than the line itself."""
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        return (f"{self.formatTime(record)} {record.levelname} {record.name} "
                f"{record.getMessage()}")


class _Batched(logging.Handler):
    """Formats each line where it is logged and writes the lines in batches, one write
    per FLUSH_EVERY, from the event loop's own thread once :func:`attach_loop` named
    it (until then, and after, each line at once: start-up, shutdown, the tools).

    Not from a thread of its own: in a busy server, a thread that wants the GIL a few
    times a second costs the event loop far more than its own work, since the loop
    gives the GIL up at every poll and, with a thread waiting for it, wakes that thread
    each time. Measured in-process (4,000 SMTP sessions of four lines each through
    Session, a fake transport): 388-430 us a session with the writer thread, 350-360
    with the loop writing, 301-317 with logging off.

    Copies for stderr (``postroom serve`` without ``-q``) still go through a thread,
    one hand-off per batch: a terminal or pipe that stops reading must not stop the
    loop. The log file is a local file: its write goes to the page cache."""

    def __init__(self, stderr: bool, file: _LogFile | None) -> None:
        super().__init__()
        self.stderr = stderr
        self.file = file
        self._lines: deque[str] = deque()       # appended from any thread, in order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._scheduled = False
        self._writing = threading.Lock()        # a flush, and a line written at once
        self._to_stderr: queue.SimpleQueue[str | None] | None = None
        self._thread: threading.Thread | None = None
        if stderr:
            self._to_stderr = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._copy_to_stderr,
                                            name="log-stderr", daemon=True)
            self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """As logging's, without the handler's lock: formatting is pure and the deque
        takes lines from any thread."""
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            loop = self._loop
            if loop is None:
                self._write([line])
                return
            self._lines.append(line)
            if not self._scheduled:
                self._scheduled = True
                try:
                    if threading.get_ident() == self._loop_thread:
                        loop.call_later(FLUSH_EVERY, self.flush)
                    else:
                        loop.call_soon_threadsafe(loop.call_later, FLUSH_EVERY, self.flush)
                except RuntimeError:                 # the loop is closed
                    self.flush()
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Write from ``loop`` (running in this thread) from now on; None: at once."""
        self.flush()
        self._loop = loop
        self._loop_thread = threading.get_ident() if loop is not None else 0

    def flush(self) -> None:
        self._scheduled = False
        lines = self._lines
        taken = [lines.popleft() for _ in range(len(lines))]
        if taken:
            self._write(taken)

    def _write(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        with self._writing:
            if self.file is not None:
                self.file.write(text.encode("utf-8", "replace"))
        if self._to_stderr is not None:
            self._to_stderr.put(text)

    def _copy_to_stderr(self) -> None:
        assert self._to_stderr is not None
        while (text := self._to_stderr.get()) is not None:
            with contextlib.suppress(Exception):
                sys.stderr.write(text)
                sys.stderr.flush()

    def close(self) -> None:
        """Write out what is waiting and stop the stderr thread."""
        self._loop = None
        self.flush()
        if self._thread is not None and self._thread.is_alive():
            assert self._to_stderr is not None
            self._to_stderr.put(None)
            self._thread.join(timeout=5)
        if self.file is not None:
            self.file.close()
        super().close()


_handler: _Batched | None = None


def setup_logging(log_dir: Path | None, *, level: int = logging.INFO, stderr: bool = True,
                  rotate: bool = True) -> None:
    """Log lines are formatted where they happen and written in batches by the event
    loop (:func:`attach_loop`), so that no thread waits for the log file."""
    global _handler
    stop_logging()
    root = logging.getLogger("postroom")
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One process rotates; the others (SMTP front ends) follow the file by name.
        file = _LogFile(log_dir / "postroom.log", rotate)
    # our lines never show the process, thread or task: skip finding them per record
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False      # type: ignore[attr-defined]  # 3.12+
    # ...nor the source line: the logging HOWTO's "Optimization" switch for findCaller
    logging._srcfile = None              # type: ignore[attr-defined]
    _handler = _Batched(stderr, file)
    _handler.setFormatter(_Formatter(FORMAT))
    root.addHandler(_handler)
    atexit.register(stop_logging)
    root.propagate = False


def attach_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Log lines are written from ``loop``, running in this thread, from now on (a
    batch per FLUSH_EVERY); ``None``: each at once again (the loop is ending)."""
    if _handler is not None:
        _handler.attach(loop)


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread (idempotent)."""
    global _handler
    if _handler is not None:
        logging.getLogger("postroom").removeHandler(_handler)
        _handler.close()
        _handler = None
