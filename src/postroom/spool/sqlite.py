"""The SQLite spool: one database in WAL mode, each commit's WAL fdatasync'd before
its callers hear of it (``synchronous=FULL``, with the sync moved out of the writers'
lock: see :meth:`SqliteSpool._writer`).

Table ``messages`` holds the envelope and the message bytes (CRLF line ends, Received
header included; a big message's bytes in ``<data_dir>/bodies/<name>``); table
``recipients`` one row per recipient with its direction, state (:mod:`.states`), retry
time, lease and fencing token; ``attempts`` the failed attempts of waiting recipients;
``dead_bodies`` the files of deleted messages, unlinked after their deletion commits.

All writes go through one writer thread that takes jobs in batches: every job of a
batch runs in its own savepoint inside one transaction, and every caller is answered
only after the commit (group commit: many sessions share one fsync). Reads run on
reader connections in worker threads (WAL: they never block the writer). This module
holds all of the queue's SQL.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from ..body import Body
from .records import (
    RECIPIENT_COLUMNS,
    AttemptView,
    Claim,
    Conversion,
    Filters,
    MessageView,
    NewMessage,
    NoticeOwed,
    NoticeSent,
    QueueSummary,
    RecipientView,
    StorageFull,
    Transition,
    recipient_view,
)
from .states import QUEUES, State, check_entry, check_move, wants_notice

__all__ = ["SqliteSpool", "connect", "is_disk_full"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id        TEXT PRIMARY KEY,
    received  REAL NOT NULL,
    sender    TEXT NOT NULL,
    size      INTEGER NOT NULL,
    params    TEXT NOT NULL,      -- JSON: MAIL FROM parameters (BODY, SMTPUTF8, RET, ENVID)
    client    TEXT NOT NULL,      -- JSON: peer, helo, listener, auth user, session id
    data      BLOB NOT NULL,      -- the message; or, with body_file, the lines we added
    body_file TEXT NOT NULL DEFAULT ''  -- a big message's bytes: <data_dir>/bodies/<name>
);
CREATE TABLE IF NOT EXISTS attempts (     -- failed attempts of waiting recipients
    id        INTEGER PRIMARY KEY,
    message   TEXT NOT NULL,
    recipient INTEGER NOT NULL,
    at        REAL NOT NULL,
    reply     TEXT NOT NULL,
    detail    TEXT NOT NULL          -- JSON: status, step, hop, remote host and IP, transcript
);
CREATE INDEX IF NOT EXISTS attempts_message ON attempts (message);
CREATE TABLE IF NOT EXISTS dead_bodies (  -- files of deleted messages, unlinked after commit
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS recipients (
    id           INTEGER PRIMARY KEY,
    message      TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address      TEXT NOT NULL,
    params       TEXT NOT NULL,   -- JSON: RCPT TO parameters (NOTIFY, ORCPT)
    direction    TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    state        TEXT NOT NULL CHECK (state IN
                   ('conversion', 'delivery', 'delivered', 'failed', 'expanded')),
    parent       INTEGER,         -- the alias recipient this one was expanded from
    next_attempt REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    held         INTEGER NOT NULL DEFAULT 0,
    last_reply   TEXT NOT NULL DEFAULT '',
    updated      REAL NOT NULL,
    notice       TEXT NOT NULL DEFAULT '',  -- a DSN owed to the sender: '' | failure | success
    warned       INTEGER NOT NULL DEFAULT 0, -- delay notice: 0 not yet, 1 owed, 2 sent
    detail       TEXT NOT NULL DEFAULT '{}', -- JSON: the last attempt (step, host, ip, hop, ...)
    destination  TEXT NOT NULL DEFAULT '',  -- "<route index>|<domain>" chosen at conversion
    lease_until  REAL NOT NULL DEFAULT 0,   -- claimed: in flight until then
    lease_owner  TEXT NOT NULL DEFAULT '',  -- who holds the claim
    claim        INTEGER NOT NULL DEFAULT 0 -- fencing token: one more at every claim
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, direction, next_attempt);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients (message);
-- what owed_notices reads every queue round: without it, a scan of every recipient
DROP INDEX IF EXISTS recipients_notice;
CREATE INDEX IF NOT EXISTS recipients_owed ON recipients (message)
    WHERE notice != '' OR warned = 1;
CREATE INDEX IF NOT EXISTS recipients_destination ON recipients (destination)
    WHERE state = 'delivery' AND direction = 'outbound';
CREATE TABLE IF NOT EXISTS nodes (         -- the node(s) using this spool: one, here
    name      TEXT PRIMARY KEY,
    info      TEXT NOT NULL,               -- JSON: pid, started, version, ...
    last_seen REAL NOT NULL
);
"""

