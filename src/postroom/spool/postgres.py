"""The PostgreSQL spool: one queue shared by several Postroom nodes.

The same tables as the SQLite spool (``messages``, ``recipients`` with their leases and
fencing tokens, ``attempts``), plus ``message_chunks`` (a big message's bytes, 1 MiB per
row, deleted with their message) and ``nodes`` (each node's heartbeat). Postroom creates
and migrates them itself: ``postroom_schema`` records the versions applied, and the
migrations run in one transaction under an advisory lock, so that two nodes starting
together do not race.

Every verb is one short transaction on a connection from a pool (psycopg 3, async),
opened lazily in the running event loop; none is held open across the caller's network
I/O. Claims are taken with ``FOR UPDATE SKIP LOCKED``, so two nodes never get the same
recipient, and leases run on the database's clock (``clock_timestamp()``), so the nodes'
clocks need not agree (unless a ``clock`` is given: the tests' fake clock then drives
leases too, as in the other backends).

A big message's bytes are copied from the node-local file into the database in the
enqueue's transaction; a node that reads the message materialises it into a cache file
``bodies/<name>`` (written to a temporary name, then renamed), so every reader of
:class:`~postroom.body.Body` works unchanged. :meth:`PostgresSpool.sweep_bodies` removes
cache files whose message is gone.

``enqueue`` (and ``notices_sent`` with a report) send ``NOTIFY postroom_queue`` in their
transaction; each node LISTENs (:meth:`PostgresSpool.start`) and wakes its ``on_commit``
listeners when another node commits work. A database that cannot be reached is
:class:`~postroom.spool.records.StorageUnavailable` from every verb; the pool reconnects
by itself when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.pool_async import StopWorker

from ..body import CHUNK, Body
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
    StorageUnavailable,
    Transition,
    recipient_view,
)
from .states import QUEUES, State, check_entry, check_move, wants_notice

__all__ = ["CHANNEL", "MIGRATIONS", "PostgresSpool", "SchemaTooNew", "migrate"]

log = logging.getLogger("postroom.spool")

T = TypeVar("T")
AConn = psycopg.AsyncConnection[TupleRow]

CHANNEL = "postroom_queue"              # NOTIFY channel: new work was committed
SCHEMA_LOCK = 0x706F7374726F6F6D        # pg_advisory_xact_lock key: b"postroom"
ORPHAN_AGE = 3600.0                     # a body file nobody names, untouched this long, goes
RETRIES = 5                             # a transaction a deadlock rolled back runs again

# The database's clock, in epoch seconds: leases run on it, so nodes need not agree.
DB_NOW = "extract(epoch FROM clock_timestamp())::float8"

# Connection defaults; the URL's own parameters win. Keepalives notice a database host
# that vanished (no FIN, no RST) within about a minute instead of TCP's fifteen.
CONNECT_DEFAULTS = {"application_name": "postroom", "connect_timeout": "5",
                    "keepalives": "1", "keepalives_idle": "30",
                    "keepalives_interval": "10", "keepalives_count": "3"}

# Each version's statements, applied in order, each version in the transaction that
# records it in postroom_schema. Append only: a released version is never edited.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (   # 1: the queue
        """CREATE TABLE messages (
            id        text PRIMARY KEY,
            received  double precision NOT NULL,
            sender    text NOT NULL,
            size      bigint NOT NULL,
            params    text NOT NULL,      -- JSON: MAIL FROM parameters
            client    text NOT NULL,      -- JSON: peer, helo, listener, auth user, session id
            data      bytea NOT NULL,     -- the message; or, with body_file, the lines we added
            body_file text NOT NULL DEFAULT ''  -- a big message: its chunks, and the cache name
        )""",
        """CREATE TABLE message_chunks (  -- a big message's bytes, 1 MiB per row
            message text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            seq     integer NOT NULL,
            data    bytea NOT NULL,
            PRIMARY KEY (message, seq)
        )""",
        # stored out of line uncompressed: mail is mostly compressed or base64 already,
        # and pglz on every megabyte in and out costs more CPU than it saves
        "ALTER TABLE message_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        """CREATE TABLE recipients (
            id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            message      text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            address      text NOT NULL,
            params       text NOT NULL,     -- JSON: RCPT TO parameters (NOTIFY, ORCPT)
            direction    text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
            state        text NOT NULL CHECK (state IN
                           ('conversion', 'delivery', 'delivered', 'failed', 'expanded')),
            parent       bigint,            -- the alias recipient this one was expanded from
            next_attempt double precision NOT NULL,
            attempts     integer NOT NULL DEFAULT 0,
            held         boolean NOT NULL DEFAULT false,
            last_reply   text NOT NULL DEFAULT '',
            updated      double precision NOT NULL,
            notice       text NOT NULL DEFAULT '',   -- a DSN owed: '' | failure | success
            warned       smallint NOT NULL DEFAULT 0, -- delay notice: 0 not yet, 1 owed, 2 sent
            detail       text NOT NULL DEFAULT '{}', -- JSON: the last attempt
            destination  text NOT NULL DEFAULT '',   -- "<route index>|<domain>"
            lease_until  double precision NOT NULL DEFAULT 0,  -- claimed: in flight until then
            lease_owner  text NOT NULL DEFAULT '',   -- the node holding the claim
            claim        bigint NOT NULL DEFAULT 0   -- fencing token: one more at every claim
        )""",
        "CREATE INDEX recipients_due ON recipients (state, direction, next_attempt)",
        "CREATE INDEX recipients_message ON recipients (message)",
        "CREATE INDEX recipients_notice ON recipients (message) "
        "WHERE notice <> '' OR warned = 1",
        "CREATE INDEX recipients_destination ON recipients (destination) "
        "WHERE state = 'delivery' AND direction = 'outbound'",
        "CREATE INDEX recipients_leased ON recipients (lease_owner) WHERE lease_until > 0",
        """CREATE TABLE attempts (        -- failed attempts of waiting recipients
            id        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            message   text NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            recipient bigint NOT NULL,
            at        double precision NOT NULL,
            reply     text NOT NULL,
            detail    text NOT NULL        -- JSON
        )""",
        "CREATE INDEX attempts_message ON attempts (message)",
        """CREATE TABLE nodes (           -- every node that shares the queue
            name      text PRIMARY KEY,
            info      text NOT NULL,       -- JSON: pid, started, version, listeners, ...
            last_seen double precision NOT NULL
        )""",
    ),
)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer Postroom than this one."""


