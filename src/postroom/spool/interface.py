"""What a spool backend does: queue verbs, not SQL.

The SMTP intake enqueues; the queue manager reads conversion work and records its
decisions, claims due recipients with a lease, records results, defers a whole
destination and sends the notices owed; the admin API reads the views and acts. Every
write is durable when its call returns. Three backends implement it (:mod:`.sqlite`,
:mod:`.memory`, :mod:`.postgres`) and pass the same contract tests
(``tests/contract/test_spool_contract.py``).

A backend whose database cannot be reached raises
:class:`~.records.StorageUnavailable` from any verb, and one whose disk is full
:class:`~.records.StorageFull`; both mean "try again later".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..body import Body
from .records import (
    Claim,
    Conversion,
    Filters,
    MessageView,
    NewMessage,
    NoticeOwed,
    NoticeSent,
    QueueSummary,
    RecipientView,
    Transition,
)

__all__ = ["Spool"]


class Spool(Protocol):
    bodies: Path                      # where big messages' files live

    async def start(self, listen: bool = True) -> None:
        """Connect, and with ``listen`` wake the ``on_commit`` listeners at other
        nodes' commits too (PostgreSQL: the process that runs the queue listens; front
        ends need not). Call once, in the event loop that will use the spool."""
        ...

    # --- receiving -----------------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        """Store a message and its recipients (in conversion); durable on return."""
        ...

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each enqueue (the queue manager's wake-up)."""
        ...

    # --- conversion ----------------------------------------------------------------
    async def pending_conversion(self, limit: int) -> list[Claim]:
        """Recipients waiting in conversion, oldest first."""
        ...

    async def convert(self, decisions: Sequence[Conversion], now: float) -> None:
        """Apply conversion's decisions; a recipient no longer in conversion (an
        administrator deleted it meanwhile) is left alone."""
        ...

    # --- delivery ------------------------------------------------------------------
    async def due(self, direction: str, now: float, limit: int, owner: str = "") -> list[Claim]:
        """Recipients in delivery, not held, due, and not leased to anyone but ``owner``:
        soonest first."""
        ...

    async def claim(self, due: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[Claim]:
        """Lease those of ``due`` (as :meth:`due` found them) that are still due, and
        not leased to another owner, to ``owner`` until ``now + lease``; each claim gets
        a new fencing token.

        A lease keeps other owners (nodes) off; an owner's own claims are its to renew
        (it knows what it has in flight), so a result it could not record is tried again
        at once rather than after the lease."""
        ...

    async def renew(self, claims: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[int]:
        """Extend to ``now + lease`` the leases of ``claims`` still held by ``owner`` with
        the same token (a long delivery keeps its claims); returns the ids whose claim
        was lost (expired and taken by another owner, or finished meanwhile)."""
        ...

    async def release_leases(self, owner: str) -> None:
        """Forget ``owner``'s leases (at its start: a crash left them behind)."""
        ...

    async def record(self, transitions: Sequence[Transition], now: float) -> list[int]:
        """Record claimed outcomes; returns the ids refused as stale (no longer the
        current claim, or no longer in delivery). Finished messages are deleted."""
        ...

    async def defer_destination(self, ref: str, until: float, reply: str, detail: str,
                                now: float, owner: str = "") -> int:
        """Every recipient for destination ``ref`` not leased to another owner waits until
        ``until``; those with no reply yet get ``reply`` and ``detail`` (JSON) as their
        reason."""
        ...

    async def message_bodies(self, ids: Sequence[str]) -> dict[str, tuple[Body, dict[str, str]]]:
        """(body, MAIL parameters) of each message that still exists."""
        ...

    async def body(self, mid: str) -> Body | None: ...

    # --- notices -------------------------------------------------------------------
    async def owed_notices(self, limit: int) -> list[NoticeOwed]: ...

    async def notices_sent(self, sent: Sequence[NoticeSent], now: float) -> list[NoticeSent]:
        """Enqueue each report and clear what it answers, in one transaction; returns
        those actually sent (a notice someone else sent meanwhile is skipped)."""
        ...

    # --- nodes ---------------------------------------------------------------------
    async def heartbeat(self, node: str, info: dict[str, Any], now: float) -> None:
        """``node`` is alive: keep its ``info`` (pid, started, version, ...) and the time."""
        ...

    async def nodes(self, now: float) -> list[dict[str, Any]]:
        """Every node seen, by name: ``name``, ``info``, ``last_seen``,
        ``seconds_since`` and ``claims`` (the live leases it holds)."""
        ...

    # --- views and actions ---------------------------------------------------------
    def summary(self) -> list[QueueSummary]:
        """The four queues (synchronous and cheap: metrics scrapes call it)."""
        ...

    def reusable_bytes(self) -> int:
        """Space inside the spool's own files that new mail fills before the files
        grow (SQLite's free pages; 0 elsewhere). Synchronous and cheap: the reserve
        check at MAIL adds it to the disk's free space."""
        ...

    async def recipients(self, filters: Filters, now: float) -> list[RecipientView]:
        """Active recipients matching the filters (not ``reason``), oldest first."""
        ...

    async def message(self, mid: str) -> MessageView | None: ...

    async def act(self, action: str, rids: Iterable[int], now: float, who: str
                  ) -> dict[str, Any]:
        """retry, hold, release, delete or bounce (an NDR where the sender wants one)."""
        ...

    # --- housekeeping --------------------------------------------------------------
    async def sweep_bodies(self, started: float = 0.0) -> int: ...

    def close(self) -> None: ...

    async def aclose(self) -> None:
        """:meth:`close`, waiting in the loop for connections to end cleanly."""
        ...