# Columns added after the first release, for spools created before them.
MESSAGE_MIGRATIONS = {
    "body_file": "ALTER TABLE messages ADD COLUMN body_file TEXT NOT NULL DEFAULT ''",
}
MIGRATIONS = {
    "notice": "ALTER TABLE recipients ADD COLUMN notice TEXT NOT NULL DEFAULT ''",
    "warned": "ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0",
    "detail": "ALTER TABLE recipients ADD COLUMN detail TEXT NOT NULL DEFAULT '{}'",
    "destination": "ALTER TABLE recipients ADD COLUMN destination TEXT NOT NULL DEFAULT ''",
    "lease_until": "ALTER TABLE recipients ADD COLUMN lease_until REAL NOT NULL DEFAULT 0",
    "lease_owner": "ALTER TABLE recipients ADD COLUMN lease_owner TEXT NOT NULL DEFAULT ''",
    "claim": "ALTER TABLE recipients ADD COLUMN claim INTEGER NOT NULL DEFAULT 0",
}

# The notices owed to senders, read every queue round (index recipients_owed).
OWED = ("SELECT r.id, r.message, r.address, r.params, r.state, r.last_reply, r.detail, "
        "r.notice, r.warned, m.sender, m.received, m.params FROM recipients r "
        "JOIN messages m ON m.id = r.message WHERE r.notice != '' OR r.warned = 1 "
        "ORDER BY r.message LIMIT ?")

# A recipient that keeps its message in the spool: still to deliver, or owed a notice.
PENDING = "(state IN ('conversion', 'delivery') OR notice != '' OR warned = 1)"
# record(): a claimed recipient (its ``warned``: 1 while a delay notice is owed), and
# whether any other recipient of its message keeps the message.
CLAIMED = "SELECT warned FROM recipients WHERE id = ? AND claim = ? AND state = 'delivery'"
OTHERS_OWED = f"SELECT 1 FROM recipients WHERE message = ? AND id != ? AND {PENDING} LIMIT 1"

WAL_CHECKPOINT_PAGES = 256          # of 4 KiB: 1 MiB
WAL_SIZE_LIMIT = 1 << 20


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (28, 122):       # ENOSPC, EDQUOT
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "full" in str(exc)
    return False


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                               timeout=10)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # A small WAL. By default it grows to 4 MiB before a checkpoint and never shrinks;
        # on a full disk it kept growing while every checkpoint failed for want of space
        # for the database file, so freeing the delivered mail never let the spool commit
        # again (CI: the 4 MB tmpfs test). Checkpoint every 1 MiB; truncate to 1 MiB.
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop | None
    future: Any                       # asyncio.Future, or None with ``done``
    done: Callable[[Any, BaseException | None], None] | None = None
    durable: bool = True              # False: no fsync of its own (see _write)


def _body(bodies: Path, data: bytes, body_file: str, size: int) -> Body:
    if not body_file:
        return Body(data)
    return Body(data, bodies / body_file, size - len(data))


