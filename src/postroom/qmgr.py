"""The queue manager: moves recipients through conversion, delivery and notices.

One loop, woken when the spool commits and at least every second. Each round:

1. **converts** a batch: aliases expand, mail loops fail, recipients for domains that no
   address space covers fail at once (5.4.4);
2. **delivers locally** the due inbound recipients: claimed with a lease, handed to the
   ``local`` agent (Maildir), or to the ``lmtp`` agent where a route sends the domain's
   final delivery to a mail store;
3. **dispatches outbound** the due outbound recipients: grouped by destination (route
   and, for MX routes, domain), claimed, one connection per batch of messages, capped in
   total and per destination; a destination whose every host failed backs off as a whole;
4. **sends notices**: NDRs for failures, delay notices, success notices (RFC 3464),
   each a new message from the null sender, built outside the spool's transaction.

The queue manager decides (the schedule, the lifetime, the notices owed); the spool
(:mod:`postroom.spool`) records, and only for the holder of a recipient's current claim.
Agents (:mod:`postroom.delivery`) deliver. Transient failures wait for the next retry
time (kept across restarts), and become permanent after ``max_queue_lifetime``.

Crash behaviour: a delivery is recorded only after it happened, so a crash in between
repeats it on restart (a duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import DEFAULT_ROUTES, DeliveryConfig, Route
from .conversion import MAX_HOPS, count_hops, expand, xtext_encode
from .delivery import (
    LOCAL_ROUTE,
    Agents,
    Destination,
    OutboundMessage,
    OutboundRecipient,
    announce_delivered,
)
from .delivery.local import take_back
from .events import EventLog
from .intake import HEAD_BYTES, direction_of
from .mailauth.sign import Signer, split_message
from .metrics import Metrics, status_label
from .model import DeliveryResult, Reply
from .notices import build_notice
from .routing import RouteDecision, RouteMemo, lmtp_route
from .spool import (
    Claim,
    Conversion,
    Direction,
    NewMessage,
    NoticeOwed,
    NoticeSent,
    Spool,
    State,
    StorageFull,
    StorageUnavailable,
    Target,
    Transition,
    wants_notice,
)

__all__ = ["QueueManager", "retry_delay", "wants_notice"]


log = logging.getLogger("postroom.qmgr")

After = Callable[[], None]      # what to log and count once a decision is recorded


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt; the last interval repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


class QueueManager:
    BATCH = 256
    MESSAGES_PER_CONNECTION = 50
    # Back-to-back rounds that hand nothing to a delivery agent are this far apart at
    # least. While a destination is down, every new message woke a round of its own
    # (four reads and a write, to put it to wait with the destination), and under
    # steady delivery so did every commit that found all due mail in flight; now the
    # work of 10 ms waits together. Rounds that deliver never wait: a batch's end frees
    # its connection for the next at once (a gap after every round made W2 slower).
    # Measured, three interleaved pairs each: W3 945-979 -> 992-1,020 messages/s,
    # server CPU 1.17-1.21 -> 1.08-1.15 ms a message; W2 1,090-1,124 -> 1,134-1,159.
    ROUND_GAP = 0.01
    HEARTBEAT = 10.0            # seconds between this node's heartbeats in the spool

    def __init__(
        self,
        spool: Spool,
        agents: Agents,
        *,
        local_domains: frozenset[str],
        aliases: Mapping[str, tuple[str, ...]],
        delivery: DeliveryConfig,
        routes: tuple[Route, ...] = DEFAULT_ROUTES,
        hostname: str = "localhost",
        clock: Callable[[], float] = time.time,
        workers: int = 8,
        rng: random.Random | None = None,
        started: float = 0.0,
        metrics: Metrics | None = None,
        events: EventLog | None = None,
        owner: str = "local",
        lease: float = 600.0,
        node_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.spool = spool
        self.agents = agents
        self.events = events
        self.metrics = metrics or Metrics()
        # components an administrator stopped: queue-manager (every round), conversion,
        # local-delivery, outbound-delivery
        self.stopped: set[str] = set()
        self.started = started              # body files older than this and unnamed are orphans
        self._swept_at = 0.0
        self._archive_expired_at = -3600.0
        self.local_domains = local_domains
        self.aliases = aliases
        self.delivery = delivery
        self.routes = routes
        self.hostname = hostname
        self.clock = clock
        self.owner = owner                  # whose claims these are (the node's name)
        self.lease = lease                  # how long a claim lasts; renewed every third
        self.node_info = dict(node_info or {})
        self._held: dict[int, Claim] = {}   # claims in flight, renewed while they last
        self._memo = RouteMemo()
        self._renewer: asyncio.Task[None] | None = None
        self._unreachable_noted = -3600.0
        self.rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qmgr")
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[int] = set()
        self._delivering = False          # this round handed work to an agent
        # Whether a claim of ours may have ended without its results recorded (a failed
        # round or delivery task; and at start): then the next round's due() reads our
        # own leased recipients too, to try them again at once. Otherwise it skips them:
        # they are in flight, and reading them back each round was most of its rows.
        self._unrecorded = True
        self._mine = self.owner
        self._connections: dict[str, int] = defaultdict(int)
        self._failures: dict[str, int] = {}     # destinations failing as a whole, in a row
        # destination ref -> (end of its backoff, the failure's reply, its detail as JSON)
        self._suspended: dict[str, tuple[float, str, str]] = {}
        self._outbound_tasks: set[asyncio.Task[None]] = set()
        self.signer: Signer | None = None   # DKIM for notices that leave; app sets it
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
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="qmgr")
        self._renewer = loop.create_task(self._keep_claims(), name="qmgr-leases")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for task in list(self._outbound_tasks):
            task.cancel()
        if self._outbound_tasks:
            await asyncio.gather(*self._outbound_tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

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
            days = await self._in_pool(self.events.expire_archive)
            if days:
                log.info("removed %d days of archived messages", days)

    def _unreachable(self, exc: BaseException) -> None:
        """The spool's database is away: said once a minute, retried every second."""
        now = time.monotonic()
        if now - self._unreachable_noted >= 60:
            self._unreachable_noted = now
            log.error("the spool is unreachable (%s); retrying every second", exc)
            self._event(5003, f"the spool's database cannot be reached ({exc}): new mail "
                        "is answered 451 4.3.0 and deliveries wait; retrying every second")

    async def _keep_claims(self) -> None:
        """Renew the claims in flight every third of the lease, so that a slow delivery
        keeps them; say this node is alive every HEARTBEAT seconds."""
        renewed = time.monotonic()
        while not self._stopping:
            try:
                # this node's counters travel with its heartbeat: ``postroom stats
                # --all-nodes`` adds up every node's (read in a thread: with several
                # processes, they are files)
                counters = await asyncio.to_thread(self.metrics.counters)
                await self.spool.heartbeat(self.owner, {**self.node_info, "counters": counters},
                                           self.clock())
                if time.monotonic() - renewed >= self.lease / 3 and self._held:
                    renewed = time.monotonic()
                    lost = await self.spool.renew(list(self._held.values()), self.clock(),
                                                  self.owner, self.lease)
                    if lost:
                        log.warning("%d claims in flight were lost (expired and taken by "
                                    "another node, or finished meanwhile); their results "
                                    "will not be recorded", len(lost))
            except StorageUnavailable as exc:
                self._unreachable(exc)
            except StorageFull:
                pass                            # said by the round that met it
            except Exception:
                log.exception("renewing claims failed; retrying")
            await asyncio.sleep(min(self.HEARTBEAT, self.lease / 3))

    async def _run(self) -> None:
        # nothing of ours is in flight any more: a crash left its claims behind
        while not self._stopping:
            try:
                await self.spool.release_leases(self.owner)
                break
            except StorageUnavailable as exc:
                self._unreachable(exc)
                await asyncio.sleep(1)
        try:
            await self._sweep(self.started or time.time())
        except OSError as exc:
            log.warning("could not remove old body files: %s", exc)
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            self._delivering = False
            self._wake.clear()
            stopped = self.stopped
            self._mine = self.owner if self._unrecorded else ""
            self._unrecorded = False
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
            except StorageUnavailable as exc:
                self._unrecorded = True
                self._unreachable(exc)
                worked = 0
                await asyncio.sleep(1)
            except StorageFull:
                self._unrecorded = True
                self._event(5001, "the spool's disk is full: the queue manager cannot record "
                            "results; retrying every second")
                log.warning("the spool's disk is full: results cannot be recorded; "
                            "retrying in 1s (deliveries made meanwhile may repeat)")
                worked = 0
                await asyncio.sleep(1)
            except Exception:
                self._unrecorded = True
                log.exception("queue manager round failed; retrying in 1s")
                self._event(5002, "a queue manager round failed (details in postroom.log); "
                            "retrying in 1s")
                worked = 0
                await asyncio.sleep(1)
            if worked or self._stopping:
                if not self._delivering and not self._stopping:
                    # nothing handed to an agent: conversions, notices, new mail put
                    # to wait for a destination that is down; rounds of those that
                    # follow each other wait for company (see ROUND_GAP)
                    await asyncio.sleep(max(0.0, started + self.ROUND_GAP - loop.time()))
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    # --- conversion ----------------------------------------------------------------
    async def convert_batch(self) -> int:
        items = await self.spool.pending_conversion(self.BATCH)
        if not items:
            return 0
        bodies = await self.spool.message_bodies(sorted({i.message for i in items}))
        # Received headers counted outside the spool's writer (a big body is a file read)
        hops: dict[str, int] = await self._in_pool(
            lambda: {mid: count_hops(b.head(HEAD_BYTES)) for mid, (b, _) in bodies.items()})
        now = self.clock()
        decisions: list[Conversion] = []
        after: list[After] = []
        for it in items:
            if hops.get(it.message, 0) >= MAX_HOPS:
                decisions.append(self._fail(it, now, f"554 5.4.6 Mail loop: the message has "
                                            f"{hops[it.message]} Received headers (limit "
                                            f"{MAX_HOPS})", "5.4.6", "routing", after))
            elif it.direction == Direction.OUTBOUND:
                decisions.append(self._route(it, it.address, it.params, now, after))
            else:
                decisions.append(self._expand(it, now, after))
        await self.spool.convert(decisions, now)
        for done in after:
            done()
        return len(items)

    def _expand(self, it: Claim, now: float, after: list[After]) -> Conversion:
        address, mid = it.address, it.message
        result = expand(address, self.aliases)
        if result.error:
            return self._fail(it, now, f"550 5.4.6 Alias expansion failed: {result.error}",
                              "5.4.6", "local", after)
        if result.targets == (address,):
            # implied by the delivery event; recorded only at medium (a hot path)
            after.append(lambda: self._event(2004, f"<{address}>: local mailbox", mid,
                                             level="medium", domain=_domain(address),
                                             rcpt=address))
            return self._final(it.rid, address)
        params = dict(it.params)
        params.setdefault("ORCPT", f"rfc822;{xtext_encode(address)}")
        targets = []
        for target in result.targets:
            if direction_of(_domain(target), self.local_domains) == Direction.INBOUND:
                targets.append(Target(target, Direction.INBOUND, params, self._final(0, target)))
            else:
                targets.append(Target(target, Direction.OUTBOUND, params,
                                      self._route(it, target, params, now, after)))

        def done() -> None:
            log.info("queue_id=%s alias %s -> %s", mid, address, ", ".join(result.targets))
            self._event(2004, f"<{address}>: alias for {', '.join(result.targets)}", mid,
                        domain=_domain(address), rcpt=address)
        after.append(done)
        return Conversion(it.rid, State.EXPANDED, last_reply="alias: " + ", ".join(
            result.targets), targets=tuple(targets))

    def _final(self, rid: int, address: str) -> Conversion:
        """A local recipient's final delivery: Maildir, or LMTP where a route says so."""
        route = lmtp_route(_domain(address), self.routes)
        ref = Destination(route, "").ref if route is not None else ""
        return Conversion(rid, State.DELIVERY, destination=ref)

    def _route(self, it: Claim, address: str, params: Mapping[str, str], now: float,
               after: list[After]) -> Conversion:
        dest = self._destination(address)
        if dest is None:
            decision = self._choose(_domain(address))
            return self._fail(it, now, f"550 5.4.4 Unable to route: {decision.reason}",
                              "5.4.4", "routing", after, params, address)
        after.append(lambda: self._event(2004, f"<{address}>: {dest.describe()}", it.message,
                                         domain=_domain(address), rcpt=address))
        # new mail for a destination that is backing off waits with it ("delivery
        # temporarily suspended"), instead of being tried at once
        until, reply, why = self._suspended.get(dest.ref, (0.0, "", "{}"))
        if until > now:
            return Conversion(it.rid, State.DELIVERY, dest.ref, until, reply, json.loads(why))
        return Conversion(it.rid, State.DELIVERY, dest.ref)

    def _fail(self, it: Claim, now: float, reply: str, status: str, step: str,
              after: list[After], params: Mapping[str, str] | None = None,
              address: str = "") -> Conversion:
        """``it`` fails at conversion (or ``address``, a target of its alias, does)."""
        notice = "failure" if wants_notice("failure", it.sender,
                                           it.params if params is None else params) else ""
        after.append(lambda: log.warning("queue_id=%s to=<%s> failed: %s", it.message,
                                         address or it.address, reply))
        return Conversion(it.rid, State.FAILED, last_reply=reply, notice=notice,
                          detail={"status": status, "step": step, "last_attempt": now})

    # --- claiming and handing to agents --------------------------------------------
    def _destination(self, address: str, ref: str = "") -> Destination | None:
        """The destination stored at conversion (``ref``) while the routing table still
        has that route for this domain; otherwise a fresh choice."""
        domain = _domain(address)
        decision = self._choose(domain)
        if not decision.chosen:
            return None
        stored = self._route_at(ref)
        if stored is not None and stored in decision.chosen:
            route = stored
        elif len(decision.chosen) == 1:
            route = decision.chosen[0]
        else:
            route = self.rng.choice(decision.chosen)
        return Destination(route, domain if route.via == "mx" else "")

    def _choose(self, domain: str) -> RouteDecision:
        return self._memo.choose(domain, self.routes, self.local_domains)

    def _route_at(self, ref: str) -> Route | None:
        index, _, _ = ref.partition("|")
        return self.routes[int(index)] if index.isdigit() and int(index) < len(self.routes) \
            else None

    def _local_destination(self, c: Claim) -> Destination:
        """Maildir, or the LMTP route that now covers the recipient's domain."""
        route = lmtp_route(_domain(c.address), self.routes)
        return Destination(route, "") if route is not None else Destination(LOCAL_ROUTE, "")

    async def _messages(self, claims: Sequence[Claim]) -> list[OutboundMessage]:
        by_message: dict[str, list[Claim]] = defaultdict(list)
        for c in claims:
            by_message[c.message].append(c)
        data = await self.spool.message_bodies(list(by_message))
        out = []
        for mid, cs in by_message.items():
            if mid in data:
                body, mparams = data[mid]
                out.append(OutboundMessage(mid, cs[0].sender, mparams, body, [
                    OutboundRecipient(c.rid, c.address, c.params) for c in cs]))
        return out

    async def deliver_batch(self) -> int:
        """Final delivery of the due inbound recipients: Maildir here, in this round;
        a mail store over LMTP in its own task, as outbound mail goes (capped, backing off
        when the store is down), so a slow store never holds up the Maildirs."""
        now = self.clock()
        due = await self.spool.due(Direction.INBOUND, now, self.BATCH, self._mine)
        local: list[Claim] = []
        stores: dict[str, tuple[Destination, list[Claim]]] = {}
        for d in due:
            if d.rid in self._in_flight:
                continue
            dest = self._local_destination(d)
            if dest.route.via == "local":
                local.append(d)
            elif self._suspended.get(dest.ref, (0.0,))[0] <= now and \
                    self._connections[dest.key] < self.delivery.max_connections_per_destination:
                stores.setdefault(dest.key, (dest, []))[1].append(d)
        claims = await self.spool.claim(local + [d for _, ds in stores.values() for d in ds],
                                        now, self.owner, self.lease)
        claimed = {c.rid: c for c in claims}
        for dest, ds in stores.values():
            self._start(dest, [claimed[d.rid] for d in ds if d.rid in claimed])
        mine = [claimed[d.rid] for d in local if d.rid in claimed]
        if mine:
            self._delivering = True
            agent = self.agents.for_route(LOCAL_ROUTE)
            assert agent is not None, "the local agent is always registered"
            self._held.update((c.rid, c) for c in mine)
            try:
                results = await agent.deliver(Destination(LOCAL_ROUTE, ""),
                                              await self._messages(mine))
                await self._record([(claimed[r.recipient], r) for r in results])
            finally:
                for c in mine:
                    self._held.pop(c.rid, None)
        return len(claims)

    def _start(self, dest: Destination, claims: list[Claim]) -> None:
        """Deliver ``claims`` to ``dest`` in a task of its own (one connection)."""
        if not claims:
            return
        self._delivering = True
        self._in_flight.update(c.rid for c in claims)
        self._held.update((c.rid, c) for c in claims)
        self._connections[dest.key] += 1
        task = asyncio.get_running_loop().create_task(self._deliver_remote(dest, claims))
        self._outbound_tasks.add(task)
        task.add_done_callback(self._outbound_tasks.discard)

    # --- recording -----------------------------------------------------------------
    async def _record(self, results: Sequence[tuple[Claim, DeliveryResult]]) -> None:
        """Decide what each result means for its recipient and record it; a local copy
        whose result cannot be recorded (full disk) or was refused (no longer our claim)
        is taken back: it will be, or was, delivered by whoever holds the claim."""
        now = self.clock()
        decided = [self._decide(c, r, now) for c, r in results]
        try:
            stale = set(await self.spool.record([t for t, _ in decided], now))
        except StorageFull:
            # Not recorded, so these recipients will be delivered again: take back this
            # round's copies. Kept, they are duplicates, and on a full disk each retry's
            # copies ate the space freed for the spool's own commit, so it never got it.
            take_back(r for _, r in results)
            raise
        if stale:
            log.warning("%d results were not recorded: their recipients were claimed again "
                        "or finished meanwhile", len(stale))
            take_back(r for c, r in results if c.rid in stale)
        for t, done in decided:
            if t.claim.rid not in stale:
                done()

    def _decide(self, c: Claim, r: DeliveryResult, now: float) -> tuple[Transition, After]:
        detail: dict[str, Any] = r.as_detail()
        detail["last_attempt"] = now
        direction = c.direction or Direction.OUTBOUND
        domain = _domain(c.address)
        hop, ip = detail.get("hop"), detail.get("remote_ip")
        where = f" {r.remote_host} [{ip}]" if ip else ""
        status = r.dsn_status
        m = self.metrics
        if r.ok:
            notice = "success" if not r.dsn_capable and \
                wants_notice("success", c.sender, c.params) else ""

            def delivered() -> None:
                announce_delivered(log, m, self.events.emit if self.events else None,
                                   c.message, c.address, direction, r, now - c.received)
            return Transition(c, State.DELIVERED, str(r.reply), detail, notice=notice), delivered
        age = now - c.received
        if r.transient and age < self.delivery.max_queue_lifetime:
            attempts = c.attempts + 1
            when = now + retry_delay(self.retry, attempts)
            warn = age >= self.delivery.delay_warning and \
                wants_notice("delay", c.sender, c.params)
            detail["will_retry_until"] = c.received + self.delivery.max_queue_lifetime

            def deferred() -> None:
                m.attempts.labels(direction, "deferred", status_label(status)).inc()
                m.deferred.labels(direction).inc()
                log.warning("queue_id=%s to=<%s> status=deferred (%s); next attempt in %ds",
                            c.message, c.address, r.reply, when - now)
                self._event(3003, f"<{c.address}> deferred at {r.step or '?'} via {hop or '?'}"
                            f"{where}: {r.reply}; next attempt in {int(when - now)}s",
                            c.message, domain=domain, rcpt=c.address, hop=hop, remote_ip=ip,
                            next_attempt=when)
            return Transition(c, State.DELIVERY, str(r.reply), detail, attempts=attempts,
                              next_attempt=when, warn=warn, log_attempt=True), deferred
        reply = str(r.reply)
        if r.transient:
            detail["status"] = "5.4.7"
            detail["expired_after"] = age
            detail["last_step"] = detail.get("step", "")
            detail["step"] = "lifetime"
            reply = f"gave up after {age / 86400:.1f} days; last error: {r.reply}"
        notice = "failure" if wants_notice("failure", c.sender, c.params) else ""
        step = detail["step"]

        def failed() -> None:
            m.attempts.labels(direction, "failed", status_label(status)).inc()
            m.bounced.labels(direction).inc()
            log.warning("queue_id=%s to=<%s> status=failed (%s)", c.message, c.address, reply)
            self._event(3004, f"<{c.address}> failed at {step or '?'} via {hop or '?'}: {reply}",
                        c.message, domain=domain, rcpt=c.address, hop=hop, remote_ip=ip)
        return Transition(c, State.FAILED, reply, detail, notice=notice), failed

    # --- outbound ------------------------------------------------------------------
    async def dispatch_outbound(self) -> int:
        cap = self.delivery.max_connections
        if len(self._outbound_tasks) >= cap:
            return 0
        now = self.clock()
        due = await self.spool.due(Direction.OUTBOUND, now, 4 * self.BATCH, self._mine)
        groups: dict[str, tuple[Destination, list[Claim]]] = {}
        unroutable: list[Claim] = []
        waiting: dict[str, int] = {}
        for d in due:
            if d.rid in self._in_flight:
                continue
            dest = self._destination(d.address, d.destination)
            if dest is None:
                unroutable.append(d)
                continue
            if self.agents.for_route(dest.route) is None:
                continue                        # no agent for it: stays queued
            if self._suspended.get(dest.ref, (0.0,))[0] > now:
                # new mail (converted at intake) for a destination that is backing off
                # waits with it ("delivery temporarily suspended"), untried
                waiting[dest.ref] = waiting.get(dest.ref, 0) + 1
                continue
            groups.setdefault(dest.key, (dest, []))[1].append(d)
        for ref in waiting:
            until, reply, why = self._suspended[ref]
            await self.spool.defer_destination(ref, until, reply, why, now, self.owner)
        chosen: list[tuple[Destination, list[Claim]]] = []
        running = len(self._outbound_tasks)
        for key, (dest, items) in groups.items():
            by_message: dict[str, list[Claim]] = defaultdict(list)
            for d in items:
                by_message[d.message].append(d)
            messages = list(by_message.values())
            connections = self._connections[key]
            for i in range(0, len(messages), self.MESSAGES_PER_CONNECTION):
                if running >= cap or connections >= self.delivery.max_connections_per_destination:
                    break
                chosen.append((dest, [c for cs in messages[i:i + self.MESSAGES_PER_CONNECTION]
                                      for c in cs]))
                running += 1
                connections += 1
        if not chosen and not unroutable:
            return sum(waiting.values())
        # Claimed before starting: a delivery that finishes at once must find its claim.
        wanted = unroutable + [c for _, cs in chosen for c in cs]
        claimed = {c.rid: c for c in await self.spool.claim(wanted, now, self.owner, self.lease)}
        if unroutable:
            await self._record([(claimed[d.rid], DeliveryResult(
                d.rid, False, False, Reply(550, "5.4.4", "Unable to route: no address space "
                                            f"covers {_domain(d.address)}"), "routing",
                hop="routing table")) for d in unroutable if d.rid in claimed])
        started = 0
        for dest, cs in chosen:
            mine = [claimed[c.rid] for c in cs if c.rid in claimed]
            self._start(dest, mine)
            started += len(mine)
        return started + len(unroutable) + sum(waiting.values())

    async def _deliver_remote(self, dest: Destination, claims: list[Claim]) -> None:
        recorded = False
        try:
            agent = self.agents.for_route(dest.route)
            assert agent is not None
            results = await agent.deliver(dest, await self._messages(claims))
            by_id = {c.rid: c for c in claims}
            await self._record([(by_id[r.recipient], r) for r in results])
            recorded = True
            if results and all(r.hop_failure for r in results):
                first = results[0]
                await self._back_off(dest, str(first.reply), {**first.as_detail(),
                                                              "last_attempt": self.clock()})
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
            if not recorded:
                self._unrecorded = True
            self._connections[dest.key] -= 1
            if self._connections[dest.key] <= 0:
                del self._connections[dest.key]
            self._in_flight.difference_update(c.rid for c in claims)
            for c in claims:
                self._held.pop(c.rid, None)
            self._wake.set()

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
        try:
            await self.spool.defer_destination(dest.ref, now + wait, reply, why, now, self.owner)
        except StorageFull:
            log.warning("the spool's disk is full: the wait for %s is kept in memory only",
                        dest.describe())
        log.warning("destination %s failed as a whole; backing off for %ds",
                    dest.describe(), wait)
        self._event(3006, f"{dest.describe()} failed as a whole ({reply or 'see the log'}); "
                    f"its mail waits {int(wait)}s")

    # --- notices -------------------------------------------------------------------
    async def send_notices(self) -> int:
        owed = await self.spool.owed_notices(self.BATCH)
        if not owed:
            return 0
        now = self.clock()
        groups: dict[tuple[str, str], list[NoticeOwed]] = defaultdict(list)
        for row in owed:
            groups[(row.message, row.kind)].append(row)
        sent = []
        for (mid, kind), items in groups.items():
            first = items[0]
            report = None
            if first.sender:
                body = await self.spool.body(mid)
                if body is None:
                    continue
                report = await self._in_pool(functools.partial(
                    self._notice, kind, items, body, now))
            sent.append(NoticeSent(mid, kind, tuple(i.rid for i in items), report))
        for n in await self.spool.notices_sent(sent, now):
            if n.report is None:
                continue
            rcpts = ", ".join(i.address for i in groups[(n.message, n.kind)])
            sender = groups[(n.message, n.kind)][0].sender
            qid = n.report.queue_id
            self.metrics.notices.labels(n.kind).inc()
            self._event(3005, f"{n.kind} notice for {rcpts} sent to <{sender}> as {qid}",
                        n.message, notice=n.kind, notice_id=qid)
            log.info("queue_id=%s %s notice for %s sent to <%s> as queue_id=%s", n.message,
                     n.kind, rcpts, sender, qid)
        return len(owed)


    def _notice(self, kind: str, items: list[NoticeOwed], body: Any, now: float) -> NewMessage:
        """A notice, DKIM-signed when it leaves and the hostname's domain has a key
        (its From: is MAILER-DAEMON@hostname), once, before it is queued."""
        report = build_notice(kind, items, body, hostname=self.hostname, now=now,
                              max_return_size=self.delivery.max_return_size,
                              local_domains=self.local_domains)
        signer = self.signer
        if signer and any(r.direction == Direction.OUTBOUND for r in report.recipients):
            header, rest = split_message(report.data)
            stamp = signer.sign(header, (rest,), now)
            if stamp:
                report = dataclasses.replace(report, data=stamp + report.data)
        return report
