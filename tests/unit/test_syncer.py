"""postroom.syncer: fsync from the event loop (Linux AIO, or threads where it is missing),
and a folder's group commit. Real files and folders in a temporary directory; both the
AIO and the thread path run every test."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom import syncer as syncer_module
from postroom.syncer import DEPTH, Syncer, _Aio


def aio_works() -> bool:
    async def probe() -> bool:
        try:
            _Aio(asyncio.get_running_loop()).close()
        except OSError:
            return False
        return True
    return asyncio.run(probe())


@pytest.fixture(params=["aio", "threads"])
def syncer(request: pytest.FixtureRequest) -> Iterator[Syncer]:
    s = Syncer(use_aio=request.param == "aio")
    yield s
    s.close()


def run(s: Syncer, coro_fn: object) -> object:
    async def main() -> object:
        try:
            return await coro_fn()  # type: ignore[operator]
        finally:
            s.close()
    return asyncio.run(main())


def mode_of_one_fsync(s: Syncer, path: Path, close: bool = True) -> str:
    """fsync a file through ``s`` in a new event loop; the way it went."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)

    async def go() -> str:
        try:
            await s.fsync(fd)
            return s.mode
        finally:
            if close:
                s.close()
    try:
        return asyncio.run(go())
    finally:
        os.close(fd)


def test_the_aio_path_is_taken_where_the_kernel_offers_it(tmp_path: Path) -> None:
    # Linux AIO where io_setup works (this machine, CI); threads elsewhere
    assert mode_of_one_fsync(Syncer(), tmp_path / "f") == ("aio" if aio_works() else "threads")
    assert Syncer(use_aio=False).mode == "threads"


def test_files_and_folders_are_synced_many_at_once(syncer: Syncer, tmp_path: Path) -> None:
    # more than the kernel context holds at once: the rest wait their turn
    n = DEPTH + 40
    fds = []
    for i in range(n):
        fd = os.open(tmp_path / f"m{i}", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x" * 100)
        fds.append(fd)

    async def go() -> list[object]:
        return await asyncio.gather(*(syncer.fsync(fd) for fd in fds),
                                    syncer.sync_dir(tmp_path), return_exceptions=True)
    try:
        results = run(syncer, go)
    finally:
        for fd in fds:
            os.close(fd)
    assert results == [None] * (n + 1)


def test_an_fsync_that_fails_raises_its_errno(syncer: Syncer, tmp_path: Path) -> None:
    r, w = os.pipe()                        # a pipe cannot be fsync'd: EINVAL
    closed = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1    # EBADF: never opened
    with pytest.raises(OSError):
        os.fstat(closed)

    async def go() -> list[object]:
        return await asyncio.gather(syncer.fsync(r), syncer.fsync(closed),
                                    syncer.sync_dir(tmp_path / "missing"),
                                    return_exceptions=True)
    try:
        bad_pipe, bad_fd, missing = run(syncer, go)  # type: ignore[misc]
    finally:
        os.close(r)
        os.close(w)
    assert isinstance(bad_pipe, OSError) and bad_pipe.errno == errno.EINVAL
    assert isinstance(bad_fd, OSError) and bad_fd.errno == errno.EBADF
    assert isinstance(missing, FileNotFoundError)


class Slow(Syncer):
    """Records when each folder fsync starts; each takes 20 ms."""

    def __init__(self, use_aio: bool) -> None:
        super().__init__(use_aio)
        self.starts: list[float] = []

    async def fsync(self, fd: int) -> None:
        self.starts.append(time.monotonic())
        await asyncio.sleep(0.02)
        await super().fsync(fd)


@pytest.mark.parametrize("use_aio", [True, False])
def test_a_folders_fsyncs_are_shared_and_each_starts_after_its_callers_asked(
        tmp_path: Path, use_aio: bool) -> None:
    s = Slow(use_aio)
    asked: dict[int, float] = {}
    returned: dict[int, float] = {}

    async def caller(i: int) -> None:
        await asyncio.sleep(0.003 * i)      # asking before, during and after one fsync
        asked[i] = time.monotonic()
        await s.sync_dir(tmp_path)
        returned[i] = time.monotonic()

    async def go() -> None:
        await asyncio.gather(*(caller(i) for i in range(12)))
    run(s, go)
    assert 2 <= len(s.starts) < 12          # shared, not one each
    for i in range(12):
        # some fsync started after this caller asked, and ended before it returned
        assert any(asked[i] <= t and t + 0.02 <= returned[i] for t in s.starts), i


def test_a_failed_folder_fsync_reaches_its_callers_and_no_later_one(tmp_path: Path) -> None:
    class Flaky(Syncer):
        calls = 0

        async def fsync(self, fd: int) -> None:
            self.calls += 1
            await asyncio.sleep(0.01)
            if self.calls == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))

    s = Flaky()

    async def go() -> list[object]:
        first = asyncio.ensure_future(s.sync_dir(tmp_path))
        await asyncio.sleep(0)              # fsync 1 is running: these wait for fsync 2
        covered = await asyncio.gather(*(s.sync_dir(tmp_path) for _ in range(3)),
                                       return_exceptions=True)
        later = await s.sync_dir(tmp_path)  # fsync 3, its own
        return [await first, *covered, later]
    got = run(s, go)
    assert got[0] is None and got[4] is None
    assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in got[1:4])  # type: ignore[index]
    assert s.calls == 3


def test_a_cancelled_caller_does_not_cancel_the_others_fsync(tmp_path: Path) -> None:
    s = Slow(True)

    async def go() -> object:
        first = asyncio.ensure_future(s.sync_dir(tmp_path))
        await asyncio.sleep(0.005)          # fsync 1 runs; a and b wait for fsync 2
        a = asyncio.ensure_future(s.sync_dir(tmp_path))
        b = asyncio.ensure_future(s.sync_dir(tmp_path))
        await asyncio.sleep(0.005)
        a.cancel()
        await first
        return await b
    assert run(s, go) is None
    assert len(s.starts) == 2


def test_a_forked_child_makes_its_own_context(tmp_path: Path) -> None:
    s = Syncer()
    # the parent's context, left open: a child that used it would fail (EINVAL)
    parent = mode_of_one_fsync(s, tmp_path / "f", close=False)
    pid = os.fork()
    if pid == 0:                            # the child: a new loop, its own context
        try:
            code = 0 if mode_of_one_fsync(s, tmp_path / "g") == parent else 3
        except BaseException:  # noqa: BLE001
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    s.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_the_system_calls_it_falls_back_to_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncer_module, "_CALLS", {})      # an architecture without numbers
    assert mode_of_one_fsync(Syncer(), tmp_path / "f") == "threads"