class SqliteSpool:
    """The SQLite spool with its group-commit writer thread."""

    MAX_BATCH = 512

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.bodies = path.parent / "bodies"
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(path)
        for table, migrations in (("recipients", MIGRATIONS), ("messages", MESSAGE_MIGRATIONS)):
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if have:
                for column, statement in migrations.items():
                    if column not in have:
                        self._conn.execute(statement)
        self._conn.executescript(SCHEMA)
        os.chmod(path, 0o600)
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reusable, self._reusable_at = 0, -1.0
        # Reads run on these threads only, each with its own connection (and its own
        # page cache, up to 2 MiB: four of them and the callers' threads raised W4's peak
        # RSS by 9 MB), so a long admin read never waits for the queue manager's.
        self._reader_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spool-read")
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._thread.start()
        self.batches = 0
        self.jobs_done = 0
        self._listeners: list[Callable[[], None]] = []

    # --- the writer ----------------------------------------------------------------
    def _writer(self) -> None:
        conn = self._conn
        # Every process's writer takes this lock around its transaction. Without it two
        # writers meet in SQLite's busy handler, which sleeps 1, 2, 5... ms between tries
        # while the other's transaction lasts a fraction of that; a blocked flock is
        # woken the moment the lock is free.
        #
        # The commit itself does not sync (synchronous=NORMAL): the WAL is fdatasync'd
        # after the lock is released, and only then are the callers answered. That is
        # what synchronous=FULL does at the commit (an fdatasync of the WAL, where the
        # commit's frames are written in order), with the lock no longer held across
        # the disk's wait: the other process's writer commits meanwhile, and the two
        # syncs overlap. Checkpoints sync as before (the WAL before, the database
        # after). Measured on W2 (6,000 messages, four interleaved pairs): 849-905
        # messages/s with the sync under the lock, 934-961 without.
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        conn.execute("PRAGMA synchronous=NORMAL")
        while True:
            first = self._jobs.get()
            if first is None:
                os.close(lock)
                return
            batch = [first]
            while len(batch) < self.MAX_BATCH:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                batch.append(nxt)
            results: list[tuple[_Job, Any, BaseException | None]] = []
            durable = any(job.durable for job in batch)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for job in batch:
                    conn.execute("SAVEPOINT job")
                    try:
                        value = job.fn(conn)
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                        if is_disk_full(exc):
                            raise
                        results.append((job, None, exc))
                    else:
                        conn.execute("RELEASE job")
                        results.append((job, value, None))
                conn.execute("COMMIT")
            except BaseException as exc:  # noqa: BLE001
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                err: BaseException = StorageFull(str(exc)) if is_disk_full(exc) else exc
                results = [(job, None, err) for job in batch]
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            if durable and any(error is None for _, _, error in results):
                results = self._synced(results)
            self.batches += 1
            self.jobs_done += len(batch)
            for job, value, error in results:
                self._finish(job, value, error)

    def _synced(self, results: list[tuple[_Job, Any, BaseException | None]]
                ) -> list[tuple[_Job, Any, BaseException | None]]:
        """``results`` once the WAL is on disk; if it cannot be synced, every durable
        job's caller hears so (its commit may not survive a power failure: a sender
        told 4xx sends again, a duplicate at worst, never a loss)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            err: BaseException = StorageFull(str(exc)) if is_disk_full(exc) else exc
            return [(job, None, err) if job.durable and error is None else (job, value, error)
                    for job, value, error in results]
        return results

    @staticmethod
    def _finish(job: _Job, value: Any, error: BaseException | None) -> None:
        if job.done is not None:
            job.done(value, error)
            return
        fut = job.future
        loop = job.loop
        assert loop is not None

        def settle() -> None:
            if fut.cancelled():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass                                  # the loop is gone; nobody is waiting

    async def _write(self, job: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run ``job(conn)`` inside the next committed batch; return after the commit.

        ``durable=False`` is for bookkeeping that may be lost in a power failure at no
        cost: a claim's lease, a heartbeat, a suspended destination's wait. A batch of
        such jobs commits without the WAL's fdatasync. What another process reads, and
        a ``kill -9``, see it at once (it is in the WAL, in the page cache); the next
        durable commit's fdatasync of the WAL, which is written in order, makes it
        durable too. A power failure can lose only such jobs committed after the last
        durable commit, never the record that followed one: a claim lost with its
        delivery's record means a delivery made again, a duplicate, never a loss.
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put(_Job(job, loop, fut, durable=durable))
        return await fut  # type: ignore[no-any-return]

    def write_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Like :meth:`_write`, for callers outside an event loop (the bench's filler)."""
        box: dict[str, Any] = {}
        ready = threading.Event()

        def done(value: Any, error: BaseException | None) -> None:
            box["value"], box["error"] = value, error
            ready.set()

        self._jobs.put(_Job(job, None, None, done))
        ready.wait()
        if box["error"] is not None:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._readers.conn = connect(self.path)
            self._reader_conns.append(conn)
        return conn

    def _read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read-only query in a worker thread, on that thread's reader connection."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader_pool, self._read_now, fn)

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def start(self, listen: bool = True) -> None:
        """Nothing to connect: the database was opened by the constructor."""

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self._reader_pool.shutdown(wait=True)
        self._conn.close()
        for conn in self._reader_conns:
            conn.close()

    # --- receiving -----------------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        now = self.clock()
        await self._write(lambda conn: _insert_message(conn, message, now))
        for listener in self._listeners:
            listener()

    def enqueue_sync(self, messages: Sequence[NewMessage]) -> None:
        """Many messages in one transaction, outside an event loop (the bench's W4 fill)."""
        now = self.clock()

        def job(conn: sqlite3.Connection) -> None:
            for m in messages:
                _insert_message(conn, m, now)
        self.write_sync(job)

    # --- conversion ----------------------------------------------------------------
    async def pending_conversion(self, limit: int) -> list[Claim]:
        def q(c: sqlite3.Connection) -> list[Claim]:
            rows = c.execute(
                "SELECT r.id, r.message, r.address, m.sender, r.attempts, m.received, r.params, "
                "r.direction FROM recipients r JOIN messages m ON m.id = r.message "
                "WHERE r.state = 'conversion' ORDER BY r.id LIMIT ?", (limit,)).fetchall()
            return [Claim(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), direction=r[7])
                    for r in rows]
        return await self._read(q)

    async def convert(self, decisions: Sequence[Conversion], now: float) -> None:
        def job(conn: sqlite3.Connection) -> None:
            touched: set[str] = set()
            for d in decisions:
                check_move(State.CONVERSION, d.state)
                mid = _apply_conversion(conn, d.rid, d, now)
                if mid is None:
                    continue          # no longer in conversion: deleted meanwhile
                touched.add(mid)
                if d.state != State.EXPANDED:
                    continue
                # a target that is already a recipient of this message gets one copy only
                present = {a for (a,) in conn.execute(
                    "SELECT address FROM recipients WHERE message = ? AND state != 'expanded'",
                    (mid,))}
                for t in d.targets:
                    if t.address in present:
                        continue
                    cur = conn.execute(
                        "INSERT INTO recipients (message, address, params, direction, state, "
                        "parent, next_attempt, updated) VALUES (?, ?, ?, ?, 'conversion', ?, ?, ?)",
                        (mid, t.address, json.dumps(t.params), t.direction, d.rid, now, now))
                    assert cur.lastrowid is not None
                    check_move(State.CONVERSION, t.outcome.state)
                    _apply_conversion(conn, cur.lastrowid, t.outcome, now)
            _finish_messages(conn, touched)
        await self._write(job)

    # --- delivery ------------------------------------------------------------------
    async def due(self, direction: str, now: float, limit: int, owner: str = "") -> list[Claim]:
        def q(c: sqlite3.Connection) -> list[Claim]:
            rows = c.execute(
                "SELECT r.id, r.message, r.address, m.sender, r.attempts, m.received, r.params, "
                "r.destination, r.direction FROM recipients r JOIN messages m ON m.id = r.message "
                "WHERE r.state = 'delivery' AND r.direction = ? AND r.held = 0 "
                "AND r.next_attempt <= ? AND (r.lease_until <= ? OR r.lease_owner = ?) "
                "ORDER BY r.next_attempt LIMIT ?", (direction, now, now, owner, limit)).fetchall()
            return [Claim(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7],
                          direction=r[8]) for r in rows]
        return await self._read(q)

    async def claim(self, due: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[Claim]:
        wanted = {c.rid: c for c in due}
        ids = list(wanted)

        def job(conn: sqlite3.Connection) -> list[Claim]:
            out = []
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                out += [replace(wanted[rid], token=token, attempts=attempts,
                                destination=destination)
                        for rid, token, attempts, destination in conn.execute(
                            "UPDATE recipients SET lease_until = ?, lease_owner = ?, "
                            "claim = claim + 1 WHERE id IN "
                            f"({','.join('?' * len(chunk))}) AND state = 'delivery' AND held = 0 "
                            "AND next_attempt <= ? AND (lease_until <= ? OR lease_owner = ?) "
                            "RETURNING id, claim, attempts, destination",
                            (now + lease, owner, *chunk, now, now, owner)).fetchall()]
            return out
        return await self._write(job, durable=False) if ids else []

    async def renew(self, claims: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[int]:
        def job(conn: sqlite3.Connection) -> list[int]:
            return [c.rid for c in claims if conn.execute(
                "UPDATE recipients SET lease_until = ? WHERE id = ? AND claim = ? "
                "AND lease_owner = ? AND state = 'delivery'",
                (now + lease, c.rid, c.token, owner)).rowcount == 0]
        return await self._write(job, durable=False) if claims else []

    async def release_leases(self, owner: str) -> None:
        await self._write(lambda conn: conn.execute(
            "UPDATE recipients SET lease_until = 0, lease_owner = '' "
            "WHERE lease_until > 0 AND lease_owner IN (?, '')", (owner,)))

    async def record(self, transitions: Sequence[Transition], now: float) -> list[int]:
        def job(conn: sqlite3.Connection) -> list[int]:
            stale = []
            done: set[str] = set()
            for t in transitions:
                check_move(State.DELIVERY, t.state)
                if t.state != State.DELIVERY and not t.notice:
                    # Final with nothing owed: if its message has no other recipient to
                    # wait for, the message goes now, and updating the row first would
                    # be wasted (about a third of this job's time in W2's relay).
                    row = conn.execute(CLAIMED, (t.claim.rid, t.claim.token)).fetchone()
                    if row is None:
                        stale.append(t.claim.rid)
                        continue
                    if row[0] != 1 and conn.execute(
                            OTHERS_OWED, (t.claim.message, t.claim.rid)).fetchone() is None:
                        done.add(t.claim.message)
                        continue
                cur = conn.execute(
                    "UPDATE recipients SET state = ?, last_reply = ?, updated = ?, "
                    "attempts = COALESCE(?, attempts + 1), "
                    "next_attempt = COALESCE(?, next_attempt), notice = ?, "
                    "warned = CASE WHEN ? AND warned = 0 THEN 1 ELSE warned END, "
                    "lease_until = 0, lease_owner = '', detail = ? "
                    "WHERE id = ? AND claim = ? AND state = 'delivery'",
                    (t.state, t.reply, now, t.attempts, t.next_attempt, t.notice, int(t.warn),
                     json.dumps(t.detail), t.claim.rid, t.claim.token))
                if cur.rowcount == 0:
                    stale.append(t.claim.rid)
                    continue
                if t.log_attempt:
                    # a deferral: kept for "postroom queue show" (every attempt, not the last)
                    conn.execute("INSERT INTO attempts (message, recipient, at, reply, detail) "
                                 "VALUES (?, ?, ?, ?, ?)", (t.claim.message, t.claim.rid, now,
                                                            t.reply, json.dumps(t.detail)))
            _delete_messages(conn, done)
            _finish_messages(conn, {t.claim.message for t in transitions} - done)
            return stale
        return await self._write(job) if transitions else []

    async def defer_destination(self, ref: str, until: float, reply: str, detail: str,
                                now: float, owner: str = "") -> int:
        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE recipients SET next_attempt = ?, "
                "detail = CASE WHEN last_reply = '' AND ? != '' THEN ? ELSE detail END, "
                "last_reply = CASE WHEN last_reply = '' THEN ? ELSE last_reply END "
                "WHERE destination = ? AND state = 'delivery' "
                "AND direction = 'outbound' AND (lease_until <= ? OR lease_owner = ?) "
                "AND next_attempt < ?", (until, reply, detail, reply, ref, now, owner, until)
            ).rowcount
        return await self._write(job, durable=False)

    async def message_bodies(self, ids: Sequence[str]
                             ) -> dict[str, tuple[Body, dict[str, str]]]:
        bodies = self.bodies

        def q(c: sqlite3.Connection) -> dict[str, tuple[Body, dict[str, str]]]:
            rows = c.execute(f"SELECT id, data, body_file, size, params FROM messages WHERE id IN "
                             f"({','.join('?' * len(ids))})", list(ids)).fetchall()
            return {mid: (_body(bodies, data, body_file, size), json.loads(params))
                    for mid, data, body_file, size, params in rows}
        return await self._read(q) if ids else {}

    async def body(self, mid: str) -> Body | None:
        return await self._read(lambda c: _load_body(c, mid, self.bodies))

    # --- notices -------------------------------------------------------------------
    async def owed_notices(self, limit: int) -> list[NoticeOwed]:
        def q(c: sqlite3.Connection) -> list[NoticeOwed]:
            rows = c.execute(OWED, (limit,)).fetchall()
            return [NoticeOwed(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], json.loads(r[6]),
                               r[7] or "delay", r[9], r[10], json.loads(r[11])) for r in rows]
        return await self._read(q)

    async def notices_sent(self, sent: Sequence[NoticeSent], now: float) -> list[NoticeSent]:
        def job(conn: sqlite3.Connection) -> list[NoticeSent]:
            done = []
            for n in sent:
                if n.kind == "delay":
                    cleared = sum(conn.execute(
                        "UPDATE recipients SET warned = 2 WHERE id = ? AND warned = 1",
                        (rid,)).rowcount for rid in n.rids)
                else:
                    cleared = sum(conn.execute(
                        "UPDATE recipients SET notice = '' WHERE id = ? AND notice = ?",
                        (rid, n.kind)).rowcount for rid in n.rids)
                if not cleared:
                    continue                     # sent meanwhile by someone else
                if n.report is not None:
                    _insert_message(conn, n.report, now)
                done.append(n)
            _finish_messages(conn, {n.message for n in sent})
            return done
        done = await self._write(job) if sent else []
        if any(n.report is not None for n in done):
            for listener in self._listeners:
                listener()
        return done

    # --- nodes ---------------------------------------------------------------------
    async def heartbeat(self, node: str, info: dict[str, Any], now: float) -> None:
        await self._write(lambda conn: conn.execute(
            "INSERT INTO nodes (name, info, last_seen) VALUES (?, ?, ?) ON CONFLICT (name) "
            "DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen",
            (node, json.dumps(info), now)), durable=False)

    async def nodes(self, now: float) -> list[dict[str, Any]]:
        def q(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT n.name, n.info, n.last_seen, (SELECT COUNT(*) FROM recipients r "
                "WHERE r.lease_owner = n.name AND r.lease_until > ? AND r.state = 'delivery') "
                "FROM nodes n ORDER BY n.name", (now,)).fetchall()
            return [{"name": name, "info": json.loads(info), "last_seen": seen,
                     "seconds_since": max(0.0, now - seen), "claims": claims}
                    for name, info, seen, claims in rows]
        return await self._read(q)

    # --- views ---------------------------------------------------------------------
    def summary(self) -> list[QueueSummary]:
        return self._reader_pool.submit(self._read_now, _summary).result()

    def reusable_bytes(self) -> int:
        """The database file's free pages (a drained queue leaves them behind, and the
        file never shrinks), read at most once a second."""
        now = time.monotonic()
        if now - self._reusable_at >= 1.0:
            self._reusable_at = now
            try:
                self._reusable = self._read_now(lambda c: int(
                    c.execute("PRAGMA freelist_count").fetchone()[0]) * int(
                    c.execute("PRAGMA page_size").fetchone()[0]))
            except sqlite3.Error:
                self._reusable = 0
        return self._reusable

    async def recipients(self, filters: Filters, now: float) -> list[RecipientView]:
        where, args = _where(filters, now)

        def q(c: sqlite3.Connection) -> list[RecipientView]:
            return [recipient_view(row) for row in c.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients r JOIN messages m "
                f"ON m.id = r.message WHERE {where} ORDER BY m.received, r.id", args)]
        return await self._read(q)

    async def message(self, mid: str) -> MessageView | None:
        bodies = self.bodies

        def q(c: sqlite3.Connection) -> MessageView | None:
            row = c.execute("SELECT id, received, sender, size, params, client, data, "
                            "body_file FROM messages WHERE id = ?", (mid,)).fetchone()
            if row is None:
                return None
            rcpts = tuple(recipient_view(r) for r in c.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients r JOIN messages m "
                "ON m.id = r.message WHERE r.message = ? ORDER BY r.id", (mid,)))
            attempts = tuple(AttemptView(a[0], a[1], a[2], json.loads(a[3] or "{}"))
                             for a in c.execute("SELECT recipient, at, reply, detail FROM "
                                                "attempts WHERE message = ? ORDER BY id", (mid,)))
            return MessageView(row[0], row[1], row[2], row[3], json.loads(row[4]),
                               json.loads(row[5]), rcpts, attempts,
                               _body(bodies, row[6], row[7], row[3]))
        return await self._read(q)

    # --- actions -------------------------------------------------------------------
    async def act(self, action: str, rids: Iterable[int], now: float, who: str
                  ) -> dict[str, Any]:
        ids = list(rids)
        return await self._write(lambda conn: _act(conn, action, ids, now, who))

    # --- housekeeping --------------------------------------------------------------
    async def sweep_bodies(self, started: float = 0.0) -> int:
        """Unlink the body files of deleted messages; with ``started``, also files no
        message names that are older than it (a crash between file and commit).

        Reads through a reader connection, which sees committed rows only: a file is
        unlinked only once the deletion of its message is durable.
        """
        def collect(c: sqlite3.Connection) -> tuple[list[str], list[Path]]:
            dead = [n for (n,) in c.execute("SELECT name FROM dead_bodies").fetchall()]
            orphans: list[Path] = []
            if started and self.bodies.is_dir():
                named = {n for (n,) in c.execute(
                    "SELECT body_file FROM messages WHERE body_file != ''").fetchall()}
                orphans = [Path(e.path) for e in os.scandir(self.bodies)
                           if e.name not in named and e.stat().st_mtime < started]
            for path in [self.bodies / n for n in dead] + orphans:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            return dead, orphans

        dead, orphans = await self._read(collect)
        if dead:
            await self._write(lambda c: c.executemany(
                "DELETE FROM dead_bodies WHERE name = ?", [(n,) for n in dead]))
        return len(dead) + len(orphans)


