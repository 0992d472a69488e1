"""Hostile input on real sockets: every attack gets one correct reply, never a traceback.

Each test talks to a real ``postroom serve`` subprocess with a raw socket (for what
smtplib would never send), smtplib or swaks, and checks three things: the reply the
standards call for, that no message was lost or smuggled (Maildirs and the
``queued`` log lines), and that nothing leaked a Python traceback to the wire or the log.
"""

from __future__ import annotations

import base64
import random
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import UNTRUSTED, RawClient, ServerProcess, client_tls_context

OTHER = "127.0.0.67"          # a second untrusted source address
REPLY_LINE = re.compile(r"[2-5][0-9][0-9](?:[ -].*)?\Z")
REPLY_LINE_BYTES = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\Z")
GOOD = b"Subject: fine\r\n\r\nall good\r\n"
Factory = Callable[..., ServerProcess]


# --- helpers ------------------------------------------------------------------------
class Client(RawClient):
    """A RawClient that reads the greeting and checks every reply it ever reads."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0,
                 greet: bool = True) -> None:
        super().__init__(port, source=source, timeout=timeout)
        if greet:
            code, text = self.reply()
            assert code == 220, text

    def reply(self) -> tuple[int, str]:
        code, text = super().reply()
        assert "Traceback" not in text and "File \"" not in text, text
        for line in text.split("\n"):
            assert REPLY_LINE.match(line), f"malformed reply line {line!r}"
        assert not text.startswith("451 4.3.0"), f"internal error: {text}"
        return code, text

    def ehlo(self, name: str = "client.test") -> str:
        code, text = self.cmd(f"EHLO {name}")
        assert code == 250, text
        return text

    def start_data(self, rcpts: tuple[str, ...] = ("alice@example.test",),
                   sender: str = "sender@far.example") -> None:
        code, text = self.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        for r in rcpts:
            code, text = self.cmd(f"RCPT TO:<{r}>")
            assert code == 250, text
        code, text = self.cmd("DATA")
        assert code == 354, text

    def send_message(self, body: bytes = GOOD, rcpt: str = "alice@example.test") -> str:
        self.start_data((rcpt,))
        self.send(body + b".\r\n")
        code, text = self.reply()
        assert code == 250 and "2.0.0 Ok: queued as" in text, text
        return text

    def expect_noop_only(self) -> None:
        """The next reply is NOOP's own and nothing else is pending: no extra replies."""
        assert self.cmd("NOOP") == (250, "250 2.0.0 Ok")
        time.sleep(0.05)
        self.sock.setblocking(False)
        try:
            extra = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            extra = b""
        finally:
            self.sock.setblocking(True)
            self.sock.settimeout(10)
        assert self.buf + extra == b"", f"unexpected extra replies: {self.buf + extra!r}"


def queued(sp: ServerProcess) -> int:
    """How many messages the server has accepted so far (from its log)."""
    return sp.log_text().count(" queued queue_id=")


def all_mail(sp: ServerProcess) -> list[bytes]:
    """Every message in every Maildir (new, cur and tmp) of the server."""
    root = sp.data / "mail"
    return [f.read_bytes() for f in sorted(root.glob("*/*/*/*")) if f.is_file()]


def wait_for_mail(sp: ServerProcess, address: str, marker: bytes, timeout: float = 10) -> bytes:
    """The delivered message for ``address`` that contains ``marker``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in sp.messages(address) if marker in m]
        if found:
            assert len(found) == 1, f"{marker!r} delivered {len(found)} times"
            return found[0]
        assert time.monotonic() < deadline, f"{marker!r} never reached {address}"
        time.sleep(0.05)


def assert_nowhere(sp: ServerProcess, *markers: bytes) -> None:
    time.sleep(0.3)            # let anything queued before the marker mail settle
    for m in all_mail(sp):
        for marker in markers:
            assert marker not in m, f"{marker!r} was delivered: {m[:500]!r}"


def assert_clean_log(sp: ServerProcess) -> None:
    log = sp.log_text()
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 2000):][:6000]
    assert " crashed" not in log and "unexpected error" not in log, log[-4000:]
    assert sp.proc is not None and sp.proc.poll() is None, "server died"


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def swaks(sp: ServerProcess, *args: str,
          port: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port or sp.mx_port),
         "--helo", "client.test", "--from", "sender@far.example",
         "--to", "alice@example.test", "--timeout", "15", *args],
        capture_output=True, text=True, timeout=60)


def tls_upgrade(c: Client) -> None:
    """STARTTLS has been answered 220: do the handshake on the client's raw socket."""
    assert c.buf == b"", f"plaintext after the 220 for STARTTLS: {c.buf!r}"
    c.sock = client_tls_context().wrap_socket(c.sock, server_hostname="mx.example.test")
    c.buf = b""


