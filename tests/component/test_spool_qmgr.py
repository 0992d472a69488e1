"""Spool and queue manager together, with a fake clock and fake or real mailboxes."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postroom.config import DeliveryConfig
from postroom.delivery import Agents
from postroom.delivery.local import LocalDeliveryAgent
from postroom.model import DeliveryResult, Reply
from postroom.qmgr import QueueManager, retry_delay
from postroom.spool import (
    Claim,
    Direction,
    NewMessage,
    NewRecipient,
    SqliteSpool,
    State,
    StorageFull,
    new_queue_id,
)
from postroom.store import MaildirStore, StoreError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(MaildirStore):
    """A Maildir store that fails the first ``failures`` deliveries."""

    def __init__(self, root: Path, failures: int, transient: bool = True) -> None:
        super().__init__(root, "test")
        self.failures = failures
        self.transient = transient
        self.calls = 0

    def deliver(self, local: str, domain: str, data: bytes, *, sync_dir: bool = True) -> Path:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreError("No space left on device", self.transient)
        return super().deliver(local, domain, data, sync_dir=sync_dir)


def message(*rcpts: tuple[str, str], data: bytes = b"Subject: t\r\n\r\nx\r\n") -> NewMessage:
    return NewMessage(new_queue_id(), "s@far.example", {}, {"peer": "127.0.0.1"}, data,
                      tuple(NewRecipient(a, d, {}) for a, d in rcpts))


def rows(spool: SqliteSpool, columns: str) -> list[tuple[object, ...]]:
    """Every recipient row, final ones included, straight from the SQLite file."""
    conn = sqlite3.connect(spool.path)
    try:
        return conn.execute(f"SELECT {columns} FROM recipients ORDER BY id").fetchall()
    finally:
        conn.close()


def states(spool: SqliteSpool) -> list[tuple[object, ...]]:
    return rows(spool, "address, direction, state")




@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path, clock: Clock):  # type: ignore[no-untyped-def]
    sp = SqliteSpool(tmp_path / "spool.sqlite3", clock=clock)
    yield sp
    sp.close()


def make_qmgr(spool: SqliteSpool, store: MaildirStore, clock: Clock,
              aliases: dict[str, tuple[str, ...]] | None = None,
              remote: object = None) -> QueueManager:
    local = LocalDeliveryAgent(store, lambda a: True, aliases or {}, ThreadPoolExecutor(4),
                               clock)
    agents = {"local": local} if remote is None else {"local": local, "mx": remote}
    return QueueManager(spool, Agents(agents), local_domains=frozenset({"example.test"}),  # type: ignore[arg-type]
                        aliases=aliases or {}, delivery=DeliveryConfig(retry=(60.0, 300.0)),
                        clock=clock)


def stored_messages(spool: SqliteSpool) -> int:
    conn = sqlite3.connect(spool.path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def test_concurrent_enqueues_share_commits(spool: SqliteSpool) -> None:
    async def main() -> None:
        await asyncio.gather(*(spool.enqueue(message(("a@example.test", "inbound")))
                               for _ in range(300)))
    asyncio.run(main())
    assert spool.summary()[0].messages == 300
    assert spool.batches < 300          # group commit: fewer fsyncs than messages


def test_bookkeeping_commits_without_an_fsync_and_mail_always_with_one(
        spool: SqliteSpool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of claims, heartbeats or a suspended destination's waits commits without
    a sync; a batch with any durable job is answered only after an fdatasync of the WAL,
    made once the writers' lock is free again."""
    synced: list[tuple[str, bool]] = []          # (file, lock free) per fdatasync
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        probe = os.open(f"{spool.path}.lock", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)   # fails while it is held
            fcntl.flock(probe, fcntl.LOCK_UN)
            free = True
        except BlockingIOError:
            free = False
        finally:
            os.close(probe)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), free))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    def syncs(conn: sqlite3.Connection) -> int:
        return len(synced)

    async def main() -> tuple[int, int, list[int]]:
        await spool._write(syncs, durable=False)
        lazy = len(synced)
        await spool._write(syncs)
        durable = len(synced)
        # together (one batch, or two if the writer woke in between): a sync for the
        # durable ones
        await asyncio.gather(spool._write(syncs, durable=False), spool._write(syncs),
                             spool.enqueue(NewMessage(
                                 new_queue_id(), "s@far.example", {}, {}, b"x\r\n",
                                 (NewRecipient("a@example.test", "inbound", {},
                                               State.DELIVERY),))))
        return lazy, durable, len(synced)
    lazy, durable, mixed = asyncio.run(main())
    assert (lazy, durable) == (0, 1) and mixed - durable in (1, 2)
    assert synced == [(f"{spool.path}-wal", True)] * mixed

    async def claim() -> list[Claim]:
        due = await spool.due(Direction.INBOUND, spool.clock(), 10, "n1")
        return await spool.claim(due, spool.clock(), "n1", 60)
    [claimed] = asyncio.run(claim())
    # another connection (another process) sees the lazy commit at once
    other = sqlite3.connect(tmp_path / "spool.sqlite3")
    try:
        assert other.execute("SELECT lease_owner FROM recipients WHERE id = ?",
                             (claimed.rid,)).fetchone() == ("n1",)
    finally:
        other.close()


