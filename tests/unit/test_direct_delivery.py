"""Local delivery at intake (postroom.direct): which recipients are written into their
Maildirs before the 250, what is queued instead, and what happens to the copies when
the rest cannot be queued. Real Maildirs in a temporary folder; the spool is a fake
(intake's decision only). The whole path, with a real server, is in
tests/integration/test_delivery.py."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from postroom import store
from postroom.address import parse_path
from postroom.config import Route
from postroom.delivery.local import LocalDeliveryAgent
from postroom.direct import DirectDelivery
from postroom.intake import EarlyConversion, Intake, Submission
from postroom.metrics import Metrics
from postroom.spool import StorageFull
from postroom.store import MaildirStore
from postroom.syncer import Syncer
from tests.unit.test_intake_conversion import Events
from tests.unit.test_intake_stamping import FakeSpool

MAILBOXES = {"bob@example.org", "carol@example.org"}


class RefusingSpool(FakeSpool):
    async def enqueue(self, message: Any) -> None:
        raise StorageFull("database or disk is full")


def files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/new/*"))


class BrokenDisk(Syncer):
    """fsync of a folder fails with EIO (a file's works)."""

    async def fsync(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, os.strerror(5))
        await super().fsync(fd)


def queue(tmp_path: Path, rcpts: list[tuple[str, dict[str, str]]], *, spool: Any = None,
          delivering: bool = True, aliases: dict[str, tuple[str, ...]] | None = None,
          data: bytes = b"Subject: hi\r\n\r\nhello\r\n", syncer: Syncer | None = None
          ) -> tuple[Any, Any, Events]:
    spool = spool or FakeSpool()
    events = Events()
    aliases = aliases or {}
    intake = Intake(spool, "mx.example.org", frozenset({"example.org"}), None, events)  # type: ignore[arg-type]
    intake.early = EarlyConversion((Route("*", "mx", index=0),), aliases)
    pool = ThreadPoolExecutor(2)
    agent = LocalDeliveryAgent(MaildirStore(tmp_path, "mx.example.org"), MAILBOXES.__contains__,
                               aliases, pool)
    syncer = syncer or Syncer()
    intake.deliver_here = DirectDelivery(agent, syncer, Metrics(), events)
    intake.delivering = delivering
    sub = Submission(parse_path("<alice@far.test>", allow_null=False),
                     [(parse_path(f"<{r}>", allow_null=False), p) for r, p in rcpts], data,
                     "192.0.2.1", "client.far.test", "mx", "ESMTP")

    async def run() -> Any:
        try:
            return await intake.queue(sub)
        finally:
            syncer.close()

    try:
        message = asyncio.run(run())
    finally:
        pool.shutdown()
    return message, spool, events


def test_a_message_for_local_mailboxes_only_is_delivered_and_never_queued(tmp_path: Path) -> None:
    message, spool, events = queue(tmp_path, [("bob@example.org", {}), ("carol@example.org", {})])
    assert spool.stored == []
    got = files(tmp_path)
    assert [p.parent.parent.name for p in got] == ["bob", "carol"]
    text = got[0].read_bytes()
    assert text.startswith(b"Return-Path: <alice@far.test>\nDelivered-To: bob@example.org\n")
    assert b"\r\n" not in text and text.endswith(b"\nhello\n")
    assert b"Received: from client.far.test" in text
    assert list(tmp_path.glob("*/*/tmp/*")) == []
    # the receipt, the routing, then each delivery as the queue manager would word it
    kinds = [k for k, _, _ in events.got]
    assert kinds == [3001, 2004, 2004, 3002, 3002]
    assert events.got[3][1] == ("<bob@example.org> delivered via local mailbox: "
                                f"250 2.0.0 delivered to maildir as {got[0].name}")


def test_only_the_rest_is_queued(tmp_path: Path) -> None:
    message, spool, _ = queue(tmp_path, [
        ("bob@example.org", {}),
        ("carol@example.org", {"NOTIFY": "SUCCESS,FAILURE"}),   # owes a success notice
        ("list@example.org", {}),                                # an alias: conversion
        ("dan@elsewhere.test", {}),                              # remote
    ], aliases={"list@example.org": ("bob@example.org",)})
    assert [p.parent.parent.name for p in files(tmp_path)] == ["bob"]
    [queued] = spool.stored
    assert queued.queue_id == message.queue_id and queued.data == message.data
    assert [(r.address, r.state) for r in queued.recipients] == [
        ("carol@example.org", "delivery"), ("list@example.org", "conversion"),
        ("dan@elsewhere.test", "delivery")]
    # the receipt names every recipient, the delivered one included
    assert len(message.recipients) == 4


def test_nothing_is_delivered_at_intake_while_local_delivery_is_stopped(tmp_path: Path) -> None:
    message, spool, _ = queue(tmp_path, [("bob@example.org", {})], delivering=False)
    assert files(tmp_path) == []
    assert spool.stored == [message]


def test_a_failed_copy_stays_queued_for_the_queue_manager(tmp_path: Path) -> None:
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "bob").write_text("a file where the Maildir should be")
    message, spool, _ = queue(tmp_path, [("bob@example.org", {}), ("carol@example.org", {})])
    assert [p.parent.parent.name for p in files(tmp_path)] == ["carol"]
    [queued] = spool.stored
    assert [(r.address, r.state) for r in queued.recipients] == [("bob@example.org", "delivery")]


