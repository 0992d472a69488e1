"""The spool: durable state of every accepted message and each of its recipients.

On disk: one SQLite database in WAL mode with ``synchronous=FULL``. Table ``messages``
holds the envelope and the message bytes (CRLF line ends, Received header included);
table ``recipients`` holds one row per recipient with its direction (``inbound`` to a
local mailbox, ``outbound`` to another host) and state:

    conversion ──> delivery ──> delivered | failed        (expanded: an alias, replaced
                      ^  │                                  by its targets)
                      └──┘ transient failure: next_attempt moves on

The four queues an administrator sees are views: ``<direction>-<state>``.

All writes go through one writer thread that takes jobs in batches: every job of a
batch runs in its own savepoint inside one transaction, and every caller is answered
only after the commit (group commit: many sessions share one fsync). A message whose
recipients are all final is deleted in the same transaction that made them final.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .body import Body

__all__ = [
    "QUEUES", "NewMessage", "NewRecipient", "QueueSummary", "Spool", "SpoolRecipient",
    "SqliteSpool", "StorageFull", "finish_messages", "insert_message", "is_disk_full",
    "load_body", "make_body", "new_queue_id", "record",
]

T = TypeVar("T")

QUEUES = ("inbound-conversion", "inbound-delivery", "outbound-conversion", "outbound-delivery")
ACTIVE_STATES = ("conversion", "delivery")

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
    destination  TEXT NOT NULL DEFAULT '',  -- outbound: "<route index>|<domain>" chosen at conversion
    lease_until  REAL NOT NULL DEFAULT 0    -- outbound: in flight until then (cleared at start)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, direction, next_attempt);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients (message);
CREATE INDEX IF NOT EXISTS recipients_notice ON recipients (notice) WHERE notice != '';
CREATE INDEX IF NOT EXISTS recipients_destination ON recipients (destination)
    WHERE state = 'delivery' AND direction = 'outbound';
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
}


class StorageFull(Exception):
    """The disk (or the database) is full: the client should try again later."""


_ID_PREFIX = ""
_id_counter = itertools.count()


def _seed_ids() -> None:
    """A fresh prefix and counter per process (again in every forked front end)."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = f"{secrets.randbits(12):03X}"
    _id_counter = itertools.count(secrets.randbits(16))


_seed_ids()
os.register_at_fork(after_in_child=_seed_ids)


def new_queue_id() -> str:
    """A queue id that sorts by arrival: 11 hex digits of milliseconds, then a
    per-process prefix and counter (unique within the process, cheap to make)."""
    return f"{int(time.time() * 1000):011X}{_ID_PREFIX}{next(_id_counter) & 0xFFFF:04X}"


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    direction: str
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class NewMessage:
    queue_id: str
    sender: str
    params: dict[str, str]
    client: dict[str, Any]
    data: bytes
    recipients: tuple[NewRecipient, ...]
    body_file: str = ""          # the rest of a big message, in the bodies folder
    body_size: int = 0           # that file's size

    @property
    def size(self) -> int:
        return len(self.data) + self.body_size


@dataclass(frozen=True, slots=True)
class SpoolRecipient:
    id: int
    message: str
    address: str
    direction: str
    state: str
    params: dict[str, str]
    attempts: int
    sender: str


@dataclass(frozen=True, slots=True)
class QueueSummary:
    name: str
    messages: int
    recipients: int
    oldest: float | None       # arrival time of the oldest message, or None when empty
    held: int


class Spool(Protocol):
    """What the SMTP server and the queue manager need of durable storage."""

    bodies: Path                      # where big messages' files live

    async def enqueue(self, message: NewMessage) -> None: ...
    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T: ...
    def summary(self) -> list[QueueSummary]: ...


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop | None
    future: Any                       # asyncio.Future or concurrent Future-like callback
    done: Callable[[Any, BaseException | None], None] | None = None


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (28, 122):       # ENOSPC, EDQUOT
        return True
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "full" in str(exc)
    return False


WAL_CHECKPOINT_PAGES = 256          # of 4 KiB: 1 MiB
WAL_SIZE_LIMIT = 1 << 20


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
        self._reader = connect(path)
        self._reader_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._thread.start()
        self.batches = 0
        self.jobs_done = 0
        self._listeners: list[Callable[[], None]] = []

    # --- the writer ----------------------------------------------------------------
    def _writer(self) -> None:
        conn = self._conn
        while True:
            first = self._jobs.get()
            if first is None:
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
            self.batches += 1
            self.jobs_done += len(batch)
            for job, value, error in results:
                self._finish(job, value, error)

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

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job(conn)`` inside the next committed batch; return after the commit."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put(_Job(job, loop, fut))
        return await fut

    def run_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Like :meth:`run`, for callers outside an event loop (CLI, tests)."""
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

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only query on the reader connection (WAL: never blocks the writer)."""
        with self._reader_lock:
            self._reader.execute("BEGIN")
            try:
                return fn(self._reader)
            finally:
                self._reader.execute("COMMIT")

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self._conn.close()
        self._reader.close()

    # --- operations ----------------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        """Store a message and its recipients durably; returns once committed."""
        now = self.clock()
        await self.run(lambda conn: insert_message(conn, message, now))
        for listener in self._listeners:
            listener()

    def summary(self) -> list[QueueSummary]:
        return self.read(queue_summary)

    async def sweep_bodies(self, started: float = 0.0) -> int:
        """Unlink the body files of deleted messages; with ``started``, also files no
        message names that are older than it (a crash between file and commit).

        Reads through the reader connection, which sees committed rows only: a file is
        unlinked only once the deletion of its message is durable.
        """
        loop = asyncio.get_running_loop()

        def collect() -> tuple[list[str], list[Path]]:
            dead = [n for (n,) in self.read(lambda c: c.execute(
                "SELECT name FROM dead_bodies").fetchall())]
            orphans: list[Path] = []
            if started and self.bodies.is_dir():
                named = {n for (n,) in self.read(lambda c: c.execute(
                    "SELECT body_file FROM messages WHERE body_file != ''").fetchall())}
                orphans = [Path(e.path) for e in os.scandir(self.bodies)
                           if e.name not in named and e.stat().st_mtime < started]
            for path in [self.bodies / n for n in dead] + orphans:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            return dead, orphans

        dead, orphans = await loop.run_in_executor(None, collect)
        if dead:
            await self.run(lambda c: c.executemany("DELETE FROM dead_bodies WHERE name = ?",
                                                   [(n,) for n in dead]))
        return len(dead) + len(orphans)


