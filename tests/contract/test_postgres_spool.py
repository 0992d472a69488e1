"""What only the PostgreSQL spool promises: several nodes on one queue.

Two :class:`PostgresSpool` objects on one database are two nodes: they never both get
a recipient, read each other's big messages, wake each other, and finish a message
together. The schema is Postroom's own, versioned and migrated once. A database that
goes away is ``StorageUnavailable`` and the same spool object works again when it is
back (the stop/start tests are together at the end of this module, so that one server
restart serves them all).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from postroom.spool import (
    Conversion,
    Direction,
    Filters,
    SqliteSpool,
    State,
    StorageUnavailable,
    Transition,
    open_spool,
)
from postroom.spool.postgres import MIGRATIONS, PostgresSpool, SchemaTooNew

from .test_spool_contract import delivered, msg, postgres_db

T = TypeVar("T")


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    return postgres_db(request, "pg")


def nodes(url: str, tmp_path: Path, *names: str, **kw: Any) -> list[PostgresSpool]:
    return [PostgresSpool(url, tmp_path / name / "bodies", **kw) for name in names]


def run(spools: list[PostgresSpool], body: Callable[[], Awaitable[T]]) -> T:
    """``body()`` in one event loop; every spool closed before the loop ends."""
    async def main() -> T:
        try:
            return await body()
        finally:
            for sp in spools:
                await sp.aclose()
    return asyncio.run(main())


async def fill(sp: PostgresSpool, count: int, per_message: int = 1) -> None:
    """``count`` messages to far.test, all of them converted and due."""
    for i in range(count):
        await sp.enqueue(msg(*(f"r{i}-{j}@far.test" for j in range(per_message))))
    while items := await sp.pending_conversion(500):
        await sp.convert([Conversion(c.rid, State.DELIVERY, "0|far.test") for c in items],
                         time.time())


# --- claims across nodes --------------------------------------------------------------
def test_two_nodes_claiming_the_same_work_never_both_get_a_recipient(
        url: str, tmp_path: Path) -> None:
    a, b = nodes(url, tmp_path, "a", "b")

    async def body() -> None:
        await fill(a, 120, per_message=2)

        async def worker(sp: PostgresSpool, owner: str) -> list[int]:
            got: list[int] = []
            for _ in range(40):
                # what nobody holds, as every node sees it; then claimed for this node
                due = await sp.due(Direction.OUTBOUND, time.time(), 20, "")
                got += [c.rid for c in await sp.claim(due, time.time(), owner, 300)]
            return got
        await asyncio.gather(*(sp.nodes(time.time()) for sp in (a, a, b, b)))   # warm pools
        # both nodes see the same due rows and race for them, four claimers each (a
        # node's own claimers may take a row again from each other: that is its own
        # claim renewed, with a new token)
        results = await asyncio.gather(*(worker(sp, owner) for sp, owner in
                                         [(a, "node-a"), (b, "node-b")] * 4))
        by_node = {"node-a": {r for got in results[0::2] for r in got},
                   "node-b": {r for got in results[1::2] for r in got}}
        assert not by_node["node-a"] & by_node["node-b"], "claimed by both nodes"
        assert len(by_node["node-a"] | by_node["node-b"]) == 240        # all of them
        assert by_node["node-a"] and by_node["node-b"]
        held = {r.id: r.lease_owner for r in await a.recipients(Filters(), time.time())}
        assert {rid for rid, owner in held.items() if owner == "node-a"} == by_node["node-a"]
        status = {n["name"]: n["claims"] for n in await a.nodes(time.time())}
        assert status == {}                       # nobody sent a heartbeat yet
        await a.heartbeat("node-a", {"pid": 1}, time.time())
        await b.heartbeat("node-b", {"pid": 2}, time.time())
        status = {n["name"]: n["claims"] for n in await b.nodes(time.time())}
        assert status == {"node-a": len(by_node["node-a"]), "node-b": len(by_node["node-b"])}
    run([a, b], body)


def test_leases_run_on_the_databases_clock(url: str, tmp_path: Path) -> None:
    """Without a clock of the caller's, a lease ends by the database's time: a node
    whose own clock is far ahead cannot take another node's claim early."""
    a, b = nodes(url, tmp_path, "a", "b")

    async def body() -> None:
        await fill(a, 1)
        (c,) = await a.claim(await a.due(Direction.OUTBOUND, time.time(), 10, "a"),
                             time.time(), "a", 1.0)
        ahead = time.time() + 3600                # b's clock is an hour fast
        assert await b.due(Direction.OUTBOUND, ahead, 10, "b") == []
        assert await b.claim([c], ahead, "b", 60) == []
        assert await a.renew([c], time.time(), "a", 1.0) == []
        await asyncio.sleep(1.2)
        (taken,) = await b.claim([c], time.time(), "b", 60)
        assert taken.token > c.token
        assert await a.renew([c], time.time(), "a", 60) == [c.rid]
        assert await a.record([delivered(c)], time.time()) == [c.rid]
        assert await b.record([delivered(taken)], time.time()) == []
    run([a, b], body)


