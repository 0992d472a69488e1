"""Intake: one step from an accepted message to a queued one (Postfix's cleanup).

SMTP sessions, ``postroom sendmail`` and the admin API's submissions all end here. It
decides each recipient's direction once (a local domain: inbound; any other: outbound),
adds the headers we owe (``Received``, and ``Message-ID``/``Date`` for a submission that
lacks them), builds the queued message, stores it durably, and records the receipt (the
counter, the log line and event 3001). The caller answers 250 only after it returns.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .conversion import missing_headers, received_header
from .events import EventLog
from .metrics import Metrics
from .model import Address
from .spool import Direction, NewMessage, NewRecipient, Spool, new_queue_id

__all__ = ["Intake", "Submission", "direction_of"]

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


class Intake:
    def __init__(self, spool: Spool, hostname: str, local_domains: Collection[str],
                 metrics: Metrics | None = None, events: EventLog | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.hostname = hostname
        self.local_domains = local_domains      # replaced on reload
        self.metrics = metrics
        self.events = events
        self.clock = clock

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
        if s.add_missing:
            header += missing_headers(s.data, self.hostname, now)
        client: dict[str, Any] = {"peer": s.peer, "helo": s.helo, "listener": s.listener,
                                  "tls": s.tls, "auth": s.auth, "session": s.session}
        if s.body_file:
            return NewMessage(qid, str(s.sender), s.mail_params, client, header,
                              tuple(seen.values()), body_file=s.body_file,
                              body_size=s.body_size)
        return NewMessage(qid, str(s.sender), s.mail_params, client, header + s.data,
                          tuple(seen.values()))

    async def queue(self, s: Submission) -> NewMessage:
        """Build and store the message durably; record its receipt. Raises StorageFull
        (or any storage error) with nothing stored."""
        message = self.build(s)
        await self.spool.enqueue(message)
        self.received(s, message)
        return message

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
        if ev is None or not ev.enabled("message_transfer", "minimum", peer=s.peer):
            return
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