def insert_message(conn: sqlite3.Connection, m: NewMessage, now: float) -> None:
    """Insert a message and its recipients (inside a job, like any write)."""
    conn.execute(
        "INSERT INTO messages (id, received, sender, size, params, client, data, body_file) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (m.queue_id, now, m.sender, m.size, json.dumps(m.params), json.dumps(m.client),
         m.data, m.body_file),
    )
    conn.executemany(
        "INSERT INTO recipients (message, address, params, direction, state, next_attempt, "
        "updated) VALUES (?, ?, ?, ?, 'conversion', ?, ?)",
        [(m.queue_id, r.address, json.dumps(r.params), r.direction, now, now)
         for r in m.recipients],
    )


def queue_summary(conn: sqlite3.Connection) -> list[QueueSummary]:
    """The four queues: messages, recipients, oldest arrival and held recipients."""
    rows = conn.execute(
        "SELECT r.direction || '-' || r.state, COUNT(DISTINCT r.message), COUNT(*), "
        "MIN(m.received), SUM(r.held) FROM recipients r JOIN messages m ON m.id = r.message "
        "WHERE r.state IN ('conversion', 'delivery') GROUP BY r.direction, r.state"
    ).fetchall()
    found = {name: QueueSummary(name, msgs, rcpts, oldest, held or 0)
             for name, msgs, rcpts, oldest, held in rows}
    return [found.get(name, QueueSummary(name, 0, 0, None, 0)) for name in QUEUES]


def record(conn: sqlite3.Connection, rid: int, *, state: str, reply: str, now: float,
           attempts: int | None = None, next_attempt: float | None = None, notice: str = "",
           warn: bool = False, detail: dict[str, Any] | None = None,
           log_attempt: bool = False) -> None:
    """Record one attempt's outcome for a recipient; ``log_attempt`` also keeps it in
    the recipient's list of attempts."""
    conn.execute(
        "UPDATE recipients SET state = ?, last_reply = ?, updated = ?, "
        "attempts = COALESCE(?, attempts + 1), next_attempt = COALESCE(?, next_attempt), "
        "notice = ?, warned = CASE WHEN ? AND warned = 0 THEN 1 ELSE warned END, lease_until = 0, "
        "detail = COALESCE(?, detail) WHERE id = ?",
        (state, reply, now, attempts, next_attempt, notice, int(warn),
         json.dumps(detail) if detail is not None else None, rid))
    if log_attempt and detail is not None:
        # a deferral: keep it for "postroom queue show" (every attempt, not only the last)
        conn.execute("INSERT INTO attempts (message, recipient, at, reply, detail) "
                     "SELECT message, id, ?, ?, ? FROM recipients WHERE id = ?",
                     (now, reply, json.dumps(detail), rid))


def finish_messages(conn: sqlite3.Connection, message_ids: Iterable[str]) -> None:
    """Delete messages that owe nothing more: every recipient is final and every
    notice owed to the sender (NDR, success) has gone out.
    """
    for mid in set(message_ids):
        active = conn.execute(
            "SELECT 1 FROM recipients WHERE message = ? AND (state IN ('conversion', 'delivery') "
            "OR notice != '' OR warned = 1) LIMIT 1", (mid,)).fetchone()
        if active is None:
            conn.execute("DELETE FROM recipients WHERE message = ?", (mid,))
            conn.execute("DELETE FROM attempts WHERE message = ?", (mid,))
            conn.execute("INSERT OR IGNORE INTO dead_bodies (name) SELECT body_file FROM messages "
                         "WHERE id = ? AND body_file != ''", (mid,))
            conn.execute("DELETE FROM messages WHERE id = ?", (mid,))


def load_body(conn: sqlite3.Connection, mid: str, bodies: Path) -> Body | None:
    """A stored message's bytes (None when the message is gone)."""
    row = conn.execute("SELECT data, body_file, size FROM messages WHERE id = ?",
                       (mid,)).fetchone()
    return None if row is None else make_body(bodies, *row)


def make_body(bodies: Path, data: bytes, body_file: str, size: int) -> Body:
    if not body_file:
        return Body(data)
    return Body(data, bodies / body_file, size - len(data))
