#!/usr/bin/env python3
"""Fuzz the sans-I/O SMTP server core (postroom.smtp.protocol.ServerProtocol).

One input is one session. The first HEADER bytes choose the session's settings and a
small control stream; the rest is what the client sends. The control stream decides how
the client bytes are cut into ``receive()`` calls and how the driver answers each event
that needs an answer (a positive reply or a 5xx, sometimes a 421), so the fuzzer explores
framing and the caller's decisions together.

Invariants checked on every input (any violation raises and is a finding):

- no exception ever escapes the core while the driver keeps to its contract;
- ``take_output()`` is always whole reply lines: three digits, then ' ' or '-' (or the
  end of the line), then CRLF; no bare CR or LF; a multi-line reply keeps its code and is
  never left unfinished;
- ``phase`` is always a ``Phase``; ``errors`` never decreases;
- at most one ``MessageReceived`` per DATA that the core accepted with 354, and what it
  carries is a clean message (CRLF lines of at most 998 octets, no NUL, within the size
  limit, with a sender and at least one recipient);
- the core never closes behind the caller's back: ``phase`` becomes CLOSED only with a
  ``Closed`` event (or the caller's own ``close_with``);
- after ``Closed`` (or ``close_with``) nothing more is processed: no event, no output.

Run (see fuzz/README.md):  fuzz/run 60      or directly:
    python3 fuzz/fuzz_smtp.py -max_total_time=60 fuzz/corpus/smtp     (atheris)
    python3 fuzz/fuzz_smtp.py --hypothesis 60                         (no atheris)
    python3 fuzz/fuzz_smtp.py --replay CRASH_FILE...
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import harness  # noqa: E402 - fuzz/ is this script's own folder on sys.path

ROOT = harness.ROOT
sys.path.insert(0, str(ROOT / "src"))       # fuzz this checkout, not another installed copy

try:
    import atheris
except ImportError:                          # the hypothesis fallback below still works
    atheris = None

if atheris is not None and not {"--hypothesis", "--prepare", "--replay"} & set(sys.argv):
    atheris.enabled_hooks.add("RegEx")       # comparison feedback from re and str methods
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["postroom", "encodings.idna", "base64"]):
        import encodings.idna  # noqa: F401

        from postroom import replies
        from postroom.address import routing_hazard
        from postroom.model import Reply
        from postroom.smtp.protocol import (
            NEED_DATA,
            AuthCredentials,
            Capabilities,
            Closed,
            MailFrom,
            MessageReceived,
            Phase,
            RcptTo,
            ServerProtocol,
            StartTls,
        )
else:
    from postroom import replies
    from postroom.address import routing_hazard
    from postroom.model import Reply
    from postroom.smtp.protocol import (
        NEED_DATA,
        AuthCredentials,
        Capabilities,
        Closed,
        MailFrom,
        MessageReceived,
        Phase,
        RcptTo,
        ServerProtocol,
        StartTls,
    )

HEADER = 8
HOST = "mx.fuzz.test"
SIZES = (64, 300, 1000, 5000)
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -][^\r\n]*)?\Z")

POSITIVE = {
    MailFrom: replies.SENDER_OK,
    RcptTo: replies.RECIPIENT_OK,
    MessageReceived: replies.queued("FUZZ1"),
    AuthCredentials: replies.AUTH_SUCCEEDED,
    StartTls: replies.READY_FOR_TLS,
}
NEGATIVE = (
    Reply(550, "5.1.1", "no such user"),
    Reply(554, "5.7.1", "refused"),
    replies.AUTH_FAILED,
    replies.relay_denied("x@y.example"),
    Reply(552, "5.3.4", "too big\nsecond line"),
)
CLOSING = Reply(421, "4.3.2", "shutting down")


class Violation(AssertionError):
    """An invariant of the core does not hold."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


