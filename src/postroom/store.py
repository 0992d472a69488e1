"""Local mailboxes in Maildir format, readable by Dovecot or any IMAP server.

Layout: the Maildir of ``local@domain`` is ``<root>/<domain>/<local>/`` with ``tmp/``,
``new/`` and ``cur/``. Dovecot reads it with ``mail_location = maildir:<root>/%d/%n``.

Delivery is durable before it is reported: write into ``tmp/``, fsync the file, link
it into ``new/``, remove the tmp name, fsync ``new/``. Files use LF line ends, as every
Maildir reader expects.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .files import writeback_due
from .process import process_id
from .syncer import Syncer

__all__ = ["MaildirStore", "StoreError", "sync", "sync_async"]

_counter = itertools.count()


class StoreError(Exception):
    """A delivery that did not happen; ``transient`` says whether to try again."""

    def __init__(self, message: str, transient: bool, reason: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.reason = reason or message        # without paths: safe to show a sender


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirStore:
    """Maildirs under one root; see the module docstring for the layout."""

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = root
        # Maildir names must not contain '/' or ':'; RFC-free convention from qmail.
        self.hostname = hostname.replace("/", "\\057").replace(":", "\\072")
        self._known: set[Path] = set()
        self._ready: dict[tuple[str, str, str], str] = {}   # (local, domain, folder) -> folder

    def maildir(self, local: str, domain: str) -> Path:
        if not local or "/" in local or local.startswith(".") or "\x00" in local:
            raise StoreError(f"unsafe mailbox name {local!r}", transient=False)
        if not domain or "/" in domain or domain.startswith("."):
            raise StoreError(f"unsafe domain name {domain!r}", transient=False)
        return self.root / domain / local

    def folder(self, local: str, domain: str, folder: str = "") -> Path:
        """A Maildir++ folder of a mailbox (``Junk`` → ``<mailbox>/.Junk``, Dovecot's
        layout); "" is the inbox."""
        base = self.maildir(local, domain)
        if not folder:
            return base
        if not folder.isalnum():
            raise StoreError(f"unsafe folder name {folder!r}", transient=False)
        return base / f".{folder}"

    def create(self, local: str, domain: str, folder: str = "") -> Path:
        """Make the Maildir (and ``folder`` in it) if needed; new folders are fsync'd
        into their parents."""
        base = self.folder(local, domain, folder)
        if base in self._known:
            return base
        if folder:
            self.create(local, domain)
        for sub in ("tmp", "new", "cur"):
            path = base / sub
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
                for parent in (base, base.parent, base.parent.parent):
                    _fsync_dir(parent)
        self._known.add(base)
        return base

    def deliver(self, local: str, domain: str, data: bytes | Iterable[bytes], *,
                sync_dir: bool = True, folder: str = "") -> Path:
        """Store one message (already with its Return-Path and Delivered-To); ``data``
        may be an iterable of chunks, written as they come (a big message). ``folder``
        names a Maildir++ folder (``Junk``) instead of the inbox.

        With ``sync_dir=False`` the caller must :meth:`sync` the returned file's folder
        before it reports the delivery: several deliveries then share one fsync.
        """
        draft = self._draft(local, domain, data, folder)
        try:
            try:
                os.fsync(draft.fd)
            except BaseException:
                draft.discard()
                raise
            final = draft.publish()
            if sync_dir:
                _fsync_dir(os.path.dirname(final))
            return Path(final)
        except OSError as exc:
            raise _store_error(exc, draft.base) from exc

    async def deliver_async(self, local: str, domain: str, data: bytes, syncer: Syncer,
                            folder: str = "") -> str:
        """:meth:`deliver` of a small message from the event loop: the file is written
        in the loop's thread (page cache, a few microseconds) and fsync'd by ``syncer``,
        without a worker thread. The caller syncs the returned file's folder
        (:func:`sync_async`) before it reports the delivery."""
        if (local, domain, folder) not in self._ready:
            # a new mailbox: its folders are made and fsync'd in a thread, once
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._folder_ready, local, domain, folder)
            except OSError as exc:
                raise _store_error(exc, str(self.root)) from exc
        draft = self._draft(local, domain, data, folder)
        try:
            try:
                await syncer.fsync(draft.fd)
            except BaseException:
                draft.discard()
                raise
            return draft.publish()
        except OSError as exc:
            raise _store_error(exc, draft.base) from exc

    def _folder_ready(self, local: str, domain: str, folder: str) -> str:
        key = (local, domain, folder)
        base = self._ready.get(key)
        if base is None:
            # made (or found) once; later deliveries use its name as a string
            base = self._ready[key] = str(self.create(local, domain, folder))
        return base

    def _draft(self, local: str, domain: str, data: bytes | Iterable[bytes],
               folder: str) -> _Draft:
        """The message written into ``tmp/``, not yet fsync'd nor linked."""
        key = (local, domain, folder)
        base = ""
        try:
            base = self._folder_ready(local, domain, folder)
            sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
            # microseconds zero-padded: names in one folder sort by arrival
            # the process id: a forked front end names its files apart
            unique = f"{sec}.M{usec:06d}P{process_id()}Q{next(_counter)}"
            tmp = f"{base}/tmp/{unique}.{self.hostname}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                # the folder went since we made it (removed by hand): make it again
                self._ready.pop(key, None)
                self._known.discard(Path(base))
                self._known.discard(self.maildir(local, domain))
                self.create(local, domain, folder)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            draft = _Draft(fd, tmp, f"{base}/new/{unique}.{self.hostname}", base)
            size = kicked = 0
            try:
                for chunk in [data] if isinstance(data, bytes) else data:
                    view = memoryview(chunk)
                    size += len(view)
                    while view:
                        view = view[os.write(fd, view):]
                    kicked = writeback_due(fd, size, kicked)     # a big message's
            except BaseException:
                draft.discard()
                raise
            draft.final += f",S={size}"
            return draft
        except OSError as exc:
            raise _store_error(exc, base or str(self.root)) from exc


