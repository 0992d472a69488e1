"""Property tests for the sans-I/O SMTP core and the envelope path parser.

Bounded for CI (a few hundred derandomized examples each); the open-ended search is the
fuzzing in fuzz/. Every test drives :class:`ServerProtocol` through :class:`Driver`, which
keeps the caller's contract (one ``respond`` per event that needs one) and checks after
every step that

- every byte taken with ``take_output`` is a whole, well-formed reply line;
- ``phase`` is a ``Phase``, ``errors`` never goes down;
- nothing is said while a DATA is open, and one DATA gives at most one message;
- once the core has returned ``Closed`` it neither buffers, answers nor returns events.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom import replies
from postroom.address import AddressError, parse_path, routing_hazard
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

HOST = "mx.test"
BOUNDED = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -][^\r\n]*)?\Z")

POSITIVE: dict[type, Reply] = {
    MailFrom: replies.SENDER_OK,
    RcptTo: replies.RECIPIENT_OK,
    MessageReceived: replies.queued("Q1"),
    AuthCredentials: replies.AUTH_SUCCEEDED,
    StartTls: replies.READY_FOR_TLS,
}
NEGATIVE = [Reply(550, "5.1.1", "no such user"), Reply(554, "5.7.1", "no\nreally not"),
            replies.AUTH_FAILED]
CLOSING = Reply(421, "4.3.2", "shutting down")


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@dataclass
class Driver:
    """One core, driven the way the asyncio session drives it, checked at every step.

    ``answers`` is consumed in turn for the events that need an answer: True for the
    positive reply, a Reply to give that reply; when it runs out, everything is positive.
    """

    caps: Capabilities = field(default_factory=lambda: Capabilities(HOST))
    tls: bool = False
    answers: list[bool | Reply] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    wire: bytes = b""
    closed: bool = False
    datas: int = 0
    data_state: str = "idle"          # "open" after 354, "message" after its MessageReceived
    messages_per_data: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.core = ServerProtocol(self.caps, tls_active=self.tls)
        self.errors = 0
        self._answers = iter(self.answers)

    def _check_state(self) -> None:
        core = self.core
        assert isinstance(core.phase, Phase), core.phase
        assert core.errors >= self.errors, (self.errors, core.errors)
        self.errors = core.errors

    def _take(self) -> None:
        out = self.core.take_output()
        if not out:
            return
        assert not self.closed, f"output after Closed: {out!r}"
        assert out.endswith(b"\r\n"), out[-60:]
        code = None
        for line in out.split(b"\r\n")[:-1]:
            m = REPLY_LINE.match(line)
            assert m, f"malformed reply line {line!r}"
            if code is not None:
                assert m.group(1) == code, f"multi-line reply changes code at {line!r}"
            if line[3:4] == b"-":
                code = m.group(1)
                continue
            code = None
            if line.startswith(b"354"):
                assert self.data_state == "idle", f"354 while DATA is {self.data_state}"
                self.data_state = "open"
                self.datas += 1
                self.messages_per_data.append(0)
            elif self.data_state == "open":
                assert line[:1] in (b"4", b"5"), f"{line!r} said during DATA"
                self.data_state = "idle"
            elif self.data_state == "message":
                self.data_state = "idle"
        assert code is None, f"unfinished multi-line reply in {out!r}"
        self.wire += out

    def _answer(self, ev: object) -> Reply:
        choice = next(self._answers, True)
        if choice is True or (isinstance(ev, StartTls) and choice is not CLOSING):
            return POSITIVE[type(ev)]
        assert isinstance(choice, Reply)
        return choice

    def pump(self) -> None:
        core = self.core
        while True:
            ev = core.next_event()
            self._check_state()
            self._take()
            if ev is NEED_DATA:
                if core.phase is Phase.CLOSED:
                    assert self.closed, "phase is CLOSED without a Closed event"
                return
            assert not self.closed, f"{ev!r} after Closed"
            self.events.append(ev)
            if isinstance(ev, Closed):
                assert core.phase is Phase.CLOSED
                self.closed = True
                continue
            if isinstance(ev, MessageReceived):
                assert self.data_state == "open", "a message without its own 354"
                self.data_state = "message"
                self.messages_per_data[-1] += 1
                body = ev.data
                assert body == b"" or body.endswith(b"\r\n")
                assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
                assert b"\x00" not in body and len(body) <= self.caps.max_message_size
            if isinstance(ev, MailFrom | RcptTo):
                routing_hazard(ev.sender if isinstance(ev, MailFrom) else ev.recipient)
            core.respond(self._answer(ev))
            self._check_state()
            self._take()

    def feed(self, *chunks: bytes) -> Driver:
        for chunk in chunks:
            before = self.core.buffered
            self.core.receive(chunk)
            if self.closed:
                assert self.core.buffered == before, "input buffered after Closed"
            self.pump()
        return self

    def of(self, kind: type) -> list[object]:
        return [e for e in self.events if isinstance(e, kind)]


# --- strategies ---------------------------------------------------------------------

FRAGMENTS = [
    b"\r\n", b"\n", b"\r", b"\x00", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n",
    b"\r.\r\n", b"\r\n\x00.\r\n", b"\n.\r\r\n", b"\x00\n.\r\n", b" ", b"<", b">", b"@", b"\"",
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@far.example>", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<b@far.example>\r\n", b"RCPT TO:<postmaster>\r\n", b" SIZE=", b" SMTPUTF8",
    b" BODY=8BITMIME", b" ENVID=x+2B", b" NOTIFY=NEVER", b" ORCPT=rfc822;b@x", b"DATA\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n", b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n", b"*\r\n", b"=\r\n",
    b"\xff", b"\xc3\xa9", b"x" * 600, b"y" * 1100, b"z" * 13000,
    b"EHLO c\r\nMAIL FROM:<a@far.example>\r\nRCPT TO:<b@far.example>\r\nDATA\r\n",
]
ANSWERS = st.one_of(st.just(True), st.just(True), st.sampled_from([*NEGATIVE, CLOSING]))


@st.composite
def caps_and_tls(draw: st.DrawFn) -> tuple[Capabilities, bool]:
    caps = Capabilities(
        HOST, max_message_size=draw(st.sampled_from([50, 1000, 20000])),
        max_recipients=draw(st.integers(1, 4)),
        max_errors=draw(st.sampled_from([1, 3, 20, 10_000])),
        starttls=draw(st.booleans()), auth=draw(st.booleans()))
    return caps, draw(st.booleans())


byte_streams = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=48)),
                        max_size=40)


# --- any byte stream ------------------------------------------------------------------


@BOUNDED
@given(setup=caps_and_tls(), chunks=byte_streams, answers=st.lists(ANSWERS, max_size=20))
def test_any_byte_stream_gives_well_formed_replies_and_consistent_state(
        setup: tuple[Capabilities, bool], chunks: list[bytes], answers: list[bool | Reply]) -> None:
    caps, tls = setup
    d = Driver(caps=caps, tls=tls, answers=answers)
    d.core.greet()
    d.pump()
    d.feed(*chunks)
    assert d.wire.startswith(b"220 ")
    assert all(n <= 1 for n in d.messages_per_data)
    assert len(d.of(Closed)) <= 1
    if d.closed:
        assert isinstance(d.events[-1], Closed)


@BOUNDED
@given(setup=caps_and_tls(), before=byte_streams, after=byte_streams,
       ending=st.sampled_from([b"QUIT\r\n", b"FROB\r\n" * 25, b"\x00\r\n" * 25]))
def test_after_quit_or_closed_the_core_emits_nothing(
        setup: tuple[Capabilities, bool], before: list[bytes], after: list[bytes],
        ending: bytes) -> None:
    caps, tls = setup
    d = Driver(caps=Capabilities(HOST, max_errors=min(caps.max_errors, 20),
                                 max_message_size=caps.max_message_size), tls=tls)
    # a DATA left open by ``before`` would swallow the ending: end it first
    d.feed(*before, b"\r\n.\r\n", ending)
    if not d.closed:       # the ending was eaten by an AUTH exchange or a long line
        d.feed(b"\r\n" + ending)
    assert d.closed and d.core.phase is Phase.CLOSED
    wire, events, buffered = d.wire, list(d.events), d.core.buffered
    d.feed(*after, b"NOOP\r\nQUIT\r\n")
    assert (d.wire, d.events) == (wire, events)
    assert d.core.buffered == buffered      # what came before the close stays unread
    assert d.core.next_event() is NEED_DATA and d.core.take_output() == b""


# --- one DATA, at most one message ----------------------------------------------------

SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\r\n\x00.\r\n",
           b"\r\n.\x00\r\n", b"\n.\r\r\n", b"\x00\n.\r\n", b"\r\r\n.\r\r\n", b"\r\n.\n\r\n",
           b"\r\n\r.\r\n", b"\r\n.\r\x00\n", b"\n..\n", b"\r\n..\r\n"]
SECOND = (b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
          b"Subject: smuggled\r\n\r\nevil\r\n")


@BOUNDED
@given(body=st.lists(st.one_of(st.sampled_from(SMUGGLE), st.sampled_from(FRAGMENTS),
                               st.just(SECOND), st.binary(max_size=30)), max_size=25),
       cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_nothing_inside_one_data_becomes_a_command_or_a_second_message(
        body: list[bytes], cuts: list[int]) -> None:
    content = b"".join(body).replace(b"\r\n.\r\n", b"\r\n..\r\n")
    if content.startswith(b".\r\n"):
        content = b"." + content
    stream = (b"EHLO c\r\nMAIL FROM:<s@far.example>\r\nRCPT TO:<alice@example.test>\r\n"
              b"DATA\r\n" + content + b"\r\n.\r\n")
    assert stream.count(b"\r\n.\r\n") == 1 or stream.startswith(b".\r\n")
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    d = Driver(caps=Capabilities(HOST, max_message_size=20000))
    d.feed(*(stream[a:b] for a, b in zip(points, points[1:], strict=False)))
    assert d.datas == 1 and d.messages_per_data[0] <= 1
    kinds = [type(e) for e in d.events]
    assert kinds in ([MailFrom, RcptTo], [MailFrom, RcptTo, MessageReceived]), kinds
    codes = [line[:3] for line in d.wire.split(b"\r\n")[:-1] if line[3:4] != b"-"]
    assert len(codes) == 5, codes     # EHLO, MAIL, RCPT, 354, and one end-of-data reply
    assert d.core.phase is Phase.COMMAND and d.core.buffered == 0


@BOUNDED
@given(stream=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(SMUGGLE),
                                 st.binary(max_size=20)), max_size=40),
       answers=st.lists(ANSWERS, max_size=20))
def test_every_message_has_its_own_354(stream: list[bytes], answers: list[bool | Reply]) -> None:
    d = Driver(caps=Capabilities(HOST, max_message_size=1000, max_errors=10_000),
               answers=answers)
    d.feed(b"EHLO c\r\n", *stream)
    assert all(n <= 1 for n in d.messages_per_data)
    assert len(d.of(MessageReceived)) <= d.datas


# --- valid sessions, any pipelining ----------------------------------------------------

SENDERS = ["<a@far.example>", "<>", "<\"q u\"@far.example>", "<b.c+tag@sub.far.example>"]
RCPTS = ["<b@far.example>", "<postmaster>", "<Alice@Example.TEST>", "<nobody@far.example>",
         "<x@[127.0.0.1]>"]
MAIL_PARAMS = ["", " SIZE=100", " BODY=8BITMIME", " RET=HDRS ENVID=id+2B1", " BODY=7BIT SIZE=0"]
RCPT_PARAMS = ["", " NOTIFY=SUCCESS,FAILURE", " NOTIFY=NEVER", " ORCPT=rfc822;b+40x"]
BODY_LINE = st.one_of(
    st.sampled_from(["", ".", "..", ". x", "...", "Subject: hi", "From: a@b", " folded"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2000,
                          blacklist_categories=["Cs", "Cc", "Zl", "Zp"]), max_size=20),
)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """A valid session as units (what a lock-step client sends at each turn) and the
    message bodies it should produce, un-stuffed."""
    units: list[bytes] = [b"EHLO client.test\r\n"]
    bodies: list[bytes] = []
    if draw(st.booleans()):
        units.append(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n")
    for _ in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(0, 2))):
            units.append(draw(st.sampled_from([b"NOOP\r\n", b"RSET\r\n", b"VRFY x\r\n",
                                               b"HELP\r\n", b"FROB\r\n"])))
        units.append(f"MAIL FROM:{draw(st.sampled_from(SENDERS))}"
                     f"{draw(st.sampled_from(MAIL_PARAMS))}\r\n".encode())
        for _ in range(draw(st.integers(1, 3))):
            units.append(f"RCPT TO:{draw(st.sampled_from(RCPTS))}"
                         f"{draw(st.sampled_from(RCPT_PARAMS))}\r\n".encode())
        if draw(st.booleans()):
            units.append(b"RSET\r\n")
            continue
        lines = [line.encode() for line in draw(st.lists(BODY_LINE, max_size=8))]
        body = b"".join(line + b"\r\n" for line in lines)
        stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                           for line in lines)
        units += [b"DATA\r\n", stuffed + b".\r\n"]
        bodies.append(body)
    units.append(b"QUIT\r\n")
    return units, bodies


def answer_for(ev: object) -> bool | Reply:
    if isinstance(ev, RcptTo) and ev.recipient.local == "nobody":
        return NEGATIVE[0]
    return True


class FixedAnswers(Driver):
    def _answer(self, ev: object) -> Reply:
        choice = answer_for(ev)
        return POSITIVE[type(ev)] if choice is True else choice  # type: ignore[return-value]


def run_units(packets: list[bytes]) -> FixedAnswers:
    d = FixedAnswers(caps=Capabilities(HOST, starttls=True, auth=True), tls=True)
    d.core.greet()
    d.pump()
    d.feed(*packets)
    return d


@BOUNDED
@given(session=sessions(), groups=st.lists(st.integers(1, 6), max_size=40),
       cuts=st.lists(st.integers(0, 3000), max_size=30))
def test_valid_sessions_give_the_same_result_however_pipelined_and_chunked(
        session: tuple[list[bytes], list[bytes]], groups: list[int], cuts: list[int]) -> None:
    units, bodies = session
    lockstep = run_units(units)
    # the lock-step run: every message arrives un-stuffed, the session ends with QUIT
    received = lockstep.of(MessageReceived)
    expected = [b for b, ok in zip(bodies, _transactions_with_recipients(units), strict=True)
                if ok]
    assert [m.data for m in received] == expected  # type: ignore[attr-defined]
    assert lockstep.closed and lockstep.events[-1] == Closed("QUIT")
    # the same units pipelined in random groups...
    packets, i = [], 0
    for g in [*groups, len(units)]:
        if i >= len(units):
            break
        packets.append(b"".join(units[i:i + g]))
        i += g
    pipelined = run_units(packets)
    assert (pipelined.events, pipelined.wire) == (lockstep.events, lockstep.wire)
    # ...and as one stream cut at random octets
    stream = b"".join(units)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunked = run_units([stream[a:b] for a, b in zip(points, points[1:], strict=False)])
    assert (chunked.events, chunked.wire) == (lockstep.events, lockstep.wire)


def _transactions_with_recipients(units: list[bytes]) -> list[bool]:
    """For each DATA in the session: whether at least one recipient was accepted."""
    out, accepted = [], 0
    for u in units:
        if u.startswith(b"MAIL"):
            accepted = 0
        elif u.startswith(b"RCPT") and b"<nobody@" not in u:
            accepted += 1
        elif u == b"DATA\r\n":
            out.append(accepted > 0)
    return out


def test_session_strategy_example_is_what_the_property_relies_on() -> None:
    units = [b"EHLO c\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<nobody@far.example>\r\n",
             b"DATA\r\n", b"NOOP\r\n", b"MAIL FROM:<a@far.example>\r\n",
             b"RCPT TO:<b@far.example>\r\n", b"DATA\r\n", b"..x\r\n.\r\n", b"QUIT\r\n"]
    d = run_units(units)
    (msg,) = d.of(MessageReceived)
    assert msg.data == b".x\r\n"  # type: ignore[attr-defined]
    assert _transactions_with_recipients(units) == [False, True]


# --- the path parser ---------------------------------------------------------------------

ADDRESS_PIECES = ["<", ">", "@", "\"", "\\", ".", "[", "]", "IPv6:", "%", "!", ":", ",", " ",
                  "xn--", "-", "a", "Z", "0", "example.test", "\u00e9", "\u0130", "\u3002",
                  "\uff0e", "\u00ad", "\u00df", "\u212a", "\x00", "\x7f", "\t"]
address_texts = st.one_of(
    st.text(max_size=80),
    st.builds("".join, st.lists(st.one_of(st.sampled_from(ADDRESS_PIECES), st.text(max_size=5)),
                                max_size=20)),
    st.builds(lambda a, b: f"<{a}@{b}>", st.text(max_size=30), st.text(max_size=30)),
)


@settings(BOUNDED, max_examples=300)
@given(text=address_texts, utf8=st.booleans(), allow_null=st.booleans())
def test_the_path_parser_raises_nothing_but_address_error_and_round_trips(
        text: str, utf8: bool, allow_null: bool) -> None:
    try:
        address = parse_path(text, allow_null=allow_null, utf8=utf8)
    except AddressError:
        return
    hazard = routing_hazard(address)
    if address.is_null:
        assert allow_null and text == "<>"
        return
    assert utf8 or str(address).isascii()
    again = parse_path(f"<{address}>", allow_null=allow_null, utf8=utf8)
    assert again.key == address.key
    assert routing_hazard(again) == hazard


@settings(BOUNDED, max_examples=300)
@given(line=st.builds(lambda verb, text: verb + text.encode("utf-8"),
                      st.sampled_from([b"MAIL FROM:", b"RCPT TO:"]), address_texts),
       smtputf8=st.booleans())
def test_any_path_in_mail_or_rcpt_gets_an_answer_not_an_exception(
        line: bytes, smtputf8: bool) -> None:
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>" + (b" SMTPUTF8" if smtputf8 else b"") + b"\r\n")
    d.feed(line.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n")
    assert d.wire.count(b"\r\n") >= 3


def test_a_lone_surrogate_is_an_address_error() -> None:
    with pytest.raises(AddressError):
        parse_path("<\ud800@example.test>", allow_null=False, utf8=True)


def test_an_address_that_normalising_makes_too_long_is_refused_up_front() -> None:
    """256 octets as sent, longer once the domain is normalised (IDNA): refused at
    once, so that every accepted address parses again."""
    text = "<" + "l" * 64 + "@\u0130." + "a" * 60 + "." + "b" * 60 + "." + "c" * 30 + "." \
        + "d" * 35 + ">"
    assert len(text[1:-1].encode()) == 256
    with pytest.raises(AddressError, match="longer than 256"):
        parse_path(text, allow_null=False, utf8=True)
