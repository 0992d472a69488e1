"""Message bytes as the spool keeps them: small messages inline, big ones in a file.

A message up to :data:`SPILL_AT` bytes lives in its SQLite row, which keeps the common
case at one fsync shared by a whole group commit. A bigger one is written, while it
arrives, to ``<data_dir>/bodies/<queue id>``; its row then holds only the header
lines Postroom added (Received, and a missing Message-ID or Date). Readers go through
:class:`Body`, which yields the message in chunks, so that no component ever holds a big
message whole.

Life of a body file:

* a session creates it when the message passes :data:`SPILL_AT` and writes each part
  as it is decoded; at the end of DATA the file and its folder are fsync'd before the
  row that names it is committed, and only then does the client get its 250;
* a refused, reset or broken-off message has its file removed by the session;
* when a message is finished, the transaction that deletes its row records the file
  in ``dead_bodies``; the queue manager unlinks it after that commit;
* a file without a row that is older than the server's start (a crash between file and
  commit) is removed at start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import writeback_due

__all__ = ["CHUNK", "SPILL_AT", "Body", "BodyWriter", "to_lf"]

SPILL_AT = 1 << 20          # message bytes held in memory before they go to a file
CHUNK = 1 << 20             # read size for streaming a body file


@dataclass(frozen=True, slots=True)
class Body:
    """A stored message: ``prefix`` (inline bytes), then the file's bytes, if any."""

    prefix: bytes
    path: Path | None = None
    file_size: int = 0

    @property
    def size(self) -> int:
        return len(self.prefix) + self.file_size

    def __len__(self) -> int:
        return self.size

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        if self.path is not None:
            with open(self.path, "rb") as f:
                while block := f.read(size):
                    yield block

    def head(self, limit: int) -> bytes:
        """At most the first ``limit`` bytes (the header section, for most readers)."""
        if len(self.prefix) >= limit or self.path is None:
            return self.prefix[:limit]
        out = bytearray(self.prefix)
        with open(self.path, "rb") as f:
            out += f.read(limit - len(out))
        return bytes(out)

    def read(self) -> bytes:
        """The whole message in memory: only for messages known to be small."""
        return self.prefix if self.path is None else b"".join(self.chunks())


def to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """CRLF line ends to LF, across chunk boundaries (a CR at a chunk's end waits)."""
    carry = b""
    for chunk in chunks:
        if carry:
            chunk, carry = carry + chunk, b""
        if chunk.endswith(b"\r"):
            chunk, carry = chunk[:-1], b"\r"
        if chunk:
            yield chunk.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def strip_cr(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """:func:`to_lf` for a message whose every CR begins a CRLF (a CRLF-clean one):
    every CR deleted, with no care for chunk boundaries."""
    for chunk in chunks:
        yield chunk.translate(None, b"\r")


class BodyWriter:
    """The parts of one message as a session receives them; spills to a file past
    :data:`SPILL_AT`. Not thread-safe: one session owns it.

    Writes that fail (a full disk) are remembered and reported by :meth:`finish`, so
    that the session reads the message to its end and then answers 452.
    """

    def __init__(self, folder: Path, serial: int, name: str) -> None:
        self.folder = folder
        self.serial = serial
        self.name = name                      # the queue id the message will get
        self.size = 0
        self.head = bytearray()               # the first bytes, for header checks
        self._parts: list[bytes] = []
        self._fd = -1
        self._written = 0                     # bytes in the file
        self._kicked = 0                      # of which the writeback was started
        self.error: OSError | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def write(self, parts: Iterable[bytes]) -> None:
        for part in parts:
            if len(self.head) < 65536:
                self.head += part[: 65536 - len(self.head)]
            self.size += len(part)
            if self.error is not None:
                continue
            if self._fd < 0:
                self._parts.append(part)
                if self.size > SPILL_AT:
                    self._spill()
            else:
                self._write(part)

    def _spill(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            self.error = exc
            self._parts = []
            return
        parts, self._parts = self._parts, []
        for part in parts:
            self._write(part)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = exc
            return
        self._written += len(data)
        self._kicked = writeback_due(self._fd, self._written, self._kicked)

    def inline(self) -> bytes | None:
        """The whole message, when it never left memory."""
        return b"".join(self._parts) if self._fd < 0 and self.error is None else None

    def finish(self) -> None:
        """Make the file durable (file and folder fsync'd); raises the first write error.

        Blocking: run it off the event loop.
        """
        if self.error is not None:
            raise self.error
        if self._fd < 0:
            return
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -2                     # closed, but the message is in the file
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Forget the message: close and remove its file, if any."""
        self._parts = []
        if self._fd >= 0:
            os.close(self._fd)
        if self._fd != -1:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._fd = -1
