"""Local mailboxes in Maildir format, readable by Dovecot or any IMAP server.

Layout: the Maildir of ``local@domain`` is ``<root>/<domain>/<local>/`` with ``tmp/``,
``new/`` and ``cur/``. Dovecot reads it with ``mail_location = maildir:<root>/%d/%n``.

Delivery is durable before it is reported: write into ``tmp/``, fsync the file, link
it into ``new/``, remove the tmp name, fsync ``new/``. Files use LF line ends, as every
Maildir reader expects.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from pathlib import Path

__all__ = ["MaildirStore", "StoreError"]

_counter = itertools.count()


class StoreError(Exception):
    """A delivery that did not happen; ``transient`` says whether to try again."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


_TRANSIENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
              errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM}


class MaildirStore:
    def __init__(self, root: Path, hostname: str) -> None:
        self.root = root
        # Maildir names must not contain '/' or ':'; RFC-free convention from qmail.
        self.hostname = hostname.replace("/", "\\057").replace(":", "\\072")

    def maildir(self, local: str, domain: str) -> Path:
        if not local or "/" in local or local.startswith(".") or "\x00" in local:
            raise StoreError(f"unsafe mailbox name {local!r}", transient=False)
        if not domain or "/" in domain or domain.startswith("."):
            raise StoreError(f"unsafe domain name {domain!r}", transient=False)
        return self.root / domain / local

    def create(self, local: str, domain: str) -> Path:
        base = self.maildir(local, domain)
        for sub in ("tmp", "new", "cur"):
            (base / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        return base

    def deliver(self, local: str, domain: str, data: bytes) -> Path:
        """Store one message (already with its Return-Path and Delivered-To)."""
        try:
            base = self.create(local, domain)
            sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
            unique = f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}"
            name = f"{unique}.{self.hostname},S={len(data)}"
            tmp = base / "tmp" / name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            final = base / "new" / name
            try:
                os.link(tmp, final)
            finally:
                os.unlink(tmp)
            dfd = os.open(base / "new", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return final
        except OSError as exc:
            transient = exc.errno in _TRANSIENT
            raise StoreError(f"{os.strerror(exc.errno or 0)} ({exc.__class__.__name__})",
                             transient) from exc