# --- the statements --------------------------------------------------------------------
def _insert_message(conn: sqlite3.Connection, m: NewMessage, now: float) -> None:
    conn.execute(
        "INSERT INTO messages (id, received, sender, size, params, client, data, body_file) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (m.queue_id, now, m.sender, m.size, json.dumps(m.params), json.dumps(m.client),
         m.data, m.body_file),
    )
    for r in m.recipients:
        check_entry(r.state)
    conn.executemany(
        "INSERT INTO recipients (message, address, params, direction, state, destination, "
        "next_attempt, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(m.queue_id, r.address, json.dumps(r.params), r.direction, r.state, r.destination,
          now, now) for r in m.recipients],
    )


def _apply_conversion(conn: sqlite3.Connection, rid: int, d: Conversion, now: float
                      ) -> str | None:
    """Move one recipient out of conversion; its message, or None if it was not there."""
    row = conn.execute(
        "UPDATE recipients SET state = ?, destination = ?, updated = ?, next_attempt = ?, "
        "last_reply = ?, detail = COALESCE(?, detail), notice = ? "
        "WHERE id = ? AND state = 'conversion' RETURNING message",
        (d.state, d.destination, now, now if d.next_attempt is None else d.next_attempt,
         d.last_reply, json.dumps(d.detail) if d.detail is not None else None, d.notice, rid)
    ).fetchone()
    return None if row is None else str(row[0])


