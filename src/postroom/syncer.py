"""fsync from the event loop without a thread: Linux AIO's ``IOCB_CMD_FSYNC``.

Python's ``os.fsync`` blocks, so an event loop hands it to a worker thread; the thread
then needs the GIL back after every call, and a busy loop thread holds it. Measured on
W1 (a Maildir file and its folder synced per message, two processes): the hand-offs
cost about 0.35 ms of CPU per message, a fifth of the server's. Linux has had an
asynchronous fsync since 4.18: ``io_submit`` with ``IOCB_CMD_FSYNC`` queues the same
``vfs_fsync`` that ``fsync(2)`` runs to a kernel worker, and the completion is counted on
an eventfd that the loop watches. Several of them run at once, so the file system still
groups their journal commits. Python has no binding for it (nor does the standard
library), so this calls the four system calls through ctypes.

Where that is missing (another OS or architecture, ``io_setup`` refused by a sandbox or
by ``fs.aio-max-nr``), each fsync runs in a small thread pool instead: the same result,
at the old cost.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .process import process_id

__all__ = ["Syncer"]

log = logging.getLogger("postroom.store")

# io_setup, io_destroy, io_getevents, io_submit
_CALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FSYNC = 2
_IOCB_FLAG_RESFD = 1
DEPTH = 256                     # requests in flight per process; more wait their turn


class _Iocb(ctypes.Structure):          # struct iocb, little-endian layout
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):         # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Aio:
    """One AIO context and its eventfd, in one process, for one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        calls = _CALLS.get(platform.machine())
        if calls is None:
            raise OSError(f"no AIO system call numbers for {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = calls
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self.ctx = ctypes.c_ulong(0)
        if self._call(self._setup, DEPTH, ctypes.byref(self.ctx)) < 0:
            raise _errno_error("io_setup")
        try:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            self._call(self._destroy, self.ctx)
            raise
        self.loop = loop
        self.waiting: dict[int, tuple[_Iocb, asyncio.Future[None]]] = {}
        self.queued: list[tuple[_Iocb, asyncio.Future[None]]] = []   # not yet submitted
        self.flushing = False
        self.ids = itertools.count(1)
        self.events = (_Event * 64)()
        self.zero = _Timespec(0, 0)
        loop.add_reader(self.efd, self._reap)

    def _call(self, nr: int, *args: object) -> int:
        return int(self._syscall(ctypes.c_long(nr), *args))

    def fsync(self, fd: int) -> asyncio.Future[None]:
        iocb = _Iocb(data=next(self.ids), opcode=_IOCB_CMD_FSYNC, fildes=fd,
                     flags=_IOCB_FLAG_RESFD, resfd=self.efd)
        fut = self.loop.create_future()
        self.queued.append((iocb, fut))
        if not self.flushing:          # one io_submit for what this loop turn asked for
            self.flushing = True
            self.loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.flushing = False
        room = DEPTH - len(self.waiting)
        batch, self.queued = self.queued[:room], self.queued[room:]
        while batch:
            ptrs = (ctypes.POINTER(_Iocb) * len(batch))(
                *(ctypes.pointer(iocb) for iocb, _ in batch))
            n = self._call(self._submit, self.ctx, ctypes.c_long(len(batch)), ptrs)
            if n < 0:
                err = ctypes.get_errno()
                if err == 11:                     # EAGAIN: the kernel is full; retry later
                    self.queued[:0] = batch
                    if not self.waiting:          # no completion will come to retry it
                        self.flushing = True
                        self.loop.call_later(0.001, self._flush)
                    return
                iocb, fut = batch.pop(0)          # the first request is the bad one
                if not fut.done():
                    fut.set_exception(OSError(err, f"fsync: {os.strerror(err)}"))
                continue
            for iocb, fut in batch[:n]:
                self.waiting[iocb.data] = (iocb, fut)
            batch = batch[n:]

    def _reap(self) -> None:
        try:
            os.read(self.efd, 8)
        except BlockingIOError:
            pass
        while self.waiting:
            n = self._call(self._getevents, self.ctx, ctypes.c_long(0),
                           ctypes.c_long(len(self.events)), self.events,
                           ctypes.byref(self.zero))
            if n <= 0:
                break
            for ev in self.events[:n]:
                _, fut = self.waiting.pop(ev.data, (None, None))
                if fut is None or fut.done():
                    continue
                if ev.res < 0:
                    fut.set_exception(OSError(-ev.res, f"fsync: {os.strerror(-ev.res)}"))
                else:
                    fut.set_result(None)
            if n < len(self.events):
                break
        if self.queued and not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.efd)
        except (RuntimeError, ValueError):
            pass                                  # the loop is already closed
        self._call(self._destroy, self.ctx)       # waits for what is in flight
        os.close(self.efd)


