"""What an administrator sees of the queues and does to them: summary, list, show,
reasons, and the actions retry, hold, release, delete and bounce.

Backend-neutral: these read a :class:`~postroom.spool.interface.Spool`'s views and
shape them for the admin API (the console and the commands are its clients).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from ..conversion import header_block
from .interface import Spool
from .records import Filters, MessageView, RecipientView
from .states import ACTIONS, QUEUES, queue_name

__all__ = ["QueueError", "act", "list_queue", "reasons", "select", "show", "summary"]


class QueueError(ValueError):
    """A request that names no queue, message or reason that exists."""


def _check_queue(name: str) -> None:
    if name not in QUEUES:
        raise QueueError(f"no queue {name!r}: the queues are {', '.join(QUEUES)}")


def summary(spool: Spool, now: float) -> list[dict[str, Any]]:
    """The four queues: messages, recipients, oldest arrival, next retry, held."""
    return [{"name": q.name, "messages": q.messages, "recipients": q.recipients,
             "oldest": q.oldest,
             "oldest_age_seconds": None if q.oldest is None else max(0.0, now - q.oldest),
             "next_retry": None if q.next_retry is None else max(q.next_retry, now),
             "held": q.held} for q in spool.summary()]


async def select(spool: Spool, f: Filters, now: float) -> list[RecipientView]:
    """Active recipients matching the filters, the reason group included."""
    if f.queue:
        _check_queue(f.queue)
    rows = await spool.recipients(f, now)
    if f.reason:
        rows = [row for row in rows if _reason_of(row)[0] == f.reason]
    return rows


async def list_queue(spool: Spool, queue: str, f: Filters, now: float,
                     limit: int = 1000) -> dict[str, Any]:
    """Messages with recipients in ``queue`` that match the filters (oldest first)."""
    _check_queue(queue)
    rows = await select(spool, Filters(**{**f.__dict__, "queue": queue}), now)
    messages: dict[str, dict[str, Any]] = {}
    for row in rows:
        m = messages.get(row.message)
        if m is None:
            if len(messages) >= limit:
                continue
            m = messages[row.message] = {
                "id": row.message, "sender": row.sender, "received": row.received,
                "size": row.size, "recipients": []}
        m["recipients"].append(_recipient(row))
    return {"queue": queue, "messages": list(messages.values()),
            "truncated": len({r.message for r in rows}) > len(messages)}


def _recipient(row: RecipientView) -> dict[str, Any]:
    detail = row.detail
    return {"address": row.address, "queue": queue_name(row.direction, row.state),
            "attempts": row.attempts, "held": row.held,
            "next_attempt": row.next_attempt, "last_reply": row.last_reply,
            "status": detail.get("status", ""), "hop": detail.get("hop", ""),
            "remote_ip": detail.get("remote_ip")}


async def show(spool: Spool, mid: str, now: float | None = None) -> dict[str, Any]:
    """One message: envelope, headers, each recipient and every recorded attempt."""
    m = await spool.message(mid)
    if m is None:
        raise QueueError(f"no message {mid!r} in the queue (delivered, returned or deleted?)")
    return _show(m, time.time() if now is None else now)


def _show(m: MessageView, now: float) -> dict[str, Any]:
    by_rcpt: dict[int, list[dict[str, Any]]] = {}
    for a in m.attempts:
        d = a.detail
        by_rcpt.setdefault(a.recipient, []).append({
            "at": a.at, "reply": a.reply, "status": d.get("status", ""),
            "step": d.get("step", ""), "hop": d.get("hop", ""),
            "remote_host": d.get("remote_host"), "remote_ip": d.get("remote_ip"),
            "transcript": d.get("transcript", "")})
    recipients = []
    for r in m.recipients:
        item = _recipient(r)
        item["state"] = r.state
        item["params"] = r.params
        item["transcript"] = r.detail.get("transcript", "")
        item["attempt_log"] = by_rcpt.get(r.id, [])
        if r.lease_owner and r.lease_until > now:       # in flight: who holds the claim
            item["claimed_by"] = r.lease_owner
        recipients.append(item)
    head = header_block(m.body.head(65536)) if m.body is not None else b""
    return {"id": m.id, "received": m.received, "sender": m.sender, "size": m.size,
            "params": m.params, "client": m.client,
            "headers": head.decode("utf-8", "replace"), "recipients": recipients}


# --- reasons -------------------------------------------------------------------------
_VARIABLE = re.compile(r"<[^<>\s]*>|\[[0-9a-fA-F.:]+\]|\b[0-9A-F]{10,}\b|\b\d{5,}\b")


def _reason_of(row: RecipientView) -> tuple[str, dict[str, Any]]:
    """(group id, what the group shows) for a waiting recipient: its remote reply with
    addresses, IPs and ids blanked, its enhanced status, and its next hop."""
    reply = row.last_reply or ("held by the administrator" if row.held else "not tried yet")
    pattern = _VARIABLE.sub("…", reply)
    status = row.detail.get("status", "")
    hop = row.detail.get("hop", "") or ("local mailbox" if row.direction == "inbound" else "")
    key = json.dumps([pattern, status, hop])
    return hashlib.sha256(key.encode()).hexdigest()[:10], {
        "reply": pattern, "status": status, "hop": hop}


async def reasons(spool: Spool, now: float) -> list[dict[str, Any]]:
    """Waiting recipients grouped by why they wait, biggest group first."""
    groups: dict[str, dict[str, Any]] = {}
    for row in await spool.recipients(Filters(), now):
        if row.state != "delivery" or not (row.last_reply or row.held):
            continue
        gid, shown = _reason_of(row)
        g = groups.get(gid)
        if g is None:
            g = groups[gid] = {"id": gid, **shown, "recipients": 0, "messages": set(),
                               "oldest": row.received, "example": row.last_reply,
                               "queues": set()}
        g["recipients"] += 1
        g["messages"].add(row.message)
        g["oldest"] = min(g["oldest"], row.received)
        g["queues"].add(queue_name(row.direction, row.state))
    out = []
    for g in groups.values():
        g["messages"] = len(g["messages"])
        g["queues"] = sorted(g["queues"])
        g["oldest_age_seconds"] = max(0.0, now - g["oldest"])
        out.append(g)
    return sorted(out, key=lambda g: (-g["recipients"], g["oldest"]))


# --- actions -------------------------------------------------------------------------
async def act(spool: Spool, action: str, f: Filters, now: float,
              who: str = "the administrator") -> dict[str, Any]:
    """Apply ``action`` to every active recipient the filters select."""
    if action not in ACTIONS:
        raise QueueError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    rows = await select(spool, f, now)
    return await spool.act(action, [r.id for r in rows], now, who)
