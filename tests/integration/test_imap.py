"""The store: users read their mail over IMAP, through the Dovecot that Postroom runs
(the imap component), with real clients: curl, mbsync (isync) and a raw IMAP session
for IDLE and for LOGIN before TLS.

Every server starts through ``postroom serve``. One server (Maildir delivery) is shared
by most checks, in file order; the server with LMTP delivery and the one without
Dovecot have their own. Failed logins cost Dovecot's auth delay (2 s) and an auth
penalty for their client address, so each check that fails a login does it from an
address of its own (127.0.0.5x).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, client_tls_context, free_port, wait_port, wait_until

DOVECOT = "/usr/sbin/dovecot"
USERS = {"alice@example.test": "alice-pw-7", "bob@example.test": "hunter2"}


def imap_config(port: int, tls_port: int | None = None, delivery: str = "maildir") -> str:
    return textwrap.dedent(f"""\
        [imap]
        enabled = true
        listen = "127.0.0.1:{port}"
        listen_tls = "{f'127.0.0.1:{tls_port}' if tls_port else ''}"
        delivery = "{delivery}"
        """)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    """A folder every user may pass through: as root, Dovecot reads the mail as the
    ``mail`` user, and pytest's own temporary folders are 0700."""
    path = Path(tempfile.mkdtemp(prefix="postroom-imap-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Store:
    """A running server with its IMAP ports."""

    def __init__(self, sp: ServerProcess, port: int, tls_port: int | None) -> None:
        self.sp, self.port, self.tls_port = sp, port, tls_port
        self.cert = sp.data / "tls" / "cert.pem"

    def curl(self, user: str, password: str, path: str = "", *args: str,
             source: str = "127.0.0.1", tls: bool = False, implicit: bool = False
             ) -> subprocess.CompletedProcess[str]:
        """curl as an IMAP client; with ``tls``, STARTTLS verifying Postroom's certificate."""
        scheme, port = ("imaps", self.tls_port) if implicit else ("imap", self.port)
        command = ["curl", "-sS", "--max-time", "20", "--interface", source,
                   "--user", f"{user}:{password}"]
        if tls or implicit:
            command += ["--ssl-reqd", "--cacert", str(self.cert)]
        command += [f"{scheme}://127.0.0.1:{port}/{path}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=40)

    def search(self, user: str, subject: str) -> list[int]:
        cp = self.curl(user, USERS.get(user, ""), "INBOX", "-X", f"SEARCH SUBJECT {subject}")
        assert cp.returncode == 0, cp.stderr
        m = re.search(r"\* SEARCH([\d ]*)", cp.stdout)
        assert m, cp.stdout
        return [int(n) for n in m.group(1).split()]

    def status(self) -> dict[str, Any]:
        data = json.loads(self.sp.cli("status", "--json").stdout)
        return next(c for c in data["components"] if c["name"] == "imap")

    def master_pid(self) -> int:
        return int((self.sp.data / "imap" / "run" / "master.pid").read_text())

    def events(self, *ids: int) -> list[dict[str, Any]]:
        data = json.loads(self.sp.cli("events", "--json", "--since", "1h").stdout)
        return [e for e in data["events"] if e["id"] in ids]

    def log(self) -> str:
        return (self.sp.data / "imap" / "dovecot.log").read_text(errors="replace")


def start_store(folder: Path, name: str, delivery: str = "maildir",
                tls_port: bool = True) -> Store:
    port, tport = free_port(), (free_port() if tls_port else None)
    sp = ServerProcess(folder / name, imap_config(port, tport, delivery))
    for user, password in USERS.items():
        sp.add_user(user, password)
    sp.start()
    wait_port(port)
    store = Store(sp, port, tport)
    assert wait_until(lambda: store.status()["state"] == "running", 15), store.status()
    return store


@pytest.fixture(scope="module")
def store(folder: Path) -> Iterator[Store]:
    s = start_store(folder, "maildir")
    yield s
    s.sp.stop()
    assert not dovecots(s.sp), "Dovecot outlived the server"


def dovecots(sp: ServerProcess) -> list[int]:
    """The processes still running Dovecot with this server's config."""
    config = str(sp.data / "imap" / "dovecot.conf").encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and config in (proc / "cmdline").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def in_maildir(sp: ServerProcess, address: str, subject: str) -> bool:
    """Whether the message is in the mailbox's Maildir (``new/``, or ``cur/`` once an IMAP
    client has seen it)."""
    local, _, domain = address.rpartition("@")
    base = sp.data / "mail" / domain / local
    return any(f"Subject: {subject}\n".encode() in p.read_bytes()
               for sub in ("new", "cur") for p in (base / sub).glob("*") if p.is_file())


def send(sp: ServerProcess, rcpt: str, subject: str) -> float:
    """An SMTP message to ``rcpt``; the time its 250 came."""
    with sp.smtp() as s:
        s.sendmail("sender@remote.test", [rcpt],
                   f"From: <sender@remote.test>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
                   f"\r\nThe body of {subject}.\r\n")
        return time.monotonic()


class RawImap:
    """One IMAP session on a socket, line by line (IDLE, and LOGIN before TLS)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()
        self.n = 0

    def line(self) -> str:
        return self.file.readline().decode(errors="replace").rstrip("\r\n")

    def cmd(self, command: str) -> list[str]:
        self.n += 1
        tag = f"t{self.n}"
        self.sock.sendall(f"{tag} {command}\r\n".encode())
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(f"{tag} ") or not line:
                return lines

    def close(self) -> None:
        self.sock.close()


# --- the shared server (Maildir delivery) ---------------------------------------------
def test_mail_sent_over_smtp_is_read_over_imap_and_every_file_has_the_mail_owner(
        store: Store) -> None:
    sp = store.sp
    send(sp, "alice@example.test", "first-over-imap")
    assert wait_until(lambda: in_maildir(sp, "alice@example.test", "first-over-imap"), 10)
    (uid,) = store.search("alice@example.test", "first-over-imap")
    cp = store.curl("alice@example.test", "alice-pw-7", f"INBOX;UID={uid}")
    assert cp.returncode == 0 and "Subject: first-over-imap" in cp.stdout
    assert "The body of first-over-imap." in cp.stdout
    # one owner for the Postroom-written and the Dovecot-written files alike
    mail = sp.data / "mail"
    owner = os.stat(mail).st_uid
    assert owner == (pwd.getpwnam("mail").pw_uid if os.geteuid() == 0 else os.getuid())
    maildir = mail / "example.test" / "alice"
    entries = list(maildir.rglob("*"))
    assert any(p.name.startswith("dovecot") for p in entries)     # Dovecot wrote here too
    assert all(p.stat().st_uid == owner for p in entries)
    # private: nothing other users can read or change (Dovecot's empty, read-only
    # dovecot-uidvalidity.<hex> marker holds nothing to read)
    assert all(p.stat().st_mode & 0o077 == 0 for p in [maildir, *entries]
               if p.is_dir() or p.stat().st_size), [
        (p.name, oct(p.stat().st_mode)) for p in entries if p.stat().st_mode & 0o077]
    passwd = sp.data / "imap" / "passwd"
    assert passwd.stat().st_mode & 0o777 == 0o600


def test_the_special_folders_are_there_and_subscribed(store: Store) -> None:
    cp = store.curl("bob@example.test", "hunter2", "", "-X", 'LIST (SPECIAL-USE) "" "*"')
    assert cp.returncode == 0, cp.stderr
    for name in ("Drafts", "Junk", "Sent", "Trash"):
        assert re.search(rf"\* LIST \([^)]*\\{name}[^)]*\) \"/\" {name}", cp.stdout), cp.stdout
    cp = store.curl("bob@example.test", "hunter2", "", "-X", 'LSUB "" "*"')
    assert {"Drafts", "Junk", "Sent", "Trash"} <= set(re.findall(r'"/" (\w+)', cp.stdout))


def test_idle_reports_new_mail_within_a_second(store: Store) -> None:
    client = RawImap(store.port)
    try:
        assert client.cmd("LOGIN bob@example.test hunter2")[-1].startswith("t1 OK")
        selected = client.cmd("SELECT INBOX")
        before = int(next(ln.split()[1] for ln in selected if ln.endswith(" EXISTS")))
        client.n += 1
        client.sock.sendall(b"t3 IDLE\r\n")
        assert client.line().startswith("+ ")
        queued = send(store.sp, "bob@example.test", "pushed-by-idle")
        client.sock.settimeout(10)
        line = client.line()
        elapsed = time.monotonic() - queued
        assert line == f"* {before + 1} EXISTS", line
        assert elapsed < 1.0, f"IDLE said {line!r} {elapsed:.2f} s after the 250"
        client.sock.sendall(b"DONE\r\n")
        while not client.line().startswith("t3 "):
            pass
        assert client.cmd("LOGOUT")[-1].startswith("t4 OK")
    finally:
        client.close()


def test_mbsync_syncs_the_inbox_over_starttls_and_trusts_only_postroom_certificate(
        store: Store, folder: Path) -> None:
    send(store.sp, "alice@example.test", "synced-by-mbsync")
    assert wait_until(lambda: in_maildir(store.sp, "alice@example.test", "synced-by-mbsync"),
                      10)
    local = folder / "mbsync-alice"
    local.mkdir()
    config = folder / "mbsyncrc"
    config.write_text(textwrap.dedent(f"""\
        IMAPAccount postroom
        Host localhost
        Port {store.port}
        User alice@example.test
        Pass alice-pw-7
        SSLType STARTTLS
        SystemCertificates no
        CertificateFile {store.cert}

        IMAPStore remote
        Account postroom

        MaildirStore local
        Path {local}/
        Inbox {local}/INBOX

        Channel inbox
        Far :remote:INBOX
        Near :local:INBOX
        Create Near
        Sync Pull
        SyncState *
        """))
    cp = subprocess.run(["mbsync", "-c", str(config), "inbox"], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    synced = [p.read_text(errors="replace") for p in (local / "INBOX").rglob("*")
              if p.is_file() and p.parent.name in ("new", "cur")]
    assert any("Subject: synced-by-mbsync" in m for m in synced)
    assert re.search(r"Login: user=<alice@example.test>, method=PLAIN, rip=127\.0\.0\.1, "
                     r"lip=127\.0\.0\.1, mpid=\d+, TLS", store.log())


def test_login_before_tls_is_refused_from_another_address_and_works_after_it(
        store: Store) -> None:
    client = RawImap(store.port, source="127.0.0.66")
    try:
        assert "STARTTLS" in client.greeting and "LOGINDISABLED" in client.greeting
        reply = client.cmd("LOGIN alice@example.test alice-pw-7")[-1]
        assert reply.startswith("t1 NO") and "PRIVACYREQUIRED" in reply, reply
        assert client.cmd("STARTTLS")[-1].startswith("t2 OK")
        ctx = client_tls_context()
        ctx.load_verify_locations(store.cert)
        ctx.verify_mode = ssl.CERT_REQUIRED        # Postroom's own certificate, checked
        client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
        client.file = client.sock.makefile("rb")
        assert client.cmd("LOGIN alice@example.test alice-pw-7")[-1].startswith("t3 OK")
    finally:
        client.close()
    # curl: STARTTLS, and IMAPS on listen_tls, each verifying the certificate
    assert store.curl("alice@example.test", "alice-pw-7", "", source="127.0.0.66",
                      tls=True).returncode == 0
    assert store.curl("alice@example.test", "alice-pw-7", "", source="127.0.0.66",
                      implicit=True).returncode == 0


def test_users_added_changed_and_removed_while_running_are_in_step_within_a_second(
        store: Store) -> None:
    sp = store.sp
    sp.add_user("carol@example.test", "first-pw")
    time.sleep(1.0)
    assert store.curl("carol@example.test", "first-pw", "INBOX").returncode == 0
    # submission takes the same account
    with smtplib.SMTP("127.0.0.1", sp.sub_port, local_hostname="client.test", timeout=15) as s:
        s.starttls(context=client_tls_context())
        assert s.login("carol@example.test", "first-pw")[0] == 235

    sp.cli("users", "passwd", "carol@example.test", "--password-stdin", input="second-pw\n")
    time.sleep(1.0)
    assert store.curl("carol@example.test", "second-pw", "INBOX").returncode == 0
    refused = store.curl("carol@example.test", "first-pw", "INBOX", source="127.0.0.51",
                         tls=True)
    assert refused.returncode == 67, refused           # curl: login denied
    with smtplib.SMTP("127.0.0.1", sp.sub_port, local_hostname="client.test", timeout=15) as s:
        s.starttls(context=client_tls_context())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("carol@example.test", "first-pw")
        assert s.login("carol@example.test", "second-pw")[0] == 235

    sp.cli("users", "remove", "carol@example.test")
    time.sleep(1.0)
    gone = store.curl("carol@example.test", "second-pw", "INBOX", source="127.0.0.52",
                      tls=True)
    assert gone.returncode == 67, gone

    # the console's way: the admin API adds a mailbox, which can log in at once too
    token = (sp.data / "admin.token").read_text().strip()
    request = urllib.request.Request(
        f"http://127.0.0.1:{sp.admin_port}/api/users", method="POST",
        data=json.dumps({"address": "dave@example.test", "password": "dave-pw"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert json.load(resp)["added"] == "dave@example.test"
    time.sleep(1.0)
    assert store.curl("dave@example.test", "dave-pw", "INBOX").returncode == 0


def test_a_wrong_password_is_refused_and_throttled_and_never_logged(store: Store) -> None:
    began = time.monotonic()
    wrong = store.curl("alice@example.test", "not-her-password", "INBOX",
                       source="127.0.0.53", tls=True)
    refused_after = time.monotonic() - began
    assert wrong.returncode == 67, wrong
    assert refused_after >= 1.0, f"refused after {refused_after:.2f} s: not throttled"
    # the auth penalty: even the right password from that address waits now
    began = time.monotonic()
    right = store.curl("alice@example.test", "alice-pw-7", "INBOX", source="127.0.0.53", tls=True)
    assert right.returncode == 0, right
    assert time.monotonic() - began >= 1.0
    assert re.search(r"passwd-file\(alice@example.test,127\.0\.0\.53,<[^>]*>\): Password "
                     r"mismatch", store.log())
    for path in [*(store.sp.data / "imap").glob("dovecot.*"),
                 *(store.sp.data / "logs").glob("*"), store.sp.log]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for secret in ("not-her-password", "alice-pw-7", "hunter2", "second-pw", "dave-pw"):
            assert secret not in text, f"{secret} in {path}"


def test_doctor_finds_a_bad_maildir_and_a_user_out_of_step_and_its_fixes_work(
        store: Store) -> None:
    sp = store.sp
    stray = sp.data / "mail" / "example.test" / "bob" / "new" / "stray-file"
    stray.write_text("put here by hand\n")
    os.chmod(stray, 0o644)
    passwd = sp.data / "imap" / "passwd"
    passwd.write_text("".join(ln + "\n" for ln in passwd.read_text().splitlines()
                              if not ln.startswith("bob@")))
    cp = sp.cli("doctor", "--json", check=False)
    report = json.loads(cp.stdout)
    assert cp.returncode == 1 and report["verdict"] == "store-failed", report
    step = report["steps"][9]
    assert (step["step"], step["name"], step["status"]) == (10, "store", "fail")
    problems = step["detail"]["problems"]
    login = [p for p in problems if p["kind"] == "cannot-log-in"]
    assert [p["finding"].split(":")[0] for p in login] == [
        "bob@example.test cannot log in over IMAP with its password"], problems
    assert "postroom restart imap" in login[0]["fix"]
    (bad,) = [p for p in problems if p["kind"] == "maildir-permissions"]
    assert str(stray) in bad["finding"] and "lets other users in" in bad["finding"]
    assert bad["fix"].startswith("chown -R ") and "chmod -R u+rwX,go-rwx" in bad["fix"]

    subprocess.run(["sh", "-c", bad["fix"]], check=True)
    assert sp.cli("restart", "imap").returncode == 0
    assert "bob@example.test:" in passwd.read_text()
    report = json.loads(sp.cli("doctor", "--json", check=False).stdout)
    assert report["steps"][9]["status"] == "ok", report["steps"][9]
    assert store.curl("bob@example.test", "hunter2", "INBOX").returncode == 0


def test_stopping_and_starting_the_imap_component(store: Store) -> None:
    sp = store.sp
    assert "imap: stopped" in sp.cli("stop", "imap").stdout
    assert store.curl("alice@example.test", "alice-pw-7").returncode == 7      # refused
    report = json.loads(sp.cli("doctor", "--json", check=False).stdout)
    assert report["verdict"] == "service-down"
    assert "imap" in report["steps"][0]["finding"]
    assert "postroom start imap" in report["steps"][0]["fix"]
    assert any(p["kind"] == "imap-down" for p in report["steps"][9]["detail"]["problems"])
    send(sp, "alice@example.test", "while-imap-is-stopped")        # mail still comes in
    assert "imap: running" in sp.cli("start", "imap").stdout
    assert store.search("alice@example.test", "while-imap-is-stopped")
    texts = [e["text"] for e in store.events(1005)]
    assert any(t.startswith("imap: stop (was running, now stopped)") for t in texts)


def test_kill_9_of_dovecot_restarts_it_records_events_and_mail_keeps_coming(
        store: Store) -> None:
    sp = store.sp
    old = store.master_pid()
    os.kill(old, signal.SIGKILL)
    send(sp, "alice@example.test", "while-dovecot-is-down")
    # delivered meanwhile (the Maildir needs no Dovecot)
    assert wait_until(lambda: in_maildir(sp, "alice@example.test", "while-dovecot-is-down"),
                      10)
    assert wait_until(lambda: store.status()["state"] == "running"
                      and store.master_pid() != old, 15), store.status()
    down = store.events(5004)
    assert down and "was killed by SIGKILL (9)" in down[-1]["text"], down
    assert "restarting in 1 s" in down[-1]["text"]
    assert store.events(5005)
    assert store.search("alice@example.test", "while-dovecot-is-down")


# --- LMTP delivery --------------------------------------------------------------------
def test_lmtp_delivery_goes_through_dovecot_and_resumes_at_once_after_a_crash(
        folder: Path) -> None:
    store = start_store(folder, "lmtp", delivery="lmtp", tls_port=False)
    sp = store.sp
    try:
        send(sp, "alice@example.test", "delivered-by-lmtp")
        assert wait_until(lambda: "saved mail to INBOX" in store.log(), 10), store.log()
        assert store.search("alice@example.test", "delivered-by-lmtp")
        delivered = store.events(3002)
        assert "via LMTP unix:" in delivered[-1]["text"], delivered
        assert "dovecot-uidlist" in os.listdir(sp.data / "mail" / "example.test" / "alice")

        os.kill(store.master_pid(), signal.SIGKILL)
        send(sp, "bob@example.test", "queued-while-down")
        # deferred while Dovecot is down, then delivered as soon as it is back, not
        # after the 60 s retry interval
        assert wait_until(lambda: store.status()["state"] == "running", 15)
        assert wait_until(lambda: bool(store.search("bob@example.test", "queued-while-down")),
                          10)
    finally:
        sp.stop()


# --- no Dovecot -----------------------------------------------------------------------
def test_without_dovecot_the_server_runs_and_imap_says_what_to_install(folder: Path) -> None:
    """Dovecot is hidden from the server alone: a mount namespace where its program is
    /dev/null."""
    sp = ServerProcess(folder / "none", imap_config(free_port()))
    sp.add_user("alice@example.test")
    with sp.log.open("ab") as out:
        sp.proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f"mount --bind /dev/null {DOVECOT} && "
             'exec "$0" -m postroom.cli serve -c "$1"', sys.executable, str(sp.config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=sp.workdir)
    try:
        wait_port(sp.admin_port)
        status = json.loads(sp.cli("status", "--json").stdout)["components"]
        imap = next(c for c in status if c["name"] == "imap")
        assert imap["state"] == "not-installed"
        assert imap["note"] == "Dovecot is not installed: apt-get install dovecot-imapd"
        assert all(c["state"] == "running" for c in status if c["name"] != "imap")
        send(sp, "alice@example.test", "without-dovecot")
        assert wait_until(lambda: in_maildir(sp, "alice@example.test", "without-dovecot"), 10)
        assert "imap: not-installed" in sp.cli("start", "imap").stdout
        report = json.loads(sp.cli("doctor", "--json", check=False).stdout)
        assert report["steps"][0]["fix"] == "apt-get install dovecot-imapd"
        assert "not-installed" in sp.cli("status").stdout
    finally:
        sp.stop()
    assert "Traceback" not in sp.log.read_text()


def test_a_mail_folder_the_mail_owner_cannot_reach_fails_once_with_the_fix(
        folder: Path) -> None:
    """As root, Dovecot reads mail as the ``mail`` user, which must pass through every
    folder above data_dir/mail. A start that cannot work says why, once, and waits."""
    if os.geteuid() != 0:
        pytest.skip("only root hands the mail to another user")
    blocked = folder / "blocked"
    blocked.mkdir(mode=0o700)
    blocked.chmod(0o700)
    port = free_port()
    sp = ServerProcess(blocked / "srv", imap_config(port))
    sp.add_user("alice@example.test", USERS["alice@example.test"])
    sp.start()
    try:
        store = Store(sp, port, None)
        assert wait_until(lambda: store.status()["state"] == "failed", 15), store.status()
        note = store.status()["note"]
        assert f"{blocked} is mode 0700" in note and f"chmod o+x {blocked}" in note
        (event,) = store.events(5004)
        assert event["text"].startswith("Dovecot (IMAP) cannot start: ")
        send(sp, "alice@example.test", "while-imap-failed")           # mail flows
        assert wait_until(lambda: in_maildir(sp, "alice@example.test", "while-imap-failed"),
                          10)
        time.sleep(1.5)
        assert len(store.events(5004)) == 1            # not retried: nothing would change
        blocked.chmod(0o711)
        assert "imap: running" in sp.cli("start", "imap").stdout
        assert store.search("alice@example.test", "while-imap-failed")
    finally:
        sp.stop()