def _finish_messages(conn: sqlite3.Connection, message_ids: Iterable[str]) -> None:
    """Delete messages that owe nothing more: every recipient is final and every
    notice owed to the sender (NDR, success) has gone out."""
    _delete_messages(conn, [mid for mid in set(message_ids) if conn.execute(
        f"SELECT 1 FROM recipients WHERE message = ? AND {PENDING} LIMIT 1",
        (mid,)).fetchone() is None])


def _delete_messages(conn: sqlite3.Connection, message_ids: Iterable[str]) -> None:
    """Delete messages with their recipients and attempts; a body file is unlinked once
    the deletion is committed (``dead_bodies``)."""
    for mid in message_ids:
        conn.execute("DELETE FROM recipients WHERE message = ?", (mid,))
        conn.execute("DELETE FROM attempts WHERE message = ?", (mid,))
        conn.execute("INSERT OR IGNORE INTO dead_bodies (name) SELECT body_file FROM messages "
                     "WHERE id = ? AND body_file != ''", (mid,))
        conn.execute("DELETE FROM messages WHERE id = ?", (mid,))


def _load_body(conn: sqlite3.Connection, mid: str, bodies: Path) -> Body | None:
    row = conn.execute("SELECT data, body_file, size FROM messages WHERE id = ?",
                       (mid,)).fetchone()
    return None if row is None else _body(bodies, *row)


