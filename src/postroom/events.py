"""The event log and diagnostic logging (Exchange's categories, without the restart).

An event is something an administrator may want to know later: a message received, a
relay refused, a delivery deferred, a component stopped. Each kind has a stable numeric
id, a category, a severity and the diagnostic level it needs (CATALOGUE below;
docs/events.md explains each one and what to do about it).

Diagnostic logging decides which events are kept. Each category has a level: ``none``,
``minimum``, ``medium`` or ``maximum``. An event is recorded when its level is at most
the category's level; errors are always recorded. A peer address or a recipient domain
may have its own levels, for looking at one sender without flooding the log.

Recorded events go to two places, written by a background thread so that no caller
waits:

* ``<data_dir>/events.sqlite3``, which ``postroom events`` and ``postroom trace`` read.
  Its commits are not fsync'd (``synchronous=NORMAL``): a crash may lose the last
  fraction of a second of events, never mail.
* ``<data_dir>/logs/events.jsonl``, one JSON object per line, rotated at 20 MiB with
  ``[logging] retention`` old files kept.

At ``maximum``, ``smtp_protocol`` writes whole SMTP conversations to
``logs/protocol.jsonl`` (AUTH secrets replaced by ``****``), and ``message_archival``
keeps a copy of every accepted message under ``<data_dir>/archive/<day>/`` for
``[logging] archive_days``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CATALOGUE", "CATEGORIES", "LEVELS", "SEVERITIES", "EventKind", "EventLog",
           "Levels", "connect_events", "find_messages", "query_events", "timeline"]

CATEGORIES = ("initialization", "addressing", "message_transfer", "smtp_interface",
              "internal_processing", "smtp_protocol", "message_archival")
LEVELS = ("none", "minimum", "medium", "maximum")
SEVERITIES = ("error", "warning", "info")

log = logging.getLogger("postroom.events")
ROTATE_AT = 20 * 1024 * 1024


class JsonlFile:
    """An append-only JSON-lines file. The main process rotates it at ROTATE_AT
    (``name.1`` … ``name.<retention>``); the other processes append to whatever file
    has the name, reopening it when it was rotated away."""

    def __init__(self, path: Path, *, rotate: bool, retention: int) -> None:
        self.path = path
        self.rotate = rotate
        self.retention = retention
        self._f: Any = None
        self._complained = False

    def write(self, lines: list[str]) -> None:
        try:
            f = self._open()
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            if self.rotate and f.tell() > ROTATE_AT:
                self._rotate()
        except OSError as exc:
            if not self._complained:        # a full disk: say it once, keep the mail going
                self._complained = True
                log.warning("cannot write %s: %s; its lines are lost until it can", self.path,
                            exc)
            self.close()

    def _open(self) -> Any:
        if self._f is not None and not self.rotate:
            try:
                if os.stat(self.path).st_ino != os.fstat(self._f.fileno()).st_ino:
                    self.close()
            except FileNotFoundError:
                self.close()
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._complained = False
        return self._f

    def _rotate(self) -> None:
        self.close()
        for n in range(self.retention - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


@dataclass(frozen=True)
class EventKind:
    id: int
    category: str
    level: str            # the diagnostic level at which it is recorded
    severity: str
    title: str
    meaning: str
    action: str


def _k(id_: int, category: str, level: str, severity: str, title: str, meaning: str,
       action: str) -> EventKind:
    return EventKind(id_, category, level, severity, title, meaning, action)


CATALOGUE: dict[int, EventKind] = {k.id: k for k in (
    _k(1001, "initialization", "minimum", "info", "server started",
       "The server started: its listeners, processes and data directory are in the text.",
       "Nothing."),
    _k(1002, "initialization", "minimum", "info", "server stopping",
       "The server received SIGTERM or SIGINT and is stopping. Accepted mail stays queued.",
       "Nothing, unless nobody meant to stop it."),
    _k(1003, "initialization", "minimum", "warning", "configuration reloaded",
       "postroom reload (or SIGHUP) applied a new configuration. Keys that need a restart "
       "are named.",
       "Restart the server if the text names keys that need it."),
    _k(1004, "initialization", "minimum", "error", "reload refused",
       "A reload found an invalid configuration and changed nothing.",
       "Fix the key named in the text (postroom check shows every problem), then reload."),
    _k(1005, "initialization", "minimum", "warning", "component stopped or started",
       "An administrator stopped, started or restarted a component.",
       "Start it again when the work is done: postroom status lists what is stopped."),
    _k(1006, "initialization", "medium", "info", "diagnostic logging changed",
       "An administrator changed the level of a category.",
       "Put it back to minimum when done: maximum writes a lot."),
    _k(1007, "initialization", "minimum", "warning", "configuration edited",
       "An administrator changed the address spaces or relay settings in the console: the "
       "file was validated, written (the previous one kept as <file>.bak) and reloaded.",
       "Nothing, unless nobody meant to; the .bak file holds the previous version."),
    _k(1008, "initialization", "minimum", "info", "mailbox changed",
       "An administrator added or removed a mailbox, or reset its password, through the "
       "admin API (the console).",
       "Nothing."),
    _k(2001, "addressing", "minimum", "warning", "relaying refused",
       "A client that is neither trusted nor authenticated asked to send to another "
       "domain: 550 5.7.1 Relaying mail to <address> is not allowed.",
       "If the client is yours, have it authenticate on the submission port, or add its "
       "network to [relay] trusted_networks. postroom explain shows the decision."),
    _k(2002, "addressing", "minimum", "warning", "no address space",
       "No [[route]] covers the recipient's domain (550 5.4.4).",
       "Add a [[route]] for the domain, or a catch-all match = \"*\"."),
    _k(2003, "addressing", "medium", "info", "recipient refused",
       "A recipient was refused at RCPT for another reason (unknown mailbox, syntax, "
       "limits). The reply is in the text.",
       "Unknown mailbox: create it with postroom users add, or add an alias."),
    _k(2004, "addressing", "minimum", "info", "recipient routed",
       "The queue manager chose where a recipient goes: an alias's targets, or an "
       "address space and its next hop. A plain local mailbox is recorded only at medium "
       "(its delivery event says as much).",
       "Nothing; postroom trace shows it in the message's timeline."),
    _k(3001, "message_transfer", "minimum", "info", "message received",
       "A message got its 250: peer, HELO, TLS, AUTH identity, sender, recipients, size.",
       "Nothing."),
    _k(3002, "message_transfer", "minimum", "info", "delivered",
       "A recipient was delivered to its mailbox, or accepted by the next hop.",
       "Nothing."),
    _k(3003, "message_transfer", "minimum", "warning", "deferred",
       "A delivery attempt failed for now; the recipient waits for its next retry. The "
       "text has the next hop, its IP and its reply.",
       "postroom queue reasons groups the waiting mail by cause."),
    _k(3004, "message_transfer", "minimum", "warning", "failed",
       "A recipient failed for good (a 5xx reply, an expired lifetime, a loop); the "
       "sender gets an NDR unless it asked for none.",
       "Read the reply in the text: it names the server that refused and what to change."),
    _k(3005, "message_transfer", "minimum", "info", "notice sent",
       "A delivery status notification (failure = NDR, delay, success) was queued for the "
       "sender; its own queue id is in the text.",
       "Nothing."),
    _k(3006, "message_transfer", "minimum", "warning", "destination backed off",
       "Every host of a destination failed; new and queued mail for it waits until the "
       "next retry instead of trying again at once.",
       "postroom queue reasons shows the cause; postroom queue retry --reason ID --all "
       "retries at once after fixing it."),
    _k(3007, "message_transfer", "minimum", "warning", "queue action",
       "An administrator retried, held, released, deleted or returned queued mail.",
       "Nothing."),
    _k(3101, "message_transfer", "minimum", "info", "sender authentication checked",
       "Inbound verification (SPF, DKIM, DMARC, ARC) of a message on the MX listener: "
       "each method's result, and the action (accept, quarantine, reject, defer) with "
       "its reason. The same results are in the message's Authentication-Results field.",
       "Nothing for accept. For a reject or quarantine you did not expect, the text names "
       "the check and the domain whose DNS records failed (docs/verification.md)."),
    _k(3102, "message_transfer", "minimum", "warning", "forged Authentication-Results",
       "A message from outside carried Authentication-Results fields that claim this "
       "server's authserv-id; they were renamed X-Forged-Authn-Results (RFC 8601 §5).",
       "Nothing: the message is delivered; the renamed fields cannot mislead a reader."),
    _k(3103, "message_transfer", "minimum", "warning", "message queued unsigned",
       "Mail of one of our users that leaves could not be DKIM-signed (or a forwarded "
       "message ARC-sealed): it was queued without the signature rather than refused.",
       "postroom.log has the error with its trace; postroom dkim show and postroom check "
       "test the keys. Receivers that enforce DMARC may refuse such mail."),
    _k(4001, "smtp_interface", "medium", "info", "connection",
       "A client connected (medium) and disconnected (maximum).",
       "Nothing."),
    _k(4002, "smtp_interface", "minimum", "warning", "connection refused by a limit",
       "A connection was refused: too many in all, or from one address, or the listener's "
       "component is stopped.",
       "Raise [smtp] max_connections or max_connections_per_peer if the load is real."),
    _k(4003, "smtp_interface", "minimum", "warning", "authentication failed",
       "AUTH failed for a username (never the password). Repeated failures lead to 4004.",
       "If it is a user: postroom users passwd ADDRESS. If not, it is a guessing attack."),
    _k(4004, "smtp_interface", "minimum", "warning", "authentication throttled",
       "An address failed AUTH too often and is refused for a while.",
       "Nothing, unless it is your own client; then fix its password."),
    _k(4005, "smtp_interface", "medium", "info", "TLS failed or timed out",
       "A TLS handshake failed, or a session timed out.",
       "Check the client's TLS settings and the certificate in [tls]."),
    _k(4006, "smtp_interface", "minimum", "warning", "console login failed",
       "A login to the web console failed: a wrong password, or an account that is not "
       "an admin. The username is in the text, never the password. After five "
       "failures from one client address within 15 minutes, its logins are refused for a "
       "while (one event says so).",
       "If it is you: postroom users passwd ADDRESS. If not, someone is guessing."),
    _k(4007, "smtp_interface", "medium", "info", "console login",
       "An administrator logged in to the web console, or out.",
       "Nothing."),
    _k(5001, "internal_processing", "minimum", "error", "storage full",
       "The disk of the data directory is full: acceptance answers 452 4.3.1 and deliveries "
       "wait.",
       "Free space on the disk of data_dir; everything resumes by itself."),
    _k(5002, "internal_processing", "minimum", "error", "internal error",
       "An unexpected error; the text has a reference that also appears in postroom.log "
       "with the details.",
       "Report it with the reference and the matching lines of postroom.log."),
    _k(5003, "internal_processing", "minimum", "error", "spool unreachable",
       "The queue's PostgreSQL database ([spool] url) cannot be reached: new mail is "
       "answered 451 4.3.0 and deliveries wait. Said once a minute while it lasts; the "
       "node resumes by itself when the database is back.",
       "Check that PostgreSQL runs and that this node can reach it (postroom status, "
       "psql with the same URL)."),
    _k(5004, "internal_processing", "minimum", "error", "mail store down",
       "Dovecot, which the imap component runs, exited when nobody asked it to (killed, "
       "crashed) or could not start; the text has its exit status and the last errors "
       "of its log. It is started again after 1, 2, 4 ... up to 60 seconds. Meanwhile "
       "mail is still accepted and delivered to the Maildirs (with [imap] delivery = "
       "\"lmtp\", local mail waits in the queue); only IMAP clients cannot connect.",
       "If it keeps failing: read data_dir/imap/dovecot.log and postroom doctor's store "
       "step; postroom restart imap tries again at once."),
    _k(5005, "internal_processing", "minimum", "warning", "mail store restarted",
       "Dovecot is running again after event 5004; the text says after how many attempts "
       "and how long it was down.",
       "Nothing, unless it happens often: then find why it died in data_dir/imap/dovecot.log."),
    _k(6001, "smtp_protocol", "maximum", "info", "conversation logged",
       "At maximum, each session's conversation goes to logs/protocol.jsonl; this event "
       "marks where a session's lines start.",
       "Lower the level when done: the protocol log is large."),
    _k(7001, "message_archival", "maximum", "info", "message archived",
       "At maximum, a copy of an accepted message was kept in data_dir/archive.",
       "Lower the level when done: archived copies hold users' mail."),
)}


@dataclass
class Levels:
    """Category levels, with optional overrides for one peer address or domain."""

    default: dict[str, int]
    peers: dict[str, dict[str, int]]
    domains: dict[str, dict[str, int]]

    @classmethod
    def from_names(cls, names: Mapping[str, str] | None = None) -> Levels:
        base = {c: LEVELS.index("minimum") for c in CATEGORIES}
        for c, level in (names or {}).items():
            base[c] = LEVELS.index(level)
        return cls(base, {}, {})

    def level(self, category: str, peer: str | None = None, domain: str | None = None) -> int:
        value = self.default.get(category, 1)
        if domain and domain in self.domains:
            value = max(value, self.domains[domain].get(category, 0))
        if peer and peer in self.peers:
            value = max(value, self.peers[peer].get(category, 0))
        return value

    def set(self, category: str, level: str, peer: str = "", domain: str = "") -> None:
        cats = CATEGORIES if category == "all" else (category,)
        if any(c not in CATEGORIES for c in cats):
            raise ValueError(f"no category {category!r}: use all or one of "
                             f"{', '.join(CATEGORIES)}")
        if level not in LEVELS:
            raise ValueError(f"no level {level!r}: use one of {', '.join(LEVELS)}")
        target = self.default
        if peer:
            target = self.peers.setdefault(peer, {})
        elif domain:
            target = self.domains.setdefault(domain.lower(), {})
        for c in cats:
            target[c] = LEVELS.index(level)
        for table in (self.peers, self.domains):
            for key in [k for k, v in table.items() if not any(v.values())]:
                del table[key]

    def as_json(self) -> dict[str, Any]:
        def names(d: dict[str, int]) -> dict[str, str]:
            return {c: LEVELS[v] for c, v in d.items()}
        return {"categories": names(self.default),
                "peers": {p: names(v) for p, v in self.peers.items()},
                "domains": {d: names(v) for d, v in self.domains.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Levels:
        def idx(d: Mapping[str, str]) -> dict[str, int]:
            return {c: LEVELS.index(v) for c, v in d.items() if c in CATEGORIES and v in LEVELS}
        out = cls.from_names()
        out.default.update(idx(data.get("categories", {})))
        out.peers = {p: idx(v) for p, v in data.get("peers", {}).items()}
        out.domains = {d: idx(v) for d, v in data.get("domains", {}).items()}
        return out


SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY,
    at        REAL NOT NULL,
    kind      INTEGER NOT NULL,
    severity  TEXT NOT NULL,
    category  TEXT NOT NULL,
    text      TEXT NOT NULL,
    queue_id  TEXT,
    peer      TEXT,
    fields    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE INDEX IF NOT EXISTS events_queue ON events (queue_id) WHERE queue_id IS NOT NULL;
"""