class _Draft:
    """A message file in ``tmp/``, open, before its fsync and its link into ``new/``."""

    __slots__ = ("fd", "tmp", "final", "base")

    def __init__(self, fd: int, tmp: str, final: str, base: str) -> None:
        self.fd, self.tmp, self.final, self.base = fd, tmp, final, base

    def discard(self) -> None:
        os.close(self.fd)
        os.unlink(self.tmp)

    def publish(self) -> str:
        """Close it and link it into ``new/`` (after its fsync); returns the new name."""
        os.close(self.fd)
        try:
            os.link(self.tmp, self.final)
        finally:
            os.unlink(self.tmp)
        return self.final


def _store_error(exc: OSError, where: str) -> StoreError:
    # Every storage error (full disk, permissions, a file where a folder should be) is
    # something an administrator can fix: retry, never drop.
    reason = os.strerror(exc.errno) if exc.errno else exc.__class__.__name__
    return StoreError(f"{reason} ({exc.filename or where})", transient=True, reason=reason)


class _Shared:
    """One folder's fsyncs, shared by the threads that need them (a group commit).

    A thread's names are durable after an fsync of the folder that *started* after it
    linked them. So it waits for the next fsync to start; the threads that ask while one
    runs all wait for the next, and one of them runs it for all. Ten sessions delivering
    into one mailbox at once make two or three fsyncs, not ten.
    """

    __slots__ = ("cond", "started", "finished", "running", "errors", "waiting")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.started = 0          # fsyncs begun
        self.finished = 0         # fsyncs ended (they run one at a time, in order)
        self.running = False
        self.errors: dict[int, BaseException] = {}    # failed fsyncs someone may ask about
        self.waiting: dict[int, int] = {}             # fsync number -> threads needing it

    def sync(self, folder: str) -> None:
        with self.cond:
            need = self.started + 1          # the first fsync to start after this call
            self.waiting[need] = self.waiting.get(need, 0) + 1
            try:
                while self.finished < need:
                    if self.running:
                        self.cond.wait()
                        continue
                    self.running = True
                    self.started += 1
                    mine = self.started
                    self.cond.release()
                    error: BaseException | None = None
                    try:
                        _fsync_dir(folder)
                    except BaseException as exc:  # noqa: BLE001 - every waiter hears of it
                        error = exc
                    finally:
                        self.cond.acquire()
                        self.running = False
                        self.finished = mine
                        if error is not None:
                            self.errors[mine] = error
                        self.cond.notify_all()
                error = self.errors.get(need)
            finally:
                self.waiting[need] -= 1
                if not self.waiting[need]:
                    del self.waiting[need]
                # forget the failures no waiting thread can still ask about
                oldest = min(self.waiting, default=self.finished + 1)
                for gen in [g for g in self.errors if g < oldest]:
                    del self.errors[gen]
        if error is not None:
            raise error


_shared: dict[str, _Shared] = {}
_shared_lock = threading.Lock()


def sync(folder: Path | str) -> None:
    """Make the names linked into ``folder`` durable (fsync of the directory); threads
    that ask at the same time share one fsync."""
    key = str(folder)
    shared = _shared.get(key)
    if shared is None:
        with _shared_lock:
            shared = _shared.setdefault(key, _Shared())
    try:
        shared.sync(key)
    except OSError as exc:
        raise _store_error(exc, str(folder)) from exc


async def sync_async(folder: str, syncer: Syncer) -> None:
    """:func:`sync` from the event loop: ``syncer``'s group commit, without a thread."""
    try:
        await syncer.sync_dir(folder)
    except OSError as exc:
        raise _store_error(exc, folder) from exc