def _summary(conn: sqlite3.Connection) -> list[QueueSummary]:
    rows = conn.execute(
        "SELECT r.direction || '-' || r.state, COUNT(DISTINCT r.message), COUNT(*), "
        "MIN(m.received), SUM(r.held), MIN(CASE WHEN r.held = 0 THEN r.next_attempt END) "
        "FROM recipients r JOIN messages m ON m.id = r.message "
        "WHERE r.state IN ('conversion', 'delivery') GROUP BY r.direction, r.state").fetchall()
    found = {name: QueueSummary(name, msgs, rcpts, oldest, held or 0, nxt)
             for name, msgs, rcpts, oldest, held, nxt in rows}
    return [found.get(name, QueueSummary(name, 0, 0, None, 0)) for name in QUEUES]


def _where(f: Filters, now: float) -> tuple[str, list[Any]]:
    clauses = ["r.state IN ('conversion', 'delivery')"]
    args: list[Any] = []
    if f.queue:
        direction, state = f.queue_parts()
        clauses.append("r.direction = ? AND r.state = ?")
        args += [direction, state]
    if f.ids:
        clauses.append(f"r.message IN ({','.join('?' * len(f.ids))})")
        args += list(f.ids)
    if f.domain:
        clauses.append("lower(substr(r.address, instr(r.address, '@') + 1)) = ?")
        args.append(f.domain.lower().rstrip("."))
    if f.rcpt:
        clauses.append("lower(r.address) = ?")
        args.append(f.rcpt.lower())
    if f.sender:
        clauses.append("lower(m.sender) = ?")
        args.append("" if f.sender == "<>" else f.sender.lower())
    if f.older_than:
        clauses.append("m.received <= ?")
        args.append(now - f.older_than)
    if f.held is not None:
        clauses.append("r.held = ?")
        args.append(int(f.held))
    return " AND ".join(clauses), args