def authenticated_submission_client(sp: ServerProcess, source: str) -> Client:
    c = Client(sp.sub_port, source=source)
    c.ehlo()
    assert c.cmd("STARTTLS")[0] == 220
    tls_upgrade(c)
    assert "AUTH PLAIN LOGIN" in c.ehlo()
    return c


# --- command lines --------------------------------------------------------------------
def test_command_line_over_512_octets_is_500_and_session_continues(server: ServerProcess) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    # exactly 512 octets with CRLF is allowed; one more is not
    assert c.cmd("NOOP " + "x" * 505)[0] == 250
    code, text = c.cmd("NOOP " + "x" * 506)
    assert code == 500 and text.startswith("500 5.5.2"), text
    c.expect_noop_only()
    # an unknown verb padded far past every limit, in one line
    code, text = c.cmd(b"X" * 5000)
    assert code == 500 and text.startswith("500 5.5.2"), text
    c.expect_noop_only()
    # MAIL may be longer (RFC 3461 parameters) but not unbounded
    code, text = c.cmd("MAIL FROM:<a@far.example> ENVID=" + "e" * 2000)
    assert code == 500 and text.startswith("500 5.5.2"), text
    c.expect_noop_only()
    assert c.cmd("MAIL FROM:<a@far.example>")[0] == 250
    c.close()
    assert_clean_log(server)


def test_endless_command_line_gets_one_reply_and_is_discarded(server: ServerProcess) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    for _ in range(10):                      # 200 KB without a line end, in pieces
        c.send(b"RCPT TO:<" + b"A" * 20000)
        time.sleep(0.01)
    c.send(b">\r\n")
    code, text = c.reply()
    assert code == 500 and text.startswith("500 5.5.2"), text
    c.expect_noop_only()                     # the tail was not read as a command
    c.send_message()
    c.close()
    assert_clean_log(server)