def test_a_failed_wal_sync_fails_the_durable_callers_only(
        spool: SqliteSpool, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, os.strerror(5))

    async def main() -> list[object]:
        return await asyncio.gather(spool._write(lambda c: "lazy", durable=False),
                                    spool._write(lambda c: "mail"), return_exceptions=True)
    monkeypatch.setattr(os, "fdatasync", broken)
    got = asyncio.run(main())
    assert got[0] == "lazy"
    assert isinstance(got[1], OSError) and got[1].errno == 5
    monkeypatch.undo()
    assert asyncio.run(spool._write(lambda c: "again")) == "again"


def test_a_failing_job_does_not_undo_the_others_in_its_batch(spool: SqliteSpool) -> None:
    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO messages VALUES ('x', 0, '', 0, '{}', '{}', x'', '')")
        raise ValueError("boom")

    async def main() -> list[object]:
        return await asyncio.gather(
            spool.enqueue(message(("a@example.test", "inbound"))), spool._write(bad),
            spool.enqueue(message(("b@example.test", "inbound"))), return_exceptions=True)
    results = asyncio.run(main())
    assert isinstance(results[1], ValueError)
    assert stored_messages(spool) == 2


def test_a_full_disk_becomes_storage_full_for_the_caller(spool: SqliteSpool) -> None:
    def full(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(StorageFull):
        spool.write_sync(full)


def test_conversion_expands_aliases_and_sends_remote_targets_outbound(
        spool: SqliteSpool, tmp_path: Path, clock: Clock) -> None:
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock,
                  {"team@example.test": ("a@example.test", "b@example.test", "x@remote.example")})

    async def main() -> None:
        await spool.enqueue(message(("team@example.test", "inbound"),
                                    ("y@remote.example", "outbound")))
        assert await q.convert_batch() == 2
        assert await q.deliver_batch() == 2
    asyncio.run(main())
    assert states(spool) == [
        ("team@example.test", "inbound", "expanded"),
        ("y@remote.example", "outbound", "delivery"),
        ("a@example.test", "inbound", "delivered"),
        ("b@example.test", "inbound", "delivered"),
        ("x@remote.example", "outbound", "delivery"),
    ]
    summary = {s.name: s for s in spool.summary()}
    assert summary["outbound-delivery"].recipients == 2
    assert summary["inbound-delivery"].recipients == 0
    assert len(list((tmp_path / "mail" / "example.test" / "a" / "new").iterdir())) == 1


def test_transient_failure_waits_for_the_schedule_then_delivers(
        spool: SqliteSpool, tmp_path: Path, clock: Clock) -> None:
    store = FlakyStore(tmp_path / "mail", failures=2)
    q = make_qmgr(spool, store, clock)

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound")))
        await q.convert_batch()
        assert await q.deliver_batch() == 1          # fails: next in 60 s
        assert await q.deliver_batch() == 0          # not due yet
        clock.now += 59
        assert await q.deliver_batch() == 0
        clock.now += 1
        assert await q.deliver_batch() == 1          # fails again: next in 300 s
        clock.now += 299
        assert await q.deliver_batch() == 0
        clock.now += 1
        assert await q.deliver_batch() == 1          # delivered
    asyncio.run(main())
    assert store.calls == 3
    # all recipients final and delivered: the message is gone from the spool
    assert stored_messages(spool) == 0