def test_two_nodes_finishing_a_messages_last_recipients_together_delete_it(
        url: str, tmp_path: Path) -> None:
    """Each node records one of a message's two recipients at the same moment: one of
    them sees the other's commit and deletes the message (none is left behind)."""
    a, b = nodes(url, tmp_path, "a", "b")

    async def body() -> None:
        await fill(a, 40, per_message=2)
        due = await a.due(Direction.OUTBOUND, time.time(), 500, "x")
        first = {c.message: c for c in due}
        second = [c for c in due if first[c.message] is not c]
        ca = await a.claim(list(first.values()), time.time(), "a", 300)
        cb = await b.claim(second, time.time(), "b", 300)
        assert len(ca) == len(cb) == 40
        await asyncio.gather(*(sp.record([delivered(c)], time.time())
                               for pair in zip(ca, cb, strict=True)
                               for sp, c in zip((a, b), pair, strict=True)))
        assert a.summary()[3].recipients == 0
        assert await a.recipients(Filters(), time.time()) == []
        assert await a.message(ca[0].message) is None
    run([a, b], body)


# --- big messages ---------------------------------------------------------------------
def test_a_big_body_enqueued_on_one_node_is_read_back_whole_on_another(
        url: str, tmp_path: Path) -> None:
    a, b = nodes(url, tmp_path, "a", "b")
    payload = os.urandom(3 * (1 << 20) + 12345)          # four chunks
    a.bodies.mkdir(parents=True)
    (a.bodies / "big").write_bytes(payload)
    m = msg("x@far.test", data=b"Received: by a\r\n", body_file="big",
            body_size=len(payload))

    async def body() -> None:
        await a.enqueue(m)
        got = await b.message_bodies([m.queue_id])
        body, params = got[m.queue_id]
        assert body.path == b.bodies / "big" and body.size == m.size
        assert body.read() == b"Received: by a\r\n" + payload        # byte for byte
        assert [p.name for p in b.bodies.iterdir()] == ["big"]      # no temporary left
        again = await b.body(m.queue_id)
        assert again is not None and again.path == body.path
        view = await b.message(m.queue_id)
        assert view is not None and view.body is not None and view.body.size == m.size
        # nothing is swept while the message is queued
        assert await a.sweep_bodies() == 0 and await b.sweep_bodies() == 0
        await fill(a, 0)
        (c,) = await b.claim(await b.due(Direction.OUTBOUND, time.time(), 10, "b"),
                             time.time(), "b", 60)
        assert await b.record([delivered(c)], time.time()) == []
        assert await b.body(m.queue_id) is None
        # each node removes its own copy once the message is gone
        assert await b.sweep_bodies() == 1 and not (b.bodies / "big").exists()
        assert await a.sweep_bodies() == 1 and not (a.bodies / "big").exists()
        rows = await asyncio.to_thread(a.schema_version)
        assert rows == len(MIGRATIONS)
    run([a, b], body)
    pg = PostgresSpool(url, tmp_path / "c")
    try:
        assert pg.summary()[2].recipients == 0
    finally:
        pg.close()


def test_sweeping_leaves_files_being_written_and_takes_old_leftovers(
        url: str, tmp_path: Path) -> None:
    (a,) = nodes(url, tmp_path, "a")
    a.bodies.mkdir(parents=True)
    (a.bodies / "writing").write_bytes(b"x" * 10)           # a session's file, in progress
    (a.bodies / "crashed").write_bytes(b"x" * 10)           # a leftover from before start
    (a.bodies / ".big.1234.tmp").write_bytes(b"x")          # a materialisation that died
    old = time.time() - 7200
    os.utime(a.bodies / "crashed", (old, old))
    os.utime(a.bodies / ".big.1234.tmp", (old, old))

    async def body() -> None:
        assert await a.sweep_bodies() == 2
        assert await a.sweep_bodies(started=time.time() + 1) == 1    # at start: all leftovers
    run([a], body)
    assert list(a.bodies.iterdir()) == []


