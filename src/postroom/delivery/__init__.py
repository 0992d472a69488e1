"""Delivery agents: one protocol, one agent per kind of final or next hop.

An agent takes a :class:`Destination` and a batch of messages for it and returns one
:class:`~postroom.model.DeliveryResult` per recipient. It never touches the spool: the
queue manager claims the work, calls the agent, and records what it returns.

The agents, chosen by :class:`Agents` from the route's ``via``:

- ``local``: this server's Maildirs (:mod:`.local`);
- ``mx`` and ``smarthost``: SMTP to the domain's MX hosts or to a smart host (:mod:`.smtp`);
- ``lmtp``: LMTP to a mail store such as Dovecot or Cyrus (:mod:`.lmtp`).

A new kind of agent is a module here with a class that has ``deliver``, and one entry
in the registry that ``app`` builds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..body import Body
from ..config import Route
from ..metrics import Metrics, status_label
from ..model import DeliveryResult
from ..routing import describe_destination, destination_ref

__all__ = ["LOCAL_ROUTE", "Agents", "DeliveryAgent", "Destination", "OutboundMessage",
           "OutboundRecipient", "announce_delivered"]

# Mail for this server's own domains, delivered to its Maildirs.
LOCAL_ROUTE = Route("*", "local", index=-1)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a group of recipients goes: a route, and the domain for MX routes."""

    route: Route
    domain: str            # for smart hosts, LMTP and local: "" (one connection for all)

    @property
    def ref(self) -> str:
        """How the spool records it: the route's place in the table, and the domain."""
        return destination_ref(self.route, self.domain)

    @property
    def key(self) -> str:
        via = self.route.via
        if via == "mx":
            return f"mx:{self.domain}"
        if via == "local":
            return "local"
        return f"{via}:{self.route.next_hop}"

    def describe(self) -> str:
        return describe_destination(self.route, self.domain)


@dataclass(frozen=True, slots=True)
class OutboundRecipient:
    id: int                # the spool's recipient id
    address: str
    params: dict[str, str]


@dataclass(slots=True)
class OutboundMessage:
    queue_id: str
    sender: str
    mail_params: dict[str, str]
    data: Body
    recipients: list[OutboundRecipient]


class DeliveryAgent(Protocol):
    async def deliver(self, dest: Destination, messages: Sequence[OutboundMessage]
                      ) -> list[DeliveryResult]:
        """One result per recipient of every message, in any order."""
        ...


class Agents:
    """The registry: which agent serves a route's ``via``."""

    def __init__(self, agents: Mapping[str, DeliveryAgent]) -> None:
        self._agents = dict(agents)

    def for_route(self, route: Route) -> DeliveryAgent | None:
        return self._agents.get(route.via)

    def __contains__(self, via: str) -> bool:
        return via in self._agents


def announce_delivered(log: logging.Logger, metrics: Metrics, emit: Callable[..., Any] | None,
                       queue_id: str, address: str, direction: str, r: DeliveryResult,
                       waited: float) -> None:
    """A recorded delivery, told: the counters, the log line and event 3002 (the queue
    manager's results, and local deliveries made at intake, alike)."""
    metrics.delivered.labels(direction).inc()
    metrics.delivery.labels(direction).observe(max(0.0, waited))
    metrics.attempts.labels(direction, "delivered", status_label(r.dsn_status)).inc()
    hop, ip = r.hop, r.remote_ip
    if ip:
        log.info("queue_id=%s to=<%s> relay=%s[%s] status=delivered (%s)", queue_id, address,
                 r.remote_host, ip, r.reply)
    else:
        log.info("queue_id=%s to=<%s> status=delivered (%s)", queue_id, address, r.reply)
    if emit is not None:
        where = f" {r.remote_host} [{ip}]" if ip else ""
        emit(3002, f"<{address}> delivered via {hop or '?'}{where}: {r.reply}", queue_id=queue_id,
             domain=address.rpartition("@")[2], rcpt=address, hop=hop, remote_ip=ip)