def test_mail_loop_fails_the_recipient_and_keeps_the_message_for_its_ndr(
        spool: SqliteSpool, tmp_path: Path) -> None:
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), Clock())
    looped = b"Received: from a by b; x\r\n" * 100 + b"Subject: loop\r\n\r\nx\r\n"

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound"), data=looped))
        await q.convert_batch()
    asyncio.run(main())
    row = rows(spool, "state, last_reply")[0]
    assert row[0] == "failed" and str(row[1]).startswith("554 5.4.6")
    assert stored_messages(spool) == 1


def test_alias_loop_ends_at_the_address_that_closes_it(spool: SqliteSpool, tmp_path: Path) -> None:
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), Clock(),
                  {"a@example.test": ("b@example.test",), "b@example.test": ("a@example.test",)})

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound")))
        await q.convert_batch()
    asyncio.run(main())
    # a -> b -> a: the loop closes at a, which is delivered as a mailbox
    assert states(spool) == [("a@example.test", "inbound", "delivery")]


def test_alias_target_already_a_recipient_gets_one_copy(spool: SqliteSpool, tmp_path: Path) -> None:
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), Clock(),
                  {"team@example.test": ("a@example.test", "b@example.test")})

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound"), ("team@example.test", "inbound")))
        await q.convert_batch()
    asyncio.run(main())
    assert sorted(a for a, _, s in states(spool) if s == "delivery") == [
        "a@example.test", "b@example.test"]


@pytest.mark.parametrize("attempts, expected", [(1, 60.0), (2, 300.0), (3, 300.0), (50, 300.0)])
def test_retry_schedule_repeats_its_last_interval(attempts: int, expected: float) -> None:
    assert retry_delay((60.0, 300.0), attempts) == expected


