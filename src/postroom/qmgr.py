"""The queue manager: moves recipients through conversion, delivery and notices.

One loop, woken when the spool commits and at least every second. Each round:

1. **converts** a batch: aliases expand, mail loops fail, recipients for domains that no
   address space covers fail at once (5.4.4);
2. **delivers locally** the due inbound recipients, into their Maildirs, several at a
   time in worker threads;
3. **dispatches outbound** the due outbound recipients: grouped by destination (route
   and, for MX routes, domain), one connection per batch of messages, capped in total
   and per destination; a destination whose every host failed backs off as a whole;
4. **sends notices**: NDRs for failures, delay notices, success notices (RFC 3464),
   each a new message from the null sender.

Every result is recorded in the spool: transient failures wait for the next retry
time (kept across restarts), and become permanent after ``max_queue_lifetime``.

Crash behaviour: a delivery is recorded only after it happened, so a crash in between
repeats it on restart (a duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .body import Body, to_lf
from .bounce import RecipientReport, build_report
from .config import DEFAULT_ROUTES, DeliveryConfig, Route
from .conversion import (
    MAX_HOPS,
    count_hops,
    delivery_headers,
    expand,
    local_delivery_bytes,
    xtext_decode,
    xtext_encode,
)
from .delivery import (
    Destination,
    OutboundMessage,
    OutboundRecipient,
    RecipientResult,
    SmtpDeliveryAgent,
)
from .events import EventLog
from .metrics import Metrics, status_label
from .routing import choose_route
from .spool import (
    NewMessage,
    NewRecipient,
    SqliteSpool,
    StorageFull,
    finish_messages,
    insert_message,
    load_body,
    make_body,
    new_queue_id,
    record,
)
from .store import MaildirStore, StoreError, sync

__all__ = ["QueueManager", "retry_delay", "wants_notice"]

HEAD_BYTES = 256 * 1024     # enough of a message to count its Received headers

log = logging.getLogger("postroom.qmgr")


def _sync_or_error(folder: Path) -> str | None:
    try:
        sync(folder)
    except StoreError as exc:
        log.warning("fsync of %s failed: %s", folder, exc)
        return exc.reason
    return None


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt; the last interval repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def wants_notice(kind: str, sender: str, params: Mapping[str, str]) -> bool:
    """Whether the sender gets a ``failure``, ``delay`` or ``success`` notice (RFC 3461).

    Never for the null sender (no bounce loops). Without NOTIFY: failures and delays.
    """
    if not sender:
        return False
    notify = params.get("NOTIFY")
    if notify is None:
        return kind in ("failure", "delay")
    return kind.upper() in notify.upper().split(",")


@dataclass(frozen=True, slots=True)
class _Due:
    id: int
    message: str
    address: str
    sender: str
    attempts: int
    received: float
    params: dict[str, str]
    destination: str = ""


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What happened to one recipient in one attempt, however it was delivered."""

    due: _Due
    ok: bool
    transient: bool
    reply: str
    status: str = ""
    detail: dict[str, Any] | None = None
    success_notice: bool = False
    path: Path | None = None          # a Maildir file whose folder still needs its fsync