def _errno_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class Syncer:
    """``await syncer.fsync(fd)`` is ``os.fsync(fd)`` without blocking the loop;
    ``await syncer.sync_dir(path)`` makes the names linked into a folder durable, with
    the callers of one moment sharing one fsync (a group commit)."""

    def __init__(self, use_aio: bool = True) -> None:
        self.use_aio = use_aio
        self._aio: _Aio | None = None
        self._owner: tuple[int, asyncio.AbstractEventLoop] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._folders: dict[str, _Folder] = {}

    @property
    def mode(self) -> str:
        return "aio" if self._aio is not None else "threads"

    def _context(self) -> _Aio | None:
        loop = asyncio.get_running_loop()
        pid = process_id()
        if self._owner != (pid, loop):    # first use, or a forked child, or a new loop
            if self._aio is not None and self._owner is not None:
                if self._owner[0] == pid:
                    self._aio.close()
                else:                             # a parent's context is not ours
                    os.close(self._aio.efd)
            self._owner = (pid, loop)
            self._aio = None
            self._folders = {}
            if self.use_aio:
                try:
                    self._aio = _Aio(loop)
                except OSError as exc:
                    log.info("fsync runs in threads (no Linux AIO here: %s)", exc)
        return self._aio

    async def fsync(self, fd: int) -> None:
        aio = self._context()
        if aio is not None:
            await aio.fsync(fd)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(4, thread_name_prefix="fsync")
        await asyncio.get_running_loop().run_in_executor(self._pool, os.fsync, fd)

    async def sync_dir(self, path: str | Path) -> None:
        key = str(path)
        self._context()
        folder = self._folders.get(key)
        if folder is None:
            folder = self._folders[key] = _Folder(key, self)
        await folder.sync()

    def close(self) -> None:
        if self._aio is not None and self._owner is not None and \
                self._owner[0] == process_id():
            self._aio.close()
        self._aio = self._owner = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _Folder:
    """One folder's fsyncs. A caller's names are durable after an fsync that *started*
    after it linked them: with none running, one starts now; while one runs, the callers
    wait for the next, which starts when it ends and serves them all."""

    __slots__ = ("path", "syncer", "running", "next")

    def __init__(self, path: str, syncer: Syncer) -> None:
        self.path = path
        self.syncer = syncer
        self.running = False
        self.next: asyncio.Future[None] | None = None

    async def sync(self) -> None:
        if not self.running:
            fut = asyncio.get_running_loop().create_future()
            self._start(fut)
        elif self.next is None:
            fut = self.next = asyncio.get_running_loop().create_future()
        else:
            fut = self.next
        # shielded: a cancelled caller must not cancel the others' fsync
        await asyncio.shield(fut)

    def _start(self, fut: asyncio.Future[None]) -> None:
        self.running = True
        asyncio.get_running_loop().create_task(self._run(fut))

    async def _run(self, fut: asyncio.Future[None]) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                await self.syncer.fsync(fd)
            finally:
                os.close(fd)
        except Exception as exc:  # noqa: BLE001 - every waiter hears of it
            fut.set_exception(exc)
        else:
            fut.set_result(None)
        finally:
            self.running = False
            if self.next is not None:
                nxt, self.next = self.next, None
                self._start(nxt)