# --- the schema -----------------------------------------------------------------------
def test_the_schema_is_created_once_versioned_and_left_alone_after(
        url: str, tmp_path: Path, postgres_server: Any) -> None:
    dbname = url.rsplit("/", 1)[1]
    # two nodes starting together on an empty database: one creates, the other waits
    spools = [PostgresSpool(url, tmp_path / f"n{i}") for i in range(4)]
    errors: list[BaseException] = []

    def open_one(sp: PostgresSpool) -> None:
        try:
            sp.summary()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=open_one, args=(sp,)) for sp in spools]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sp in spools:
        sp.close()
    assert errors == []
    rows = postgres_server.psql(dbname, "SELECT version FROM postroom_schema ORDER BY version")
    assert rows == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    # a later start changes nothing
    before = postgres_server.psql(dbname, "SELECT version, applied FROM postroom_schema")
    again = PostgresSpool(url, tmp_path / "again")

    async def body() -> None:
        await again.start()
        await again.enqueue(msg("a@far.test"))
    run([again], body)
    assert postgres_server.psql(dbname, "SELECT version, applied FROM postroom_schema") == before
    # a database migrated by a newer Postroom is refused, not used
    postgres_server.psql(dbname, f"INSERT INTO postroom_schema (version) "
                                 f"VALUES ({len(MIGRATIONS) + 1})")
    newer = PostgresSpool(url, tmp_path / "newer")
    try:
        with pytest.raises(SchemaTooNew):
            newer.summary()
    finally:
        newer.close()