def _act(conn: sqlite3.Connection, action: str, rids: list[int], now: float, who: str
         ) -> dict[str, Any]:
    messages: set[str] = set()
    changed = 0
    finished: list[tuple[str, str, str]] = []   # (queue id, address, direction) deleted or returned
    for rid in rids:
        row = conn.execute("SELECT r.message, r.state, r.address, r.direction, r.params, "
                           "m.sender FROM recipients r JOIN messages m ON m.id = r.message "
                           "WHERE r.id = ?", (rid,)).fetchone()
        if row is None or row[1] not in ("conversion", "delivery"):
            continue
        mid = row[0]
        messages.add(mid)
        if action == "retry":
            cur = conn.execute("UPDATE recipients SET next_attempt = ?, held = 0 WHERE id = ? "
                               "AND state = 'delivery'", (now, rid))
        elif action == "hold":
            cur = conn.execute("UPDATE recipients SET held = 1 WHERE id = ?", (rid,))
        elif action == "release":
            cur = conn.execute("UPDATE recipients SET held = 0, next_attempt = MIN(next_attempt, ?) "
                               "WHERE id = ? AND held = 1", (now, rid))
        elif action == "delete":
            check_move(row[1], State.FAILED)
            cur = conn.execute("UPDATE recipients SET state = 'failed', notice = '', "
                               "last_reply = ?, updated = ?, lease_until = 0 WHERE id = ?",
                               (f"deleted by {who} (no report sent)", now, rid))
        else:   # bounce
            check_move(row[1], State.FAILED)
            notice = "failure" if wants_notice("failure", row[5], json.loads(row[4])) else ""
            detail = json.dumps({"status": "5.3.0", "step": "queue", "hop": "this server",
                                 "last_attempt": now})
            cur = conn.execute(
                "UPDATE recipients SET state = 'failed', notice = ?, last_reply = ?, detail = ?, "
                "updated = ?, lease_until = 0 WHERE id = ?",
                (notice, f"554 5.3.0 returned to the sender by {who} before delivery", detail,
                 now, rid))
        changed += cur.rowcount
        if cur.rowcount and action in ("delete", "bounce"):
            finished.append((mid, row[2], row[3]))
    if action in ("delete", "bounce"):
        _finish_messages(conn, messages)
    return {"action": action, "recipients": changed, "messages": len(messages),
            "finished": finished}
