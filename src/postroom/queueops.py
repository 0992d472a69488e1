"""What an administrator sees of the queues and does to them: summary, list, show,
reasons, and the actions retry, hold, release, delete and bounce.

Plain functions over a SQLite connection of the spool: reads run on the reader
connection, actions as one write job each (``SqliteSpool.run``). The admin API is their
only caller; the command line goes through the API.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .body import Body
from .conversion import header_block
from .spool import QUEUES, finish_messages

__all__ = ["ACTIONS", "Filters", "QueueError", "act", "list_queue", "reasons", "select_ids",
           "show", "summary"]

ACTIONS = ("retry", "hold", "release", "delete", "bounce")


class QueueError(ValueError):
    """A request that names no queue, message or reason that exists."""


@dataclass(frozen=True)
class Filters:
    domain: str = ""
    sender: str = ""
    rcpt: str = ""
    older_than: float = 0.0          # seconds
    held: bool | None = None
    reason: str = ""                 # a reason group id from reasons()
    queue: str = ""
    ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not (self.domain or self.sender or self.rcpt or self.older_than or
                    self.held is not None or self.reason or self.queue or self.ids)


def _queue(name: str) -> tuple[str, str]:
    if name not in QUEUES:
        raise QueueError(f"no queue {name!r}: the queues are {', '.join(QUEUES)}")
    direction, state = name.split("-", 1)
    return direction, state


def summary(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """The four queues: messages, recipients, oldest arrival, next retry, held."""
    rows = conn.execute(
        "SELECT r.direction || '-' || r.state, COUNT(DISTINCT r.message), COUNT(*), "
        "MIN(m.received), MIN(CASE WHEN r.held = 0 THEN r.next_attempt END), SUM(r.held) "
        "FROM recipients r JOIN messages m ON m.id = r.message "
        "WHERE r.state IN ('conversion', 'delivery') GROUP BY r.direction, r.state").fetchall()
    found = {name: (msgs, rcpts, oldest, nxt, held)
             for name, msgs, rcpts, oldest, nxt, held in rows}
    out = []
    for name in QUEUES:
        msgs, rcpts, oldest, nxt, held = found.get(name, (0, 0, None, None, 0))
        out.append({"name": name, "messages": msgs, "recipients": rcpts, "oldest": oldest,
                    "oldest_age_seconds": None if oldest is None else max(0.0, now - oldest),
                    "next_retry": None if nxt is None else max(nxt, now), "held": held or 0})
    return out


# --- selecting recipients ------------------------------------------------------------
_REASON_KEY = "r.last_reply, json_extract(r.detail, '$.hop')"


def _where(f: Filters, now: float) -> tuple[str, list[Any]]:
    clauses = ["r.state IN ('conversion', 'delivery')"]
    args: list[Any] = []
    if f.queue:
        direction, state = _queue(f.queue)
        clauses.append("r.direction = ? AND r.state = ?")
        args += [direction, state]
    if f.ids:
        clauses.append(f"r.message IN ({','.join('?' * len(f.ids))})")
        args += list(f.ids)
    if f.domain:
        clauses.append("lower(substr(r.address, instr(r.address, '@') + 1)) = ?")
        args.append(f.domain.lower().rstrip("."))
    if f.rcpt:
        clauses.append("lower(r.address) = ?")
        args.append(f.rcpt.lower())
    if f.sender:
        clauses.append("lower(m.sender) = ?")
        args.append("" if f.sender == "<>" else f.sender.lower())
    if f.older_than:
        clauses.append("m.received <= ?")
        args.append(now - f.older_than)
    if f.held is not None:
        clauses.append("r.held = ?")
        args.append(int(f.held))
    return " AND ".join(clauses), args


def _recipient_rows(conn: sqlite3.Connection, f: Filters, now: float) -> list[sqlite3.Row]:
    where, args = _where(f, now)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT r.id, r.message, r.address, r.direction, r.state, r.attempts, r.held, "
            "r.next_attempt, r.last_reply, r.detail, m.sender, m.received, m.size "
            f"FROM recipients r JOIN messages m ON m.id = r.message WHERE {where} "
            "ORDER BY m.received, r.id", args).fetchall()
    finally:
        conn.row_factory = None
    if f.reason:
        rows = [row for row in rows if _reason_of(row)[0] == f.reason]
    return rows


def list_queue(conn: sqlite3.Connection, queue: str, f: Filters, now: float,
               limit: int = 1000) -> dict[str, Any]:
    """Messages with recipients in ``queue`` that match the filters (oldest first)."""
    _queue(queue)
    rows = _recipient_rows(conn, Filters(**{**f.__dict__, "queue": queue}), now)
    messages: dict[str, dict[str, Any]] = {}
    for row in rows:
        m = messages.get(row["message"])
        if m is None:
            if len(messages) >= limit:
                continue
            m = messages[row["message"]] = {
                "id": row["message"], "sender": row["sender"], "received": row["received"],
                "size": row["size"], "recipients": []}
        m["recipients"].append(_recipient(row))
    return {"queue": queue, "messages": list(messages.values()),
            "truncated": len({r["message"] for r in rows}) > len(messages)}


def _recipient(row: sqlite3.Row) -> dict[str, Any]:
    detail = json.loads(row["detail"] or "{}")
    return {"address": row["address"], "queue": f"{row['direction']}-{row['state']}",
            "attempts": row["attempts"], "held": bool(row["held"]),
            "next_attempt": row["next_attempt"], "last_reply": row["last_reply"],
            "status": detail.get("status", ""), "hop": detail.get("hop", ""),
            "remote_ip": detail.get("remote_ip")}


def show(conn: sqlite3.Connection, mid: str, body: Body | None) -> dict[str, Any]:
    """One message: envelope, headers, each recipient and every recorded attempt."""
    row = conn.execute("SELECT id, received, sender, size, params, client FROM messages "
                       "WHERE id = ?", (mid,)).fetchone()
    if row is None:
        raise QueueError(f"no message {mid!r} in the queue (delivered, returned or deleted?)")
    conn.row_factory = sqlite3.Row
    try:
        rcpts = conn.execute(
            "SELECT r.id, r.message, r.address, r.direction, r.state, r.attempts, r.held, "
            "r.next_attempt, r.last_reply, r.detail, r.params, r.notice, "
            "r.parent FROM recipients r WHERE r.message = ? ORDER BY r.id", (mid,)).fetchall()
        attempts = conn.execute(
            "SELECT recipient, at, reply, detail FROM attempts WHERE message = ? ORDER BY id",
            (mid,)).fetchall()
    finally:
        conn.row_factory = None
    by_rcpt: dict[int, list[dict[str, Any]]] = {}
    for a in attempts:
        d = json.loads(a["detail"] or "{}")
        by_rcpt.setdefault(a["recipient"], []).append({
            "at": a["at"], "reply": a["reply"], "status": d.get("status", ""),
            "step": d.get("step", ""), "hop": d.get("hop", ""),
            "remote_host": d.get("remote_host"), "remote_ip": d.get("remote_ip"),
            "transcript": d.get("transcript", "")})
    recipients = []
    for r in rcpts:
        item = _recipient(r)
        item["state"] = r["state"]
        item["params"] = json.loads(r["params"] or "{}")
        detail = json.loads(r["detail"] or "{}")
        item["transcript"] = detail.get("transcript", "")
        item["attempt_log"] = by_rcpt.get(r["id"], [])
        recipients.append(item)
    head = header_block(body.head(65536)) if body is not None else b""
    return {"id": row[0], "received": row[1], "sender": row[2], "size": row[3],
            "params": json.loads(row[4]), "client": json.loads(row[5]),
            "headers": head.decode("utf-8", "replace"), "recipients": recipients}


# --- reasons -------------------------------------------------------------------------
_VARIABLE = re.compile(r"<[^<>\s]*>|\[[0-9a-fA-F.:]+\]|\b[0-9A-F]{10,}\b|\b\d{5,}\b")


def _reason_of(row: sqlite3.Row) -> tuple[str, dict[str, Any]]:
    """(group id, what the group shows) for a waiting recipient: its remote reply with
    addresses, IPs and ids blanked, its enhanced status, and its next hop."""
    detail = json.loads(row["detail"] or "{}")
    reply = row["last_reply"] or ("held by the administrator" if row["held"] else
                                  "not tried yet")
    pattern = _VARIABLE.sub("…", reply)
    status = detail.get("status", "")
    hop = detail.get("hop", "") or ("local mailbox" if row["direction"] == "inbound" else "")
    key = json.dumps([pattern, status, hop])
    return hashlib.sha256(key.encode()).hexdigest()[:10], {
        "reply": pattern, "status": status, "hop": hop}


def reasons(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Waiting recipients grouped by why they wait, biggest group first."""
    groups: dict[str, dict[str, Any]] = {}
    for row in _recipient_rows(conn, Filters(), now):
        if row["state"] != "delivery" or not (row["last_reply"] or row["held"]):
            continue
        gid, shown = _reason_of(row)
        g = groups.get(gid)
        if g is None:
            g = groups[gid] = {"id": gid, **shown, "recipients": 0, "messages": set(),
                               "oldest": row["received"], "example": row["last_reply"],
                               "queues": set()}
        g["recipients"] += 1
        g["messages"].add(row["message"])
        g["oldest"] = min(g["oldest"], row["received"])
        g["queues"].add(f"{row['direction']}-{row['state']}")
    out = []
    for g in groups.values():
        g["messages"] = len(g["messages"])
        g["queues"] = sorted(g["queues"])
        g["oldest_age_seconds"] = max(0.0, now - g["oldest"])
        out.append(g)
    return sorted(out, key=lambda g: (-g["recipients"], g["oldest"]))