def connect_events(path: Path) -> sqlite3.Connection:
    fresh = not path.exists()
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    # switching to WAL takes an exclusive lock that the busy handler does not wait for;
    # "serve" creates the file before the front ends start, so they find WAL already set
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    # keep the WAL small (checkpoint every 100 pages, truncate to 512 KiB): left at
    # SQLite's default it grows to 4 MiB, which on a small disk takes the space mail needs
    conn.execute("PRAGMA wal_autocheckpoint=100")
    conn.execute("PRAGMA journal_size_limit=524288")
    conn.executescript(SCHEMA)
    if fresh:
        os.chmod(path, 0o600)
    return conn


# An event's JSON document (json.dumps with these options makes a new encoder a call).
_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode

# One batch of events, given as a JSON array of their documents, in one statement.
INSERT_BATCH = (
    "INSERT INTO events (at, kind, severity, category, text, queue_id, peer, fields) "
    "SELECT json_extract(value, '$.at'), json_extract(value, '$.id'), "
    "json_extract(value, '$.severity'), json_extract(value, '$.category'), "
    "json_extract(value, '$.text'), json_extract(value, '$.queue_id'), "
    "json_extract(value, '$.peer'), value FROM json_each(?)")


def _has_json_each(conn: sqlite3.Connection) -> bool:
    """SQLite's JSON functions are built in since 3.38 and a common option before."""
    try:
        conn.execute("SELECT count(*) FROM json_each('[]')").fetchall()
        return True
    except sqlite3.OperationalError:
        return False


