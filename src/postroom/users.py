"""The mailbox users: addresses with argon2 password hashes, in ``<data_dir>/users.sqlite3``.

The server reads this database on every lookup, so ``postroom users ...`` takes
effect at once, with no restart. The file is created with mode 0600.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .address import AddressError, parse_path

if TYPE_CHECKING:
    from .config import Config

__all__ = ["User", "UserError", "UserStore", "mailbox_key"]

_SAFE_LOCAL = re.compile(r"[a-z0-9!#$&'*+\-=?^_`{|}~]+(?:\.[a-z0-9!#$&'*+\-=?^_`{|}~]+)*\Z")


class UserError(ValueError):
    """A user operation that cannot be done; ``str()`` says why in plain words."""


@dataclass(frozen=True)
class User:
    address: str
    created: float
    admin: bool


def mailbox_key(address: str) -> str:
    """Validate an address for a mailbox and return its lookup key (lower case).

    Mailbox local parts become directory names, so they must be plain dot-atoms
    without ``/``, ``%`` or ``!`` (and never quoted).
    """
    try:
        addr = parse_path(f"<{address}>", allow_null=False, utf8=False)
    except AddressError as exc:
        raise UserError(f"{address!r} is not a valid address: {exc}") from None
    local = addr.local.lower()
    if not _SAFE_LOCAL.match(local):
        raise UserError(f"{address!r}: a mailbox name may use letters, digits, dots and "
                        "-_+=' but not '/', '%', '!' or quotes")
    if addr.domain.startswith("[") or addr.domain.endswith("."):
        raise UserError(f"{address!r}: the domain must be a plain domain name")
    return f"{local}@{addr.domain}"


class UserStore:
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS users (
        address TEXT PRIMARY KEY,       -- lower case local@domain
        hash    TEXT NOT NULL,          -- argon2id
        created REAL NOT NULL,
        admin   INTEGER NOT NULL DEFAULT 0
    );
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._watched = (str(path), f"{path}-wal")     # what _signature stats, as strings
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     timeout=10)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.executescript(self.SCHEMA)
        if fresh:
            os.chmod(path, 0o600)
        self._lock = threading.Lock()
        # OWASP's argon2id profile (19 MiB, 2 passes): argon2-cffi's default takes 64 MiB
        # per hash, which every AUTH thread of every process would hold at once.
        # Existing hashes verify with the parameters stored in them.
        self._hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
        self._dummy = ""
        # Mailboxes known to exist, for the RCPT check (a query there cost about 0.3 ms
        # of the event loop per recipient). Forgotten when the database or its WAL
        # changes (another process ran "users add/remove") and at least every
        # EXISTS_TTL seconds; a "no" is always asked of the database.
        self._known: set[str] = set()
        self._known_sig: tuple[int, ...] = ()
        self._known_at = 0.0

    def close(self) -> None:
        self._conn.close()

    EXISTS_TTL = 2.0

    def _signature(self) -> tuple[int, ...]:
        sig: list[int] = []
        for path in self._watched:
            try:
                st = os.stat(path)
                sig += (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                sig += (0, 0, 0)
        return tuple(sig)

    def signature(self) -> tuple[int, ...]:
        """Changes whenever the user database does, in any process (its files' mtime,
        size and inode): the imap component watches it to keep Dovecot's users in step."""
        return self._signature()

    def credentials(self) -> list[tuple[str, str]]:
        """Every user's address and argon2 hash (for Dovecot's passwd-file, never a log)."""
        with self._lock:
            return self._conn.execute("SELECT address, hash FROM users ORDER BY address"
                                      ).fetchall()

    def exists(self, key: str) -> bool:
        now = time.monotonic()
        sig = self._signature()
        if sig != self._known_sig or now - self._known_at > self.EXISTS_TTL:
            self._known = set()
            self._known_sig, self._known_at = sig, now
        if key in self._known:
            return True
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM users WHERE address = ?", (key,)).fetchone()
        if row is not None:
            self._known.add(key)
        return row is not None

    def add(self, address: str, password: str, *, admin: bool = False) -> str:
        key = mailbox_key(address)
        if not password:
            raise UserError("the password is empty")
        digest = self._hasher.hash(password)
        with self._lock:
            try:
                self._conn.execute("INSERT INTO users (address, hash, created, admin) "
                                   "VALUES (?, ?, ?, ?)", (key, digest, time.time(), int(admin)))
            except sqlite3.IntegrityError:
                raise UserError(f"{key} already exists") from None
        return key

    def remove(self, address: str) -> str:
        key = mailbox_key(address)
        with self._lock:
            cur = self._conn.execute("DELETE FROM users WHERE address = ?", (key,))
        self._known.discard(key)
        if cur.rowcount == 0:
            raise UserError(f"{key} does not exist")
        return key

    def set_password(self, address: str, password: str) -> str:
        key = mailbox_key(address)
        if not password:
            raise UserError("the password is empty")
        digest = self._hasher.hash(password)
        with self._lock:
            cur = self._conn.execute("UPDATE users SET hash = ? WHERE address = ?", (digest, key))
        if cur.rowcount == 0:
            raise UserError(f"{key} does not exist")
        return key

    def list(self, admins_only: bool = False) -> list[User]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT address, created, admin FROM users"
                + (" WHERE admin = 1" if admins_only else "") + " ORDER BY address").fetchall()
        return [User(a, c, bool(adm)) for a, c, adm in rows]

    def verify(self, username: str, password: str) -> str | None:
        """The user's key when the password matches, else None. Slow (argon2): call off-loop.

        An unknown user costs the same hash verification as a known one.
        """
        try:
            key = mailbox_key(username)
        except UserError:
            key = ""
        with self._lock:
            row = self._conn.execute("SELECT hash FROM users WHERE address = ?",
                                     (key,)).fetchone()
        if not row and not self._dummy:
            self._dummy = self._hasher.hash("postroom-timing-equaliser")
        digest = row[0] if row else self._dummy
        try:
            self._hasher.verify(digest, password)
        except (VerificationError, InvalidHashError):
            return None
        return key if row else None


def add_mailbox(store: UserStore, config: Config, address: str, password: str, *,
                admin: bool = False) -> tuple[str, Path, str]:
    """Add a user and make its Maildir. Returns (key, the Maildir, a warning or "")."""
    from .store import MaildirStore
    key = store.add(address, password, admin=admin)
    local, _, domain = key.rpartition("@")
    maildir = MaildirStore(config.mail_dir, config.hostname).create(local, domain)
    warning = "" if domain in config.local_domains else (
        f"{domain} is not a local domain: mail for {key} will not be accepted until "
        "[domains] local lists it")
    return key, maildir, warning