class QueueManager:
    BATCH = 256
    MESSAGES_PER_CONNECTION = 50
    LEASE = 3600.0

    def __init__(
        self,
        spool: SqliteSpool,
        store: MaildirStore,
        *,
        local_domains: frozenset[str],
        aliases: Mapping[str, tuple[str, ...]],
        mailbox_exists: Callable[[str], bool],
        delivery: DeliveryConfig,
        routes: tuple[Route, ...] = DEFAULT_ROUTES,
        agent: SmtpDeliveryAgent | None = None,
        hostname: str = "localhost",
        clock: Callable[[], float] = time.time,
        workers: int = 8,
        rng: random.Random | None = None,
        started: float = 0.0,
        metrics: Metrics | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.spool = spool
        self.events = events
        self.metrics = metrics or Metrics()
        # components an administrator stopped: queue-manager (every round), conversion,
        # local-delivery, outbound-delivery
        self.stopped: set[str] = set()
        self.started = started              # body files older than this and unnamed are orphans
        self._swept_at = 0.0
        self._archive_expired_at = -3600.0
        self.store = store
        self.local_domains = local_domains
        self.aliases = aliases
        self.mailbox_exists = mailbox_exists
        self.delivery = delivery
        self.routes = routes
        self.agent = agent
        self.hostname = hostname
        self.clock = clock
        self.rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local-delivery")
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[int] = set()
        self._connections: dict[str, int] = defaultdict(int)
        self._failures: dict[str, int] = {}     # destinations failing as a whole, in a row
        # destination ref -> (end of its backoff, the failure's reply, its detail as JSON)
        self._suspended: dict[str, tuple[float, str, str]] = {}
        self._outbound_tasks: set[asyncio.Task[None]] = set()
        spool.on_commit(self._wake.set)

    @property
    def retry(self) -> tuple[float, ...]:
        return self.delivery.retry

    def wake(self) -> None:
        self._wake.set()

    def _event(self, kind: int, text: str, queue_id: str | None = None, **kw: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, text, queue_id=queue_id, **kw)

    @property
    def outbound_in_flight(self) -> int:
        return len(self._outbound_tasks)

    def retry_now(self) -> None:
        """An administrator asked for a retry: forget every destination's backoff."""
        self._failures.clear()
        self._suspended.clear()
        self._wake.set()

    def start(self) -> None:
        self.clear_leases()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="qmgr")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for task in list(self._outbound_tasks):
            task.cancel()
        if self._outbound_tasks:
            await asyncio.gather(*self._outbound_tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def _sweep(self, started: float = 0.0) -> None:
        """Remove the body files of finished messages (at most once a second), and
        archived copies past ``[logging] archive_days`` (once an hour)."""
        now = time.monotonic()
        if now - self._swept_at < 1.0 and not started:
            return
        self._swept_at = now
        removed = await self.spool.sweep_bodies(started)
        if removed:
            log.debug("removed %d body files of finished messages", removed)
        if self.events is not None and now - self._archive_expired_at >= 3600:
            self._archive_expired_at = now          # archived copies: days past archive_days
            days = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.events.expire_archive)
            if days:
                log.info("removed %d days of archived messages", days)

    async def _run(self) -> None:
        try:
            await self._sweep(self.started or time.time())
        except OSError as exc:
            log.warning("could not remove old body files: %s", exc)
        while not self._stopping:
            self._wake.clear()
            stopped = self.stopped
            try:
                worked = 0
                if "queue-manager" not in stopped:
                    if "conversion" not in stopped:
                        worked += await self.convert_batch()
                    if "local-delivery" not in stopped:
                        worked += await self.deliver_batch()
                    if "outbound-delivery" not in stopped:
                        worked += await self.dispatch_outbound()
                    worked += await self.send_notices()
                    await self._sweep()
            except StorageFull:
                self._event(5001, "the spool's disk is full: the queue manager cannot record "
                            "results; retrying every second")
                log.warning("the spool's disk is full: results cannot be recorded; "
                            "retrying in 1s (deliveries made meanwhile may repeat)")
                worked = 0
                await asyncio.sleep(1)
            except Exception:
                log.exception("queue manager round failed; retrying in 1s")
                self._event(5002, "a queue manager round failed (details in postroom.log); "
                            "retrying in 1s")
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
            "SELECT r.id, r.message, r.address, r.params, r.direction, m.sender "
            "FROM recipients r JOIN messages m ON m.id = r.message "
            "WHERE r.state = 'conversion' ORDER BY r.id LIMIT ?", (self.BATCH,)).fetchall()
        if not rows:
            return 0
        now = self.clock()
        hops: dict[str, int] = {}
        touched = set()
        for rid, mid, address, params_json, direction, sender in rows:
            touched.add(mid)
            params = json.loads(params_json)
            if mid not in hops:
                body = load_body(conn, mid, self.spool.bodies)
                hops[mid] = count_hops(body.head(HEAD_BYTES)) if body is not None else 0
            if hops[mid] >= MAX_HOPS:
                self._fail(conn, rid, now, sender, params, "554 5.4.6 Mail loop: the message "
                           f"has {hops[mid]} Received headers (limit {MAX_HOPS})", "5.4.6",
                           "routing")
                continue
            if direction == "outbound":
                self._route_or_fail(conn, rid, mid, address, sender, params, now)
                continue
            result = expand(address, self.aliases)
            if result.error:
                self._fail(conn, rid, now, sender, params,
                           f"550 5.4.6 Alias expansion failed: {result.error}", "5.4.6", "local")
                continue
            if result.targets == (address,):
                conn.execute("UPDATE recipients SET state = 'delivery', updated = ? WHERE id = ?",
                             (now, rid))
                # implied by the delivery event; recorded only at medium (a hot path)
                self._event(2004, f"<{address}>: local mailbox", mid, level="medium",
                            domain=address.rpartition("@")[2], rcpt=address)
                continue
            params.setdefault("ORCPT", f"rfc822;{xtext_encode(address)}")
            conn.execute("UPDATE recipients SET state = 'expanded', updated = ?, last_reply = ? "
                         "WHERE id = ?", (now, "alias: " + ", ".join(result.targets), rid))
            # a target that is already a recipient of this message gets one copy only
            present = {a for (a,) in conn.execute(
                "SELECT address FROM recipients WHERE message = ? AND state != 'expanded'",
                (mid,))}
            for target in result.targets:
                if target in present:
                    continue
                local = self._is_local(target)
                cur = conn.execute(
                    "INSERT INTO recipients (message, address, params, direction, state, parent, "
                    "next_attempt, updated) VALUES (?, ?, ?, ?, 'delivery', ?, ?, ?)",
                    (mid, target, json.dumps(params), "inbound" if local else "outbound", rid,
                     now, now))
                if not local:
                    assert cur.lastrowid is not None
                    self._route_or_fail(conn, cur.lastrowid, mid, target, sender, params, now)
            log.info("queue_id=%s alias %s -> %s", mid, address, ", ".join(result.targets))
            self._event(2004, f"<{address}>: alias for {', '.join(result.targets)}", mid,
                        domain=address.rpartition("@")[2], rcpt=address)
        finish_messages(conn, touched)
        return len(rows)

    def _route_or_fail(self, conn: sqlite3.Connection, rid: int, mid: str, address: str,
                       sender: str, params: dict[str, str], now: float) -> None:
        dest = self._destination(address)
        if dest is not None:
            # new mail for a destination that is backing off waits with it ("delivery
            # temporarily suspended"), instead of being tried at once
            self._event(2004, f"<{address}>: {dest.describe()}", mid,
                        domain=address.rpartition("@")[2], rcpt=address)
            until, reply, why = self._suspended.get(dest.ref, (0.0, "", "{}"))
            if until > now:
                conn.execute("UPDATE recipients SET state = 'delivery', destination = ?, "
                             "updated = ?, next_attempt = ?, last_reply = ?, detail = ? "
                             "WHERE id = ?", (dest.ref, now, until, reply, why, rid))
            else:
                conn.execute("UPDATE recipients SET state = 'delivery', destination = ?, "
                             "updated = ?, next_attempt = ? WHERE id = ?",
                             (dest.ref, now, now, rid))
            return
        decision = choose_route(address.rpartition("@")[2], self.routes, self.local_domains)
        self._fail(conn, rid, now, sender, params,
                   f"550 5.4.4 Unable to route: {decision.reason}", "5.4.4", "routing")

    def _fail(self, conn: sqlite3.Connection, rid: int, now: float, sender: str,
              params: Mapping[str, str], reply: str, status: str, step: str) -> None:
        notice = "failure" if wants_notice("failure", sender, params) else ""
        record(conn, rid, state="failed", reply=reply, now=now, notice=notice,
               detail={"status": status, "step": step, "last_attempt": now})
        log.warning("rcpt id=%d failed: %s", rid, reply)

    # --- local delivery ------------------------------------------------------------
    def _due(self, conn: sqlite3.Connection, direction: str, limit: int) -> list[_Due]:
        """Due recipients: not held, retry time reached, not in flight (outbound)."""
        now = self.clock()
        rows = conn.execute(
            "SELECT r.id, r.message, r.address, m.sender, r.attempts, m.received, r.params, "
            "r.destination FROM recipients r JOIN messages m ON m.id = r.message "
            "WHERE r.state = 'delivery' AND r.direction = ? AND r.held = 0 "
            "AND r.next_attempt <= ? AND r.lease_until <= ? ORDER BY r.next_attempt LIMIT ?",
            (direction, now, now, limit)).fetchall()
        return [_Due(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), row[7])
                for row in rows]

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.spool.read, fn)

    async def _message_data(self, ids: list[str]) -> dict[str, tuple[Body, str]]:
        bodies = self.spool.bodies

        def q(c: sqlite3.Connection) -> dict[str, tuple[Body, str]]:
            rows = c.execute(f"SELECT id, data, body_file, size, params FROM messages WHERE id IN "
                             f"({','.join('?' * len(ids))})", ids).fetchall()
            return {mid: (make_body(bodies, data, body_file, size), params)
                    for mid, data, body_file, size, params in rows}
        return await self._read(q) if ids else {}  # type: ignore[no-any-return]

    async def deliver_batch(self) -> int:
        due = await self._read(lambda c: self._due(c, "inbound", self.BATCH))
        if not due:
            return 0
        loop = asyncio.get_running_loop()
        data = await self._message_data(sorted({d.message for d in due}))
        outcomes = list(await asyncio.gather(*(
            loop.run_in_executor(self._pool, self._deliver_one, d, data[d.message][0])
            for d in due)))
        # One fsync per Maildir folder for the whole round, before anything is recorded.
        folders = {o.path.parent for o in outcomes if o.path is not None}
        failed = dict(zip(folders, await asyncio.gather(*(
            loop.run_in_executor(self._pool, _sync_or_error, f) for f in folders)), strict=True))
        for i, o in enumerate(outcomes):
            if o.path is not None and failed[o.path.parent] is not None:
                outcomes[i] = _Outcome(o.due, False, True, "451 4.3.0 Maildir delivery failed: "
                                       f"{failed[o.path.parent]}", "4.3.0", o.detail)
        try:
            await self.spool.run(lambda conn: self._record(conn, outcomes))
        except StorageFull:
            # Not recorded, so these recipients will be delivered again: take back this
            # round's copies. Kept, they are duplicates, and on a full disk each retry's
            # copies ate the space freed for the spool's own commit, so it never got it.
            for o in outcomes:
                if o.path is not None:
                    try:
                        o.path.unlink()
                    except OSError as exc:
                        log.warning("could not take back %s: %s", o.path, exc)
            raise
        return len(due)

    def _deliver_one(self, due: _Due, body: Body) -> _Outcome:
        local, _, domain = due.address.rpartition("@")
        detail = {"step": "local", "hop": "local mailbox", "last_attempt": self.clock()}
        if local != "postmaster" and not self.mailbox_exists(due.address) \
                and due.address not in self.aliases:
            return _Outcome(due, False, False, f"550 5.1.1 Mailbox {due.address} no longer "
                            "exists", "5.1.1", detail)
        try:
            if body.path is None:      # the common case: one write
                content: bytes | Iterator[bytes] = local_delivery_bytes(
                    body.prefix, due.sender, due.address)
            else:
                content = to_lf(itertools.chain(
                    (delivery_headers(due.sender, due.address),), body.chunks()))
            path = self.store.deliver(local, domain, content, sync_dir=False)
        except StoreError as exc:
            code = "451 4.3.0" if exc.transient else "550 5.2.0"
            log.warning("queue_id=%s to=<%s> Maildir delivery failed: %s", due.message,
                        due.address, exc)
            return _Outcome(due, False, exc.transient, f"{code} Maildir delivery failed: "
                            f"{exc.reason}", code[4:], detail)
        return _Outcome(due, True, False, f"250 2.0.0 delivered to maildir as {path.name}",
                        "2.0.0", detail, success_notice=True, path=path)

    # --- recording -----------------------------------------------------------------
    def _record(self, conn: sqlite3.Connection, outcomes: list[_Outcome]) -> None:
        now = self.clock()
        for o in outcomes:
            d = o.due
            detail = dict(o.detail or {})
            detail.setdefault("status", o.status)
            detail.setdefault("last_attempt", now)
            direction = "outbound" if d.destination else "inbound"
            if o.ok:
                self.metrics.delivered.labels(direction).inc()
                self.metrics.delivery.labels(direction).observe(max(0.0, now - d.received))
                self.metrics.attempts.labels(direction, "delivered",
                                             status_label(o.status)).inc()
                notice = "success" if o.success_notice and \
                    wants_notice("success", d.sender, d.params) else ""
                record(conn, d.id, state="delivered", reply=o.reply, now=now, notice=notice,
                       detail=detail)
                log.info("queue_id=%s to=<%s> status=delivered (%s)", d.message, d.address,
                         o.reply)
                self._event(3002, f"<{d.address}> delivered via {detail.get('hop', '?')}"
                            + (f" {detail.get('remote_host')} [{detail.get('remote_ip')}]"
                               if detail.get("remote_ip") else "") + f": {o.reply}",
                            d.message, domain=d.address.rpartition("@")[2], rcpt=d.address,
                            hop=detail.get("hop"), remote_ip=detail.get("remote_ip"))
                continue
            age = now - d.received
            self.metrics.attempts.labels(direction, "deferred" if o.transient else "failed",
                                         status_label(o.status)).inc()
            if o.transient and age < self.delivery.max_queue_lifetime:
                self.metrics.deferred.labels(direction).inc()
                attempts = d.attempts + 1
                when = now + retry_delay(self.retry, attempts)
                warn = age >= self.delivery.delay_warning and \
                    wants_notice("delay", d.sender, d.params)
                detail["will_retry_until"] = d.received + self.delivery.max_queue_lifetime
                record(conn, d.id, state="delivery", reply=o.reply, now=now, attempts=attempts,
                       next_attempt=when, warn=warn, detail=detail, log_attempt=True)
                log.warning("queue_id=%s to=<%s> status=deferred (%s); next attempt in %ds",
                            d.message, d.address, o.reply, when - now)
                self._event(3003, f"<{d.address}> deferred at {detail.get('step', '?')} via "
                            f"{detail.get('hop', '?')}"
                            + (f" {detail.get('remote_host')} [{detail.get('remote_ip')}]"
                               if detail.get("remote_ip") else "")
                            + f": {o.reply}; next attempt in {int(when - now)}s",
                            d.message, domain=d.address.rpartition("@")[2], rcpt=d.address,
                            hop=detail.get("hop"), remote_ip=detail.get("remote_ip"),
                            next_attempt=when)
                continue
            reply = o.reply
            if o.transient:
                days = age / 86400
                detail["status"] = "5.4.7"
                detail["expired_after"] = age
                detail["last_step"] = detail.get("step", "")
                detail["step"] = "lifetime"
                reply = f"gave up after {days:.1f} days; last error: {o.reply}"
            self.metrics.bounced.labels(direction).inc()
            notice = "failure" if wants_notice("failure", d.sender, d.params) else ""
            record(conn, d.id, state="failed", reply=reply, now=now, notice=notice, detail=detail)
            log.warning("queue_id=%s to=<%s> status=failed (%s)", d.message, d.address, reply)
            self._event(3004, f"<{d.address}> failed at {detail.get('step', '?')} via "
                        f"{detail.get('hop', '?')}: {reply}", d.message,
                        domain=d.address.rpartition("@")[2], rcpt=d.address,
                        hop=detail.get("hop"), remote_ip=detail.get("remote_ip"))
        finish_messages(conn, {o.due.message for o in outcomes})

    # --- outbound ------------------------------------------------------------------
    def _destination(self, address: str, ref: str = "") -> Destination | None:
        """The destination stored at conversion (``ref``) while the routing table still
        has that route for this domain; otherwise a fresh choice."""
        domain = address.rpartition("@")[2]
        decision = choose_route(domain, self.routes, self.local_domains)
        if not decision.chosen:
            return None
        index, _, _ = ref.partition("|")
        stored = self.routes[int(index)] if index.isdigit() and int(index) < len(self.routes) \
            else None
        if stored is not None and stored in decision.chosen:
            route = stored
        elif len(decision.chosen) == 1:
            route = decision.chosen[0]
        else:
            route = self.rng.choice(decision.chosen)
        return Destination(route, "" if route.via == "smarthost" else domain)

    def clear_leases(self) -> None:
        """At start: nothing is in flight any more (a crash left its leases behind)."""
        self.spool.run_sync(lambda conn: conn.execute(
            "UPDATE recipients SET lease_until = 0 WHERE lease_until > 0"))

    async def dispatch_outbound(self) -> int:
        if self.agent is None:
            return 0
        cap = self.delivery.max_connections
        if len(self._outbound_tasks) >= cap:
            return 0
        due = await self._read(lambda c: self._due(c, "outbound", 4 * self.BATCH))
        groups: dict[str, tuple[Destination, list[_Due]]] = {}
        unroutable: list[_Due] = []
        for d in due:
            if d.id in self._in_flight:
                continue
            dest = self._destination(d.address, d.destination)
            if dest is None:
                unroutable.append(d)
                continue
            groups.setdefault(dest.key, (dest, []))[1].append(d)
        if unroutable:
            await self.spool.run(lambda conn: self._record(conn, [
                _Outcome(d, False, False, "550 5.4.4 Unable to route: no address space covers "
                         f"{d.address.rpartition('@')[2]}", "5.4.4",
                         {"step": "routing", "hop": "routing table"}) for d in unroutable]))
        chosen: list[tuple[Destination, list[tuple[str, list[_Due]]]]] = []
        running = len(self._outbound_tasks)
        for key, (dest, items) in groups.items():
            by_message: dict[str, list[_Due]] = defaultdict(list)
            for d in items:
                by_message[d.message].append(d)
            messages = list(by_message.items())
            connections = self._connections[key]
            for i in range(0, len(messages), self.MESSAGES_PER_CONNECTION):
                if running >= cap or connections >= self.delivery.max_connections_per_destination:
                    break
                chosen.append((dest, messages[i:i + self.MESSAGES_PER_CONNECTION]))
                running += 1
                connections += 1
        if not chosen:
            return len(unroutable)
        # Lease before starting: a delivery that finishes at once must not have its
        # result overwritten by a late lease. A restart clears leases (clear_leases).
        leased = [d.id for _, batch in chosen for _, ds in batch for d in ds]
        until = self.clock() + self.LEASE
        await self.spool.run(lambda conn: conn.executemany(
            "UPDATE recipients SET lease_until = ? WHERE id = ?", [(until, rid) for rid in leased]))
        self._in_flight.update(leased)
        for dest, batch in chosen:
            self._connections[dest.key] += 1
            task = asyncio.get_running_loop().create_task(self._deliver_outbound(dest, batch))
            self._outbound_tasks.add(task)
            task.add_done_callback(self._outbound_tasks.discard)
        started = len(leased)
        return started + len(unroutable)

    async def _deliver_outbound(self, dest: Destination, batch: list[tuple[str, list[_Due]]]
                                ) -> None:
        ids = [d.id for _, ds in batch for d in ds]
        try:
            assert self.agent is not None
            data = await self._message_data([mid for mid, _ in batch])
            messages, dues = [], {}
            for mid, ds in batch:
                if mid not in data:
                    continue
                body, mparams = data[mid]
                messages.append(OutboundMessage(
                    mid, ds[0].sender, json.loads(mparams), body,
                    [OutboundRecipient(d.id, d.address, d.params) for d in ds]))
                dues.update({d.id: d for d in ds})
            results = await self.agent.deliver(dest, messages)
            outcomes = [self._outcome(dues[r.recipient.id], r) for r in results]
            await self.spool.run(lambda conn: self._record(conn, outcomes))
            if results and all(r.hop_failure for r in results):
                first = outcomes[0]
                await self._back_off(dest, first.reply,
                                     {**(first.detail or {}), "status": first.status})
            else:
                self._failures.pop(dest.key, None)
                self._suspended.pop(dest.ref, None)
        except asyncio.CancelledError:
            raise
        except StorageFull:
            log.warning("the spool's disk is full: results for %s cannot be recorded",
                        dest.describe())
            await self._back_off(dest)
        except Exception:
            log.exception("outbound delivery to %s failed; will retry", dest.describe())
            await self._back_off(dest)
        finally:
            self._connections[dest.key] -= 1
            if self._connections[dest.key] <= 0:
                del self._connections[dest.key]
            self._in_flight.difference_update(ids)
            self._wake.set()

    def _outcome(self, due: _Due, r: RecipientResult) -> _Outcome:
        detail = {"status": r.status, "step": r.step, "remote_host": r.remote_host,
                  "remote_ip": r.remote_ip, "hop": r.hop, "transcript": r.transcript[-8000:]}
        # A next hop that speaks DSN takes over success notices (RFC 3461 §4.1);
        # one that does not gets them from us, as "relayed".
        return _Outcome(due, r.ok, r.transient, r.reply, r.status, detail,
                        success_notice=r.ok and not r.dsn_capable)

    async def _back_off(self, dest: Destination, reply: str = "",
                        detail: dict[str, Any] | None = None) -> None:
        """Hold every queued recipient for this destination until its next retry time,
        in the spool, so the wait survives a restart and held rows are never read.
        Recipients not tried yet get the failure that caused the wait as their reason."""
        failures = self._failures.get(dest.key, 0) + 1
        self._failures[dest.key] = failures
        wait = retry_delay(self.retry, failures)
        now = self.clock()
        why = json.dumps({**(detail or {}), "backed_off": True, "transcript": ""})
        self._suspended[dest.ref] = (now + wait, reply, why)
        await self.spool.run(lambda conn: conn.execute(
            "UPDATE recipients SET next_attempt = ?, "
            "detail = CASE WHEN last_reply = '' AND ? != '' THEN ? ELSE detail END, "
            "last_reply = CASE WHEN last_reply = '' THEN ? ELSE last_reply END "
            "WHERE destination = ? AND state = 'delivery' "
            "AND direction = 'outbound' AND lease_until <= ? AND next_attempt < ?",
            (now + wait, reply, why, reply, dest.ref, now, now + wait)))
        log.warning("destination %s failed as a whole; backing off for %ds",
                    dest.describe(), wait)
        self._event(3006, f"{dest.describe()} failed as a whole ({reply or 'see the log'}); "
                    f"its mail waits {int(wait)}s")

    # --- notices -------------------------------------------------------------------
    async def send_notices(self) -> int:
        return await self.spool.run(self._notices)

    def _notices(self, conn: sqlite3.Connection) -> int:
        rows = conn.execute(
            "SELECT r.id, r.message, r.address, r.params, r.state, r.last_reply, r.detail, "
            "r.notice, r.warned, m.sender, m.received, m.params FROM recipients r "
            "JOIN messages m ON m.id = r.message WHERE r.notice != '' OR r.warned = 1 "
            "ORDER BY r.message LIMIT ?", (self.BATCH,)).fetchall()
        if not rows:
            return 0
        now = self.clock()
        groups: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
        for row in rows:
            kind = row[7] if row[7] else "delay"
            groups[(row[1], kind)].append(row)
        for (mid, kind), items in groups.items():
            sender, received, mparams = items[0][9], items[0][10], json.loads(items[0][11])
            reports = []
            for _rid, _, address, params_json, _state, reply, detail_json, *_ in items:
                params = json.loads(params_json)
                detail = json.loads(detail_json)
                orcpt = xtext_decode(params.get("ORCPT", "").partition(";")[2])
                reports.append(RecipientReport(
                    final_recipient=address,
                    original_recipient=orcpt or None,
                    action={"failure": "failed", "delay": "delayed"}.get(
                        kind, "relayed" if detail.get("remote_host") else "delivered"),
                    status=detail.get("status") or ("2.0.0" if kind == "success" else "5.0.0"),
                    diagnostic=reply, remote_host=detail.get("remote_host"),
                    remote_ip=detail.get("remote_ip"), step=detail.get("step", ""),
                    hop=detail.get("hop", ""), last_attempt=detail.get("last_attempt"),
                    will_retry_until=detail.get("will_retry_until")))
            if sender:
                body = load_body(conn, mid, self.spool.bodies)
                assert body is not None
                report = build_report(
                    kind=kind, reporting_mta=self.hostname, original_sender=sender,
                    original=body.head(self.delivery.max_return_size + 1),
                    original_size=body.size, arrival=received, recipients=reports,
                    ret=mparams.get("RET"),
                    envid=xtext_decode(mparams["ENVID"]) if "ENVID" in mparams else None,
                    max_return_size=self.delivery.max_return_size, now=now,
                    message_id=f"<{new_queue_id()}.{kind}@{self.hostname}>",
                    boundary=f"{new_queue_id()}/{self.hostname}")
                qid = new_queue_id()
                direction = "inbound" if self._is_local(sender.lower()) else "outbound"
                insert_message(conn, NewMessage(
                    qid, "", {}, {"peer": "127.0.0.1", "helo": self.hostname,
                                  "listener": "internal", "notice": kind, "about": mid},
                    report, (NewRecipient(_lower_domain(sender), direction, {}),)), now)
                self.metrics.notices.labels(kind).inc()
                self._event(3005, f"{kind} notice for "
                            f"{', '.join(r.final_recipient for r in reports)} sent to <{sender}> "
                            f"as {qid}", mid, notice=kind, notice_id=qid)
                log.info("queue_id=%s %s notice for %s sent to <%s> as queue_id=%s", mid, kind,
                         ", ".join(r.final_recipient for r in reports), sender, qid)
            for item in items:
                if kind == "delay":
                    conn.execute("UPDATE recipients SET warned = 2 WHERE id = ?", (item[0],))
                else:
                    conn.execute("UPDATE recipients SET notice = '' WHERE id = ?", (item[0],))
        finish_messages(conn, {mid for mid, _ in groups})
        return len(rows)


def _lower_domain(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if domain else address