def test_open_spool_chooses_the_backend_and_loads_psycopg_only_for_a_url(
        url: str, tmp_path: Path) -> None:
    sqlite = open_spool(tmp_path / "one")
    try:
        assert isinstance(sqlite, SqliteSpool)
    finally:
        sqlite.close()
    pg = open_spool(tmp_path / "two", url)
    try:
        assert isinstance(pg, PostgresSpool) and pg.bodies == tmp_path / "two" / "bodies"
    finally:
        pg.close()
    code = ("import sys; from pathlib import Path; from postroom.spool import open_spool; "
            f"open_spool(Path({str(tmp_path / 'three')!r})).close(); "
            "print('psycopg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# --- wake-ups -------------------------------------------------------------------------
def test_an_enqueue_on_one_node_wakes_the_others_listeners_within_a_second(
        url: str, tmp_path: Path) -> None:
    a, b = nodes(url, tmp_path, "a", "b")
    woken_a: list[float] = []
    woken_b: list[float] = []
    a.on_commit(lambda: woken_a.append(time.monotonic()))
    b.on_commit(lambda: woken_b.append(time.monotonic()))

    async def wait_for(woken: list[float], count: int, timeout: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(woken) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return len(woken) >= count

    async def body() -> None:
        await a.start()
        await b.start()
        await asyncio.sleep(0.2)                  # both LISTENing
        assert woken_a == woken_b == []
        sent = time.monotonic()
        await a.enqueue(msg("x@far.test"))
        assert woken_a and await wait_for(woken_b, 1), "node B was not woken"
        assert woken_b[0] - sent < 1.0
        await asyncio.sleep(0.3)
        assert len(woken_a) == 1 and len(woken_b) == 1     # a ignores its own NOTIFY
        # a report enqueued with notices_sent wakes the other node too
        (c,) = await b.pending_conversion(10)
        await b.convert([Conversion(c.rid, State.FAILED, last_reply="550 5.1.1 no",
                                    notice="failure")], time.time())
        from postroom.spool import NewRecipient, NoticeSent, new_queue_id
        from postroom.spool.records import NewMessage
        report = NewMessage(new_queue_id(), "", {}, {}, b"report",
                            (NewRecipient("s@far.test", Direction.OUTBOUND, {}),))
        await b.notices_sent([NoticeSent(c.message, "failure", (c.rid,), report)], time.time())
        assert await wait_for(woken_a, 2), "node A was not woken by the report"
    run([a, b], body)


def test_an_enqueue_that_fails_stores_nothing(url: str, tmp_path: Path) -> None:
    """An enqueue is all or nothing: when its recipients' values cannot be stored (a
    NUL in a text column), no message is left behind without its recipients."""
    import psycopg

    from postroom.spool import NewRecipient, new_queue_id
    from postroom.spool.records import NewMessage
    (a,) = nodes(url, tmp_path, "a")

    async def body() -> None:
        await a.start(listen=False)
        await a.enqueue(msg("ok@far.test"))
        bad = NewMessage(new_queue_id(), "s@example.org", {}, {}, b"body",
                         (NewRecipient("x@far.test", Direction.OUTBOUND, {},
                                       State.DELIVERY, "0|far\x00.test"),))
        with pytest.raises(psycopg.DataError):
            await a.enqueue(bad)
        assert await a.message_bodies([bad.queue_id]) == {}
        assert [c.address for c in await a.pending_conversion(10)] == ["ok@far.test"]
        assert await a.due(Direction.OUTBOUND, time.time() + 60, 10) == []
    run([a], body)


# --- the database goes away and comes back (one restart for the module) ---------------
def test_a_stopped_database_is_storage_unavailable_and_the_same_spool_carries_on(
        url: str, tmp_path: Path, postgres_server: Any) -> None:
    a, b = nodes(url, tmp_path, "a", "b", timeout=1.0)
    woken_b: list[int] = []
    b.on_commit(lambda: woken_b.append(1))

    async def body() -> None:
        await a.start()
        await b.start()
        await a.enqueue(msg("x@far.test"))
        assert a.summary()[2].recipients == 1
        await asyncio.to_thread(postgres_server.stop)
        try:
            # every verb says so, quickly, whether its pool connection died while idle
            # or none can be made
            for _ in range(2):
                began = time.monotonic()
                with pytest.raises(StorageUnavailable):
                    await a.enqueue(msg("y@far.test"))
                with pytest.raises(StorageUnavailable):
                    await a.pending_conversion(10)
                with pytest.raises(StorageUnavailable):
                    await b.nodes(time.time())
                with pytest.raises(StorageUnavailable):
                    a.summary()
                assert time.monotonic() - began < 10
            # a spool that never reached the database starts all the same
            late = PostgresSpool(url, tmp_path / "late", timeout=1.0)
            await late.start()
            with pytest.raises(StorageUnavailable):
                await late.due(Direction.OUTBOUND, time.time(), 10)
        finally:
            await asyncio.to_thread(postgres_server.start)
        woken_before = len(woken_b)
        # the same objects work again, by themselves, within a few seconds
        deadline = time.monotonic() + 15
        while True:
            try:
                await a.enqueue(msg("z@far.test"))
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "the spool did not reconnect"
                await asyncio.sleep(0.2)
        recovered = time.monotonic() - deadline + 15
        assert recovered < 10
        assert [c.address for c in await a.pending_conversion(10)] == ["x@far.test",
                                                                       "z@far.test"]
        assert a.summary()[2].recipients == 2
        assert len(await late.due(Direction.OUTBOUND, time.time(), 10)) == 0
        await late.aclose()
        # the listener reconnected: it woke b once for what it may have missed, and
        # hears a's enqueues again
        deadline = time.monotonic() + 5
        while len(woken_b) <= woken_before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(woken_b) > woken_before
        n = len(woken_b)
        await a.enqueue(msg("w@far.test"))
        deadline = time.monotonic() + 2
        while len(woken_b) == n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(woken_b) > n
    run([a, b], body)


def test_a_transition_lost_with_the_connection_is_refused_or_recorded_never_half(
        url: str, tmp_path: Path, postgres_server: Any) -> None:
    """A record whose connection dies is StorageUnavailable; tried again on the same
    claim after the restart, it is recorded once (the transaction was all or nothing)."""
    (a,) = nodes(url, tmp_path, "a", timeout=1.0)

    async def body() -> None:
        await fill(a, 3)
        claims = await a.claim(await a.due(Direction.OUTBOUND, time.time(), 10, "a"),
                               time.time(), "a", 300)
        await asyncio.to_thread(postgres_server.stop)
        try:
            with pytest.raises(StorageUnavailable):
                await a.record([Transition(c, State.DELIVERED, "250 ok", {})
                                for c in claims], time.time())
        finally:
            await asyncio.to_thread(postgres_server.start)
        deadline = time.monotonic() + 15
        while True:
            try:
                stale = await a.record([delivered(c) for c in claims], time.time())
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        assert stale == []
        assert a.summary()[3].recipients == 0
    run([a], body)