class EventLog:
    """Records events (see the module docstring); one per process."""

    FLUSH_EVERY = 0.2

    def __init__(self, path: Path, levels: Levels | None = None, *, archive: Path | None = None,
                 archive_days: int = 7, clock: Any = time.time, logs: Path | None = None,
                 rotate: bool = True, retention: int = 5) -> None:
        self.path = path
        logs = logs or path.parent / "logs"
        self._jsonl = JsonlFile(logs / "events.jsonl", rotate=rotate, retention=retention)
        self._protocol = JsonlFile(logs / "protocol.jsonl", rotate=rotate, retention=retention)
        self.levels = levels or Levels.from_names()
        self.archive = archive
        self.archive_days = archive_days
        self.clock = clock
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._conn = connect_events(path)
        self._json_each = _has_json_each(self._conn)
        self._failing = False
        self._thread = threading.Thread(target=self._writer, name="event-writer", daemon=True)
        self._thread.start()

    # --- deciding ------------------------------------------------------------------
    def enabled(self, category: str, level: str, peer: str | None = None,
                domain: str | None = None) -> bool:
        return LEVELS.index(level) <= self.levels.level(category, peer, domain)

    def emit(self, kind_id: int, text: str, *, queue_id: str | None = None,
             peer: str | None = None, domain: str | None = None, level: str | None = None,
             **fields: Any) -> None:
        """Record an event if its category's level (for this peer or domain) asks for
        it. ``level`` overrides the kind's level for a more detailed variant."""
        kind = CATALOGUE[kind_id]
        if kind.severity != "error" and not self.enabled(kind.category, level or kind.level,
                                                         peer, domain):
            return
        self._queue.put((self.clock(), kind_id, kind.severity, kind.category, text, queue_id,
                         peer, fields))

    def protocol(self, session: str, peer: str, direction: str, line: str) -> None:
        """One line of an SMTP conversation (the caller redacts AUTH)."""
        self._queue.put(("protocol", json.dumps(
            {"at": round(self.clock(), 6), "session": session, "peer": peer,
             "dir": direction, "line": line}, ensure_ascii=False)))

    def archive_copy(self, queue_id: str, data: Iterable[bytes]) -> Path | None:
        """Keep a copy of an accepted message (message_archival at maximum)."""
        if self.archive is None:
            return None
        day = time.strftime("%Y-%m-%d", time.gmtime(self.clock()))
        folder = self.archive / day
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{queue_id}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk in data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return path

    def expire_archive(self) -> int:
        """Remove archive days older than ``archive_days``."""
        if self.archive is None or not self.archive.is_dir():
            return 0
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(self.clock() - self.archive_days * 86400))
        removed = 0
        for day in self.archive.iterdir():
            if day.is_dir() and day.name < cutoff:
                shutil.rmtree(day, ignore_errors=True)
                removed += 1
        return removed

    # --- writing -------------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            if item is not None:
                # sleep rather than wait for each next item: a waiting reader is woken
                # (a futex and a GIL hand-off) by every put, one per event
                time.sleep(self.FLUSH_EVERY)
            while item is not None and len(batch) < 5000:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            rows = [b for b in batch if b is not None and b[0] != "protocol"]
            if rows:
                self._write(rows)
            protocol = [b[1] for b in batch if b is not None and b[0] == "protocol"]
            if protocol:
                self._protocol.write(protocol)
            if None in batch:
                return

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        # one JSON document per event: the line in events.jsonl, and the row's fields
        # (the row's own columns are left out of them when read back)
        encode = _encode
        docs = [encode({"at": round(at, 6), "id": kind, "severity": sev, "category": cat,
                        "text": text, "queue_id": qid, "peer": peer, **fields})
                for at, kind, sev, cat, text, qid, peer, fields in rows]
        self._jsonl.write(docs)
        conn = self._conn
        try:
            # one transaction for the batch: the connection is in autocommit mode, where
            # executemany alone commits every row by itself (about 50 us of CPU a row
            # instead of 5 in batches of a few hundred)
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._insert(conn, rows, docs)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            self._failing = False
        except sqlite3.Error as exc:
            if not self._failing:            # once until it works again (a full disk)
                self._failing = True
                log.warning("could not record %d events in %s: %s; events are lost until "
                            "it can be written", len(rows), self.path, exc)

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]],
                docs: list[str]) -> None:
        if self._json_each:
            # The batch in one statement: executemany steps once a row, and each step
            # gives up the GIL and takes it back from the busy event loop. A document
            # SQLite's JSON parser refuses (a NaN in its fields) leaves nothing behind:
            # the batch then goes row by row.
            try:
                conn.execute(INSERT_BATCH, ("[" + ",".join(docs) + "]",))
                return
            except sqlite3.OperationalError as exc:
                if "JSON" not in str(exc):
                    raise
        conn.executemany(
            "INSERT INTO events (at, kind, severity, category, text, queue_id, peer, fields) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(at, kind, sev, cat, text, qid, peer, doc) for
             (at, kind, sev, cat, text, qid, peer, _), doc in zip(rows, docs, strict=True)])

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything emitted so far is written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(self.FLUSH_EVERY + 0.05)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._conn.close()
        self._jsonl.close()
        self._protocol.close()


