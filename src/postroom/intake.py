"""Intake: one step from an accepted message to a queued one (Postfix's cleanup).

SMTP sessions, ``postroom sendmail`` and the admin API's submissions all end here. It
decides each recipient's direction once (a local domain: inbound; any other: outbound),
adds the headers we owe (``Received``, and ``Message-ID``/``Date`` for a submission that
lacks them), builds the queued message, stores it durably, and records the receipt (the
counter, the log line and event 3001). The caller answers 250 only after it returns.

Mail that will leave for another server (a remote recipient, or an alias that expands
to one) is stamped here, once, before it is stored, so every attempt and every relay
sends the same bytes: mail of our own users (authenticated, trusted network, sendmail,
the API) gets DKIM signatures when its From: domain has keys; mail from outside that an
alias forwards gets an ARC seal (:mod:`postroom.mailauth`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .body import CHUNK
from .config import Route
from .conversion import MAX_HOPS, count_hops, expand, missing_headers, received_header
from .events import EventLog
from .metrics import Metrics
from .model import Address
from .routing import RouteMemo, describe_destination, destination_ref, lmtp_route
from .spool import Direction, NewMessage, NewRecipient, Spool, State, new_queue_id

if TYPE_CHECKING:          # imported when used: cryptography and dkimpy weigh ~6 MB
    from .mailauth.arcseal import Sealer
    from .mailauth.sign import Signer

__all__ = ["DeliverHere", "DeliveredHere", "EarlyConversion", "Intake", "Stamping", "Submission",
           "direction_of"]

HEAD_BYTES = 256 * 1024     # enough of a message to count its Received headers

log = logging.getLogger("postroom.intake")

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", re.I | re.M)


def direction_of(domain: str, local_domains: Collection[str]) -> Direction:
    """Where mail for ``domain`` goes: to a mailbox here, or to another host. The one
    place that decides it."""
    return Direction.INBOUND if domain.lower() in local_domains else Direction.OUTBOUND


def message_id(data: bytes) -> str | None:
    """The Message-ID header of a message's first bytes, unfolded (for trace)."""
    head = data[: data.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in data else data[:65536]
    m = _MESSAGE_ID.search(head)
    if m is None:
        return None
    return m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace")[:500]


@dataclass(slots=True)
class Submission:
    """An accepted message as its front end hands it over."""

    sender: Address
    recipients: Sequence[tuple[Address, dict[str, str]]]
    data: bytes                          # the message, or a big one's first part
    peer: str
    helo: str | None
    listener: str                        # mx | submission | submissions | local | api
    protocol: str                        # the Received header's "with": ESMTPSA, local, ...
    mail_params: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    auth: str | None = None
    session: str = ""
    queue_id: str = ""                   # given when a big message's file is named by it
    body_file: str = ""                  # a big message's file, in the spool's bodies folder
    body_size: int = 0
    decisions: list[str] = field(default_factory=list)   # each recipient's policy reason
    add_missing: bool = True             # a submission: add a missing Message-ID and Date
    trace: bytes = b""                   # fields to put just after our Received (the MX
                                         # listener's Authentication-Results)


class DeliveredHere(Protocol):
    """Copies made at intake, before the rest of their message is queued."""

    def announce(self) -> None:
        """Log, count and record them (after the receipt)."""

    def take_back(self) -> None:
        """Remove them: the rest could not be queued, and the client will send again."""


DeliverHere = Callable[[NewMessage], Awaitable[tuple[NewMessage, DeliveredHere | None]]]


@dataclass(frozen=True)
class EarlyConversion:
    """What intake needs to convert the plain recipients itself, in the acceptance's own
    commit: the routing table and the aliases. ``inbound`` is False when the queue
    manager adds routes of its own for the local domains (``[imap] delivery = "lmtp"``):
    then local recipients wait for it."""

    routes: tuple[Route, ...]
    aliases: Mapping[str, tuple[str, ...]]
    inbound: bool = True


@dataclass
class Stamping:
    """What intake needs to sign and seal: the keys, and who counts as our own user."""

    signer: Signer
    sealer: Sealer
    trusted: Callable[[str], bool]                 # a peer address in trusted_networks
    aliases: Mapping[str, tuple[str, ...]]

    def ours(self, s: Submission) -> bool:
        """Mail of our own users: authenticated, local, the API, or a trusted network."""
        return bool(s.auth) or s.listener in ("local", "api", "internal") or self.trusted(s.peer)


class Intake:
    def __init__(self, spool: Spool, hostname: str, local_domains: frozenset[str],
                 metrics: Metrics | None = None, events: EventLog | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.hostname = hostname
        self.local_domains = local_domains      # replaced on reload
        self.metrics = metrics
        self.events = events
        self.clock = clock
        self.stamping: Stamping | None = None   # DKIM and ARC; app sets it (and on reload)
        # Conversion at intake (the server state sets it from the config): off while an
        # administrator has stopped the conversion component or the queue manager, so
        # that mail waits in the conversion queues, as they expect
        self.early: EarlyConversion | None = None
        self.converting = True
        # Local delivery at intake (app sets it): None, or a callable that delivers a
        # message's plain local recipients and returns the rest to queue; off while an
        # administrator has stopped local delivery (or conversion, as above)
        self.deliver_here: DeliverHere | None = None
        self.delivering = True
        self._routes = RouteMemo()
        self._rng = random.Random()

    def build(self, s: Submission) -> NewMessage:
        """The queued message: headers added, recipients deduplicated with a direction."""
        seen: dict[str, NewRecipient] = {}
        for rcpt, params in s.recipients:
            key = rcpt.key
            if key not in seen:
                seen[key] = NewRecipient(key, direction_of(rcpt.domain, self.local_domains),
                                         params)
        qid = s.queue_id or new_queue_id()
        now = self.clock()
        header = received_header(
            helo=s.helo or "unknown", peer=s.peer, hostname=self.hostname,
            protocol=s.protocol, queue_id=qid,
            recipient=next(iter(seen)) if len(seen) == 1 else None, timestamp=now)
        header += s.trace
        if s.add_missing:
            header += missing_headers(s.data, self.hostname, now)
        client: dict[str, Any] = {"peer": s.peer, "helo": s.helo, "listener": s.listener,
                                  "tls": s.tls, "auth": s.auth, "session": s.session}
        rcpts = self._convert(tuple(seen.values()), header + s.data[:HEAD_BYTES])
        if s.body_file:
            return NewMessage(qid, str(s.sender), s.mail_params, client, header, rcpts,
                              body_file=s.body_file, body_size=s.body_size)
        return NewMessage(qid, str(s.sender), s.mail_params, client, header + s.data, rcpts)

    def _convert(self, rcpts: tuple[NewRecipient, ...], head: bytes
                 ) -> tuple[NewRecipient, ...]:
        """Conversion, done here for the recipients that need nothing else: a local
        mailbox that is no alias, a remote address that a route covers. They enter the
        spool in delivery, in the acceptance's commit, and the queue manager has one
        write and two reads less per message. Aliases, unroutable addresses and a
        message at the hop limit wait in conversion, where the queue manager decides,
        explains and notifies as before."""
        early = self.early
        if early is None or not self.converting or count_hops(head) >= MAX_HOPS:
            return rcpts
        out = []
        for r in rcpts:
            domain = r.address.rpartition("@")[2]
            if r.direction == Direction.INBOUND:
                if not early.inbound or r.address in early.aliases:
                    out.append(r)
                    continue
                store = lmtp_route(domain, early.routes)
                ref = destination_ref(store, "") if store is not None else ""
            else:
                chosen = self._routes.choose(domain, early.routes, self.local_domains).chosen
                if not chosen:
                    out.append(r)
                    continue
                route = chosen[0] if len(chosen) == 1 else self._rng.choice(chosen)
                ref = destination_ref(route, domain)
            # made anew: dataclasses.replace costs as much again (it checks every field)
            out.append(NewRecipient(r.address, r.direction, r.params, State.DELIVERY, ref))
        return tuple(out)

    async def queue(self, s: Submission) -> NewMessage:
        """Build and store the message durably; record its receipt. Raises StorageFull
        (or any storage error) with nothing stored. Plain local recipients may be
        delivered into their Maildirs first (:mod:`postroom.direct`); only the rest is
        queued then."""
        message = self.build(s)
        st = self.stamping
        if st is not None and st.signer and (forwards := self._leaves(s, st)) is not None:
            message = await asyncio.get_running_loop().run_in_executor(
                None, self._stamp, s, message, st, forwards)
        rest, done = message, None
        if self.deliver_here is not None and self.delivering:
            try:
                rest, done = await self.deliver_here(message)
            except Exception:          # never lose mail over it: the queue delivers it
                log.exception("queue_id=%s local delivery at intake failed; queued instead",
                              message.queue_id)
        if rest.recipients:
            try:
                await self.spool.enqueue(rest)
            except BaseException:
                if done is not None:
                    done.take_back()
                raise
        self.received(s, message)
        if done is not None:
            done.announce()
        return message

    def _leaves(self, s: Submission, st: Stamping) -> list[str] | None:
        """None when no copy leaves this server; else the local domains whose aliases
        send it out (empty for a remote recipient named directly)."""
        leaves, via = False, []
        for rcpt, _ in s.recipients:
            domain = rcpt.domain.lower()
            if direction_of(domain, self.local_domains) == Direction.OUTBOUND:
                leaves = True
                continue
            for target in expand(rcpt.key, st.aliases).targets:
                if direction_of(target.rpartition("@")[2], self.local_domains) \
                        == Direction.OUTBOUND:
                    leaves = True
                    via.append(domain)
                    break
        return via if leaves else None

    def _stamp(self, s: Submission, message: NewMessage, st: Stamping,
               forwards: list[str]) -> NewMessage:
        """The message with DKIM signatures or an ARC seal on top (in a worker thread)."""
        now = self.clock()
        path = self.spool.bodies / s.body_file if s.body_file else None
        try:
            if st.ours(s):
                header, body = self._parts(message, s, path)
                if header is None:
                    return message
                stamp = st.signer.sign(header, body, now)
                what = "DKIM-signed"
            elif forwards:
                whole = message.data if path is None else message.data + path.read_bytes()
                stamp = st.sealer.seal(whole, forwards, now)
                what = "ARC-sealed"
            else:
                return message
        except Exception as exc:    # never lose mail over a signature: it goes unsigned
            log.exception("queue_id=%s could not be signed; queued unsigned", message.queue_id)
            if self.metrics is not None:
                self.metrics.stamps.labels("failed").inc()
            if self.events is not None:
                self.events.emit(3103, f"{message.queue_id} from <{s.sender}> queued unsigned: "
                                 f"{type(exc).__name__}: {str(exc)[:200]}",
                                 queue_id=message.queue_id, peer=s.peer)
            return message
        if stamp:
            log.debug("queue_id=%s %s", message.queue_id, what)
            if self.metrics is not None:
                self.metrics.stamps.labels("dkim" if what == "DKIM-signed" else "arc").inc()
            return replace(message, data=stamp + message.data)
        return message

    @staticmethod
    def _parts(message: NewMessage, s: Submission, path: Path | None
               ) -> tuple[bytes | None, Iterator[bytes]]:
        """(header section, body chunks) of the message as it will be stored."""
        if path is None:
            from .mailauth.sign import split_message
            header, rest = split_message(message.data)
            return header, iter((rest,))
        # a big message: our header lines in the row, the whole message in the file
        at = s.data.find(b"\r\n\r\n")
        if at < 0:
            log.warning("queue_id=%s: header section over %d bytes; not signed",
                        message.queue_id, len(s.data))
            return None, iter(())
        header = message.data + s.data[: at + 2]

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f:
                f.seek(at + 4)
                while block := f.read(CHUNK):
                    yield block
        return header, body()

    def _routed(self, message: NewMessage, ev: EventLog) -> None:
        """Event 2004 for the recipients converted here, as the queue manager says it."""
        early = self.early
        for r in message.recipients:
            if r.state != State.DELIVERY or early is None:
                continue
            domain = r.address.rpartition("@")[2]
            if r.direction == Direction.INBOUND:
                ev.emit(2004, f"<{r.address}>: local mailbox", queue_id=message.queue_id,
                        level="medium", domain=domain, rcpt=r.address)
                continue
            index = int(r.destination.partition("|")[0])
            if index < len(early.routes):
                ev.emit(2004, f"<{r.address}>: "
                        f"{describe_destination(early.routes[index], domain)}",
                        queue_id=message.queue_id, domain=domain, rcpt=r.address)

    def received(self, s: Submission, message: NewMessage) -> None:
        rcpts = [r.address for r in message.recipients]
        qid = message.queue_id
        if self.metrics is not None:
            self.metrics.received.labels(s.listener).inc()
        if s.listener == "local":
            log.info("sendmail queued queue_id=%s from=<%s> size=%d nrcpt=%d user=%s", qid,
                     s.sender, message.size, len(rcpts), (s.auth or "").removeprefix("local:"))
        else:
            log.info("session=%s queued queue_id=%s from=<%s> size=%d nrcpt=%d", s.session,
                     qid, s.sender, message.size, len(rcpts))
        ev = self.events
        if ev is None:
            return
        if ev.enabled("message_transfer", "minimum", peer=s.peer):
            self._receipt(s, message, ev)
        self._routed(message, ev)

    def _receipt(self, s: Submission, message: NewMessage, ev: EventLog) -> None:
        """Event 3001: the message was received."""
        rcpts = [r.address for r in message.recipients]
        qid = message.queue_id
        to = ", ".join("<" + r + ">" for r in rcpts)
        if s.listener == "local":
            text = (f"received from local user {(s.auth or '').removeprefix('local:')} "
                    f"(postroom sendmail): <{s.sender}> to {to}, {message.size} bytes")
        else:
            text = (f"received from [{s.peer}] ({s.helo}) on {s.listener}"
                    f"{' over TLS' if s.tls else ''}{' as ' + str(s.auth) if s.auth else ''}: "
                    f"<{s.sender}> to {to}, {message.size} bytes")
        extra: dict[str, Any] = {"session": s.session} if s.listener != "local" else {}
        ev.emit(3001, text, queue_id=qid, peer=s.peer, sender=str(s.sender), recipients=rcpts,
                size=message.size, tls=s.tls, auth=s.auth, helo=s.helo, listener=s.listener,
                message_id=None if s.listener == "local" else message_id(s.data),
                decisions=list(s.decisions), **extra)
