"""The queue manager: moves recipients through conversion and local delivery.

One loop, woken when the spool commits new mail and at least every second for
retries. Each round converts a batch (alias expansion, loop detection) and then
delivers a batch of due inbound recipients into their Maildirs, several at a time in
worker threads, and records every result in one spool transaction.

Outbound recipients wait in ``outbound-delivery``: sending mail to other hosts is
the delivery agent's job and is not wired in yet.

Crash behaviour: a delivery is recorded only after the Maildir write is durable, so
a crash between the two delivers that recipient again on restart (a duplicate, never
a loss). Nothing else is in flight between rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .conversion import MAX_HOPS, count_hops, expand, local_delivery_bytes
from .spool import SqliteSpool, StorageFull, finish_messages
from .store import MaildirStore, StoreError

__all__ = ["QueueManager", "retry_delay"]

log = logging.getLogger("postroom.qmgr")


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt; the last interval repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


@dataclass(frozen=True, slots=True)
class _Due:
    id: int
    message: str
    address: str
    sender: str
    attempts: int


@dataclass(frozen=True, slots=True)
class _Result:
    due: _Due
    ok: bool
    transient: bool
    reply: str


class QueueManager:
    BATCH = 256

    def __init__(
        self,
        spool: SqliteSpool,
        store: MaildirStore,
        *,
        local_domains: frozenset[str],
        aliases: Mapping[str, tuple[str, ...]],
        mailbox_exists: Callable[[str], bool],
        retry: tuple[float, ...],
        clock: Callable[[], float] = time.time,
        workers: int = 8,
    ) -> None:
        self.spool = spool
        self.store = store
        self.local_domains = local_domains
        self.aliases = aliases
        self.mailbox_exists = mailbox_exists
        self.retry = retry
        self.clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local-delivery")
        self._task: asyncio.Task[None] | None = None
        spool.on_commit(self._wake.set)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="qmgr")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                worked = await self.convert_batch()
                worked += await self.deliver_batch()
            except StorageFull:
                log.warning("the spool's disk is full: results cannot be recorded; "
                            "retrying in 1s (deliveries made meanwhile may repeat)")
                worked = 0
                await asyncio.sleep(1)
            except Exception:
                log.exception("queue manager round failed; retrying in 1s")
                worked = 0
                await asyncio.sleep(1)
            if worked or self._stopping:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    # --- conversion ----------------------------------------------------------------
    async def convert_batch(self) -> int:
        return await self.spool.run(self._convert)

    def _is_local(self, address: str) -> bool:
        return address.rpartition("@")[2] in self.local_domains

    def _convert(self, conn: sqlite3.Connection) -> int:
        rows = conn.execute(
            "SELECT r.id, r.message, r.address, r.params, r.direction FROM recipients r "
            "WHERE r.state = 'conversion' ORDER BY r.id LIMIT ?", (self.BATCH,)).fetchall()
        if not rows:
            return 0
        now = self.clock()
        hops: dict[str, int] = {}
        touched = set()
        for rid, mid, address, params_json, direction in rows:
            touched.add(mid)
            if mid not in hops:
                (data,) = conn.execute("SELECT data FROM messages WHERE id = ?", (mid,)).fetchone()
                hops[mid] = count_hops(data)
            if hops[mid] >= MAX_HOPS:
                self._fail(conn, rid, now, "554 5.4.6 Mail loop: the message has "
                           f"{hops[mid]} Received headers (limit {MAX_HOPS})")
                log.warning("queue_id=%s rcpt=%s failed: mail loop (%d hops)", mid, address,
                            hops[mid])
                continue
            if direction == "outbound":
                conn.execute("UPDATE recipients SET state = 'delivery', updated = ? WHERE id = ?",
                             (now, rid))
                continue
            result = expand(address, self.aliases)
            if result.error:
                self._fail(conn, rid, now, f"550 5.4.6 Alias expansion failed: {result.error}")
                log.warning("queue_id=%s rcpt=%s failed: %s", mid, address, result.error)
                continue
            if result.targets == (address,):
                conn.execute("UPDATE recipients SET state = 'delivery', updated = ? WHERE id = ?",
                             (now, rid))
                continue
            params = json.loads(params_json)
            params.setdefault("ORCPT", f"rfc822;{address}")
            conn.execute("UPDATE recipients SET state = 'expanded', updated = ?, last_reply = ? "
                         "WHERE id = ?", (now, "alias: " + ", ".join(result.targets), rid))
            conn.executemany(
                "INSERT INTO recipients (message, address, params, direction, state, parent, "
                "next_attempt, updated) VALUES (?, ?, ?, ?, 'delivery', ?, ?, ?)",
                [(mid, t, json.dumps(params), "inbound" if self._is_local(t) else "outbound",
                  rid, now, now) for t in result.targets])
            log.info("queue_id=%s alias %s -> %s", mid, address, ", ".join(result.targets))
        finish_messages(conn, touched)
        return len(rows)

    @staticmethod
    def _fail(conn: sqlite3.Connection, rid: int, now: float, reply: str) -> None:
        conn.execute("UPDATE recipients SET state = 'failed', updated = ?, last_reply = ? "
                     "WHERE id = ?", (now, reply, rid))

    # --- local delivery ------------------------------------------------------------
    def _due(self, conn: sqlite3.Connection) -> list[_Due]:
        rows = conn.execute(
            "SELECT r.id, r.message, r.address, m.sender, r.attempts FROM recipients r "
            "JOIN messages m ON m.id = r.message WHERE r.state = 'delivery' AND "
            "r.direction = 'inbound' AND r.held = 0 AND r.next_attempt <= ? "
            "ORDER BY r.next_attempt LIMIT ?", (self.clock(), self.BATCH)).fetchall()
        return [_Due(*row) for row in rows]

    async def deliver_batch(self) -> int:
        loop = asyncio.get_running_loop()
        due = await loop.run_in_executor(self._pool, self.spool.read, self._due)
        if not due:
            return 0
        ids = sorted({d.message for d in due})
        data = await loop.run_in_executor(self._pool, self.spool.read, lambda c: dict(c.execute(
            f"SELECT id, data FROM messages WHERE id IN ({','.join('?' * len(ids))})",
            ids).fetchall()))
        results = await asyncio.gather(*(
            loop.run_in_executor(self._pool, self._deliver_one, d, data[d.message]) for d in due))
        await self.spool.run(lambda conn: self._record(conn, results))
        return len(due)

    def _deliver_one(self, due: _Due, data: bytes) -> _Result:
        local, _, domain = due.address.rpartition("@")
        if local != "postmaster" and not self.mailbox_exists(due.address) \
                and due.address not in self.aliases:
            return _Result(due, False, False,
                           f"550 5.1.1 Mailbox {due.address} no longer exists")
        try:
            path = self.store.deliver(local, domain,
                                      local_delivery_bytes(data, due.sender, due.address))
        except StoreError as exc:
            code = "451 4.3.0" if exc.transient else "550 5.2.0"
            return _Result(due, False, exc.transient,
                           f"{code} Maildir delivery failed: {exc}")
        return _Result(due, True, False, f"250 2.0.0 delivered to maildir as {path.name}")

    def _record(self, conn: sqlite3.Connection, results: list[_Result]) -> None:
        now = self.clock()
        for r in results:
            d = r.due
            if r.ok:
                conn.execute("UPDATE recipients SET state = 'delivered', attempts = attempts + 1, "
                             "last_reply = ?, updated = ? WHERE id = ?", (r.reply, now, d.id))
                log.info("queue_id=%s to=<%s> status=delivered (%s)", d.message, d.address,
                         r.reply)
            elif r.transient:
                attempts = d.attempts + 1
                when = now + retry_delay(self.retry, attempts)
                conn.execute("UPDATE recipients SET attempts = ?, next_attempt = ?, "
                             "last_reply = ?, updated = ? WHERE id = ?",
                             (attempts, when, r.reply, now, d.id))
                log.warning("queue_id=%s to=<%s> status=deferred (%s); next attempt in %ds",
                            d.message, d.address, r.reply, when - now)
            else:
                conn.execute("UPDATE recipients SET state = 'failed', attempts = attempts + 1, "
                             "last_reply = ?, updated = ? WHERE id = ?", (r.reply, now, d.id))
                log.warning("queue_id=%s to=<%s> status=failed (%s)", d.message, d.address,
                            r.reply)
        finish_messages(conn, {r.due.message for r in results})
