"""More hostile input on real sockets: pipelining into DATA, header injection through the
envelope and HELO, SMTPUTF8 end to end, slowloris peers and more smuggling vectors.

Like test_hostile.py, each test talks to a real ``postroom serve`` subprocess and checks
the replies, the Maildirs (what was really delivered) and the server's log.
"""

from __future__ import annotations

import random
import re
import select
import smtplib
import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import UNTRUSTED, RawClient, ServerProcess
from tests.integration.test_hostile import (
    Client,
    all_mail,
    assert_clean_log,
    queued,
    wait_for_mail,
)

Factory = Callable[..., ServerProcess]


def token() -> bytes:
    return b"%d" % random.randrange(10**12)


def pending(c: RawClient, wait: float = 0.3) -> bytes:
    """Whatever the server has said beyond what was read, after ``wait`` seconds."""
    time.sleep(wait)
    c.sock.setblocking(False)
    try:
        extra = c.sock.recv(65536)
    except BlockingIOError:
        extra = b""
    finally:
        c.sock.setblocking(True)
        c.sock.settimeout(10)
    return c.buf + extra


def header_block(message: bytes) -> list[bytes]:
    """The header lines of a delivered Maildir file (LF line ends)."""
    head, sep, _ = message.partition(b"\n\n")
    assert sep, f"no end of header in {message[:300]!r}"
    return head.split(b"\n")


def header_names(message: bytes) -> list[bytes]:
    """The field names of the header, in order; every line must be a field or a fold."""
    names: list[bytes] = []
    for line in header_block(message):
        if line[:1] in (b" ", b"\t"):
            assert names, f"header starts with a continuation line: {line!r}"
            continue
        m = re.match(rb"([\x21-\x39\x3b-\x7e]+):", line)
        assert m, f"header line that is neither a field nor a fold: {line!r}"
        names.append(m.group(1).lower())
    return names


def received_header(message: bytes) -> bytes:
    """The (unfolded) Received header that Postroom put on top of the message."""
    lines = header_block(message)
    start = next(i for i, line in enumerate(lines) if line.lower().startswith(b"received:"))
    out = [lines[start]]
    for line in lines[start + 1:]:
        if line[:1] not in (b" ", b"\t"):
            break
        out.append(line)
    return b"\n".join(out)


