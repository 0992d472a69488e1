"""The values that go in and out of a spool, whatever its backend."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..body import Body
from .states import QUEUES, Direction, State

__all__ = ["Claim", "Conversion", "Filters", "MessageView", "NewMessage", "NewRecipient",
           "NoticeOwed", "NoticeSent", "QueueSummary", "RecipientView", "StorageFull",
           "StorageUnavailable", "Target", "Transition", "new_queue_id"]


class StorageFull(Exception):
    """The disk (or the database) is full: the client should try again later."""


class StorageUnavailable(Exception):
    """The spool's database cannot be reached (refused, lost, shut down, no connection
    in time): the client should try again later (451 4.3.0); the spool carries on by
    itself once the database is back."""


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


# --- receiving ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    direction: str                    # a Direction
    params: dict[str, str]
    # Where it starts: conversion, or delivery when intake converted it at once (a
    # mailbox that is no alias, or a routable remote address), with its destination.
    state: str = State.CONVERSION
    destination: str = ""


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


# --- conversion --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Conversion:
    """What conversion decided for one recipient (``rid``) that waited in conversion.

    ``state`` is where it goes: delivery (with its destination), failed (with the reply
    and the notice owed), or expanded (an alias: ``targets`` replace it, ``last_reply``
    says so). A target's own outcome is a Conversion whose ``rid`` is not used.
    """

    rid: int
    state: State
    destination: str = ""
    next_attempt: float | None = None        # None: now
    last_reply: str = ""
    detail: dict[str, Any] | None = None
    notice: str = ""
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True, slots=True)
class Target:
    """One target of an expanded alias: a new recipient of the same message."""

    address: str
    direction: Direction
    params: dict[str, str]
    outcome: Conversion


# --- delivery ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Claim:
    """A recipient due for delivery; with ``token`` set, claimed: its lease's fencing
    token. A result is recorded only with the token of the recipient's current claim."""

    rid: int
    message: str
    address: str
    sender: str
    attempts: int
    received: float
    params: dict[str, str]
    destination: str = ""
    token: int = 0
    direction: str = ""


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of one claimed attempt, as the spool records it."""

    claim: Claim
    state: State                     # delivery (deferred) | delivered | failed
    reply: str                       # what queue views and the NDR show as the last reply
    detail: dict[str, Any]
    attempts: int | None = None      # None: one more
    next_attempt: float | None = None
    notice: str = ""                 # '' | failure | success
    warn: bool = False               # a delay notice is owed (once)
    log_attempt: bool = False        # keep it in the recipient's list of attempts


# --- notices -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NoticeOwed:
    rid: int
    message: str
    address: str
    params: dict[str, str]
    state: str
    last_reply: str
    detail: dict[str, Any]
    kind: str                        # failure | success | delay
    sender: str
    received: float
    mail_params: dict[str, str]


@dataclass(frozen=True, slots=True)
class NoticeSent:
    """A notice built for ``rids`` of ``message``: ``report`` enqueued in the same
    transaction (None for the null sender, who is owed nothing)."""

    message: str
    kind: str
    rids: tuple[int, ...]
    report: NewMessage | None


# --- views -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QueueSummary:
    name: str
    messages: int
    recipients: int
    oldest: float | None       # arrival time of the oldest message, or None when empty
    held: int
    next_retry: float | None = None


@dataclass(frozen=True)
class Filters:
    domain: str = ""
    sender: str = ""
    rcpt: str = ""
    older_than: float = 0.0          # seconds
    held: bool | None = None
    reason: str = ""                 # a reason group id (views.reasons); applied by views
    queue: str = ""
    ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not (self.domain or self.sender or self.rcpt or self.older_than or
                    self.held is not None or self.reason or self.queue or self.ids)

    def queue_parts(self) -> tuple[str, str]:
        if self.queue not in QUEUES:
            raise ValueError(f"no queue {self.queue!r}: the queues are {', '.join(QUEUES)}")
        direction, state = self.queue.split("-", 1)
        return direction, state

    def matches(self, r: RecipientView, now: float) -> bool:
        """The filter as plain Python (the in-memory backend; SQL does the same)."""
        if r.state not in (State.CONVERSION, State.DELIVERY):
            return False
        if self.queue and (r.direction, r.state) != self.queue_parts():
            return False
        if self.ids and r.message not in self.ids:
            return False
        if self.domain and r.address.rpartition("@")[2].lower() != \
                self.domain.lower().rstrip("."):
            return False
        if self.rcpt and r.address.lower() != self.rcpt.lower():
            return False
        if self.sender and r.sender.lower() != ("" if self.sender == "<>" else
                                                 self.sender.lower()):
            return False
        if self.older_than and r.received > now - self.older_than:
            return False
        return self.held is None or r.held == self.held


@dataclass(frozen=True, slots=True)
class RecipientView:
    id: int
    message: str
    address: str
    direction: str
    state: str
    attempts: int
    held: bool
    next_attempt: float
    last_reply: str
    detail: dict[str, Any]
    sender: str
    received: float
    size: int
    params: dict[str, str] = field(default_factory=dict)
    notice: str = ""
    parent: int | None = None
    lease_owner: str = ""
    lease_until: float = 0.0


# The columns a database backend selects for a RecipientView (recipients r, messages m).
RECIPIENT_COLUMNS = (
    "r.id, r.message, r.address, r.direction, r.state, r.attempts, r.held, r.next_attempt, "
    "r.last_reply, r.detail, m.sender, m.received, m.size, r.params, r.notice, r.parent, "
    "r.lease_owner, r.lease_until")


def recipient_view(row: Sequence[Any]) -> RecipientView:
    """A row of RECIPIENT_COLUMNS as a RecipientView (JSON columns as text)."""
    return RecipientView(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7],
                         row[8], json.loads(row[9] or "{}"), row[10], row[11], row[12],
                         json.loads(row[13] or "{}"), row[14], row[15], row[16], row[17])


@dataclass(frozen=True, slots=True)
class AttemptView:
    recipient: int
    at: float
    reply: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MessageView:
    id: str
    received: float
    sender: str
    size: int
    params: dict[str, str]
    client: dict[str, Any]
    recipients: tuple[RecipientView, ...]
    attempts: tuple[AttemptView, ...]
    body: Body | None