def query_events(conn: sqlite3.Connection, *, since: float | None = None,
                 severity: str = "", category: str = "", queue_id: str = "",
                 after_id: int = 0, limit: int = 1000, newest: bool = False
                 ) -> list[dict[str, Any]]:
    """Events, oldest first (with ``newest``: the last ``limit`` of them).
    ``severity`` means that severity or worse."""
    clauses: list[str] = ["id > ?"]
    args: list[Any] = [after_id]
    if since is not None:
        clauses.append("at >= ?")
        args.append(since)
    if severity:
        if severity not in SEVERITIES:
            raise ValueError(f"no severity {severity!r}: use {', '.join(SEVERITIES)}")
        allowed = SEVERITIES[: SEVERITIES.index(severity) + 1]
        clauses.append(f"severity IN ({','.join('?' * len(allowed))})")
        args += allowed
    if category:
        if category not in CATEGORIES:
            raise ValueError(f"no category {category!r}: use {', '.join(CATEGORIES)}")
        clauses.append("category = ?")
        args.append(category)
    if queue_id:
        clauses.append("queue_id = ?")
        args.append(queue_id)
    rows = conn.execute(
        "SELECT id, at, kind, severity, category, text, queue_id, peer, fields FROM events "
        f"WHERE {' AND '.join(clauses)} ORDER BY id {'DESC' if newest else ''} LIMIT ?",
        [*args, limit]).fetchall()
    if newest:
        rows.reverse()
    return [{"seq": r[0], "at": r[1], "id": r[2], "severity": r[3], "category": r[4],
             "text": r[5], "queue_id": r[6], "peer": r[7], "fields": _own_fields(r[8])}
            for r in rows]