# --- commands pipelined behind DATA -------------------------------------------------------
def open_transaction(server: ServerProcess) -> Client:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    assert c.cmd("MAIL FROM:<s@far.example>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    return c


def test_mail_from_pipelined_behind_data_is_message_content(server: ServerProcess) -> None:
    """RFC 2920 §3.1: DATA ends a group. "DATA\r\nMAIL FROM:<x@y>\r\n" in one packet: the
    MAIL line is the message's first line, and it is never answered as a command."""
    before = queued(server)
    mark = token()
    c = open_transaction(server)
    c.send(b"DATA\r\nMAIL FROM:<x@y.example>\r\n")
    code, text = c.reply()
    assert code == 354, text
    assert pending(c) == b"", "the MAIL line behind DATA was answered as a command"
    c.send(b"Subject: behind " + mark + b"\r\n\r\nbody " + mark + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250 and "queued as" in text, text
    c.expect_noop_only()
    c.close()
    msg = wait_for_mail(server, "alice@example.test", b"body " + mark)
    # the line is the message's first line, right under the Received header we added
    assert b"\nMAIL FROM:<x@y.example>\nSubject: behind " + mark + b"\n" in msg, msg[:600]
    assert queued(server) == before + 1


BEHIND_DATA = [b"QUIT", b"RSET", b"NOOP", b"STARTTLS", b"RCPT TO:<bob@example.test>", b"DATA",
               b"HELP", b"EHLO other.example"]


def test_any_command_pipelined_behind_data_is_message_content(server: ServerProcess) -> None:
    before = queued(server)
    mark = token()
    c = open_transaction(server)
    c.send(b"DATA\r\n" + b"".join(line + b"\r\n" for line in BEHIND_DATA))
    code, text = c.reply()
    assert code == 354, text
    assert pending(c) == b"", "a line behind DATA was answered as a command"
    c.send(b"\r\nbody " + mark + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    c.expect_noop_only()                          # still open: QUIT was text, too
    c.close()
    msg = wait_for_mail(server, "alice@example.test", b"body " + mark)
    assert b"\n" + b"\n".join(BEHIND_DATA) + b"\n\nbody " + mark in msg, msg[:600]
    assert queued(server) == before + 1
    assert not [m for m in server.messages("bob@example.test") if mark in m]


def test_whole_transaction_pipelined_behind_data_gives_one_message(server: ServerProcess) -> None:
    """A second transaction pipelined into the first one's DATA is the first message's text:
    exactly one message, for the first recipient only."""
    before = queued(server)
    mark = token()
    c = Client(server.mx_port, source=UNTRUSTED)
    c.send(b"EHLO client.test\r\nMAIL FROM:<s@far.example>\r\nRCPT TO:<alice@example.test>\r\n"
           b"DATA\r\nMAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
           b"Subject: inner " + mark + b"\r\n\r\n")
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    assert pending(c) == b""
    c.send(b"text " + mark + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    c.expect_noop_only()
    c.close()
    msg = wait_for_mail(server, "alice@example.test", b"text " + mark)
    assert b"\nMAIL FROM:<admin@example.test>\nRCPT TO:<bob@example.test>\nDATA\n" in msg
    assert not [m for m in server.messages("bob@example.test") if mark in m]
    assert queued(server) == before + 1
    assert_clean_log(server)


def test_when_data_is_refused_what_follows_is_read_as_commands_and_nothing_is_delivered(
        server: ServerProcess) -> None:
    """The other side of RFC 2920: with no accepted recipient DATA is refused, and the text
    pipelined behind it is commands (each answered), never a message."""
    before = queued(server)
    mark = token()
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.send(b"MAIL FROM:<s@far.example>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n"
           b"Subject: " + mark + b"\r\n\r\nrefused " + mark + b"\r\n.\r\n")
    codes = [c.reply()[0] for _ in range(7)]
    assert codes[:3] == [250, 550, 503], codes
    assert all(code >= 500 for code in codes[3:]), codes     # text lines are not commands
    c.expect_noop_only()
    c.close()
    assert queued(server) == before
    assert_never_delivered(server, b"refused " + mark)
    assert_clean_log(server)


# --- header injection ---------------------------------------------------------------------
HELO_NAMES = [
    b"evil.example\x0bX-Injected:\x0cyes",
    b"evil.example\tX-Injected:yes",
    b"evil\x1b[31m.example",
    b"evil\x7f.example",
    b"evil\x01\x02\x03\x1f.example",
    b"caf\xc3\xa9.example",
    b"evil\xc2\x85X-Injected:yes",                 # U+0085 NEXT LINE
    b"evil\xe2\x80\xa8X-Injected:yes",             # U+2028 LINE SEPARATOR
    b"x" * 400,
]


@pytest.mark.parametrize("name", HELO_NAMES, ids=repr)
def test_helo_name_is_sanitised_in_the_received_header(server: ServerProcess,
                                                       name: bytes) -> None:
    mark = token()
    c = Client(server.mx_port, source=UNTRUSTED)
    code, text = c.cmd(b"EHLO " + name)
    if code != 250:                   # refusing the name is fine too; nothing to check
        assert code == 501, text
        c.close()
        return
    c.start_data()
    c.send(b"Subject: helo " + mark + b"\r\n\r\nhelo body " + mark + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    c.close()
    msg = wait_for_mail(server, "alice@example.test", b"helo body " + mark)
    assert b"X-Injected" not in b"\n".join(ln for ln in header_block(msg)
                                           if not ln.lower().startswith(b"received"))
    assert header_names(msg) == [b"return-path", b"delivered-to", b"received", b"subject"]
    received = received_header(msg)
    assert re.fullmatch(rb"[\x20-\x7e\n\t]*", received), received
    helo_text = re.match(rb"Received: from (\S*) \(", received)
    assert helo_text, received
    assert re.fullmatch(rb"[\x21-\x7e]{1,255}", helo_text.group(1)), helo_text.group(1)
    assert_clean_log(server)


@pytest.mark.parametrize("helo", [b"EHLO a\rX-Injected: yes", b"EHLO a\nX-Injected: yes",
                                  b"EHLO a\x00X-Injected: yes"], ids=repr)
def test_helo_with_cr_lf_or_nul_is_refused(server: ServerProcess, helo: bytes) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.send(helo + b"\r\n")
    code, text = c.reply()
    assert code == 500 and text.startswith("500 5.5.2"), text
    if b"\n" in helo:                 # the tail after the bare LF is a line of its own
        assert c.reply()[0] == 502
    code, text = c.cmd("MAIL FROM:<s@far.example>")
    assert code == 503, text          # no HELO was taken
    c.close()


RAW_PARAM_VALUES = [b"a\x0bb", b"a\tb", b"a\x1bb", b"a\x7fb", b"a\x01b", b"a\x0cX-Injected:b"]


@pytest.mark.parametrize("value", RAW_PARAM_VALUES, ids=repr)
@pytest.mark.parametrize("template", [
    b"MAIL FROM:<s@far.example> ENVID={}",
    b"RCPT TO:<alice@example.test> ORCPT=rfc822;{}",
    b"RCPT TO:<alice@example.test> ORCPT={};alice@example.test",
    b"RCPT TO:<alice@example.test> NOTIFY={}",
], ids=["ENVID", "ORCPT-address", "ORCPT-type", "NOTIFY"])
def test_control_characters_in_envelope_parameters_are_refused(
        server: ServerProcess, template: bytes, value: bytes) -> None:
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    if template.startswith(b"RCPT"):
        assert c.cmd("MAIL FROM:<s@far.example>")[0] == 250
    code, text = c.cmd(template.replace(b"{}", value))
    assert code in (501, 555) and text[4:9] == "5.5.4", text
    c.expect_noop_only()
    c.close()


def send_with_xtext_line_breaks(server: ServerProcess) -> tuple[bytes, bytes]:
    """A message from bob (local, so he gets the success notice NOTIFY=SUCCESS asks for)
    to alice, whose ENVID and ORCPT carry '+0D+0AX-Injected:' (valid xtext for CRLF).
    Returns (the delivered message, the success notice)."""
    mark = token()
    inject = b"+0D+0AX-Injected:+20" + mark
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    code, text = c.cmd(b"MAIL FROM:<bob@example.test> ENVID=env" + mark + inject)
    assert code == 250, text
    code, text = c.cmd(b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS "
                       b"ORCPT=rfc822;alice@example.test" + inject)
    assert code == 250, text
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: xtext " + mark + b"\r\n\r\nxtext body " + mark + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    c.close()
    msg = wait_for_mail(server, "alice@example.test", b"xtext body " + mark)
    dsn = wait_for_mail(server, "bob@example.test", b"env" + mark, timeout=15)
    return msg, dsn


def test_xtext_line_breaks_in_envid_and_orcpt_reach_no_header(server: ServerProcess) -> None:
    """ENVID and ORCPT are xtext, where '+0D+0A' is CRLF: accepted, but neither the
    delivered message nor the success notice's headers and delivery-status fields may
    grow a line out of them."""
    msg, dsn = send_with_xtext_line_breaks(server)
    assert b"X-Injected" not in msg, msg[:800]
    assert header_names(msg) == [b"return-path", b"delivered-to", b"received", b"subject"]
    assert b"X-Injected" not in b"\n".join(header_block(dsn))
    header_names(dsn)
    status = dsn.partition(b"Content-Type: message/delivery-status\n")[2].partition(b"\n--")[0]
    assert status, dsn
    fields = [ln for ln in status.split(b"\n") if ln and ln[:1] not in (b" ", b"\t")]
    assert not [f for f in fields if f.startswith(b"X-Injected")], status
    envid = [f for f in fields if f.startswith(b"Original-Envelope-Id:")]
    assert len(envid) == 1 and b"X-Injected" in envid[0], status    # on its own line
    assert_clean_log(server)


def test_orcpt_line_breaks_do_not_reach_the_text_of_a_notice(server: ServerProcess) -> None:
    _, dsn = send_with_xtext_line_breaks(server)
    assert b"\r" not in dsn, "bare CR in the delivered notice"
    for line in dsn.split(b"\n"):
        assert not line.startswith(b"X-Injected"), dsn


# --- SMTPUTF8 ----------------------------------------------------------------------------
UTF8_ALIASES = """
    [aliases]
    "jörg@example.test" = ["alice@example.test"]
    "ünïcødé@example.test" = ["bob@example.test", "alice@example.test"]
    """


def test_smtputf8_addresses_end_to_end_to_local_mailboxes(server_factory: Factory) -> None:
    sp = server_factory(UTF8_ALIASES, users=("alice@example.test", "bob@example.test"))
    mark = token()
    c = Client(sp.mx_port, source=UNTRUSTED)
    assert "SMTPUTF8" in c.ehlo()
    code, text = c.cmd("RCPT TO:<jörg@example.test>")
    assert code == 503, text
    code, text = c.cmd("MAIL FROM:<séverine@bücher.example> SMTPUTF8 BODY=8BITMIME")
    assert code == 250, text
    for rcpt in ("jörg@example.test", "JÖRG@example.test", "ünïcødé@example.test"):
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, (rcpt, text)
    code, text = c.cmd("RCPT TO:<nobödy@example.test>")
    assert code == 550 and text.startswith("550 5.1.1"), text
    assert c.cmd("DATA")[0] == 354
    body = ("From: Séverine <séverine@bücher.example>\r\nTo: Jörg <jörg@example.test>\r\n"
            "Subject: grüße ✓\r\n\r\nZürich → Köln " + mark.decode() + "\r\n").encode()
    c.send(body + b".\r\n")
    code, text = c.reply()
    assert code == 250, text
    c.close()
    marker = ("Zürich → Köln " + mark.decode()).encode()
    for user in ("alice@example.test", "bob@example.test"):
        msg = wait_for_mail(sp, user, marker)      # exactly one copy each
        # the domain is stored in its IDNA A-label form, the one spelling Postroom compares
        assert "Return-Path: <séverine@xn--bcher-kva.example>\n".encode() in msg, msg[:400]
        assert body.replace(b"\r\n", b"\n") in msg
        assert f"Delivered-To: {user}\n".encode() in msg
        assert re.search(rb"\nReceived: from client\.test \(", msg), msg[:400]
    # the same through smtplib, which sends SMTPUTF8 when asked to
    with sp.smtp(source=UNTRUSTED) as s:
        s.sendmail("jörg@bücher.example", ["jörg@example.test"],
                   "Subject: via smtplib\r\n\r\nsmtplib ✓ ".encode() + mark + b"\r\n",
                   mail_options=["SMTPUTF8"])
    msg = wait_for_mail(sp, "alice@example.test", "smtplib ✓ ".encode() + mark)
    assert "Return-Path: <jörg@xn--bcher-kva.example>\n".encode() in msg
    # without SMTPUTF8 the same addresses are refused, not mangled
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    assert c.cmd("MAIL FROM:<ascii@far.example>")[0] == 250
    code, text = c.cmd("RCPT TO:<jörg@example.test>")
    assert code == 553 and text.startswith("553 5.6.7"), text
    c.expect_noop_only()
    c.close()
    assert_clean_log(sp)


# --- slowloris ---------------------------------------------------------------------------
def trickle(c: RawClient, data: bytes, interval: float, limit: float) -> tuple[float, bytes]:
    """Send ``data`` one octet every ``interval`` seconds (cycling) until the server closes
    or ``limit`` seconds pass. Returns (seconds until closed, or inf; what the server said)."""
    t0 = time.monotonic()
    said = b""
    i = 0
    while time.monotonic() - t0 < limit:
        try:
            c.sock.sendall(data[i % len(data):i % len(data) + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0, said
        i += 1
        end = time.monotonic() + interval
        while (left := end - time.monotonic()) > 0:
            readable, _, _ = select.select([c.sock], [], [], left)
            if not readable:
                continue
            try:
                chunk = c.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return time.monotonic() - t0, said
            said += chunk
    return float("inf"), said


SLOW = '[smtp]\ncommand_timeout = "2s"\ndata_timeout = "2s"'


def test_slowloris_command_is_cut_off_although_bytes_keep_coming(server_factory: Factory) -> None:
    """One byte of a command every 0.5 s: partial input must not reset the command timer,
    so the server closes about command_timeout after the last complete command."""
    sp = server_factory(SLOW)
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    elapsed, said = trickle(c, b"NOOP " + b"x" * 200, interval=0.5, limit=12)
    c.close()
    assert elapsed < 6, f"still open after {elapsed:.1f}s of trickled bytes (said {said!r})"
    assert said.startswith(b"421 4.4.2"), said
    assert "timeout in command phase" in sp.log_text()
    assert_clean_log(sp)


def test_slowloris_data_is_cut_off_although_lines_keep_coming(server_factory: Factory) -> None:
    """In DATA only 64 KB of new text resets the timer: complete lines sent slowly do not."""
    sp = server_factory(SLOW)
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    elapsed, said = trickle(c, b"ab\r\n", interval=0.5, limit=12)
    c.close()
    assert elapsed < 6, f"still open after {elapsed:.1f}s of trickled text (said {said!r})"
    assert said.startswith(b"421 4.4.2"), said
    time.sleep(0.3)
    assert queued(sp) == 0
    assert_clean_log(sp)


def test_a_slow_but_complete_client_is_not_cut_off(server_factory: Factory) -> None:
    """The other side of the slowloris rule: complete commands reset the timer."""
    sp = server_factory(SLOW)
    c = Client(sp.mx_port, source=UNTRUSTED)
    c.ehlo()
    for _ in range(3):                          # 2.7 s in all, more than command_timeout
        time.sleep(0.9)
        assert c.cmd("NOOP")[0] == 250
    c.send_message()
    c.close()
    assert_clean_log(sp)


# --- smuggling ---------------------------------------------------------------------------
# Separators from the SMTP smuggling advisories (SEC Consult 2023, CVE-2023-51764/5/6 and
# their follow-ups) not already in test_hostile.SMUGGLE_SEPARATORS. None contains a real
# CRLF.CRLF, so a server that reads the RFC strictly sees one message.
MORE_SEPARATORS = [b"\n.\r\r\n", b"\x00\n.\r\n", b"\n\x00.\r\n", b"\r\r\n.\r\r\n",
                   b"\r\n.\r\r\n", b"\r\n.\n\r\n", b"\r\n\r.\r\n", b"\r\n.\r\x00\n",
                   b"\r\x00\n.\r\n", b"\r\n\x00.\n", b"\r\n.\x00\n", b"\n.\x00\r\n",
                   b"\r\n.\r\r\r\n", b"\r\n.\r \n"]


def smuggle(c: Client, head: bytes, sep: bytes, mark: bytes, split: bool) -> None:
    """One DATA whose text hides a second transaction behind ``sep``: it must be refused
    whole with one 550 5.6.0 and nothing else said."""
    c.start_data(("alice@example.test",))
    smuggled = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"From: admin@example.test\r\nSubject: smuggled\r\n\r\nevil " + mark
                + b"\r\n.\r\n")
    if split:                         # the separator a byte at a time, in its own segments
        c.send(head)
        for octet in sep:
            time.sleep(0.01)
            c.send(bytes([octet]))
        time.sleep(0.01)
        c.send(smuggled)
    else:
        c.send(head + sep + smuggled)
    code, text = c.reply()
    assert code == 550 and text.startswith("550 5.6.0"), (sep, split, text)
    c.expect_noop_only()


def assert_never_delivered(sp: ServerProcess, *markers: bytes) -> None:
    for m in all_mail(sp):
        for marker in markers:
            assert marker not in m, f"{marker!r} was delivered: {m[:500]!r}"


@pytest.mark.parametrize("sep", MORE_SEPARATORS, ids=repr)
def test_more_smuggling_separators_are_refused_whole(server: ServerProcess, sep: bytes) -> None:
    assert b"\r\n.\r\n" not in sep
    before = queued(server)
    mark = token()
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    smuggle(c, b"Subject: carrier\r\n\r\nhello" + mark, sep, mark, split=False)
    smuggle(c, b"Subject: carrier\r\n\r\nhello" + mark, sep, mark, split=True)
    smuggle(c, b"", sep.lstrip(b"\r\n") if sep.startswith(b"\r\n.") else sep, mark, split=False)
    c.send_message(b"Subject: honest\r\n\r\nhonest " + mark + b"\r\n")  # still usable
    c.close()
    wait_for_mail(server, "alice@example.test", b"honest " + mark)
    assert queued(server) == before + 1           # the honest one only, ever
    assert_never_delivered(server, b"evil " + mark, b"hello" + mark)


def test_smuggling_separators_as_the_first_line_of_data_are_refused(
        server: ServerProcess) -> None:
    """The separator as DATA's very first line (the CRLF before it is the DATA command's)."""
    before = queued(server)
    mark = token()
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    for start in [b".\n", b".\r", b"\x00.\r\n", b".\x00\r\n", b"\n.\r\n", b".\r\r\n"]:
        smuggle(c, b"", start, mark, split=False)
    c.close()
    assert queued(server) == before
    assert_never_delivered(server, b"evil " + mark)


def test_a_stuffed_dot_line_keeps_everything_in_one_message(server: ServerProcess) -> None:
    """'..' is a dot-stuffed '.', not an end: the commands after it are text of the one
    message, which goes to its own recipient only."""
    before = queued(server)
    mark = token()
    c = Client(server.mx_port, source=UNTRUSTED)
    c.ehlo()
    c.start_data()
    c.send(b"Subject: stuffed\r\n\r\nfirst " + mark + b"\r\n..\r\n"
           b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
           b"second " + mark + b"\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, text
    c.expect_noop_only()
    c.close()
    msg = wait_for_mail(server, "alice@example.test", b"first " + mark)
    assert b"\n.\nMAIL FROM:<admin@example.test>\n" in msg and b"second " + mark in msg
    assert queued(server) == before + 1
    assert [m for m in all_mail(server) if mark in m] == [msg]
    assert_clean_log(server)


def test_module_server_is_clean_after_everything(server: ServerProcess) -> None:
    with smtplib.SMTP("127.0.0.1", server.mx_port, local_hostname="client.test",
                      source_address=(UNTRUSTED, 0), timeout=15) as s:
        assert s.noop()[0] == 250
    with socket.create_connection(("127.0.0.1", server.mx_port), timeout=5) as s:
        assert s.recv(4).startswith(b"220")
    assert_clean_log(server)
