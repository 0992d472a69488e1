"""Real remote MTAs for delivery tests: Postfix's smtp-sink, and a private Postfix.

Both listen only on 127.0.0.0/8. ``add_loopback_address`` puts a 127.x address on lo
(Postfix will not bind an address no interface carries), which the loopback-only test
namespace allows.
"""

from __future__ import annotations

import contextlib
import email
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, wait_port

SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf", path="/usr/sbin:/usr/bin") or "/usr/sbin/postconf"


def add_loopback_address(address: str) -> None:
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], capture_output=True)


class Sink:
    """smtp-sink writing each message to a file in ``dump``."""

    def __init__(self, address: str = "127.0.0.1", port: int | None = None,
                 options: tuple[str, ...] = ()) -> None:
        self.address = address
        self.port = port or free_port()
        self.dump = Path(tempfile.mkdtemp(prefix="sink-"))
        shutil.chown(self.dump, "nobody")
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-d", f"{self.dump}/%Y%m%d%H%M%S.", "-h", "sink.test",
             *self.options, f"{self.address}:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, host=self.address)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def messages(self) -> list[email.message.Message]:
        return [email.message_from_bytes(p.read_bytes()) for p in sorted(self.dump.iterdir())
                if p.is_file() and p.stat().st_size]

    def wait(self, count: int, timeout: float = 20.0) -> list[email.message.Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return self.messages()


@contextlib.contextmanager
def sink(address: str = "127.0.0.1", port: int | None = None, options: tuple[str, ...] = ()
         ) -> Iterator[Sink]:
    s = Sink(address, port, options).start()
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(s.dump, ignore_errors=True)


class Postfix:
    """A private Postfix instance: its own config dir, queue and log, no chroot."""

    def __init__(self, workdir: Path, address: str, port: int, main_cf: str) -> None:
        # Postfix's daemons drop to the postfix user, which must reach its data dir:
        # pytest's own folders are root-only, so the instance lives in /tmp.
        workdir = Path(tempfile.mkdtemp(prefix="postfix-"))
        workdir.chmod(0o755)
        self.dir = workdir
        self.address = address
        self.port = port
        self.config = workdir / "etc"
        self.queue = workdir / "queue"
        self.data = workdir / "data"
        self.log = workdir / "maillog"
        for d in (self.config, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        shutil.copy("/etc/postfix/master.cf", self.config / "master.cf")
        (self.config / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.queue}
            data_directory = {self.data}
            mail_owner = postfix
            setgid_group = postdrop
            myhostname = postfix.test
            mydomain = postfix.test
            myorigin = postfix.test
            mydestination =
            inet_interfaces = {address}
            inet_protocols = ipv4
            smtpd_peername_lookup = no
            smtp_dns_support_level = disabled
            maillog_file = {self.log}
            maillog_file_prefixes = {workdir}
            alias_maps =
            alias_database =
            local_recipient_maps =
            biff = no
            """) + textwrap.dedent(main_cf))
        self._postconf("-F", "*/*/chroot = n")
        self._postconf("-M#", "smtp/inet")
        self._postconf("-M", f"{address}:{port}/inet = {address}:{port} inet n - n - - smtpd")

    def _postconf(self, *args: str) -> None:
        subprocess.run([POSTCONF, "-c", str(self.config), *args], check=True,
                       capture_output=True)

    def start(self) -> Postfix:
        current = subprocess.run([POSTCONF, "-h", "alternate_config_directories"],
                                 capture_output=True, text=True).stdout.split()
        if str(self.config) not in current:
            subprocess.run([POSTCONF, "-e", "alternate_config_directories = "
                            + " ".join([*current[-20:], str(self.config)])],
                           check=True, capture_output=True)
        add_loopback_address(self.address)
        cp = subprocess.run([POSTFIX, "-c", str(self.config), "start"], capture_output=True,
                            text=True)
        if cp.returncode != 0:
            raise RuntimeError(f"postfix start failed: {cp.stderr}")
        wait_port(self.port, host=self.address)
        return self

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.config), "stop"], capture_output=True)
        # wait for master to let go of the port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run([POSTFIX, "-c", str(self.config), "status"],
                              capture_output=True).returncode != 0:
                return
            time.sleep(0.1)


@contextlib.contextmanager
def postfix(workdir: Path, address: str, main_cf: str, port: int | None = None
            ) -> Iterator[Postfix]:
    p = Postfix(workdir, address, port or free_port(), main_cf).start()
    try:
        yield p
    finally:
        p.stop()
        if p.log.exists() and workdir.parent.is_dir():      # keep the log with the test
            shutil.copy(p.log, workdir.with_suffix(".maillog"))
        shutil.rmtree(p.dir, ignore_errors=True)