# --- actions -------------------------------------------------------------------------
def select_ids(conn: sqlite3.Connection, f: Filters, now: float) -> list[int]:
    return [row["id"] for row in _recipient_rows(conn, f, now)]


def act(conn: sqlite3.Connection, action: str, rids: Iterable[int], now: float,
        who: str = "the administrator") -> dict[str, Any]:
    """Apply ``action`` to recipient rows (inside a write job). Returns the counts."""
    if action not in ACTIONS:
        raise QueueError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    rids = list(rids)
    messages: set[str] = set()
    changed = 0
    finished: list[tuple[str, str, str]] = []   # (queue id, address, direction) deleted or returned
    for rid in rids:
        row = conn.execute("SELECT message, state, address, direction FROM recipients "
                           "WHERE id = ?", (rid,)).fetchone()
        if row is None or row[1] not in ("conversion", "delivery"):
            continue
        mid = row[0]
        messages.add(mid)
        if action == "retry":
            cur = conn.execute("UPDATE recipients SET next_attempt = ?, held = 0 WHERE id = ? "
                               "AND state = 'delivery'", (now, rid))
        elif action == "hold":
            cur = conn.execute("UPDATE recipients SET held = 1 WHERE id = ?", (rid,))
        elif action == "release":
            cur = conn.execute("UPDATE recipients SET held = 0, next_attempt = MIN(next_attempt, ?) "
                               "WHERE id = ? AND held = 1", (now, rid))
        elif action == "delete":
            cur = conn.execute("UPDATE recipients SET state = 'failed', notice = '', "
                               "last_reply = ?, updated = ?, lease_until = 0 WHERE id = ?",
                               (f"deleted by {who} (no report sent)", now, rid))
        else:   # bounce
            detail = json.dumps({"status": "5.3.0", "step": "queue", "hop": "this server",
                                 "last_attempt": now})
            cur = conn.execute(
                "UPDATE recipients SET state = 'failed', notice = CASE WHEN "
                "(SELECT sender FROM messages WHERE id = recipients.message) != '' "
                "THEN 'failure' ELSE '' END, last_reply = ?, detail = ?, updated = ?, "
                "lease_until = 0 WHERE id = ?",
                (f"554 5.3.0 returned to the sender by {who} before delivery", detail, now, rid))
        changed += cur.rowcount
        if cur.rowcount and action in ("delete", "bounce"):
            finished.append((mid, row[2], row[3]))
    if action in ("delete", "bounce"):
        finish_messages(conn, messages)
    return {"action": action, "recipients": changed, "messages": len(messages),
            "finished": finished}