_COLUMNS = {"at", "id", "severity", "category", "text", "queue_id", "peer"}


def _own_fields(doc: str) -> dict[str, Any]:
    return {k: v for k, v in json.loads(doc).items() if k not in _COLUMNS}


def find_messages(conn: sqlite3.Connection, *, message_id: str = "", sender: str = "",
                  rcpt: str = "", since: float | None = None, limit: int = 50) -> list[str]:
    """Queue ids of received messages matching a Message-ID, a sender or a recipient
    (newest first); a recipient also matches the targets aliases expanded to."""
    clauses: list[str] = []
    args: list[Any] = []
    if message_id:
        wanted = message_id.strip()
        clauses.append("json_extract(fields, '$.message_id') IN (?, ?)")
        args += [wanted, wanted if wanted.startswith("<") else f"<{wanted}>"]
    if sender:
        clauses.append("lower(json_extract(fields, '$.sender')) = ?")
        args.append("" if sender == "<>" else sender.lower())
    if rcpt:
        clauses.append("(EXISTS (SELECT 1 FROM json_each(fields, '$.recipients') "
                       "WHERE lower(value) = ?) OR queue_id IN (SELECT queue_id FROM events "
                       "WHERE kind IN (2004, 3002, 3003, 3004) "
                       "AND lower(json_extract(fields, '$.rcpt')) = ?))")
        args += [rcpt.lower(), rcpt.lower()]
    if since is not None:
        clauses.append("at >= ?")
        args.append(since)
    if not clauses:
        raise ValueError("give a queue id, --message-id, --sender or --rcpt")
    rows = conn.execute(
        f"SELECT queue_id FROM events WHERE kind = 3001 AND {' AND '.join(clauses)} "
        "ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
    return [r[0] for r in rows]


def timeline(conn: sqlite3.Connection, queue_id: str) -> list[dict[str, Any]]:
    return query_events(conn, queue_id=queue_id, limit=10000)