def migrate(conn: psycopg.Connection[TupleRow]) -> tuple[int, int]:
    """Bring the schema to the newest version, in one transaction under an advisory lock;
    (version found, version now). Run on a connection in autocommit mode."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS postroom_schema ("
                     "version integer PRIMARY KEY, "
                     "applied timestamptz NOT NULL DEFAULT now())")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM postroom_schema").fetchone()
        found = int(row[0]) if row else 0
        if found > len(MIGRATIONS):
            raise SchemaTooNew(f"the spool's database has schema version {found}; this "
                               f"Postroom knows up to {len(MIGRATIONS)}: upgrade it")
        for version in range(found + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)  # type: ignore[arg-type]
            conn.execute("INSERT INTO postroom_schema (version) VALUES (%s)", (version,))
    return found, len(MIGRATIONS)


def _clean(text: str) -> str:
    """PostgreSQL's text cannot hold NUL (a remote reply might): U+FFFD instead."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _unavailable(exc: BaseException) -> Exception:
    """The exception a caller sees for a database error: the disk is full, or the
    database cannot be reached (refused, lost, shut down, no connection in time)."""
    if isinstance(exc, pg_errors.DiskFull):
        return StorageFull(str(exc))
    return StorageUnavailable(f"PostgreSQL: {str(exc).strip() or type(exc).__name__}")


_ROLLED_BACK = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure,
                pg_errors.TransactionRollback)
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError)