class Session:
    """Drives one ServerProtocol through one fuzz input and checks every step."""

    def __init__(self, data: bytes) -> None:
        head = data[:HEADER].ljust(HEADER, b"\x00")
        self.payload = data[HEADER:]
        flags, errs, sizes = head[0], head[1], head[2]
        self.ctl = head[3:] or b"\x00"
        self.ctl_pos = 0
        self.caps = Capabilities(
            HOST, max_message_size=SIZES[sizes % 4], max_recipients=1 + (sizes >> 2) % 5,
            max_errors=1000 if errs & 0x80 else 1 + errs % 40,
            starttls=bool(flags & 1), auth=bool(flags & 2), postmaster_domain="fuzz.test")
        self.core = ServerProtocol(self.caps, tls_active=bool(flags & 4))
        self.greet = bool(flags & 8)
        self.may_close_with = bool(flags & 16)
        self.handshake = bool(flags & 32)     # call tls_started() after a positive StartTls
        self.errors = 0
        self.datas = 0          # 354 replies seen
        self.data = "idle"      # "open" after a 354, "message" once its MessageReceived came
        self.messages = 0
        self.closed = False     # a Closed event was returned, or close_with was called

    def control(self) -> int:
        b = self.ctl[self.ctl_pos % len(self.ctl)] ^ ((self.ctl_pos * 151) & 0xFF)
        self.ctl_pos += 1
        return b

    # --- checks ----------------------------------------------------------------------
    def state(self) -> None:
        core = self.core
        check(isinstance(core.phase, Phase), f"phase is {core.phase!r}")
        check(core.errors >= self.errors, f"errors went down {self.errors} -> {core.errors}")
        self.errors = core.errors

    def output(self) -> bytes:
        """Take and check the core's output; follow DATA through its replies."""
        out = self.core.take_output()
        if self.closed and out:
            raise Violation(f"output after Closed: {out!r}")
        if not out:
            return out
        check(out.endswith(b"\r\n"), f"output not ended by CRLF: {out[-80:]!r}")
        code = None
        for line in out.split(b"\r\n")[:-1]:
            m = REPLY_LINE.match(line)
            check(m is not None, f"malformed reply line {line!r}")
            assert m is not None
            if code is not None:
                check(m.group(1) == code, f"multi-line reply changes code: {line!r}")
            if line[3:4] == b"-":
                code = m.group(1)
                continue
            code = None
            if line.startswith(b"354"):
                check(self.data == "idle", f"354 while a DATA is {self.data}")
                self.datas += 1
                self.data = "open"
            elif self.data == "open":
                # nothing is said during DATA: this ends it, refused whole by the core
                # (or a 421 from close_with)
                check(line[:1] in (b"4", b"5"), f"{line!r} during DATA without a message")
                self.data = "idle"
            elif self.data == "message":
                self.data = "idle"                  # the caller's answer to the message
        check(code is None, f"unfinished multi-line reply at the end of {out!r}")
        return out

    def message(self, ev: MessageReceived) -> None:
        check(self.data == "open", f"MessageReceived while DATA is {self.data} "
              "(two messages from one DATA?)")
        self.data = "message"
        self.messages += 1
        check(self.messages <= self.datas, f"{self.messages} messages from {self.datas} DATA")
        body = ev.data
        check(body == b"" or body.endswith(b"\r\n"),
              f"message does not end with CRLF: {body[-40:]!r}")
        crlf = body.count(b"\r\n")
        check(body.count(b"\r") == crlf and body.count(b"\n") == crlf,
              "bare CR or LF in a message")
        check(b"\x00" not in body, "NUL in a message")
        check(len(body) <= self.caps.max_message_size, "message over the size limit")
        check(all(len(line) <= 998 for line in body.split(b"\r\n")), "message line over 998")
        check(ev.envelope.sender is not None, "message without a sender")
        check(len(ev.envelope.recipients) >= 1, "message without a recipient")

    # --- driving ---------------------------------------------------------------------
    def answer(self, ev: object) -> Reply:
        c = self.control()
        if c < 0xC0 or isinstance(ev, StartTls) and c < 0xF8:
            return POSITIVE[type(ev)]
        if c >= 0xFD:
            return CLOSING
        return NEGATIVE[c % len(NEGATIVE)]

    def pump(self) -> None:
        core = self.core
        while True:
            ev = core.next_event()
            self.state()
            self.output()
            if ev is NEED_DATA:
                if core.phase is Phase.CLOSED:
                    check(self.closed, "phase is CLOSED but no Closed event was returned")
                return
            check(not self.closed, f"event {ev!r} after Closed")
            if isinstance(ev, Closed):
                check(core.phase is Phase.CLOSED, "Closed returned but the phase is not CLOSED")
                self.closed = True
                continue
            if isinstance(ev, MessageReceived):
                self.message(ev)
            elif isinstance(ev, MailFrom | RcptTo):
                addr = ev.sender if isinstance(ev, MailFrom) else ev.recipient
                routing_hazard(addr)
                check(isinstance(ev.params, dict), "params is not a dict")
            else:
                check(isinstance(ev, AuthCredentials | StartTls), f"unknown event {ev!r}")
            reply = self.answer(ev)
            core.respond(reply)
            self.state()
            self.output()
            if isinstance(ev, StartTls) and reply.is_positive and self.handshake:
                core.tls_started()
                self.state()

    def run(self) -> None:
        core = self.core
        if self.greet:
            core.greet()
            self.output()
        data = self.payload
        pos = 0
        while pos < len(data):
            c = self.control()
            n = len(data) - pos if c >= 0xF0 else 1 + c % 48 if c < 0xC0 else 1 + c * 13
            chunk = data[pos:pos + n]
            pos += n
            before = core.buffered
            core.receive(chunk)
            if self.closed:
                check(core.buffered == before, "input buffered after Closed")
            self.pump()
            if self.may_close_with and not self.closed and self.control() == 0xA5:
                core.close_with(replies.timeout(HOST))
                out = self.output()
                check(out.endswith(replies.timeout(HOST).render()),
                      f"close_with did not end the output: {out[-100:]!r}")
                self.closed = True
        self.pump()


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    Session(data).run()


