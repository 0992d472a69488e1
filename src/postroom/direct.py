"""Local delivery at intake: mail for this server's own mailboxes is written into their
Maildirs while the client waits for its ``250``, as an LMTP server delivers.

A recipient that intake converted to a plain local mailbox (no alias, a Maildir here,
not a store behind LMTP) and whose sender wants no success notice is delivered before
the message is queued: the copy written into ``tmp/``, fsync'd, linked into ``new/``,
and the folder fsync'd (``LocalDeliveryAgent.deliver_now``, the queue manager's own
agent, run in the event loop: its fsyncs go to the kernel through ``syncer.py``, with
no worker thread). A message whose every recipient was delivered so never enters the
queue, which would only have claimed it, read it back and deleted it. What was not
delivered (a full disk, a mailbox removed meanwhile) is queued in delivery as before,
and the queue manager tries again, defers or returns it with its reasons. When that
rest cannot be queued (the spool's disk is full), the copies made here are taken back
before the client gets the spool's 4xx, so its retry makes no duplicate.

Not used while an administrator has stopped the local-delivery component, the
conversion component or the queue manager (mail then waits in the queues, as they
expect), for a big message (its body is a spool file, copied by the queue manager), nor
when Postroom runs Dovecot (the Maildirs then belong to the mail owner).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .body import Body
from .delivery import OutboundMessage, OutboundRecipient, announce_delivered
from .delivery.local import LocalDeliveryAgent, take_back
from .events import EventLog
from .metrics import Metrics
from .model import DeliveryResult
from .spool import Direction, NewMessage, NewRecipient, State
from .spool.states import wants_notice
from .syncer import Syncer

__all__ = ["Delivered", "DirectDelivery"]

log = logging.getLogger("postroom.delivery")


@dataclass(slots=True)
class Delivered:
    """Copies made at intake: told once the rest of the message is queued, or taken back."""

    queue_id: str
    results: list[tuple[str, DeliveryResult]]       # (address, its delivery)
    waited: float
    metrics: Metrics
    emit: Callable[..., object] | None

    def announce(self) -> None:
        for address, r in self.results:
            announce_delivered(log, self.metrics, self.emit, self.queue_id, address,
                               Direction.INBOUND, r, self.waited)

    def take_back(self) -> None:
        take_back(r for _, r in self.results)


class DirectDelivery:
    def __init__(self, agent: LocalDeliveryAgent, syncer: Syncer, metrics: Metrics,
                 events: EventLog | None) -> None:
        self.agent = agent
        self.syncer = syncer
        self.metrics = metrics
        self.emit = events.emit if events is not None else None

    @staticmethod
    def here(sender: str, r: NewRecipient) -> bool:
        """Whether ``r`` is delivered at intake: a plain local mailbox (intake converted it
        to a Maildir destination) that owes no success notice."""
        return r.state == State.DELIVERY and r.direction == Direction.INBOUND and \
            not r.destination and not wants_notice("success", sender, r.params)

    async def __call__(self, message: NewMessage) -> tuple[NewMessage, Delivered | None]:
        """Deliver what can be delivered now; returns the rest of the message to queue
        (maybe no recipient at all) and what was delivered."""
        if message.body_file:
            return message, None
        here = [r for r in message.recipients if self.here(message.sender, r)]
        if not here:
            return message, None
        started = time.monotonic()
        out = OutboundMessage(message.queue_id, message.sender, message.params,
                              Body(message.data),
                              [OutboundRecipient(i, r.address, r.params)
                               for i, r in enumerate(here)])
        results = await self.agent.deliver_now(out, self.syncer)
        done = [(here[r.recipient].address, r) for r in results if r.ok]
        if not done:
            return message, None
        gone = {address for address, _ in done}
        rest = replace(message, recipients=tuple(
            r for r in message.recipients if r.address not in gone))
        return rest, Delivered(message.queue_id, done, time.monotonic() - started,
                               self.metrics, self.emit)