class PostgresSpool:
    """The queue in PostgreSQL, shared by every node that has the same ``url``."""

    def __init__(self, url: str, bodies: Path, *, clock: Callable[[], float] | None = None,
                 pool_size: int = 10, timeout: float = 5.0) -> None:
        self.url = url
        self.bodies = bodies
        self.clock: Callable[[], float] = clock or time.time
        # Leases run on the database's clock, unless the caller brings its own (tests).
        self._lease_now = "%(now)s" if clock is not None else DB_NOW
        self.pool_size = max(1, pool_size)
        self.timeout = timeout           # seconds to wait for a connection: then 451
        self._conninfo = make_conninfo("", **{**CONNECT_DEFAULTS, **conninfo_to_dict(url)})
        self._token = secrets.token_hex(8)          # our NOTIFYs, ignored by our listener
        self._listeners: list[Callable[[], None]] = []
        self._pool: AsyncConnectionPool[AConn] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._schema_ready = False
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_conn: AConn | None = None
        self._conns: weakref.WeakSet[AConn] = weakref.WeakSet()
        self._closed = False
        self._sync_conn: psycopg.Connection[TupleRow] | None = None
        self._sync_lock = threading.Lock()
        self._known: set[str] = set()       # body files whose message was committed
        self._materialising: dict[str, asyncio.Lock] = {}

    # --- connections ---------------------------------------------------------------
    async def start(self, listen: bool = True) -> None:
        """Open the pool, create or migrate the schema, and (``listen``) LISTEN for
        other nodes' commits on a connection of its own. A database that cannot be
        reached yet is not an error here: the verbs say so (StorageUnavailable) until
        it is back."""
        try:
            await self._ready()
        except StorageUnavailable as exc:
            log.warning("the spool's database cannot be reached yet (%s); "
                        "carrying on, retrying at every use", exc)
        if listen and self._listen_task is None:
            self._listen_task = asyncio.get_running_loop().create_task(
                self._listen(), name="spool-listen")

    async def _configure(self, conn: AConn) -> None:
        self._conns.add(conn)

    async def _ready(self) -> AsyncConnectionPool[AConn]:
        """The pool, opened in the running loop on first use; the schema, once."""
        if self._closed:
            raise StorageUnavailable("the spool is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._opening = asyncio.Lock()
        elif loop is not self._loop:
            raise RuntimeError("a PostgresSpool belongs to the event loop that first used it")
        if self._pool is None or not self._schema_ready:
            assert self._opening is not None
            async with self._opening:
                if not self._schema_ready:
                    await asyncio.to_thread(self._ensure_schema)
                if self._pool is None:
                    pool: AsyncConnectionPool[AConn] = AsyncConnectionPool(
                        self._conninfo, kwargs={"autocommit": True},
                        min_size=min(2, self.pool_size), max_size=self.pool_size,
                        open=False, configure=self._configure,
                        # a connection that died while idle (server restarted) is
                        # found out before a verb gets it
                        check=AsyncConnectionPool.check_connection,
                        timeout=self.timeout,
                        # give up on a connection attempt early: the next request
                        # starts a fresh one at once, instead of waiting for a backoff
                        # that has grown during a long outage
                        reconnect_timeout=max(2 * self.timeout, 5.0),
                        name="postroom-spool")
                    await pool.open(wait=False)
                    self._pool = pool
        assert self._pool is not None
        return self._pool

    async def _run(self, fn: Callable[[AConn], Awaitable[T]], *, tx: bool = True) -> T:
        """``fn(conn)`` in one transaction (or, with ``tx=False``, autocommit), again
        when a deadlock rolled it back; database errors become StorageUnavailable or
        StorageFull."""
        pool = await self._ready()
        for attempt in range(RETRIES):
            try:
                async with pool.connection() as conn:
                    if not tx:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except _ROLLED_BACK as exc:
                if attempt == RETRIES - 1:
                    raise _unavailable(exc) from exc
                await asyncio.sleep(0.01 * (attempt + 1) * (1 + secrets.randbelow(10)))
            except _UNREACHABLE as exc:
                raise _unavailable(exc) from exc
        raise AssertionError("unreachable")

    def _sync(self) -> psycopg.Connection[TupleRow]:
        """The synchronous connection (summary, schema); call with ``_sync_lock`` held."""
        if self._closed:
            raise StorageUnavailable("the spool is closed")
        if self._sync_conn is None or self._sync_conn.closed:
            self._sync_conn = psycopg.connect(self._conninfo, autocommit=True)
        return self._sync_conn

    def _sync_run(self, fn: Callable[[psycopg.Connection[TupleRow]], T]) -> T:
        """``fn`` on the synchronous connection. A connection that died while idle (the
        server restarted) is replaced and ``fn`` runs once more: it only reads, or
        migrates, which is all or nothing and idempotent."""
        with self._sync_lock:
            for attempt in (1, 2):
                reused = self._sync_conn is not None and not self._sync_conn.closed
                try:
                    return fn(self._sync())
                except _UNREACHABLE as exc:
                    if self._sync_conn is not None and (self._sync_conn.closed or
                                                        self._sync_conn.broken):
                        self._sync_conn.close()
                        self._sync_conn = None
                    if not (reused and attempt == 1 and self._sync_conn is None):
                        raise _unavailable(exc) from exc
            raise AssertionError("unreachable")

    def _ensure_schema(self) -> None:
        found, now = self._sync_run(migrate)
        if found != now:
            log.info("spool schema migrated from version %d to %d", found, now)
        self._schema_ready = True

    def schema_version(self) -> int:
        """The newest schema version recorded in the database."""
        def q(c: psycopg.Connection[TupleRow]) -> int:
            row = c.execute("SELECT coalesce(max(version), 0) FROM postroom_schema").fetchone()
            return int(row[0]) if row else 0
        return self._sync_run(q)

    # --- wake-ups across nodes -----------------------------------------------------
    def on_commit(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _wake(self) -> None:
        for listener in self._listeners:
            listener()

    async def _listen(self) -> None:
        """LISTEN on the channel; wake the listeners at each other node's NOTIFY, and
        once after every reconnection, since notifications may have been missed."""
        connected = False
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            except _UNREACHABLE:
                await asyncio.sleep(1)
                continue
            self._listen_conn = conn
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if connected:
                        self._wake()
                    connected = True
                    while not self._closed:
                        async for note in conn.notifies(timeout=30):
                            if note.payload != self._token:
                                self._wake()
                        await conn.execute("SELECT 1")       # still there?
            except _UNREACHABLE as exc:
                if not self._closed:
                    log.info("spool listener lost its connection (%s); reconnecting", exc)
                    await asyncio.sleep(1)
            finally:
                self._listen_conn = None

    # --- closing -------------------------------------------------------------------
    def _shut(self) -> AsyncConnectionPool[AConn] | None:
        """Closed from now on: no listener, no synchronous connection; the pool, to
        close."""
        if self._closed:
            return None
        self._closed = True
        if self._listen_task is not None:
            self._listen_task.cancel()
        if self._listen_conn is not None:
            with contextlib.suppress(Exception):
                self._listen_conn.pgconn.finish()
        with self._sync_lock:
            if self._sync_conn is not None:
                with contextlib.suppress(Exception):
                    self._sync_conn.close()
                self._sync_conn = None
        pool, self._pool = self._pool, None
        return pool

    def close(self) -> None:
        """Stop listening and close every connection at once. Synchronous (the server
        calls it in its loop; tests after theirs): prefer :meth:`aclose` in a loop."""
        pool = self._shut()
        if pool is None:
            return
        for conn in list(self._conns):           # the sockets go now
            with contextlib.suppress(Exception):
                conn.pgconn.finish()
        # psycopg_pool's workers swallow a CancelledError that arrives while they run
        # a task (a connection attempt, a check): cancelled by the loop's end at such a
        # moment, a worker would wait for its next task forever, and asyncio.run with
        # it. A StopWorker apiece ends each worker, whatever the loop does next.
        for _ in range(pool.num_workers):
            pool.run_task(StopWorker(pool))

    async def aclose(self) -> None:
        """Stop listening, close the pool and wait for its workers to end."""
        task = self._listen_task
        pool = self._shut()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close(timeout=2.0)

    # --- receiving -----------------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        now = self.clock()

        async def insert(conn: AConn) -> None:
            await self._insert_message(conn, message, now)
        # a message without a body file is one statement, in autocommit its own
        # transaction: one round trip instead of five (BEGIN, three statements, COMMIT)
        await self._run(insert, tx=bool(message.body_file))
        if message.body_file:
            self._known.add(message.body_file)      # this file is now a cache
        self._wake()

    async def _insert_message(self, conn: AConn, m: NewMessage, now: float) -> None:
        """The message's row, its recipients' and the other nodes' NOTIFY (delivered at
        commit; PostgreSQL sends a transaction's identical ones once) in one statement;
        then a big body's chunks."""
        for r in m.recipients:
            check_entry(r.state)
        await conn.execute(
            "WITH m AS (INSERT INTO messages (id, received, sender, size, params, client, "
            "data, body_file) VALUES (%(mid)s, %(now)s, %(sender)s, %(size)s, %(mparams)s, "
            "%(client)s, %(data)b, %(body_file)s) RETURNING id), "
            "r AS (INSERT INTO recipients (message, address, params, direction, state, "
            "destination, next_attempt, updated) SELECT m.id, t.a, t.p, t.d, t.s, t.r, "
            "%(now)s, %(now)s FROM m, unnest(%(a)s::text[], %(p)s::text[], %(d)s::text[], "
            "%(s)s::text[], %(r)s::text[]) WITH ORDINALITY AS t(a, p, d, s, r, n) "
            "ORDER BY t.n) SELECT pg_notify(%(channel)s, %(token)s)",
            {"mid": m.queue_id, "now": now, "sender": _clean(m.sender), "size": m.size,
             "mparams": json.dumps(m.params), "client": json.dumps(m.client),
             "data": m.data, "body_file": m.body_file,
             "a": [_clean(r.address) for r in m.recipients],
             "p": [json.dumps(r.params) for r in m.recipients],
             "d": [str(r.direction) for r in m.recipients],
             "s": [str(r.state) for r in m.recipients],
             "r": [r.destination for r in m.recipients],
             "channel": CHANNEL, "token": self._token})
        if m.body_file:
            await self._copy_body(conn, m)

    async def _copy_body(self, conn: AConn, m: NewMessage) -> None:
        """The big message's file into message_chunks, 1 MiB a row (in the enqueue's
        transaction: durable with its row)."""
        total = 0
        with open(self.bodies / m.body_file, "rb") as f:
            seq = 0
            while block := await asyncio.to_thread(f.read, CHUNK):
                await conn.execute("INSERT INTO message_chunks (message, seq, data) "
                                   "VALUES (%s, %s, %b)", (m.queue_id, seq, block))
                total += len(block)
                seq += 1
        if total != m.body_size:
            raise ValueError(f"{m.body_file} holds {total} bytes, not {m.body_size}")

    # --- conversion ----------------------------------------------------------------
    async def pending_conversion(self, limit: int) -> list[Claim]:
        async def q(conn: AConn) -> list[Claim]:
            cur = await conn.execute(
                "SELECT r.id, r.message, r.address, m.sender, r.attempts, m.received, r.params, "
                "r.direction FROM recipients r JOIN messages m ON m.id = r.message "
                "WHERE r.state = 'conversion' ORDER BY r.id LIMIT %s", (limit,))
            return [Claim(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), direction=r[7])
                    for r in await cur.fetchall()]
        return await self._run(q, tx=False)

    async def convert(self, decisions: Sequence[Conversion], now: float) -> None:
        if not decisions:
            return
        for d in decisions:
            check_move(State.CONVERSION, d.state)
            for t in d.targets:
                check_move(State.CONVERSION, t.outcome.state)
        ordered = sorted(decisions, key=lambda d: d.rid)

        async def tx(conn: AConn) -> None:
            cur = await conn.execute(
                "UPDATE recipients r SET state = v.state, destination = v.destination, "
                "updated = %(now)s, next_attempt = coalesce(v.next_attempt, %(now)s), "
                "last_reply = v.last_reply, detail = coalesce(v.detail, r.detail), "
                "notice = v.notice "
                "FROM unnest(%(id)s::bigint[], %(state)s::text[], %(dest)s::text[], "
                "%(next)s::float8[], %(reply)s::text[], %(detail)s::text[], "
                "%(notice)s::text[]) AS v(id, state, destination, next_attempt, last_reply, "
                "detail, notice) WHERE r.id = v.id AND r.state = 'conversion' "
                "RETURNING r.id, r.message",
                {"now": now, "id": [d.rid for d in ordered],
                 "state": [str(d.state) for d in ordered],
                 "dest": [d.destination for d in ordered],
                 "next": [d.next_attempt for d in ordered],
                 "reply": [_clean(d.last_reply) for d in ordered],
                 "detail": [None if d.detail is None else json.dumps(d.detail)
                            for d in ordered],
                 "notice": [d.notice for d in ordered]})
            applied = {rid: mid for rid, mid in await cur.fetchall()}
            for d in ordered:
                mid = applied.get(d.rid)
                if mid is None or d.state != State.EXPANDED or not d.targets:
                    continue
                # a target that is already a recipient of this message gets one copy only
                cur = await conn.execute("SELECT address FROM recipients WHERE message = %s "
                                         "AND state <> 'expanded'", (mid,))
                present = {a for (a,) in await cur.fetchall()}
                for t in d.targets:
                    if t.address in present:
                        continue
                    o = t.outcome
                    await conn.execute(
                        "INSERT INTO recipients (message, address, params, direction, state, "
                        "parent, next_attempt, updated, destination, last_reply, detail, "
                        "notice) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (mid, _clean(t.address), json.dumps(t.params), str(t.direction),
                         str(o.state), d.rid, now if o.next_attempt is None else o.next_attempt,
                         now, o.destination, _clean(o.last_reply),
                         json.dumps(o.detail if o.detail is not None else {}), o.notice))
            await _finish_messages(conn, applied.values())
        await self._run(tx)

    # --- delivery ------------------------------------------------------------------
    async def due(self, direction: str, now: float, limit: int, owner: str = "") -> list[Claim]:
        async def q(conn: AConn) -> list[Claim]:
            cur = await conn.execute(
                "SELECT r.id, r.message, r.address, m.sender, r.attempts, m.received, r.params, "
                "r.destination, r.direction FROM recipients r JOIN messages m ON m.id = r.message "
                "WHERE r.state = 'delivery' AND r.direction = %(direction)s AND NOT r.held "
                "AND r.next_attempt <= %(now)s "
                f"AND (r.lease_until <= {self._lease_now} OR r.lease_owner = %(owner)s) "
                "ORDER BY r.next_attempt, r.id LIMIT %(limit)s",
                {"direction": direction, "now": now, "owner": owner, "limit": limit})
            return [Claim(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7],
                          direction=r[8]) for r in await cur.fetchall()]
        return await self._run(q, tx=False)

    async def claim(self, due: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[Claim]:
        wanted = {c.rid: c for c in due}
        if not wanted:
            return []

        async def q(conn: AConn) -> list[Claim]:
            # one statement: rows another node is claiming right now are skipped, not
            # waited for; a row another node claimed and committed meanwhile is checked
            # again as it is now (its lease) before it is taken
            cur = await conn.execute(
                "WITH c AS (SELECT id FROM recipients WHERE id = ANY(%(ids)s::bigint[]) "
                "AND state = 'delivery' AND NOT held AND next_attempt <= %(now)s "
                f"AND (lease_until <= {self._lease_now} OR lease_owner = %(owner)s) "
                "ORDER BY id FOR UPDATE SKIP LOCKED) "
                f"UPDATE recipients r SET lease_until = {self._lease_now} + %(lease)s, "
                "lease_owner = %(owner)s, claim = r.claim + 1 FROM c WHERE r.id = c.id "
                "RETURNING r.id, r.claim, r.attempts, r.destination",
                {"ids": sorted(wanted), "now": now, "owner": owner, "lease": lease})
            return [replace(wanted[rid], token=token, attempts=attempts,
                            destination=destination)
                    for rid, token, attempts, destination in await cur.fetchall()]
        return await self._run(q, tx=False)

    async def renew(self, claims: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[int]:
        if not claims:
            return []

        async def q(conn: AConn) -> list[int]:
            cur = await conn.execute(
                f"UPDATE recipients r SET lease_until = {self._lease_now} + %(lease)s "
                "FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS c(id, token) "
                "WHERE r.id = c.id AND r.claim = c.token AND r.lease_owner = %(owner)s "
                "AND r.state = 'delivery' RETURNING r.id",
                {"now": now, "lease": lease, "owner": owner,
                 "ids": [c.rid for c in claims], "tokens": [c.token for c in claims]})
            kept = {rid for (rid,) in await cur.fetchall()}
            return [c.rid for c in claims if c.rid not in kept]
        return await self._run(q, tx=False)

    async def release_leases(self, owner: str) -> None:
        async def q(conn: AConn) -> None:
            await conn.execute("UPDATE recipients SET lease_until = 0, lease_owner = '' "
                               "WHERE lease_until > 0 AND lease_owner IN (%s, '')", (owner,))
        await self._run(q, tx=False)

    async def record(self, transitions: Sequence[Transition], now: float) -> list[int]:
        if not transitions:
            return []
        for t in transitions:
            check_move(State.DELIVERY, t.state)
        ordered = sorted(transitions, key=lambda t: t.claim.rid)

        async def tx(conn: AConn) -> list[int]:
            cur = await conn.execute(
                "UPDATE recipients r SET state = v.state, last_reply = v.reply, "
                "updated = %(now)s, attempts = coalesce(v.attempts, r.attempts + 1), "
                "next_attempt = coalesce(v.next_attempt, r.next_attempt), notice = v.notice, "
                "warned = CASE WHEN v.warn AND r.warned = 0 THEN 1 ELSE r.warned END, "
                "lease_until = 0, lease_owner = '', detail = v.detail "
                "FROM unnest(%(id)s::bigint[], %(token)s::bigint[], %(state)s::text[], "
                "%(reply)s::text[], %(attempts)s::integer[], %(next)s::float8[], "
                "%(notice)s::text[], %(warn)s::boolean[], %(detail)s::text[]) "
                "AS v(id, token, state, reply, attempts, next_attempt, notice, warn, detail) "
                "WHERE r.id = v.id AND r.claim = v.token AND r.state = 'delivery' "
                "RETURNING r.id",
                {"now": now, "id": [t.claim.rid for t in ordered],
                 "token": [t.claim.token for t in ordered],
                 "state": [str(t.state) for t in ordered],
                 "reply": [_clean(t.reply) for t in ordered],
                 "attempts": [t.attempts for t in ordered],
                 "next": [t.next_attempt for t in ordered],
                 "notice": [t.notice for t in ordered],
                 "warn": [t.warn for t in ordered],
                 "detail": [json.dumps(t.detail) for t in ordered]})
            done = {rid for (rid,) in await cur.fetchall()}
            # a deferral: kept for "postroom queue show" (every attempt, not the last)
            logged = [t for t in transitions if t.log_attempt and t.claim.rid in done]
            if logged:
                await conn.execute(
                    "INSERT INTO attempts (message, recipient, at, reply, detail) "
                    "SELECT t.m, t.r, %(now)s, t.reply, t.detail FROM unnest(%(m)s::text[], "
                    "%(r)s::bigint[], %(reply)s::text[], %(detail)s::text[]) WITH ORDINALITY "
                    "AS t(m, r, reply, detail, n) ORDER BY t.n",
                    {"now": now, "m": [t.claim.message for t in logged],
                     "r": [t.claim.rid for t in logged],
                     "reply": [_clean(t.reply) for t in logged],
                     "detail": [json.dumps(t.detail) for t in logged]})
            await _finish_messages(conn, {t.claim.message for t in transitions})
            return [t.claim.rid for t in transitions if t.claim.rid not in done]
        return await self._run(tx)

    async def defer_destination(self, ref: str, until: float, reply: str, detail: str,
                                now: float, owner: str = "") -> int:
        async def q(conn: AConn) -> int:
            cur = await conn.execute(
                "UPDATE recipients SET next_attempt = %(until)s, "
                "detail = CASE WHEN last_reply = '' AND %(reply)s <> '' THEN %(detail)s "
                "ELSE detail END, "
                "last_reply = CASE WHEN last_reply = '' THEN %(reply)s ELSE last_reply END "
                "WHERE destination = %(ref)s AND state = 'delivery' AND direction = 'outbound' "
                f"AND (lease_until <= {self._lease_now} OR lease_owner = %(owner)s) "
                "AND next_attempt < %(until)s",
                {"until": until, "reply": _clean(reply), "detail": detail, "ref": ref,
                 "now": now, "owner": owner})
            return cur.rowcount
        return await self._run(q, tx=False)

    # --- bodies --------------------------------------------------------------------
    async def message_bodies(self, ids: Sequence[str]
                             ) -> dict[str, tuple[Body, dict[str, str]]]:
        if not ids:
            return {}

        async def q(conn: AConn) -> list[tuple[Any, ...]]:
            cur = conn.cursor(binary=True)
            await cur.execute("SELECT id, data, body_file, size, params FROM messages "
                              "WHERE id = ANY(%s::text[])", (list(ids),))
            return await cur.fetchall()
        out = {}
        for mid, data, body_file, size, params in await self._run(q, tx=False):
            body = await self._body(mid, bytes(data), body_file, size)
            if body is not None:
                out[mid] = (body, json.loads(params))
        return out

    async def body(self, mid: str) -> Body | None:
        async def q(conn: AConn) -> tuple[Any, ...] | None:
            cur = conn.cursor(binary=True)
            await cur.execute("SELECT data, body_file, size FROM messages WHERE id = %s",
                              (mid,))
            return await cur.fetchone()
        row = await self._run(q, tx=False)
        return None if row is None else await self._body(mid, bytes(row[0]), row[1], row[2])

    async def _body(self, mid: str, data: bytes, body_file: str, size: int) -> Body | None:
        """The message's Body; a big one's bytes from this node's cache file, written
        from the database first if need be. None: the message is gone meanwhile."""
        if not body_file:
            return Body(data)
        want = size - len(data)
        path = await self._materialise(mid, body_file, want)
        return None if path is None else Body(data, path, want)

    def _cached(self, path: Path, size: int) -> bool:
        try:
            return path.stat().st_size == size
        except FileNotFoundError:
            return False

    async def _materialise(self, mid: str, name: str, size: int) -> Path | None:
        path = self.bodies / name
        if self._cached(path, size):
            self._known.add(name)
            return path
        lock = self._materialising.setdefault(name, asyncio.Lock())
        try:
            async with lock:
                if self._cached(path, size):
                    self._known.add(name)
                    return path
                self.bodies.mkdir(parents=True, exist_ok=True)
                tmp = self.bodies / f".{name}.{secrets.token_hex(4)}.tmp"

                async def fetch(conn: AConn) -> int:
                    got = 0
                    with open(tmp, "wb") as f:
                        cur = conn.cursor(binary=True)
                        async for (chunk,) in cur.stream(
                                "SELECT data FROM message_chunks WHERE message = %s "
                                "ORDER BY seq", (mid,)):
                            await asyncio.to_thread(f.write, chunk)
                            got += len(chunk)
                        await asyncio.to_thread(_flush_and_sync, f)
                    return got
                try:
                    got = await self._run(fetch, tx=False)
                    if got != size:
                        return None                  # deleted while we read it
                    os.rename(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                self._known.add(name)
                return path
        finally:
            if not lock.locked():
                self._materialising.pop(name, None)

    # --- notices -------------------------------------------------------------------
    async def owed_notices(self, limit: int) -> list[NoticeOwed]:
        async def q(conn: AConn) -> list[NoticeOwed]:
            cur = await conn.execute(
                "SELECT r.id, r.message, r.address, r.params, r.state, r.last_reply, r.detail, "
                "r.notice, r.warned, m.sender, m.received, m.params FROM recipients r "
                "JOIN messages m ON m.id = r.message WHERE r.notice <> '' OR r.warned = 1 "
                "ORDER BY r.message, r.id LIMIT %s", (limit,))
            return [NoticeOwed(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], json.loads(r[6]),
                               r[7] or "delay", r[9], r[10], json.loads(r[11]))
                    for r in await cur.fetchall()]
        return await self._run(q, tx=False)

    async def notices_sent(self, sent: Sequence[NoticeSent], now: float) -> list[NoticeSent]:
        if not sent:
            return []

        async def tx(conn: AConn) -> list[NoticeSent]:
            done = []
            for n in sent:
                rids = sorted(n.rids)
                if n.kind == "delay":
                    cur = await conn.execute("UPDATE recipients SET warned = 2 "
                                             "WHERE id = ANY(%s::bigint[]) AND warned = 1", (rids,))
                else:
                    cur = await conn.execute("UPDATE recipients SET notice = '' "
                                             "WHERE id = ANY(%s::bigint[]) AND notice = %s",
                                             (rids, n.kind))
                if not cur.rowcount:
                    continue                     # sent meanwhile by someone else
                if n.report is not None:
                    await self._insert_message(conn, n.report, now)
                done.append(n)
            await _finish_messages(conn, {n.message for n in sent})
            return done
        done = await self._run(tx)
        for n in done:
            if n.report is not None and n.report.body_file:
                self._known.add(n.report.body_file)
        if any(n.report is not None for n in done):
            self._wake()
        return done

    # --- nodes ---------------------------------------------------------------------
    async def heartbeat(self, node: str, info: dict[str, Any], now: float) -> None:
        async def q(conn: AConn) -> None:
            await conn.execute(
                "INSERT INTO nodes (name, info, last_seen) "
                f"VALUES (%(name)s, %(info)s, {self._lease_now}) ON CONFLICT (name) "
                "DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen",
                {"name": node, "info": json.dumps(info), "now": now})
        await self._run(q, tx=False)

    async def nodes(self, now: float) -> list[dict[str, Any]]:
        async def q(conn: AConn) -> list[dict[str, Any]]:
            cur = await conn.execute(
                f"SELECT n.name, n.info, n.last_seen, {self._lease_now} - n.last_seen, "
                "coalesce(c.claims, 0) FROM nodes n LEFT JOIN ("
                "SELECT lease_owner, count(*) AS claims FROM recipients "
                f"WHERE lease_until > {self._lease_now} AND state = 'delivery' "
                "GROUP BY lease_owner) c ON c.lease_owner = n.name ORDER BY n.name",
                {"now": now})
            return [{"name": name, "info": json.loads(info), "last_seen": seen,
                     "seconds_since": max(0.0, since), "claims": int(claims)}
                    for name, info, seen, since, claims in await cur.fetchall()]
        return await self._run(q, tx=False)

    # --- views ---------------------------------------------------------------------
    def reusable_bytes(self) -> int:
        return 0                  # the database's disk is not this node's data_dir

    def summary(self) -> list[QueueSummary]:
        if not self._schema_ready:
            self._ensure_schema()

        def q(c: psycopg.Connection[TupleRow]) -> list[QueueSummary]:
            rows = c.execute(
                "SELECT r.direction || '-' || r.state, count(DISTINCT r.message), count(*), "
                "min(m.received), sum(r.held::int), "
                "min(CASE WHEN NOT r.held THEN r.next_attempt END) "
                "FROM recipients r JOIN messages m ON m.id = r.message "
                "WHERE r.state IN ('conversion', 'delivery') "
                "GROUP BY r.direction, r.state").fetchall()
            found = {name: QueueSummary(name, msgs, rcpts, oldest, held or 0, nxt)
                     for name, msgs, rcpts, oldest, held, nxt in rows}
            return [found.get(name, QueueSummary(name, 0, 0, None, 0)) for name in QUEUES]
        return self._sync_run(q)

    async def recipients(self, filters: Filters, now: float) -> list[RecipientView]:
        where, args = _where(filters, now)

        async def q(conn: AConn) -> list[RecipientView]:
            cur = await conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients r JOIN messages m "
                f"ON m.id = r.message WHERE {where} ORDER BY m.received, r.id",
                args)  # type: ignore[arg-type]
            return [recipient_view(row) for row in await cur.fetchall()]
        return await self._run(q, tx=False)

    async def message(self, mid: str) -> MessageView | None:
        async def q(conn: AConn) -> tuple[Any, ...] | None:
            cur = conn.cursor(binary=True)
            await cur.execute("SELECT id, received, sender, size, params, client, data, "
                              "body_file FROM messages WHERE id = %s", (mid,))
            row = await cur.fetchone()
            if row is None:
                return None
            cur = await conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients r JOIN messages m "
                "ON m.id = r.message WHERE r.message = %s ORDER BY r.id", (mid,))
            rcpts = tuple(recipient_view(r) for r in await cur.fetchall())
            cur = await conn.execute("SELECT recipient, at, reply, detail FROM attempts "
                                     "WHERE message = %s ORDER BY id", (mid,))
            attempts = tuple(AttemptView(a[0], a[1], a[2], json.loads(a[3] or "{}"))
                             for a in await cur.fetchall())
            return row, rcpts, attempts
        got = await self._run(q)        # one snapshot for the three reads
        if got is None:
            return None
        row, rcpts, attempts = got
        body = await self._body(mid, bytes(row[6]), row[7], row[3])
        if body is None:
            return None
        return MessageView(row[0], row[1], row[2], row[3], json.loads(row[4]),
                           json.loads(row[5]), rcpts, attempts, body)

    # --- actions -------------------------------------------------------------------
    async def act(self, action: str, rids: Iterable[int], now: float, who: str
                  ) -> dict[str, Any]:
        ids = sorted(set(rids))

        async def tx(conn: AConn) -> dict[str, Any]:
            cur = await conn.execute(
                "SELECT r.id, r.message, r.state, r.address, r.direction, r.params, m.sender "
                "FROM recipients r JOIN messages m ON m.id = r.message "
                "WHERE r.id = ANY(%s::bigint[]) AND r.state IN ('conversion', 'delivery') "
                "ORDER BY r.id FOR UPDATE OF r", (ids,))
            rows = await cur.fetchall()
            messages = {row[1] for row in rows}
            sel = [row[0] for row in rows]
            finished: list[tuple[str, str, str]] = []
            if action == "retry":
                cur = await conn.execute(
                    "UPDATE recipients SET next_attempt = %s, held = false "
                    "WHERE id = ANY(%s::bigint[]) AND state = 'delivery'", (now, sel))
            elif action == "hold":
                cur = await conn.execute("UPDATE recipients SET held = true WHERE id = ANY(%s::bigint[])",
                                         (sel,))
            elif action == "release":
                cur = await conn.execute(
                    "UPDATE recipients SET held = false, next_attempt = least(next_attempt, %s) "
                    "WHERE id = ANY(%s::bigint[]) AND held", (now, sel))
            elif action == "delete":
                for row in rows:
                    check_move(row[2], State.FAILED)
                cur = await conn.execute(
                    "UPDATE recipients SET state = 'failed', notice = '', last_reply = %s, "
                    "updated = %s, lease_until = 0 WHERE id = ANY(%s::bigint[]) RETURNING id",
                    (f"deleted by {_clean(who)} (no report sent)", now, sel))
            elif action == "bounce":
                for row in rows:
                    check_move(row[2], State.FAILED)
                notices = ["failure" if wants_notice("failure", row[6], json.loads(row[5]))
                           else "" for row in rows]
                detail = json.dumps({"status": "5.3.0", "step": "queue",
                                     "hop": "this server", "last_attempt": now})
                cur = await conn.execute(
                    "UPDATE recipients r SET state = 'failed', notice = v.notice, "
                    "last_reply = %s, detail = %s, updated = %s, lease_until = 0 "
                    "FROM unnest(%s::bigint[], %s::text[]) AS v(id, notice) "
                    "WHERE r.id = v.id RETURNING r.id",
                    (f"554 5.3.0 returned to the sender by {_clean(who)} before delivery",
                     detail, now, sel, notices))
            else:
                raise ValueError(f"unknown action {action!r}")
            changed = cur.rowcount
            if action in ("delete", "bounce"):
                done = {rid for (rid,) in await cur.fetchall()}
                finished = [(row[1], row[3], row[4]) for row in rows if row[0] in done]
                await _finish_messages(conn, messages)
            return {"action": action, "recipients": changed, "messages": len(messages),
                    "finished": finished}
        return await self._run(tx)

    # --- housekeeping --------------------------------------------------------------
    async def sweep_bodies(self, started: float = 0.0) -> int:
        """Remove this node's body files whose message no longer exists: cache files
        (and files this node enqueued) at once; any other file nobody names once it is
        older than ``started`` (a crash's leftover) or untouched for an hour (another
        process's). Files are listed before the database is asked, and a name becomes a
        cache only when its file is complete, so a file being written is never taken."""
        if not self.bodies.is_dir():
            return 0
        now = time.time()
        entries: list[tuple[str, float]] = []
        for e in os.scandir(self.bodies):
            try:
                entries.append((e.name, e.stat().st_mtime))
            except FileNotFoundError:
                continue
        if not entries:
            return 0
        temps = [(n, m) for n, m in entries if n.startswith(".") and n.endswith(".tmp")]
        files = [(n, m) for n, m in entries if not (n.startswith(".") and n.endswith(".tmp"))]
        names = [n for n, _ in files]

        async def q(conn: AConn) -> set[str]:
            cur = await conn.execute("SELECT body_file FROM messages WHERE body_file = ANY(%s::text[])",
                                     (names,))
            return {n for (n,) in await cur.fetchall()}
        named = await self._run(q, tx=False) if names else set()
        removed = 0
        for name, mtime in files:
            if name in named:
                continue
            if name in self._known or (started and mtime < started) or \
                    now - mtime > ORPHAN_AGE:
                removed += _unlink(self.bodies / name)
                self._known.discard(name)
        for name, mtime in temps:                     # a materialisation that died
            if (started and mtime < started) or now - mtime > ORPHAN_AGE:
                removed += _unlink(self.bodies / name)
        return removed