# --- DATA text lines --------------------------------------------------------------------
def test_data_line_over_1000_octets_is_refused_after_end_of_data(server: ServerProcess) -> None:
    before = queued(server)
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    c.send(b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\nMAIL FROM:<x@far.example>\r\n.\r\n")
    code, text = c.reply()
    assert code == 550 and text.startswith("550 5.6.0"), text
    c.expect_noop_only()
    assert queued(server) == before
    # 998 characters + CRLF = 1000 octets is the limit itself, and is fine
    c.send_message(b"Subject: edge\r\n\r\n" + b"z" * 998 + b"\r\n")
    wait_for_mail(server, "alice@example.test", b"z" * 998 + b"\n")
    assert_nowhere(server, b"y" * 999)
    assert queued(server) == before + 1
    c.close()
    assert_clean_log(server)


def test_data_line_limit_does_not_count_the_transparency_dot(server: ServerProcess) -> None:
    """RFC 5321 4.5.3.1.6: 1000 octets per line 'not counting the leading dot duplicated
    for transparency'. A 998-character line starting with '.' goes on the wire as 999."""
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    c.send(b"Subject: dots\r\n\r\n.." + b"d" * 997 + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    wait_for_mail(server, "alice@example.test", b"\n." + b"d" * 997 + b"\n")
    c.close()
    assert_clean_log(server)


# --- message size -------------------------------------------------------------------
SMALL = "[smtp]\nmax_message_size = 10000\nmax_recipients = 3"


def test_size_parameter_over_the_limit_is_552_at_once(server_factory: Factory) -> None:
    sp = server_factory(SMALL)
    c = Client(sp.mx_port, source=UNTRUSTED)
    assert "250-SIZE 10000" in c.ehlo()
    code, text = c.cmd("MAIL FROM:<a@far.example> SIZE=10001")
    assert code == 552 and text.startswith("552 5.3.4"), text
    code, text = c.cmd("MAIL FROM:<a@far.example> SIZE=" + "9" * 20)
    assert code == 552 and text.startswith("552 5.3.4"), text
    code, text = c.cmd("MAIL FROM:<a@far.example> SIZE=" + "9" * 21)
    assert code == 501, text
    code, text = c.cmd("MAIL FROM:<a@far.example> SIZE=-1")
    assert code == 501, text
    assert c.cmd("MAIL FROM:<a@far.example> SIZE=10000")[0] == 250     # the limit itself
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: s\r\n\r\nsmall\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    assert len(sp.wait_messages("alice@example.test", 1)) == 1
    assert_clean_log(sp)


def test_oversized_data_is_read_to_its_real_end_then_552(server_factory: Factory) -> None:
    sp = server_factory(SMALL)
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    # 30 KB; past the limit come lines that would be commands if the server stopped early
    big = b"Subject: big\r\n\r\n" + b"".join(b"%05d" % i + b"b" * 95 + b"\r\n" for i in range(150))
    tail = b"RSET\r\nMAIL FROM:<evil@far.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    c.send(big + tail + big + b".\r\n")
    code, text = c.reply()
    assert code == 552 and text.startswith("552 5.3.4"), text
    c.expect_noop_only()
    assert queued(sp) == 0
    c.send_message()                          # the session is still usable
    c.close()
    msgs = sp.wait_messages("alice@example.test", 1)
    time.sleep(0.3)
    msgs = sp.messages("alice@example.test")
    assert len(msgs) == 1 and b"all good" in msgs[0] and b"00001" not in msgs[0]
    assert queued(sp) == 1
    assert_clean_log(sp)


def test_oversized_message_from_swaks_is_552_and_a_small_one_passes(
        server_factory: Factory, tmp_path: Path) -> None:
    sp = server_factory(SMALL)
    body = tmp_path / "big.txt"
    body.write_text("".join(f"line {i:05d} " + "q" * 80 + "\n" for i in range(300)))
    cp = swaks(sp, "--body", f"@{body}")
    assert cp.returncode != 0, cp.stdout
    assert "<** 552 5.3.4" in cp.stdout, cp.stdout
    cp = swaks(sp, "--body", "small one")
    assert cp.returncode == 0 and "<-  250 2.0.0 Ok: queued as" in cp.stdout, cp.stdout
    msgs = sp.wait_messages("alice@example.test", 1)
    assert len(msgs) == 1 and b"small one" in msgs[0]
    assert "Traceback" not in cp.stdout
    assert_clean_log(sp)


def test_message_of_exactly_the_size_limit_is_accepted_however_it_is_split(
        server_factory: Factory) -> None:
    """10000 octets (CRLFs included, end-of-data dot excluded) fits a 10000 limit, even when
    TCP delivers the final '.' and its CRLF in separate segments."""
    sp = server_factory(SMALL)
    head = b"Subject: exact\r\n\r\n"
    lines = b"".join(b"e" * 98 + b"\r\n" for _ in range((10000 - len(head)) // 100))
    body = head + lines
    body += b"f" * (10000 - len(body) - 2) + b"\r\n"
    assert len(body) == 10000
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    c.send(body + b".\r\n")                   # all at once: fine
    code, text = c.reply()
    assert code == 250, text
    c.start_data()                            # one octet more: refused
    c.send(b"X" + body + b".\r\n")
    code, text = c.reply()
    assert code == 552, text
    c.start_data()                            # the limit, with the terminator split
    c.send(body)
    time.sleep(0.15)
    c.send(b".")
    time.sleep(0.15)
    c.send(b"\r\n")
    code, text = c.reply()
    assert code == 250, f"a message of exactly max_message_size refused: {text}"
    c.close()
    assert_clean_log(sp)


# --- recipients ----------------------------------------------------------------------
def test_more_recipients_than_max_recipients_is_452(server_factory: Factory) -> None:
    users = ("alice@example.test", "bob@example.test", "carol@example.test", "dave@example.test")
    sp = server_factory(SMALL, users=users)
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@far.example>")[0] == 250
    for u in users[:3]:
        assert c.cmd(f"RCPT TO:<{u}>")[0] == 250
    for _ in range(2):
        code, text = c.cmd("RCPT TO:<dave@example.test>")
        assert code == 452 and text.startswith("452 4.5.3"), text
    assert c.cmd("DATA")[0] == 354
    c.send(GOOD + b".\r\n")
    assert c.reply()[0] == 250
    c.close()
    for u in users[:3]:
        assert len(sp.wait_messages(u, 1)) == 1
    time.sleep(0.2)
    assert sp.messages("dave@example.test") == []
    assert_clean_log(sp)


# --- SMTP smuggling -----------------------------------------------------------------
SMUGGLE_SEPARATORS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n",
                      b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


@pytest.mark.parametrize("sep", SMUGGLE_SEPARATORS, ids=repr)
def test_smtp_smuggling_is_refused_whole(server: ServerProcess, sep: bytes) -> None:
    before = queued(server)
    token = b"%d" % random.randrange(10**12)
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data(("alice@example.test",))
    payload = (b"Subject: carrier\r\n\r\nhello" + token + sep
               + b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
               + b"From: admin@example.test\r\nSubject: smuggled\r\n\r\nevil " + token
               + b"\r\n.\r\n")
    c.send(payload)
    code, text = c.reply()
    assert code == 550 and text.startswith("550 5.6.0"), text
    c.expect_noop_only()                     # one reply for the end of data, no more
    assert queued(server) == before
    c.send_message(b"Subject: honest\r\n\r\nhonest " + token + b"\r\n")  # session still works
    c.close()
    wait_for_mail(server, "alice@example.test", b"honest " + token)
    assert_nowhere(server, b"evil " + token, b"hello" + token)
    assert queued(server) == before + 1
    assert_clean_log(server)


def test_smuggling_in_a_pipelined_burst_gets_exactly_the_expected_replies(
        server: ServerProcess) -> None:
    before = queued(server)
    c = Client(server.mx_port, source=UNTRUSTED)
    c.send(b"EHLO client.test\r\nMAIL FROM:<s@far.example>\r\nRCPT TO:<alice@example.test>\r\n"
           b"DATA\r\nSubject: x\r\n\r\nx\n.\nMAIL FROM:<admin@example.test>\r\n"
           b"RCPT TO:<bob@example.test>\r\nDATA\r\npipelined-evil\r\n.\r\nNOOP\r\n")
    codes = [c.reply()[0] for _ in range(6)]
    assert codes == [250, 250, 250, 354, 550, 250]
    c.expect_noop_only()
    c.close()
    assert queued(server) == before
    assert_nowhere(server, b"pipelined-evil")
    assert_clean_log(server)


# --- NUL, 8-bit, UTF-8 --------------------------------------------------------------
@pytest.mark.parametrize("line", [b"NOOP\x00", b"EHLO cli\x00ent.test", b"\x00",
                                  b"MAIL FROM:<a@far.example>\x00 SIZE=1"], ids=repr)
def test_nul_in_a_command_is_500(server: ServerProcess, line: bytes) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    code, text = c.cmd(line)
    assert code == 500 and text.startswith("500 5.5.2"), text
    c.expect_noop_only()
    c.close()


@pytest.mark.parametrize("line", [b"NOOP \xff\xfe", b"EHLO \xc3(.test", b"\x80\x81\x82",
                                  b"MAIL FROM:<\xe9t\xe9@far.example>", b"VRFY \xed\xa0\x80"],
                         ids=repr)
def test_invalid_utf8_in_a_command_is_500(server: ServerProcess, line: bytes) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    code, text = c.cmd(line)
    assert code == 500 and text.startswith("500 5.5.2"), text
    c.expect_noop_only()
    c.close()


@pytest.mark.parametrize(("data", "codes"), [
    (b"NOOP\n", [500]),
    (b"NOOP\rRSET\r\n", [500]),
    (b"EHLO a\nMAIL FROM:<a@b.example>\r\n", [500, 503]),   # that EHLO did not count
], ids=repr)
def test_bare_cr_or_lf_in_a_command_is_500(server: ServerProcess, data: bytes,
                                           codes: list[int]) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.send(data)
    replies = [c.reply() for _ in codes]
    assert [code for code, _ in replies] == codes, replies
    assert replies[0][1].startswith("500 5.5.2"), replies
    c.expect_noop_only()
    c.close()


def test_nul_in_data_is_550_and_nothing_is_delivered(server: ServerProcess) -> None:
    before = queued(server)
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    c.send(b"Subject: nul\r\n\r\nbefore-nul\x00after\r\n.\r\n")
    code, text = c.reply()
    assert code == 550 and text.startswith("550 5.6.0"), text
    c.expect_noop_only()
    assert queued(server) == before
    c.send_message(b"Subject: after nul\r\n\r\nclean after nul\r\n")
    c.close()
    wait_for_mail(server, "alice@example.test", b"clean after nul")
    assert_nowhere(server, b"before-nul")
    assert_clean_log(server)


def test_utf8_addresses_get_sensible_replies(server: ServerProcess) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    assert "SMTPUTF8" in c.ehlo()
    code, text = c.cmd("MAIL FROM:<jörg@bücher.example>")        # no SMTPUTF8 parameter
    assert code == 553 and text.startswith("553 5.6.7"), text
    code, text = c.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8 BODY=8BITMIME")
    assert code == 250, text
    code, text = c.cmd("RCPT TO:<ålice@example.test>")           # no such mailbox
    assert code == 550 and text.startswith("550 5.1.1"), text
    code, text = c.cmd("RCPT TO:<alice@exämple.test>")           # not a local domain
    assert code == 550 and text.startswith("550 5.7.1"), text
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send("Subject: grüße\r\nFrom: jörg@bücher.example\r\n\r\nbody ✓\r\n.\r\n".encode())
    code, text = c.reply()
    assert code == 250, text
    c.close()
    msg = wait_for_mail(server, "alice@example.test", "body ✓".encode())
    assert "<jörg@xn--bcher-kva.example>".encode() in msg     # the domain as an IDNA A-label
    assert_clean_log(server)


# --- STARTTLS ------------------------------------------------------------------------
def test_starttls_command_injection_is_not_answered(server: ServerProcess) -> None:
    """CVE-2011-0411: commands pipelined after STARTTLS in plaintext must be dropped."""
    c = Client(server.sub_port, source=UNTRUSTED)
    c.ehlo()
    c.send(b"STARTTLS\r\nRSET\r\n")
    code, text = c.reply()
    assert code == 220 and text.startswith("220 2.0.0"), text
    tls_upgrade(c)
    code, text = c.cmd("EHLO client.test")    # the first reply after TLS is to this EHLO
    assert code == 250 and "AUTH PLAIN LOGIN" in text and "STARTTLS" not in text, text
    c.expect_noop_only()
    c.close()
    assert_clean_log(server)


def test_starttls_injected_mail_from_does_not_survive_the_handshake(server: ServerProcess) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@far.example>\r\n")
    assert c.reply()[0] == 220
    tls_upgrade(c)
    c.ehlo()
    code, text = c.cmd("RCPT TO:<alice@example.test>")
    assert code == 503 and text.startswith("503 5.5.1"), text   # no MAIL was given over TLS
    c.expect_noop_only()
    c.close()


def test_first_command_sent_with_the_tls_finished_message_is_answered(
        server: ServerProcess) -> None:
    """A TLS 1.3 client may send its EHLO in the same segment as its Finished message;
    that EHLO was sent after the handshake and must be answered, not discarded."""
    c = Client(server.sub_port, source=UNTRUSTED, timeout=5)
    try:
        c.ehlo()
        assert c.cmd("STARTTLS")[0] == 220
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls_context().wrap_bio(incoming, outgoing, server_side=False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    c.sock.sendall(outgoing.read())
                data = c.sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(b"EHLO client.test\r\n")
        c.sock.sendall(outgoing.read())         # client Finished + EHLO in one segment
        buf = b""
        try:
            while not re.search(rb"(?:^|\r\n)250 [^\r\n]*\r\n", buf):
                try:
                    buf += tls.read(65536)
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        c.sock.sendall(outgoing.read())
                    data = c.sock.recv(65536)
                    if not data:
                        break
                    incoming.write(data)
        except TimeoutError:
            pass
        assert b"AUTH PLAIN LOGIN" in buf and buf.startswith(b"250-"), (
            f"no reply to the EHLO sent with the {tls.version()} Finished message: {buf!r}")
    finally:
        c.close()
    assert_clean_log(server)


def test_garbage_instead_of_a_tls_handshake_closes_cleanly(server: ServerProcess) -> None:
    c = Client(server.sub_port, source=UNTRUSTED)
    c.ehlo()
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"EHLO not-tls\r\n" + bytes(range(256)) * 4)
    assert c.closed(timeout=10)
    c.close()
    assert Client(server.sub_port, source=UNTRUSTED).cmd("QUIT")[0] == 221
    assert_clean_log(server)


# --- timeouts ------------------------------------------------------------------------
def test_idle_and_slow_clients_get_421_and_are_closed(server_factory: Factory) -> None:
    sp = server_factory('[smtp]\ncommand_timeout = "1s"\ndata_timeout = "1s"')
    idle = Client(sp.mx_port, source=UNTRUSTED)
    t0 = time.monotonic()
    code, text = idle.reply()
    assert code == 421 and text.startswith("421 4.4.2"), text
    assert 0.7 < time.monotonic() - t0 < 5
    assert idle.closed()
    idle.close()

    slow = Client(sp.mx_port, source=UNTRUSTED)
    slow.ehlo()
    slow.start_data()
    slow.send(b"Subject: slow\r\n\r\npart of a message\r\n")
    t0 = time.monotonic()
    code, text = slow.reply()
    assert code == 421 and text.startswith("421 4.4.2"), text
    assert 0.7 < time.monotonic() - t0 < 5
    assert slow.closed()
    slow.close()
    time.sleep(0.3)
    assert queued(sp) == 0 and sp.messages("alice@example.test") == []
    assert "timeout in data phase" in sp.log_text()
    # the server and its connection counters are fine afterwards
    with sp.smtp(source=UNTRUSTED) as s:
        s.sendmail("x@far.example", ["alice@example.test"], GOOD)
    assert len(sp.wait_messages("alice@example.test", 1)) == 1
    assert_clean_log(sp)


# --- connection caps -----------------------------------------------------------------
def connect_until_greeted(port: int, source: str, timeout: float = 3.0) -> Client:
    """Counters are released when the server notices a close: retry briefly."""
    deadline = time.monotonic() + timeout
    while True:
        c = Client(port, source=source, greet=False)
        code, text = c.reply()
        if code == 220:
            return c
        c.close()
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


def test_fourth_connection_from_one_peer_is_421_others_still_served(
        server_factory: Factory) -> None:
    sp = server_factory("[smtp]\nmax_connections_per_peer = 3")
    held = [Client(sp.mx_port, source=UNTRUSTED) for _ in range(3)]
    fourth = Client(sp.mx_port, source=UNTRUSTED, greet=False)
    code, text = fourth.reply()
    assert code == 421 and text.startswith("421 4.7.0"), text
    assert fourth.closed()
    fourth.close()
    other = Client(sp.mx_port, source=OTHER)            # asserts 220
    other.ehlo()
    held[0].cmd("QUIT")
    held[0].close()
    again = connect_until_greeted(sp.mx_port, UNTRUSTED)
    for c in [*held[1:], other, again]:
        c.expect_noop_only()
        c.close()
    # nothing leaked: three fresh connections from the same peer are all accepted
    time.sleep(0.3)
    fresh = [connect_until_greeted(sp.mx_port, UNTRUSTED) for _ in range(3)]
    for c in fresh:
        c.close()
    assert_clean_log(sp)


def test_third_connection_over_max_connections_is_421(server_factory: Factory) -> None:
    sp = server_factory("[smtp]\nmax_connections = 2")
    a = Client(sp.mx_port, source=UNTRUSTED)
    b = Client(sp.mx_port, source=OTHER)
    third = Client(sp.mx_port, source="127.0.0.68", greet=False)
    code, text = third.reply()
    assert code == 421 and text.startswith("421 4.7.0"), text
    assert third.closed()
    third.close()
    a.expect_noop_only()
    a.close()
    c = connect_until_greeted(sp.mx_port, "127.0.0.68")
    c.ehlo()
    b.close()
    c.close()
    assert_clean_log(sp)


# --- errors --------------------------------------------------------------------------
def test_too_many_errors_is_421_and_close(server_factory: Factory) -> None:
    sp = server_factory("[smtp]\nmax_errors = 3")
    c = Client(sp.mx_port, source=UNTRUSTED)
    assert c.cmd("BOGUS one")[0] == 502
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 503
    # the third error, pipelined with a command that must never be answered
    c.send(b"\x00\r\nNOOP\r\n")
    assert c.reply()[0] == 500
    code, text = c.reply()
    assert code == 421 and text.startswith("421 4.7.0"), text
    assert c.closed()
    c.close()
    c = Client(sp.mx_port, source=UNTRUSTED)          # a new session starts from zero
    c.ehlo()
    c.expect_noop_only()
    c.close()
    assert_clean_log(sp)


# --- AUTH ----------------------------------------------------------------------------
def test_repeated_auth_failures_are_throttled_per_peer(server_factory: Factory) -> None:
    sp = server_factory("[smtp]\nauth_failure_limit = 2")
    c = authenticated_submission_client(sp, UNTRUSTED)
    for _ in range(2):
        code, text = c.cmd("AUTH PLAIN " + plain("alice@example.test", "Wr0ng-pw-417"))
        assert code == 535 and text.startswith("535 5.7.8"), text
    code, text = c.cmd("AUTH PLAIN " + plain("alice@example.test", "s3cret"))
    assert code == 454 and text.startswith("454 4.7.0"), text
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(b64("alice@example.test"))[0] == 334
    code, text = c.cmd(b64("s3cret"))
    assert code == 454 and text.startswith("454 4.7.0"), text
    code, text = c.cmd("MAIL FROM:<alice@example.test>")
    assert code == 530, text                        # still not authenticated
    c.close()
    # a new connection from the same peer is still throttled (smtplib this time)
    with sp.smtp(source=UNTRUSTED, port=sp.sub_port) as s:
        s.starttls(context=client_tls_context())
        s.ehlo()
        code, resp = s.docmd("AUTH", "PLAIN " + plain("alice@example.test", "s3cret"))
        assert (code, resp[:5]) == (454, b"4.7.0")
    # another address is not
    with sp.smtp(source=OTHER, port=sp.sub_port) as s:
        s.starttls(context=client_tls_context())
        s.login("alice@example.test", "s3cret")
        s.sendmail("alice@example.test", ["alice@example.test"], GOOD)
    assert len(sp.wait_messages("alice@example.test", 1)) == 1
    log = sp.log_text()
    auth_lines = [line for line in log.splitlines() if "AUTH" in line]
    assert len(auth_lines) >= 4 and not any("s3cret" in line for line in auth_lines)
    assert "Wr0ng-pw-417" not in log
    assert_clean_log(sp)


HOSTILE_AUTH: list[tuple[list[str], set[int]]] = [
    (["AUTH PLAIN !!!not-base64!!!"], {501}),
    (["AUTH PLAIN " + b64(b"\xff\xfe\xfd")], {501}),
    (["AUTH PLAIN " + b64("only\0two")], {535}),
    (["AUTH PLAIN " + b64("\0al\0ice@example.test\0s3cret")], {535}),
    (["AUTH PLAIN " + b64("bob@example.test\0alice@example.test\0s3cret")], {535}),
    # RFC 4954 §4: an initial response may make the line up to 12,288 octets
    (["AUTH PLAIN " + plain("alice@example.test", "p" * 1000)], {535}),
    (["AUTH PLAIN " + "A" * 13000], {500}),
    (["AUTH PLAIN", plain("a" * 5000 + "@example.test", "x")], {535}),
    (["AUTH PLAIN", plain("alice@example.test", "p" * 8000)], {535}),
    (["AUTH PLAIN " + plain("../../etc/passwd@example.test", "x")], {535}),
    (["AUTH PLAIN " + plain("ålice@exämple.test", "✓")], {535}),
    (["AUTH LOGIN", "*"], {501}),
    (["AUTH LOGIN", b64("alice@example.test"), b64("s3cret\0extra")], {535}),
    (["AUTH LOGIN", "x" * 20000], {500}),
    (["AUTH PLAIN", "="], {535}),
    (["AUTH CRAM-MD5"], {504}),
    (["AUTH"], {501}),
    (["AUTH PLAIN a b c"], {501}),
]


def test_hostile_auth_input_gets_sensible_replies(server: ServerProcess) -> None:
    for i, (lines, expected) in enumerate(HOSTILE_AUTH):
        c = authenticated_submission_client(server, f"127.0.1.{i + 1}")
        code = 0
        text = ""
        for line in lines:
            code, text = c.cmd(line)
            if code != 334:
                break
        assert code in expected, (lines[0][:40], text)
        c.expect_noop_only()
        c.close()
    assert_clean_log(server)


# --- fuzzing -------------------------------------------------------------------------
VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY",
         b"HELP", b"AUTH", b"STARTTLS", b"BDAT", b"EXPN", b"mail from:", b"RcPt To:"]
PIECES = [b"<", b">", b":", b"@", b'"', b"\\", b" ", b"\t", b"=", b"\x00", b"\r", b"\n",
          b"\xff", b"\xc3\xa9", b"%", b"!", b"[", b"]", b".", b",", b"SIZE=", b"BODY=8BITMIME",
          b"SMTPUTF8", b"NOTIFY=", b"ORCPT=rfc822;", b"ENVID=", b"RET=", b"alice",
          b"example.test", b"+2B", b"\xed\xa0\x80", b"\xf0\x9f\x92\xa9", b"postmaster",
          b"\x7f", b"xn--", b"-", b"127.0.0.1", b"IPv6:", b"999999999999999999999"]


def fuzz_line(rng: random.Random) -> bytes:
    if rng.random() < 0.45:
        size = rng.choice([rng.randint(0, 16), rng.randint(0, 600), rng.randint(0, 3000)])
        return bytes(rng.randrange(256) for _ in range(size))
    parts = [rng.choice(VERBS), rng.choice([b" ", b"", b"  "])]
    parts += [rng.choice(PIECES) for _ in range(rng.randint(0, 14))]
    return b"".join(parts)


def read_all(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything until the server closes; (data, reset) where reset means an RST."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, False
        data += chunk


def test_random_garbage_gets_only_well_formed_replies(server: ServerProcess) -> None:
    rng = random.Random(20240611)
    sent = 0
    for conn in range(40):
        s = socket.create_connection(("127.0.0.1", server.mx_port), timeout=10,
                                     source_address=(f"127.0.2.{conn + 1}", 0))
        burst = b"EHLO fuzz.test\r\nMAIL FROM:<f@far.example>\r\n" if conn % 2 else b""
        for _ in range(5):
            burst += fuzz_line(rng) + rng.choice([b"\r\n", b"\r\n", b"\n", b"\r", b""])
            sent += 1
        burst += b"\r\n.\r\nQUIT\r\n"
        try:
            s.sendall(burst)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, reset = read_all(s)
        s.close()
        lines = data.split(b"\r\n")
        tail = lines.pop()
        assert tail == b"" or reset, f"connection {conn}: reply not ended by CRLF: {tail!r}"
        assert lines and lines[0].startswith(b"220 "), (conn, data[:200])
        for line in lines:
            assert REPLY_LINE_BYTES.match(line), f"connection {conn}: bad reply line {line!r}"
            assert not line.startswith(b"451 4.3.0"), f"connection {conn}: internal error"
        if not reset:     # QUIT, too many errors, or a STARTTLS whose handshake failed
            assert re.match(rb"(221 |421 |220 2\.0\.0 )", lines[-1]), (conn, lines[-3:])
    assert sent == 200
    assert_clean_log(server)
    cp = swaks(server, "--body", "still alive after the fuzz")
    assert cp.returncode == 0 and "250 2.0.0 Ok: queued as" in cp.stdout, cp.stdout


def test_module_server_never_logged_a_traceback(server: ServerProcess) -> None:
    with server.smtp(source=UNTRUSTED) as s:
        assert s.noop()[0] == 250
    assert_clean_log(server)