def test_copies_are_taken_back_when_the_rest_cannot_be_queued(tmp_path: Path) -> None:
    with pytest.raises(StorageFull):
        queue(tmp_path, [("bob@example.org", {}), ("dan@elsewhere.test", {})],
              spool=RefusingSpool())
    # the client gets a 4xx and sends again: no copy may stay behind as a duplicate
    assert files(tmp_path) == []


def test_folder_fsyncs_are_shared_and_each_starts_after_its_callers_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[float] = []
    real = store._fsync_dir

    def slow(path: Any) -> None:
        starts.append(time.monotonic())
        time.sleep(0.02)
        real(path)

    monkeypatch.setattr(store, "_fsync_dir", slow)
    folder = tmp_path / "new"
    folder.mkdir()
    asked: dict[int, float] = {}
    returned: dict[int, float] = {}
    go = threading.Barrier(8)

    def caller(i: int) -> None:
        go.wait()
        asked[i] = time.monotonic()
        store.sync(folder)
        returned[i] = time.monotonic()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(starts) < 8            # shared, not one each
    for i in range(8):
        # some fsync started after this caller asked, and ended before it returned
        assert any(asked[i] <= s and s + 0.02 <= returned[i] for s in starts), i


def test_a_failed_folder_fsync_fails_the_deliveries_it_covered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Any) -> None:
        raise OSError(5, os.strerror(5))

    monkeypatch.setattr(store, "_fsync_dir", broken)
    message, spool, _ = queue(tmp_path, [("bob@example.org", {})], syncer=BrokenDisk())
    # not reported delivered: queued, so the queue manager tries again (and says why),
    # and the copy that may not last is taken back, lest the retry make a duplicate
    assert files(tmp_path) == []
    [queued] = spool.stored
    assert [r.address for r in queued.recipients] == ["bob@example.org"]
    with pytest.raises(store.StoreError) as err:
        store.sync(tmp_path)
    assert err.value.transient and err.value.reason == os.strerror(5)


def test_a_failed_shared_fsync_is_reported_to_every_caller_it_covered_and_no_later_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    gate = threading.Event()

    def flaky(path: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            gate.wait(5)                 # the first fsync runs while the others ask
            return
        if len(calls) == 2:
            raise OSError(5, os.strerror(5))

    monkeypatch.setattr(store, "_fsync_dir", flaky)
    folder = tmp_path / "new"
    folder.mkdir()
    outcome: dict[int, str] = {}

    def caller(i: int) -> None:
        try:
            store.sync(folder)
            outcome[i] = "ok"
        except store.StoreError as exc:
            outcome[i] = exc.reason

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    while not calls:
        time.sleep(0.001)
    # these ask while fsync 1 runs: fsync 2, which fails, is theirs
    waiting = [threading.Thread(target=caller, args=(i,)) for i in (1, 2, 3)]
    for t in waiting:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in [first, *waiting]:
        t.join()
    assert outcome == {0: "ok", 1: os.strerror(5), 2: os.strerror(5), 3: os.strerror(5)}
    assert len(calls) == 2
    store.sync(folder)                   # a later caller gets a fsync of its own, which works
    assert len(calls) == 3
    assert store._shared[str(folder)].errors == {}     # nothing kept once nobody waits