# --- seeds, dictionary, fallback -------------------------------------------------------
def _b64(text: bytes) -> bytes:
    import base64
    return base64.b64encode(text)


SEED_HEADERS = [
    b"\x0b\xff\x01\x00\x10\x80\xf0\x33",   # STARTTLS+AUTH, greeting, no error limit
    b"\x27\x83\x05\x00\x00\x00\x00\x00",   # implicit TLS with AUTH, 3 errors, all positive
    b"\x08\x05\x02\xf0\xf0\xf0\xf0\xf0",   # whole input at once
    b"\x18\x80\x00\x01\x02\x03\x04\x05",   # byte-sized chunks, 64 byte messages
    b"\x00\x81\x03\x91\xa0\xc3\xfd\x11",   # mixed answers, 5000 byte messages
]
SEED_SESSIONS = [
    b"EHLO client.test\r\nMAIL FROM:<a@far.example> SIZE=50 BODY=8BITMIME\r\n"
    b"RCPT TO:<b@far.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@far.example\r\n"
    b"RCPT TO:<postmaster>\r\nDATA\r\nSubject: s\r\n\r\n..stuffed\r\n.\r\nQUIT\r\n",
    b"EHLO c\r\nAUTH PLAIN " + _b64(b"\0alice\0pw") + b"\r\nMAIL FROM:<>\r\n"
    b"RCPT TO:<x@y.example>\r\nDATA\r\nhello\n.\nMAIL FROM:<e@v.il>\r\n.\r\nRSET\r\n",
    b"HELO c\r\nMAIL FROM:<\"q u\"@[127.0.0.1]>\r\nRCPT TO:<a%b@c.example>\r\nDATA\r\n"
    b"x\r\n\x00.\r\n.\r\nNOOP\r\nVRFY x\r\nHELP\r\nQUIT\r\n",
    b"EHLO c\r\nSTARTTLS\r\nEHLO c\r\nAUTH LOGIN\r\n" + _b64(b"alice") + b"\r\n"
    + _b64(b"pw") + b"\r\nMAIL FROM:<j\xc3\xb6rg@b\xc3\xbccher.example> SMTPUTF8\r\n"
    b"RCPT TO:<\xc3\xa5@example.test>\r\nDATA\r\n\xc3\xa9\r\n.\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b.example> ENVID=x+2By RET=HDRS\r\nRCPT TO:<c@d.example>\r\n"
    b"DATA\r\n" + b"y" * 1200 + b"\r\n.\r\nDATA\r\n" + b"z" * 700 + b"\r\n.\r\n"
    + b"X" * 13000 + b"\r\nQUIT\r\n",
]
TOKENS = [
    b"EHLO ", b"HELO ", b"MAIL FROM:<", b"RCPT TO:<", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n",
    b"QUIT\r\n", b"VRFY ", b"HELP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN ", b"AUTH LOGIN\r\n",
    b"BDAT ", b"EXPN ", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r\n..", b".\r\n", b"\x00", b"\r",
    b"\n", b">", b"<>", b"@", b"\"", b"\\", b" SIZE=", b" BODY=8BITMIME", b" BODY=7BIT",
    b" SMTPUTF8", b" RET=FULL", b" RET=HDRS", b" ENVID=", b" AUTH=<>", b" NOTIFY=NEVER",
    b" NOTIFY=SUCCESS,DELAY", b" ORCPT=rfc822;", b"+2B", b"<postmaster>", b"[127.0.0.1]",
    b"[IPv6:::1]", b"xn--", b"\xc3\xa9", b"\xff", b"\xed\xa0\x80", b"AGFAYg==", b"*\r\n",
    b"=\r\n", b"%", b"!", b"a@b.example>", b"99999999999999999999",
]


def seed_bytes() -> list[bytes]:
    return [head + sess for head in SEED_HEADERS for sess in SEED_SESSIONS]


def hypothesis_strategy():  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st
    piece = st.one_of(st.sampled_from(TOKENS), st.sampled_from(SEED_SESSIONS),
                      st.binary(max_size=24), st.just(b"A" * 600), st.just(b"B" * 1100))
    return st.builds(lambda h, ps: h + b"".join(ps), st.binary(min_size=HEADER, max_size=HEADER),
                     st.lists(piece, max_size=30))


def run_fallback(seconds: float, corpus: Path | None, crashes: Path) -> int:
    return harness.run_fallback(
        "smtp", seconds, corpus, crashes, test_one_input=TestOneInput,
        strategy=hypothesis_strategy(), check=TestOneInput, dump=bytes, max_examples=2000)


def main(argv: list[str]) -> int:
    return harness.main(argv, name="smtp", atheris=atheris, test_one_input=TestOneInput,
                        seeds=seed_bytes, tokens=TOKENS, fallback=run_fallback)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