class DeadAgent:
    """A delivery agent whose every next hop is down (connection refused)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def deliver(self, dest, messages):  # type: ignore[no-untyped-def]
        self.calls.append(sum(len(m.recipients) for m in messages))
        return [DeliveryResult(r.id, False, True, Reply(451, "4.4.1", "connection refused"),
                               "connect", hop=dest.describe(), remote_host="mx.far.test",
                               remote_ip="127.0.0.9", hop_failure=True)
                for m in messages for r in m.recipients]


def test_a_dead_destination_backs_off_as_a_whole_and_the_wait_is_stored(
        spool: SqliteSpool, tmp_path: Path, clock: Clock) -> None:
    agent = DeadAgent()
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock, remote=agent)
    q.MESSAGES_PER_CONNECTION = 2
    q.delivery = DeliveryConfig(retry=(60.0, 300.0), max_connections_per_destination=1)

    async def main() -> None:
        for i in range(5):
            await spool.enqueue(message((f"u{i}@far.test", "outbound")))
        await q.convert_batch()
        await q.dispatch_outbound()                  # one connection, two messages
        await asyncio.gather(*q._outbound_tasks)
        assert agent.calls == [2]
        # the other three were not tried, yet wait with the destination
        assert await q.dispatch_outbound() == 0
        clock.now += 60
        await q.dispatch_outbound()
        await asyncio.gather(*q._outbound_tasks)
        assert agent.calls == [2, 2]
    asyncio.run(main())
    waits = [float(r[0]) - clock.now for r in rows(spool, "next_attempt")]  # type: ignore[arg-type]
    assert all(w > 0 for w in waits), waits          # nobody is due right now
    assert max(waits) == 300.0                       # the second failure in a row waits longer


def test_mail_converted_at_intake_for_a_backing_off_destination_waits_untried(
        spool: SqliteSpool, tmp_path: Path, clock: Clock) -> None:
    agent = DeadAgent()
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock, remote=agent)

    async def main() -> None:
        await spool.enqueue(message(("u0@far.test", "outbound")))
        await q.convert_batch()
        await q.dispatch_outbound()
        await asyncio.gather(*q._outbound_tasks)
        assert agent.calls == [1]                    # failed as a whole: backing off
        dest = q._destination("u1@far.test")
        assert dest is not None
        # as intake stores a plain remote recipient: in delivery, due now
        await spool.enqueue(NewMessage(new_queue_id(), "s@far.example", {}, {}, b"x\r\n", (
            NewRecipient("u1@far.test", "outbound", {}, "delivery", dest.ref),)))
        assert await q.dispatch_outbound() == 1      # put back to the destination's time
        assert agent.calls == [1]                    # without a connection
        assert await q.dispatch_outbound() == 0
    asyncio.run(main())
    (row,) = [r for r in rows(spool, "address, next_attempt, last_reply")
              if r[0] == "u1@far.test"]
    assert float(row[1]) == clock.now + 60           # type: ignore[arg-type]
    assert "connection refused" in str(row[2])


def test_deliveries_are_recorded_only_after_their_folder_is_synced(
        spool: SqliteSpool, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    import postroom.delivery.local as local_module
    synced: list[str] = []

    def failing_sync(folder: str) -> None:
        synced.append(folder)
        raise StoreError("Input/output error", transient=True, reason="Input/output error")

    monkeypatch.setattr(local_module, "sync", failing_sync)
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock)

    async def main() -> None:
        for _ in range(3):
            await spool.enqueue(message(("a@example.test", "inbound")))
        await q.convert_batch()
        assert await q.deliver_batch() == 3
    asyncio.run(main())
    assert synced == [str(tmp_path / "mail" / "example.test" / "a" / "new")]   # once for all three
    found = rows(spool, "state, last_reply")
    assert [r[0] for r in found] == ["delivery"] * 3                    # not recorded as delivered
    assert all(str(r[1]).startswith("451 4.3.0") for r in found)
    # copies that may not last are taken back: the retry makes no duplicates
    assert list((tmp_path / "mail" / "example.test" / "a" / "new").iterdir()) == []


def test_a_delivery_that_cannot_be_recorded_takes_back_its_copy(
        spool: SqliteSpool, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """Disk full at the result's commit: the Maildir copy is removed (it will be delivered
    again), instead of piling up a duplicate per retry that eats the space freed."""
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock)
    new = tmp_path / "mail" / "example.test" / "a" / "new"
    real_record = spool.record

    async def full(transitions: object, now: float) -> list[int]:
        raise StorageFull("database or disk is full")

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound")))
        await q.convert_batch()
        monkeypatch.setattr(spool, "record", full)
        for _ in range(3):
            with pytest.raises(StorageFull):
                await q.deliver_batch()
            assert list(new.iterdir()) == []                 # nothing left behind
        monkeypatch.setattr(spool, "record", real_record)    # space again
        assert await q.deliver_batch() == 1
    asyncio.run(main())
    assert len(list(new.iterdir())) == 1                      # exactly one copy
    assert {q.name: q.recipients for q in spool.summary()}["inbound-delivery"] == 0


class HangingStore:
    """An LMTP store that never answers until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def deliver(self, dest, messages):  # type: ignore[no-untyped-def]
        self.calls += 1
        await self.release.wait()
        return [DeliveryResult(r.id, True, False, Reply(250, "2.0.0", "saved"), "DATA",
                               hop=dest.describe()) for m in messages for r in m.recipients]


def test_a_hanging_lmtp_store_never_holds_up_the_maildirs(tmp_path: Path, clock: Clock) -> None:
    """Mail for a domain whose final delivery is LMTP goes in a task of its own; the
    Maildir recipients of the same round are delivered meanwhile (in-memory spool)."""
    from postroom.config import Route
    from postroom.spool.memory import MemorySpool
    spool = MemorySpool(tmp_path / "bodies", clock)
    store = HangingStore()
    local = LocalDeliveryAgent(MaildirStore(tmp_path / "mail", "t"), lambda a: True, {},
                               ThreadPoolExecutor(2), clock)
    q = QueueManager(spool, Agents({"local": local, "lmtp": store}),  # type: ignore[dict-item]
                     local_domains=frozenset({"example.test", "store.test"}), aliases={},
                     delivery=DeliveryConfig(retry=(60.0, 300.0)), clock=clock,
                     routes=(Route("*"), Route("store.test", "lmtp", "127.0.0.1", 24, "none",
                                               index=1)))

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound"), ("b@store.test", "inbound")))
        await q.convert_batch()
        assert await asyncio.wait_for(q.deliver_batch(), 5) == 2
        # the Maildir copy is recorded while the store still hangs
        assert [(r.address, r.state) for r in spool.snapshot()] == [
            ("a@example.test", "delivered"), ("b@store.test", "delivery")]
        assert await q.deliver_batch() == 0          # in flight: not claimed twice
        store.release.set()
        await asyncio.gather(*q._outbound_tasks)
    asyncio.run(main())
    assert store.calls == 1
    assert spool.snapshot() == []                    # both final: the message is gone


