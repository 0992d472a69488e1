"""A spool in memory: the same verbs as the SQLite spool, nothing durable.

For unit and component tests of the queue's logic, and as the reference the contract
tests hold every backend to. Never used by the server (it would lose accepted mail).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..body import Body
from .records import (
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
    Transition,
)
from .states import QUEUES, State, check_entry, check_move, wants_notice

__all__ = ["MemorySpool"]


@dataclass
class _Message:
    id: str
    received: float
    sender: str
    size: int
    params: dict[str, str]
    client: dict[str, Any]
    data: bytes
    body_file: str


@dataclass
class _Rcpt:
    id: int
    message: str
    address: str
    params: dict[str, str]
    direction: str
    state: str
    next_attempt: float
    updated: float
    parent: int | None = None
    attempts: int = 0
    held: bool = False
    last_reply: str = ""
    notice: str = ""
    warned: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    destination: str = ""
    lease_until: float = 0.0
    lease_owner: str = ""
    claim: int = 0


class MemorySpool:
    def __init__(self, bodies: Path, clock: Callable[[], float]) -> None:
        self.bodies = bodies
        self.clock = clock
        self._messages: dict[str, _Message] = {}
        self._rcpts: dict[int, _Rcpt] = {}
        self._attempts: list[tuple[str, AttemptView]] = []
        self._dead: set[str] = set()
        self._next_id = 1
        self._listeners: list[Callable[[], None]] = []
        self._nodes: dict[str, tuple[dict[str, Any], float]] = {}

    # --- helpers -------------------------------------------------------------------
    def _add_rcpt(self, mid: str, address: str, params: dict[str, str], direction: str,
                  now: float, parent: int | None = None) -> _Rcpt:
        r = _Rcpt(self._next_id, mid, address, dict(params), direction, State.CONVERSION, now,
                  now, parent)
        self._rcpts[r.id] = r
        self._next_id += 1
        return r

    def _insert(self, m: NewMessage, now: float) -> None:
        if m.queue_id in self._messages:
            raise ValueError(f"queue id {m.queue_id} exists")
        self._messages[m.queue_id] = _Message(m.queue_id, now, m.sender, m.size, dict(m.params),
                                              dict(m.client), m.data, m.body_file)
        for r in m.recipients:
            check_entry(r.state)
        for r in m.recipients:
            new = self._add_rcpt(m.queue_id, r.address, r.params, r.direction, now)
            new.state, new.destination = State(r.state), r.destination

    def _finish(self, mids: Iterable[str]) -> None:
        for mid in set(mids):
            mine = [r for r in self._rcpts.values() if r.message == mid]
            if any(r.state in (State.CONVERSION, State.DELIVERY) or r.notice or r.warned == 1
                   for r in mine):
                continue
            for r in mine:
                del self._rcpts[r.id]
            self._attempts = [a for a in self._attempts if a[0] != mid]
            m = self._messages.pop(mid, None)
            if m is not None and m.body_file:
                self._dead.add(m.body_file)

    def _body(self, m: _Message) -> Body:
        if not m.body_file:
            return Body(m.data)
        return Body(m.data, self.bodies / m.body_file, m.size - len(m.data))

    def _view(self, r: _Rcpt) -> RecipientView:
        m = self._messages[r.message]
        return RecipientView(r.id, r.message, r.address, r.direction, r.state, r.attempts,
                             r.held, r.next_attempt, r.last_reply, copy.deepcopy(r.detail),
                             m.sender, m.received, m.size, dict(r.params), r.notice, r.parent,
                             r.lease_owner, r.lease_until)

    def _claim_of(self, r: _Rcpt) -> Claim:
        m = self._messages[r.message]
        return Claim(r.id, r.message, r.address, m.sender, r.attempts, m.received,
                     dict(r.params), r.destination, r.claim, r.direction)

    @staticmethod
    def _apply(r: _Rcpt, d: Conversion, now: float) -> None:
        r.state = d.state
        r.destination = d.destination
        r.updated = now
        r.next_attempt = now if d.next_attempt is None else d.next_attempt
        r.last_reply = d.last_reply
        if d.detail is not None:
            r.detail = copy.deepcopy(d.detail)
        r.notice = d.notice

    # --- receiving -----------------------------------------------------------------
    async def enqueue(self, message: NewMessage) -> None:
        self._insert(message, self.clock())
        for listener in self._listeners:
            listener()

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def start(self, listen: bool = True) -> None:
        pass

    async def aclose(self) -> None:
        self.close()

    # --- conversion ----------------------------------------------------------------
    async def pending_conversion(self, limit: int) -> list[Claim]:
        rows = sorted((r for r in self._rcpts.values() if r.state == State.CONVERSION),
                      key=lambda r: r.id)
        return [self._claim_of(r) for r in rows[:limit]]

    async def convert(self, decisions: Sequence[Conversion], now: float) -> None:
        touched = set()
        for d in decisions:
            r = self._rcpts.get(d.rid)
            if r is None or r.state != State.CONVERSION:
                continue
            check_move(r.state, d.state)
            touched.add(r.message)
            self._apply(r, d, now)
            if d.state != State.EXPANDED:
                continue
            present = {x.address for x in self._rcpts.values()
                       if x.message == r.message and x.state != State.EXPANDED}
            for t in d.targets:
                if t.address not in present:
                    new = self._add_rcpt(r.message, t.address, t.params, t.direction, now, r.id)
                    self._apply(new, t.outcome, now)
        self._finish(touched)

    # --- delivery ------------------------------------------------------------------
    @staticmethod
    def _is_due(r: _Rcpt, now: float, owner: str) -> bool:
        return r.state == State.DELIVERY and not r.held and r.next_attempt <= now and \
            (r.lease_until <= now or r.lease_owner == owner)

    async def due(self, direction: str, now: float, limit: int, owner: str = "") -> list[Claim]:
        rows = sorted((r for r in self._rcpts.values()
                       if r.direction == direction and self._is_due(r, now, owner)),
                      key=lambda r: (r.next_attempt, r.id))
        return [self._claim_of(r) for r in rows[:limit]]

    async def claim(self, due: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[Claim]:
        out = []
        for c in due:
            r = self._rcpts.get(c.rid)
            if r is None or not self._is_due(r, now, owner):
                continue
            r.lease_until, r.lease_owner, r.claim = now + lease, owner, r.claim + 1
            out.append(self._claim_of(r))
        return out

    async def renew(self, claims: Sequence[Claim], now: float, owner: str, lease: float
                    ) -> list[int]:
        lost = []
        for c in claims:
            r = self._rcpts.get(c.rid)
            if r is None or r.claim != c.token or r.lease_owner != owner or \
                    r.state != State.DELIVERY:
                lost.append(c.rid)
                continue
            r.lease_until = now + lease
        return lost

    async def release_leases(self, owner: str) -> None:
        for r in self._rcpts.values():
            if r.lease_until > 0 and r.lease_owner in (owner, ""):
                r.lease_until, r.lease_owner = 0.0, ""

    async def record(self, transitions: Sequence[Transition], now: float) -> list[int]:
        stale = []
        for t in transitions:
            check_move(State.DELIVERY, t.state)
            r = self._rcpts.get(t.claim.rid)
            if r is None or r.claim != t.claim.token or r.state != State.DELIVERY:
                stale.append(t.claim.rid)
                continue
            r.state, r.last_reply, r.updated = t.state, t.reply, now
            r.attempts = r.attempts + 1 if t.attempts is None else t.attempts
            if t.next_attempt is not None:
                r.next_attempt = t.next_attempt
            r.notice = t.notice
            if t.warn and r.warned == 0:
                r.warned = 1
            r.lease_until, r.lease_owner = 0.0, ""
            r.detail = copy.deepcopy(t.detail)
            if t.log_attempt:
                self._attempts.append((r.message, AttemptView(r.id, now, t.reply,
                                                              copy.deepcopy(t.detail))))
        self._finish(t.claim.message for t in transitions)
        return stale

    async def defer_destination(self, ref: str, until: float, reply: str, detail: str,
                                now: float, owner: str = "") -> int:
        n = 0
        for r in self._rcpts.values():
            if r.destination == ref and r.state == State.DELIVERY and \
                    r.direction == "outbound" and (r.lease_until <= now or r.lease_owner == owner) \
                    and r.next_attempt < until:
                r.next_attempt = until
                if not r.last_reply and reply:
                    r.detail = json.loads(detail)
                if not r.last_reply:
                    r.last_reply = reply
                n += 1
        return n

    async def message_bodies(self, ids: Sequence[str]
                             ) -> dict[str, tuple[Body, dict[str, str]]]:
        return {mid: (self._body(self._messages[mid]), dict(self._messages[mid].params))
                for mid in ids if mid in self._messages}

    async def body(self, mid: str) -> Body | None:
        m = self._messages.get(mid)
        return None if m is None else self._body(m)

    # --- notices -------------------------------------------------------------------
    async def owed_notices(self, limit: int) -> list[NoticeOwed]:
        rows = sorted((r for r in self._rcpts.values() if r.notice or r.warned == 1),
                      key=lambda r: (r.message, r.id))[:limit]
        out = []
        for r in rows:
            m = self._messages[r.message]
            out.append(NoticeOwed(r.id, r.message, r.address, dict(r.params), r.state,
                                  r.last_reply, copy.deepcopy(r.detail), r.notice or "delay",
                                  m.sender, m.received, dict(m.params)))
        return out

    async def notices_sent(self, sent: Sequence[NoticeSent], now: float) -> list[NoticeSent]:
        done = []
        for n in sent:
            cleared = 0
            for rid in n.rids:
                r = self._rcpts.get(rid)
                if r is None:
                    continue
                if n.kind == "delay" and r.warned == 1:
                    r.warned, cleared = 2, cleared + 1
                elif n.kind != "delay" and r.notice == n.kind:
                    r.notice, cleared = "", cleared + 1
            if not cleared:
                continue
            if n.report is not None:
                self._insert(n.report, now)
            done.append(n)
        self._finish(n.message for n in sent)
        if any(n.report is not None for n in done):
            for listener in self._listeners:
                listener()
        return done

    # --- nodes ---------------------------------------------------------------------
    async def heartbeat(self, node: str, info: dict[str, Any], now: float) -> None:
        self._nodes[node] = (copy.deepcopy(info), now)

    async def nodes(self, now: float) -> list[dict[str, Any]]:
        claims: dict[str, int] = {}
        for r in self._rcpts.values():
            if r.state == State.DELIVERY and r.lease_until > now:
                claims[r.lease_owner] = claims.get(r.lease_owner, 0) + 1
        return [{"name": name, "info": copy.deepcopy(info), "last_seen": seen,
                 "seconds_since": max(0.0, now - seen), "claims": claims.get(name, 0)}
                for name, (info, seen) in sorted(self._nodes.items())]

    # --- views ---------------------------------------------------------------------
    def reusable_bytes(self) -> int:
        return 0

    def summary(self) -> list[QueueSummary]:
        out = []
        for name in QUEUES:
            direction, state = name.split("-", 1)
            rows = [r for r in self._rcpts.values() if (r.direction, r.state) == (direction, state)]
            if not rows:
                out.append(QueueSummary(name, 0, 0, None, 0))
                continue
            waiting = [r.next_attempt for r in rows if not r.held]
            out.append(QueueSummary(
                name, len({r.message for r in rows}), len(rows),
                min(self._messages[r.message].received for r in rows),
                sum(1 for r in rows if r.held), min(waiting) if waiting else None))
        return out

    async def recipients(self, filters: Filters, now: float) -> list[RecipientView]:
        views = [self._view(r) for r in self._rcpts.values()]
        return sorted((v for v in views if filters.matches(v, now)),
                      key=lambda v: (v.received, v.id))

    async def message(self, mid: str) -> MessageView | None:
        m = self._messages.get(mid)
        if m is None:
            return None
        rcpts = tuple(self._view(r) for r in sorted(self._rcpts.values(), key=lambda r: r.id)
                      if r.message == mid)
        attempts = tuple(a for owner, a in self._attempts if owner == mid)
        return MessageView(m.id, m.received, m.sender, m.size, dict(m.params), dict(m.client),
                           rcpts, attempts, self._body(m))

    # --- actions -------------------------------------------------------------------
    async def act(self, action: str, rids: Iterable[int], now: float, who: str
                  ) -> dict[str, Any]:
        messages: set[str] = set()
        changed = 0
        finished: list[tuple[str, str, str]] = []
        for rid in rids:
            r = self._rcpts.get(rid)
            if r is None or r.state not in (State.CONVERSION, State.DELIVERY):
                continue
            messages.add(r.message)
            did = True
            if action == "retry":
                did = r.state == State.DELIVERY
                if did:
                    r.next_attempt, r.held = now, False
            elif action == "hold":
                r.held = True
            elif action == "release":
                did = r.held
                if did:
                    r.held, r.next_attempt = False, min(r.next_attempt, now)
            elif action == "delete":
                check_move(r.state, State.FAILED)
                r.state, r.notice, r.updated, r.lease_until = State.FAILED, "", now, 0.0
                r.last_reply = f"deleted by {who} (no report sent)"
            else:
                check_move(r.state, State.FAILED)
                sender = self._messages[r.message].sender
                r.state, r.updated, r.lease_until = State.FAILED, now, 0.0
                r.notice = "failure" if wants_notice("failure", sender, r.params) else ""
                r.last_reply = f"554 5.3.0 returned to the sender by {who} before delivery"
                r.detail = {"status": "5.3.0", "step": "queue", "hop": "this server",
                            "last_attempt": now}
            if did:
                changed += 1
                if action in ("delete", "bounce"):
                    finished.append((r.message, r.address, r.direction))
        if action in ("delete", "bounce"):
            self._finish(messages)
        return {"action": action, "recipients": changed, "messages": len(messages),
                "finished": finished}

    # --- housekeeping --------------------------------------------------------------
    async def sweep_bodies(self, started: float = 0.0) -> int:
        removed = 0
        for name in list(self._dead):
            try:
                os.unlink(self.bodies / name)
            except FileNotFoundError:
                pass
            self._dead.discard(name)
            removed += 1
        return removed

    def close(self) -> None:
        pass

    def snapshot(self) -> list[RecipientView]:
        """Every recipient row, final ones included (tests)."""
        return [replace(self._view(r)) for r in sorted(self._rcpts.values(), key=lambda r: r.id)]
