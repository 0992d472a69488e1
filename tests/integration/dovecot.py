"""A private Dovecot (Debian's dovecot-core + dovecot-lmtpd, 2.3) serving LMTP, for tests.

Each instance lives in its own temporary folder: its config, ``base_dir`` (the master's
sockets and the LMTP Unix socket), ``state_dir``, its log, a passwd-file of users and
their Maildirs. It listens on 127.0.0.1 only (on a free port) and on
``<folder>/run/lmtp``, and is started as ``dovecot -F -c <folder>/dovecot.conf`` in the
foreground, so that stopping the subprocess stops it all.

What Dovecot needs, learnt the hard way:

- It refuses to write mail as uid 0, so the users' uid and gid are ``nobody``'s, and
  their mail folder belongs to ``nobody``. The temporary folder must then be traversable
  by ``nobody`` (``mkdtemp`` makes it 0700; pytest's ``tmp_path`` sits under a 0700
  folder too, so it is not used).
- A ``passdb`` is required even for LMTP alone: without one the auth process dies
  ("No passdbs specified") and every RCPT gets ``451 4.3.0 Temporary internal error``.
- ``ssl = no``: the built-in default wants a certificate.
- ``hostname`` is set, so that Dovecot never asks a resolver for the machine's name.
- The master keeps ``master.pid`` until it has stopped all its children (about a
  second): a new instance on the same ``base_dir`` meanwhile refuses to start. Each
  instance has its own folder, and :meth:`Dovecot.stop` waits for the exit.
- Dovecot 2.3 LMTP offers PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES and CHUNKING, but
  not SIZE, DSN or SMTPUTF8; it refuses a MAIL parameter it does not offer
  (``555 5.5.4 Unsupported parameters``). An unknown user is refused at RCPT:
  ``550 5.1.1 <x@y> User doesn't exist: x@y``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.conftest import free_port, wait_port

DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin") or "/usr/sbin/dovecot"
MAIL_USER = "nobody"


USERS = ("alice@lmtp.test", "bob@lmtp.test", "carol@lmtp.test")
FULL = ("full@lmtp.test",)


class Dovecot:
    """One private Dovecot LMTP server with a passwd-file of ``users`` (full addresses),
    and ``full_users`` whose quota (1 KiB) no real message fits: Dovecot accepts them at
    RCPT and refuses the message for them alone after the data (``552 5.2.2``)."""

    def __init__(self, users: Iterable[str] = USERS, full_users: Iterable[str] = FULL,
                 port: int | None = None) -> None:
        self.users = tuple(users)
        self.full_users = tuple(full_users)
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.root.chmod(0o755)                   # the mail user must reach mail/
        self.socket = self.root / "run" / "lmtp"
        self.mail = self.root / "mail"
        self.log = self.root / "dovecot.log"
        self.config = self.root / "dovecot.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write()

    def _write(self) -> None:
        owner = pwd.getpwnam(MAIL_USER)
        uid, gid = owner.pw_uid, owner.pw_gid
        self.mail.mkdir()
        os.chown(self.mail, uid, gid)
        (self.root / "users").write_text("".join(
            f"{u}::{uid}:{gid}::{self.mail}/{u.rpartition('@')[2]}/{u.rpartition('@')[0]}::"
            f"{'userdb_quota_rule=*:storage=1K' if u in self.full_users else ''}\n"
            for u in (*self.users, *self.full_users)))
        self.config.write_text(textwrap.dedent(f"""\
            base_dir = {self.root}/run
            state_dir = {self.root}/state
            log_path = {self.log}
            hostname = lmtp.test
            postmaster_address = postmaster@lmtp.test
            protocols = lmtp
            listen = 127.0.0.1
            ssl = no
            mail_location = maildir:~/Maildir
            mail_plugins = quota
            plugin {{
              quota = maildir:User quota
            }}
            passdb {{
              driver = passwd-file
              args = {self.root}/users
            }}
            userdb {{
              driver = passwd-file
              args = {self.root}/users
            }}
            service lmtp {{
              inet_listener lmtp {{
                address = 127.0.0.1
                port = {self.port}
              }}
              unix_listener lmtp {{
                mode = 0666
              }}
            }}
            """))

    def start(self) -> Dovecot:
        out = (self.root / "dovecot.out").open("ab")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.config)],
                                     stdout=out, stderr=subprocess.STDOUT)
        out.close()
        try:
            wait_port(self.port)
            deadline = time.monotonic() + 10
            while not self.socket.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.socket.exists():
                raise TimeoutError(f"no LMTP socket at {self.socket}")
        except TimeoutError:
            self.stop()
            raise AssertionError("dovecot did not start:\n" + self.log_text()) from None
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.root / "dovecot.out", self.log)
                 if p.exists()]
        return "\n".join(parts)

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.mail / domain / local / "Maildir"

    def messages(self, address: str) -> list[bytes]:
        """The messages in the user's INBOX (``new/``), oldest first."""
        new = self.maildir(address) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(),
                                               key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def wait_messages(self, address: str, count: int, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages(address)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return self.messages(address)


@contextlib.contextmanager
def dovecot(users: Iterable[str] = USERS, full_users: Iterable[str] = FULL,
            port: int | None = None) -> Iterator[Dovecot]:
    d = Dovecot(users, full_users, port).start()
    try:
        yield d
    finally:
        d.cleanup()
