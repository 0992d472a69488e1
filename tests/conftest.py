"""Shared fixtures: a real Postroom server in a subprocess, on free loopback ports.

Integration tests talk to it over real sockets with smtplib, swaks and raw sockets.
The whole suite runs inside a loopback-only network namespace (scripts/test.sh), so a
stray lookup or connection off the machine fails at once.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Test this checkout, whatever copy of postroom pip last installed (in-process and in
# every server subprocess).
sys.path.insert(0, str(ROOT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])

UNTRUSTED = "127.0.0.66"      # a peer outside trusted_networks (127.0.0.1/32)
# Never the system resolver: servers under test ask a loopback port where no DNS
# server listens, unless a test starts dnsmasq and says otherwise.
DEAD_DNS_PORT = 9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def wait_until(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


class ServerProcess:
    """``postroom serve`` in a subprocess with its own config and data dir."""

    def __init__(self, workdir: Path, extra: str = "", domains: tuple[str, ...] = (
            "example.test", "localhost")) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "postroom.toml"
        self.data = workdir / "data"
        self._extra, self._domains = extra, domains
        self._started_once = False
        self._write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.out"

    def _write_config(self) -> None:
        """A config on four free ports (chosen again if a port was taken meanwhile)."""
        self.mx_port = free_port()
        self.sub_port = free_port()
        self.subs_port = free_port()
        self.admin_port = free_port()
        dom = ", ".join(f'"{d}"' for d in self._domains)
        base = textwrap.dedent(f"""\
            hostname = "mx.example.test"
            data_dir = "data"
            [smtp]
            processes = 1
            listen = ["127.0.0.1:{self.mx_port}"]
            submission = ["127.0.0.1:{self.sub_port}"]
            submissions = ["127.0.0.1:{self.subs_port}"]
            [domains]
            local = [{dom}]
            [relay]
            trusted_networks = ["127.0.0.1/32", "::1/128"]
            [dns]
            nameservers = ["127.0.0.1:{DEAD_DNS_PORT}"]
            [verify]
            enabled = false
            [admin]
            listen = "127.0.0.1:{self.admin_port}"
            """)
        self.config.write_text(merge_toml(base, self._extra))

    def cli(self, *args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "postroom.cli", *args, "-c", str(self.config)],
                            input=input, capture_output=True, text=True, timeout=60,
                            cwd=self.workdir)
        if check and cp.returncode != 0:
            raise AssertionError(f"postroom {' '.join(args)} failed: {cp.stderr}")
        return cp

    def start(self) -> ServerProcess:
        for attempt in range(3):
            out = self.log.open("ab")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postroom.cli", "serve", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    wait_port(self.mx_port, timeout=0.2)
                    self._started_once = True
                    return self
                except TimeoutError:
                    pass
            # A free port can be taken between choosing it and binding it (by another
            # socket's ephemeral port): on a first start, choose new ports and try again.
            taken = "Address already in use" in self.log.read_text(errors="replace")
            self.stop()
            if not (taken and not self._started_once and attempt < 2):
                break
            self._write_config()
        raise AssertionError("server did not start:\n" + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def add_user(self, address: str, password: str = "s3cret") -> None:
        self.cli("users", "add", address, "--password-stdin", input=password + "\n")

    def smtp(self, source: str = "127.0.0.1", port: int | None = None) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", port or self.mx_port, local_hostname="client.test",
                         source_address=(source, 0), timeout=15)
        return s

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.data / "mail" / domain / local / "new"

    def messages(self, address: str) -> list[bytes]:
        d = self.maildir(address)
        if not d.is_dir():
            return []
        return [p.read_bytes() for p in sorted(d.iterdir())]

    def wait_messages(self, address: str, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages(address)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.messages(address)

    def queue(self) -> dict[str, dict[str, object]]:
        out = self.cli("queue", "--json").stdout
        return {q["name"]: q for q in json.loads(out)["queues"]}

    def log_text(self) -> str:
        """The server's output so far. Log lines are written by a background thread, so
        wait until the file has stopped growing for a moment (at most two seconds)."""
        deadline = time.monotonic() + 2.0
        size = -1
        while time.monotonic() < deadline:
            now = self.log.stat().st_size if self.log.exists() else 0
            if now == size:
                break
            size = now
            time.sleep(0.1)
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        """The server's output once it contains ``text`` (AssertionError after
        ``timeout``). The SMTP port answers before every process has started: with front
        ends, a front end can take mail while the main process is still loading."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.log.read_text(errors="replace") if self.log.exists() else ""
            if text in found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the server's output:\n{found}")
            time.sleep(0.05)


def merge_toml(base: str, extra: str) -> str:
    """Merge ``extra`` into ``base`` (tests only): a key in both takes extra's value;
    ``[[route]]`` blocks are appended as they are."""
    def split(text: str) -> tuple[dict[str, dict[str, str]], list[str]]:
        sections: dict[str, dict[str, str]] = {"": {}}
        arrays: list[str] = []
        current = ""
        in_array = False
        for line in textwrap.dedent(text).splitlines():
            stripped = line.strip()
            if stripped.startswith("[["):
                in_array = True
                arrays.append(stripped)
                continue
            if stripped.startswith("["):
                in_array = False
                current = stripped
                sections.setdefault(current, {})
                continue
            if in_array:
                arrays.append(line)
            elif "=" in stripped and not stripped.startswith("#"):
                sections[current][stripped.split("=", 1)[0].strip()] = stripped
        return sections, arrays

    base_sections, base_arrays = split(base)
    extra_sections, extra_arrays = split(extra)
    for name, keys in extra_sections.items():
        base_sections.setdefault(name, {}).update(keys)
    out: list[str] = list(base_sections.pop("").values())
    for name, keys in base_sections.items():
        out.append(name)
        out.extend(keys.values())
    out.extend(base_arrays + extra_arrays)
    return "\n".join(out) + "\n"


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def make(extra: str = "", users: tuple[str, ...] = ("alice@example.test",),
             start: bool = True, **kw: object) -> ServerProcess:
        sp = ServerProcess(tmp_path / f"srv{len(started)}", extra, **kw)  # type: ignore[arg-type]
        for u in users:
            sp.add_user(u)
        started.append(sp)
        return sp.start() if start else sp

    yield make
    for sp in started:
        sp.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by a module's tests: alice and bob at example.test."""
    work = tmp_path_factory.mktemp("server")
    # error replies past the soft limit wait 0.1 s here, not the default 1 s, so that a
    # fuzz burst of 20 errors ends within a read timeout (test_relay_scan checks 1 s)
    sp = ServerProcess(work, """
        [smtp]
        error_sleep = "0.1s"
        [aliases]
        "postmaster@example.test" = ["alice@example.test"]
        "team@example.test" = ["alice@example.test", "bob@example.test"]
        "outside@example.test" = ["carol@remote.example"]
        """)
    sp.add_user("alice@example.test")
    sp.add_user("bob@example.test", "hunter2")
    sp.start()
    yield sp
    sp.stop()


def client_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    """A line-level SMTP client over a plain socket, for what smtplib will not send."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text of the last line)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed: " + repr(self.buf))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                break
        return int(lines[-1][:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()



@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """One private PostgreSQL server for the whole session (``tests/postgres.py``), from
    Debian's ``postgresql`` package: ``url(db)``, ``create_db(name)``, ``stop()``,
    ``start()``. Fails, never skips, when PostgreSQL is not installed."""
    from tests.postgres import PostgresUnavailable, start_postgres

    try:
        pg = start_postgres()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield pg
    finally:
        pg.destroy()