def test_free_pages_in_the_spool_file_count_as_reusable_space(spool: SqliteSpool) -> None:
    """A drained queue leaves free pages in the file, which never shrinks; the reserve
    check at MAIL counts them, or a disk that once filled could stay short for good."""
    def fill_and_drop(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE scratch (b BLOB)")
        c.executemany("INSERT INTO scratch VALUES (zeroblob(100000))", [()] * 5)
    spool.write_sync(fill_and_drop)
    spool.write_sync(lambda c: c.execute("DROP TABLE scratch"))
    assert spool.reusable_bytes() >= 400_000



def test_a_result_not_recorded_is_tried_again_in_the_next_round_not_after_the_lease(
        spool: SqliteSpool, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """The queue manager's rounds skip its own leased recipients (they are in flight)
    unless a claim of its may have ended unrecorded (here: the disk full at the
    result's commit); then the next round reads them back, as an owner's own lease never
    keeps it off. Without that, the copy would wait for its lease: 300 s."""
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock)
    new = tmp_path / "mail" / "example.test" / "a" / "new"
    real_record = spool.record
    failures = [StorageFull("database or disk is full")]

    async def record_once_full(transitions, now):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return await real_record(transitions, now)
    monkeypatch.setattr(spool, "record", record_once_full)

    async def main() -> None:
        await spool.enqueue(message(("a@example.test", "inbound")))
        q.start()
        try:
            for _ in range(150):                 # the round after a failure waits 1 s
                await asyncio.sleep(0.02)
                if stored_messages(spool) == 0:
                    break
        finally:
            await q.stop()
    asyncio.run(main())
    assert failures == []                        # the first result was lost...
    assert stored_messages(spool) == 0           # ...and the next round delivered it
    assert len(list(new.iterdir())) == 1


def test_rounds_that_deliver_nothing_wait_for_company(
        spool: SqliteSpool, tmp_path: Path, clock: Clock) -> None:
    """While a destination is down, each new message used to wake a round of its own
    (reads, and a write to put it to wait); rounds that hand nothing to an agent now
    start ROUND_GAP apart at least, and the messages of that time wait together."""
    agent = DeadAgent()
    q = make_qmgr(spool, MaildirStore(tmp_path / "mail", "t"), clock, remote=agent)
    rounds: list[float] = []                         # when each round began: its first read
    real_pending = spool.pending_conversion

    async def pending_conversion(limit):  # type: ignore[no-untyped-def]
        rounds.append(time.monotonic())
        return await real_pending(limit)
    spool.pending_conversion = pending_conversion  # type: ignore[method-assign]

    async def main() -> None:
        await spool.enqueue(message(("u0@far.test", "outbound")))
        q.start()
        try:
            for _ in range(100):                     # the first attempt: down, backing off
                await asyncio.sleep(0.01)
                if agent.calls:
                    break
            await asyncio.sleep(0.05)
            del rounds[:]
            for i in range(1, 41):                   # new mail, one commit at a time
                await spool.enqueue(message((f"u{i}@far.test", "outbound")))
                q.wake()
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.1)
        finally:
            await q.stop()
    asyncio.run(main())
    assert agent.calls == [1]                        # nothing tried again meanwhile
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert rounds and min(gaps) >= q.ROUND_GAP * 0.9, gaps
    assert len(rounds) < 30                          # 40 messages, fewer rounds
    waiting = [r for r in rows(spool, "address, next_attempt") if r[0] != "u0@far.test"]
    assert len(waiting) == 40
    assert all(float(r[1]) == clock.now + 60 for r in waiting)   # type: ignore[arg-type]
