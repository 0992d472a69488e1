"""A private PostgreSQL server for the tests, from Debian's ``postgresql`` package.

One per test session (the ``postgres_server`` fixture in ``tests/conftest.py``): a data
directory in a fresh temporary folder, listening on a Unix socket in that folder and on
127.0.0.1 at a free port (the tests run in a loopback-only network namespace), with
``fsync`` on, since durability is what the spool's tests are about. ``initdb`` and
``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user.

Integration tests stop and start it mid-load (:meth:`PostgresServer.stop`,
:meth:`PostgresServer.start`); each test works in a database of its own
(:meth:`PostgresServer.create_db`, :meth:`PostgresServer.url`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir", "start_postgres"]

DEBIAN_ROOT = Path("/usr/lib/postgresql")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed, or the server would not start."""


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb and pg_ctl."""
    found = []
    if DEBIAN_ROOT.is_dir():
        for entry in DEBIAN_ROOT.iterdir():
            bindir = entry / "bin"
            if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
                try:
                    found.append((float(entry.name), bindir))
                except ValueError:
                    continue
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL's server binaries are missing (no /usr/lib/postgresql/<version>/bin/"
            "initdb): install Debian's 'postgresql' package (scripts/test.sh does), then "
            "run the tests again")
    return max(found)[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in ``base``: initdb'd at once, started by :meth:`start`."""

    USER = "postgres"               # the superuser the tests connect as (trust auth)

    def __init__(self, base: Path, bindir: Path) -> None:
        self.base = base
        self.bindir = bindir
        self.data = base / "data"
        self.log = base / "server.log"
        self.port = _free_port()
        self.running = False
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable(
                    "running as root, and there is no 'postgres' user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)") from exc
            os.chown(base, pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o755)       # traversable: the socket lives here
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.USER,
                  "-E", "UTF8", "--locale=C", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# postroom tests\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{base}'\n"
                    "fsync = on\n"                    # durability is what we test
                    "synchronous_commit = on\n"
                    "max_connections = 300\n"
                    "shared_buffers = 32MB\n"
                    "log_min_messages = warning\n"
                    "log_connections = off\n")

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bindir / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            cwd=self.base)
        if cp.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"{tool} {' '.join(args)} failed ({cp.returncode}):\n"
                                      f"{cp.stdout}{cp.stderr}\n{log}")
        return cp.stdout

    # --- running -------------------------------------------------------------------
    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "start")
        self.running = True

    def stop(self) -> None:
        """Stop it at once (fast shutdown: sessions are ended, nothing is lost)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # --- databases -----------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        """The database's URL over TCP on 127.0.0.1."""
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{dbname}"

    def socket_url(self, dbname: str = "postgres") -> str:
        """The database's URL over the Unix socket in :attr:`base`."""
        return f"postgresql://{self.USER}@/{dbname}?host={self.base}&port={self.port}"

    def create_db(self, name: str) -> str:
        """A new empty database (an old one of that name is dropped first); its URL."""
        import psycopg

        with psycopg.connect(self.socket_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, dbname: str, sql: str) -> list[tuple[object, ...]]:
        """Run ``sql`` in ``dbname`` (autocommit); the rows of its last statement."""
        import psycopg

        with psycopg.connect(self.socket_url(dbname), autocommit=True) as conn:
            cur = conn.execute(sql)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []


def start_postgres() -> PostgresServer:
    """A private, started PostgreSQL server in a new temporary folder."""
    bindir = find_bindir()
    base = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
    try:
        server = PostgresServer(base, bindir)
        for attempt in range(3):
            try:
                server.start()
                return server
            except PostgresUnavailable:
                # the free port may have been taken meanwhile: choose another one
                text = server.log.read_text(errors="replace") if server.log.exists() else ""
                if attempt == 2 or "could not bind" not in text:
                    raise
                server.port = _free_port()
                with open(server.data / "postgresql.conf", "a") as f:
                    f.write(f"port = {server.port}\n")
                time.sleep(0.1)
        raise AssertionError("unreachable")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