# --- helpers ---------------------------------------------------------------------------
def _flush_and_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _unlink(path: Path) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1


async def _finish_messages(conn: AConn, message_ids: Iterable[str]) -> None:
    """Delete messages that owe nothing more: every recipient is final and every notice
    owed to the sender has gone out. Recipients, attempts and chunks go with them.

    The message rows are locked first: of two transactions finishing the last two
    recipients of one message on two nodes, the second then waits for the first's
    commit and sees it (a fresh snapshot for its next statement), so one of them deletes
    the message, where each alone would still see the other's recipient active."""
    mids = sorted(set(message_ids))
    if not mids:
        return
    await conn.execute("SELECT id FROM messages WHERE id = ANY(%s::text[]) ORDER BY id FOR UPDATE",
                       (mids,))
    await conn.execute(
        "DELETE FROM messages m WHERE m.id = ANY(%s::text[]) AND NOT EXISTS ("
        "SELECT 1 FROM recipients r WHERE r.message = m.id AND "
        "(r.state IN ('conversion', 'delivery') OR r.notice <> '' OR r.warned = 1))",
        (mids,))


def _where(f: Filters, now: float) -> tuple[str, dict[str, Any]]:
    clauses = ["r.state IN ('conversion', 'delivery')"]
    args: dict[str, Any] = {}
    if f.queue:
        direction, state = f.queue_parts()
        clauses.append("r.direction = %(direction)s AND r.state = %(state)s")
        args.update(direction=direction, state=state)
    if f.ids:
        clauses.append("r.message = ANY(%(ids)s::text[])")
        args["ids"] = list(f.ids)
    if f.domain:
        clauses.append("lower(regexp_replace(r.address, '^.*@', '')) = %(domain)s")
        args["domain"] = f.domain.lower().rstrip(".")
    if f.rcpt:
        clauses.append("lower(r.address) = %(rcpt)s")
        args["rcpt"] = f.rcpt.lower()
    if f.sender:
        clauses.append("lower(m.sender) = %(sender)s")
        args["sender"] = "" if f.sender == "<>" else f.sender.lower()
    if f.older_than:
        clauses.append("m.received <= %(older)s")
        args["older"] = now - f.older_than
    if f.held is not None:
        clauses.append("r.held = %(held)s")
        args["held"] = f.held
    return " AND ".join(clauses), args
