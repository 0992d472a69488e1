"""The sans-I/O SMTP core, fed bytes directly: framing, sequencing, parameters, DATA, AUTH.

Every test drives :class:`ServerProtocol` the way the asyncio session does: ``receive``
bytes, pull events with ``next_event`` until ``NEED_DATA``, answer the events that need
an answer with ``respond`` and read the wire bytes with ``take_output``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom import replies
from postroom.model import Address, Reply
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
CAPS = Capabilities(hostname=HOST)
OK = Reply(250, "2.0.0", "Ok")
QUEUED = replies.queued("Q1")

Answer = Callable[[object], Reply]


def default_answer(ev: object) -> Reply:
    if isinstance(ev, MailFrom):
        return replies.SENDER_OK
    if isinstance(ev, RcptTo):
        return replies.RECIPIENT_OK
    if isinstance(ev, MessageReceived):
        return QUEUED
    if isinstance(ev, AuthCredentials):
        return replies.AUTH_SUCCEEDED
    if isinstance(ev, StartTls):
        return replies.READY_FOR_TLS
    raise AssertionError(f"unexpected event {ev!r}")


def said(reply: Reply) -> str:
    """A reply as parse_replies shows it: its wire lines joined by \\n, without CRLF."""
    (text,) = parse_replies(reply.render())
    return text


def parse_replies(wire: bytes) -> list[str]:
    """Split wire output into replies; a multi-line reply is its lines joined by \\n."""
    out: list[str] = []
    current: list[str] = []
    assert wire == b"" or wire.endswith(b"\r\n"), wire
    for raw in wire.split(b"\r\n")[:-1]:
        line = raw.decode("utf-8")
        assert re.match(r"\d{3}([ -]|$)", line), f"malformed reply line {line!r}"
        current.append(line)
        if line[3:4] != "-":
            out.append("\n".join(current))
            current = []
    assert not current, f"unterminated multi-line reply {current!r}"
    return out


@dataclass
class Harness:
    """One ServerProtocol plus everything it said and every event it produced."""

    caps: Capabilities = CAPS
    tls: bool = False
    answer: Answer = default_answer
    greet: bool = False
    core: ServerProtocol = field(init=False)
    events: list[object] = field(default_factory=list)
    wire: bytes = b""

    def __post_init__(self) -> None:
        self.core = ServerProtocol(self.caps, tls_active=self.tls)
        if self.greet:
            self.core.greet()

    def pump(self) -> None:
        while True:
            ev = self.core.next_event()
            if ev is NEED_DATA:
                break
            self.events.append(ev)
            if not isinstance(ev, Closed):
                self.core.respond(self.answer(ev))
        self.wire += self.core.take_output()

    def feed(self, *chunks: bytes) -> Harness:
        for chunk in chunks:
            self.core.receive(chunk)
            self.pump()
        return self

    def lines(self, *commands: str) -> Harness:
        return self.feed(*(c.encode("utf-8") + b"\r\n" for c in commands))

    @property
    def replies(self) -> list[str]:
        return parse_replies(self.wire)

    @property
    def codes(self) -> list[int]:
        return [int(r[:3]) for r in self.replies]

    @property
    def last(self) -> str:
        return self.replies[-1]

    def of(self, kind: type) -> list[object]:
        return [e for e in self.events if isinstance(e, kind)]


def ehlo(**kw: object) -> Harness:
    return Harness(**kw).lines("EHLO client.test")  # type: ignore[arg-type]


def in_transaction(**kw: object) -> Harness:
    return ehlo(**kw).lines("MAIL FROM:<sender@far.example>")


def with_recipient(**kw: object) -> Harness:
    return in_transaction(**kw).lines("RCPT TO:<alice@example.test>")


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# --- the replies the core chooses carry the codes the RFCs give them ------------------

REPLY_CODES = [
    ("line_too_long", replies.LINE_TOO_LONG, 500, "5.5.2"),
    ("bare_line_ending_in_command", replies.BARE_LINE_ENDING_IN_COMMAND, 500, "5.5.2"),
    ("nul_in_command", replies.NUL_IN_COMMAND, 500, "5.5.2"),
    ("invalid_utf8_in_command", replies.EIGHT_BIT_IN_COMMAND, 500, "5.5.2"),
    ("unknown_command", replies.UNKNOWN_COMMAND, 502, "5.5.1"),
    ("not_implemented", replies.NOT_IMPLEMENTED, 502, "5.5.1"),
    ("need_helo", replies.NEED_HELO, 503, "5.5.1"),
    ("need_mail", replies.NEED_MAIL, 503, "5.5.1"),
    ("need_rcpt", replies.NEED_RCPT, 503, "5.5.1"),
    ("nested_mail", replies.NESTED_MAIL, 503, "5.5.1"),
    ("already_tls", replies.ALREADY_TLS, 503, "5.5.1"),
    ("tls_not_available", replies.TLS_NOT_AVAILABLE, 454, "4.7.0"),
    ("unknown_parameter", replies.UNKNOWN_PARAMETER, 555, "5.5.4"),
    ("bad_parameter_value", replies.BAD_PARAMETER_VALUE, 501, "5.5.4"),
    ("bad_notify", replies.BAD_DSN_NOTIFY, 501, "5.5.4"),
    ("needs_smtputf8", replies.NEEDS_SMTPUTF8, 553, "5.6.7"),
    ("bad_address_syntax", replies.BAD_ADDRESS_SYNTAX, 501, "5.1.3"),
    ("bad_sender_syntax", replies.BAD_SENDER_SYNTAX, 501, "5.1.7"),
    ("message_too_big", replies.message_too_big(10), 552, "5.3.4"),
    ("too_many_recipients", replies.TOO_MANY_RECIPIENTS, 452, "4.5.3"),
    ("bare_line_ending_in_data", replies.BARE_LINE_ENDING_IN_DATA, 550, "5.6.0"),
    ("nul_in_data", replies.NUL_IN_DATA, 550, "5.6.0"),
    ("data_line_too_long", replies.DATA_LINE_TOO_LONG, 550, "5.6.0"),
    ("too_many_errors", replies.TOO_MANY_ERRORS, 421, "4.7.0"),
    ("closing", replies.closing(HOST), 221, "2.0.0"),
    ("start_mail_input", replies.START_MAIL_INPUT, 354, ""),
    ("ready_for_tls", replies.READY_FOR_TLS, 220, "2.0.0"),
    ("auth_succeeded", replies.AUTH_SUCCEEDED, 235, "2.7.0"),
    ("auth_failed", replies.AUTH_FAILED, 535, "5.7.8"),
    ("auth_cancelled", replies.AUTH_CANCELLED, 501, "5.0.0"),
    ("bad_base64", replies.BAD_BASE64, 501, "5.5.2"),
    ("auth_needs_tls", replies.AUTH_NEEDS_TLS, 538, "5.7.11"),
    ("auth_not_available", replies.AUTH_NOT_AVAILABLE, 503, "5.5.1"),
    ("auth_mechanism_unknown", replies.AUTH_MECHANISM_UNKNOWN, 504, "5.5.4"),
    ("already_authenticated", replies.ALREADY_AUTHENTICATED, 503, "5.5.1"),
    ("auth_in_transaction", replies.AUTH_IN_TRANSACTION, 503, "5.5.1"),
]


@pytest.mark.parametrize(("reply", "code", "enhanced"), [c[1:] for c in REPLY_CODES],
                         ids=[c[0] for c in REPLY_CODES])
def test_core_replies_carry_their_rfc_codes(reply: Reply, code: int, enhanced: str) -> None:
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert said(reply).startswith(f"{code} {enhanced}".rstrip())


# --- greeting, EHLO and HELO ---------------------------------------------------------


def test_greeting_names_the_host_and_postroom() -> None:
    h = Harness(greet=True)
    assert h.core.take_output() == b"220 mx.test ESMTP Postroom\r\n"


EHLO_CASES = [
    # id, caps, tls_active, must be advertised, must not be advertised
    ("plain_defaults", CAPS, False,
     ["PIPELINING", "SIZE 26214400", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"],
     ["STARTTLS", "AUTH PLAIN LOGIN"]),
    ("size_follows_max_message_size", Capabilities(HOST, max_message_size=1000), False,
     ["SIZE 1000"], ["SIZE 26214400"]),
    ("starttls_offered_before_tls", Capabilities(HOST, starttls=True), False,
     ["STARTTLS"], ["AUTH PLAIN LOGIN"]),
    ("starttls_not_offered_once_tls_is_on", Capabilities(HOST, starttls=True), True,
     ["PIPELINING"], ["STARTTLS"]),
    ("auth_hidden_before_tls", Capabilities(HOST, starttls=True, auth=True), False,
     ["STARTTLS"], ["AUTH PLAIN LOGIN"]),
    ("auth_offered_under_tls", Capabilities(HOST, starttls=True, auth=True), True,
     ["AUTH PLAIN LOGIN", "SMTPUTF8", "DSN"], ["STARTTLS"]),
    ("auth_not_offered_when_disabled", Capabilities(HOST, starttls=True, auth=False), True,
     ["8BITMIME"], ["AUTH PLAIN LOGIN", "STARTTLS"]),
]


@pytest.mark.parametrize(("caps", "tls", "present", "absent"),
                         [c[1:] for c in EHLO_CASES], ids=[c[0] for c in EHLO_CASES])
def test_ehlo_advertises_exactly_the_capabilities_of_the_session(
        caps: Capabilities, tls: bool, present: list[str], absent: list[str]) -> None:
    reply = ehlo(caps=caps, tls=tls).last
    lines = reply.split("\n")
    assert lines[0] == "250-mx.test"
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    keywords = [line[4:] for line in lines[1:]]
    for kw in present:
        assert kw in keywords, (kw, keywords)
    for kw in absent:
        assert kw not in keywords, (kw, keywords)


def test_helo_answers_with_one_line_and_no_extensions() -> None:
    h = Harness().lines("HELO client.test")
    assert h.replies == ["250 mx.test"]
    assert h.core.helo == "client.test" and h.core.esmtp is False


@pytest.mark.parametrize("command", ["EHLO", "EHLO ", "HELO", "EHLO two words"])
def test_helo_or_ehlo_without_a_single_hostname_is_a_syntax_error(command: str) -> None:
    h = Harness().lines(command)
    assert h.last.startswith("501 5.5.4 ")
    assert h.core.helo is None


# --- simple commands ----------------------------------------------------------------

SIMPLE_COMMANDS = [
    ("noop", "NOOP", said(replies.OK)),
    ("noop_with_argument", "NOOP anything", said(replies.OK)),
    ("rset", "RSET", said(replies.RESET_OK)),
    ("rset_with_argument", "RSET now", "501 5.5.4"),
    ("vrfy", "VRFY alice", said(replies.VRFY_CANNOT)),
    ("vrfy_without_argument", "VRFY", "501 5.5.4"),
    ("help", "HELP", said(replies.HELP)),
    ("expn", "EXPN staff", said(replies.NOT_IMPLEMENTED)),
    ("bdat", "BDAT 10 LAST", said(replies.NOT_IMPLEMENTED)),
    ("etrn", "ETRN example.test", "502 5.5.1"),
    ("turn", "TURN", "502 5.5.1"),
    ("unknown_verb", "FROB", said(replies.UNKNOWN_COMMAND)),
    ("empty_line", "", said(replies.UNKNOWN_COMMAND)),
    ("lower_case_verb", "noop", said(replies.OK)),
]


@pytest.mark.parametrize(("line", "expected"), [c[1:] for c in SIMPLE_COMMANDS],
                         ids=[c[0] for c in SIMPLE_COMMANDS])
def test_simple_commands_get_their_fixed_reply(line: str, expected: str) -> None:
    assert ehlo().lines(line).last.startswith(expected)


# --- command sequencing ---------------------------------------------------------------

SEQUENCE_CASES = [
    ("mail_before_helo", CAPS, False, ["MAIL FROM:<a@far.example>"],
     said(replies.NEED_HELO)),
    ("rcpt_before_helo", CAPS, False, ["RCPT TO:<a@far.example>"],
     said(replies.NEED_HELO)),
    ("rcpt_before_mail", CAPS, False, ["EHLO c", "RCPT TO:<a@far.example>"],
     said(replies.NEED_MAIL)),
    ("data_before_helo", CAPS, False, ["DATA"], said(replies.NEED_HELO)),
    ("data_before_mail", CAPS, False, ["EHLO c", "DATA"], said(replies.NEED_MAIL)),
    ("data_before_rcpt", CAPS, False, ["EHLO c", "MAIL FROM:<a@far.example>", "DATA"],
     said(replies.NEED_RCPT)),
    ("nested_mail", CAPS, False,
     ["EHLO c", "MAIL FROM:<a@far.example>", "MAIL FROM:<b@far.example>"],
     said(replies.NESTED_MAIL)),
    ("rcpt_after_rset", CAPS, False,
     ["EHLO c", "MAIL FROM:<a@far.example>", "RSET", "RCPT TO:<b@far.example>"],
     said(replies.NEED_MAIL)),
    ("rcpt_after_second_ehlo", CAPS, False,
     ["EHLO c", "MAIL FROM:<a@far.example>", "EHLO c", "RCPT TO:<b@far.example>"],
     said(replies.NEED_MAIL)),
    ("data_with_argument", CAPS, False,
     ["EHLO c", "MAIL FROM:<a@far.example>", "RCPT TO:<b@far.example>", "DATA now"],
     "501 5.5.4"),
    ("starttls_before_helo", Capabilities(HOST, starttls=True), False, ["STARTTLS"],
     said(replies.NEED_HELO)),
    ("starttls_twice", Capabilities(HOST, starttls=True), True, ["EHLO c", "STARTTLS"],
     said(replies.ALREADY_TLS)),
    ("starttls_unavailable", CAPS, False, ["EHLO c", "STARTTLS"], said(replies.TLS_NOT_AVAILABLE)),
    ("starttls_with_argument", Capabilities(HOST, starttls=True), False,
     ["EHLO c", "STARTTLS now"], "501 5.5.4"),
    ("auth_before_helo", Capabilities(HOST, auth=True), True, ["AUTH PLAIN"],
     said(replies.NEED_HELO)),
    ("auth_after_plain_helo", Capabilities(HOST, auth=True), True, ["HELO c", "AUTH PLAIN"],
     said(replies.NEED_HELO)),
    ("auth_in_transaction", Capabilities(HOST, auth=True), True,
     ["EHLO c", "MAIL FROM:<a@far.example>", "AUTH PLAIN"],
     said(replies.AUTH_IN_TRANSACTION)),
    ("auth_twice", Capabilities(HOST, auth=True), True,
     ["EHLO c", "AUTH PLAIN " + b64("\0alice\0pw"), "AUTH PLAIN"],
     said(replies.ALREADY_AUTHENTICATED)),
]


@pytest.mark.parametrize(("caps", "tls", "commands", "expected"),
                         [c[1:] for c in SEQUENCE_CASES], ids=[c[0] for c in SEQUENCE_CASES])
def test_commands_out_of_sequence_are_refused(
        caps: Capabilities, tls: bool, commands: list[str], expected: str) -> None:
    h = Harness(caps=caps, tls=tls).lines(*commands)
    assert h.last.startswith(expected), h.replies
    assert len(h.replies) == len(commands)


def test_refused_mail_from_leaves_no_transaction_open() -> None:
    h = Harness(answer=lambda ev: replies.AUTH_REQUIRED).lines(
        "EHLO c", "MAIL FROM:<a@far.example>", "RCPT TO:<b@far.example>")
    assert h.replies[1].startswith("530 5.7.0")
    assert h.last.startswith(said(replies.NEED_MAIL))
    assert h.core.in_transaction is False


# --- MAIL FROM parameters -------------------------------------------------------------

MAIL_CASES = [
    # id, command after EHLO, expected reply prefix; "250" means passed to the policy
    ("plain", "MAIL FROM:<a@far.example>", "250"),
    ("lower_case", "mail from:<a@far.example>", "250"),
    ("space_after_colon", "MAIL FROM: <a@far.example>", "250"),
    ("null_sender", "MAIL FROM:<>", "250"),
    ("size_within_limit", "MAIL FROM:<a@far.example> SIZE=1000", "250"),
    ("size_at_limit", "MAIL FROM:<a@far.example> SIZE=26214400", "250"),
    ("size_over_limit", "MAIL FROM:<a@far.example> SIZE=26214401",
     said(replies.message_too_big(26214400))),
    ("size_not_a_number", "MAIL FROM:<a@far.example> SIZE=big", "501 5.5.4"),
    ("size_empty", "MAIL FROM:<a@far.example> SIZE", "501 5.5.4"),
    ("size_absurdly_long", "MAIL FROM:<a@far.example> SIZE=" + "9" * 21, "501 5.5.4"),
    ("size_unicode_superscript_digit", "MAIL FROM:<a@far.example> SIZE=\u00b2", "501 5.5.4"),
    ("size_twice", "MAIL FROM:<a@far.example> SIZE=1 SIZE=2", "555 5.5.4"),
    ("body_8bitmime", "MAIL FROM:<a@far.example> BODY=8BITMIME", "250"),
    ("body_7bit_lower_case", "MAIL FROM:<a@far.example> body=7bit", "250"),
    ("body_binarymime", "MAIL FROM:<a@far.example> BODY=BINARYMIME", "501 5.5.4"),
    ("unknown_parameter", "MAIL FROM:<a@far.example> FOO=bar",
     said(replies.UNKNOWN_PARAMETER)),
    ("rcpt_parameter_on_mail", "MAIL FROM:<a@far.example> NOTIFY=NEVER", "555 5.5.4"),
    ("parameter_with_two_equals", "MAIL FROM:<a@far.example> SIZE=1=2", "501 5.5.4"),
    ("ret_full", "MAIL FROM:<a@far.example> RET=FULL", "250"),
    ("ret_hdrs", "MAIL FROM:<a@far.example> RET=hdrs", "250"),
    ("ret_bogus", "MAIL FROM:<a@far.example> RET=BODY", "501 5.5.4"),
    ("envid_xtext", "MAIL FROM:<a@far.example> ENVID=QQ314159+2Bx", "250"),
    ("envid_bad_hex_escape", "MAIL FROM:<a@far.example> ENVID=a+zz", "501 5.5.4"),
    ("envid_bare_plus", "MAIL FROM:<a@far.example> ENVID=a+", "501 5.5.4"),
    ("envid_at_100_chars", "MAIL FROM:<a@far.example> ENVID=" + "e" * 100, "250"),
    ("envid_over_100_chars", "MAIL FROM:<a@far.example> ENVID=" + "e" * 101, "501 5.5.4"),
    ("auth_parameter", "MAIL FROM:<a@far.example> AUTH=<>", "250"),
    ("smtputf8", "MAIL FROM:<a@far.example> SMTPUTF8", "250"),
    ("smtputf8_with_value", "MAIL FROM:<a@far.example> SMTPUTF8=yes", "501 5.5.4"),
    ("non_ascii_without_smtputf8", "MAIL FROM:<j\u00f6rg@far.example>",
     said(replies.NEEDS_SMTPUTF8)),
    ("non_ascii_domain_without_smtputf8", "MAIL FROM:<a@b\u00fccher.example>", "553 5.6.7"),
    ("non_ascii_with_smtputf8", "MAIL FROM:<j\u00f6rg@far.example> SMTPUTF8", "250"),
    ("missing_angle_brackets", "MAIL FROM:a@far.example", said(replies.SYNTAX_MAIL)),
    ("missing_from", "MAIL <a@far.example>", "501 5.5.4"),
    ("parameter_glued_to_path", "MAIL FROM:<a@far.example>SIZE=10", "501 5.5.4"),
    ("unterminated_path", "MAIL FROM:<a@far.example", "501 5.5.4"),
    ("bad_sender_syntax", "MAIL FROM:<a@@far.example>", "501 5.1.7"),
    ("source_route_sender", "MAIL FROM:<@relay.example:a@far.example>", "501 5.1.7"),
]


@pytest.mark.parametrize(("command", "expected"), [c[1:] for c in MAIL_CASES],
                         ids=[c[0] for c in MAIL_CASES])
def test_mail_from_parameters_are_validated_before_the_policy_sees_them(
        command: str, expected: str) -> None:
    h = ehlo().lines(command)
    assert h.last.startswith(expected), h.last
    assert bool(h.of(MailFrom)) == (expected == "250")


def test_mail_from_passes_the_parsed_sender_and_upper_cased_parameters() -> None:
    h = ehlo().lines("MAIL FROM:<Sender@Far.Example> size=10 body=8BITMIME ret=FULL")
    (ev,) = h.of(MailFrom)
    assert isinstance(ev, MailFrom)
    assert ev.sender == Address("Sender", "far.example")
    assert ev.params == {"SIZE": "10", "BODY": "8BITMIME", "RET": "FULL"}
    assert h.core.envelope.mail_params == ev.params


def test_size_over_a_small_configured_limit_is_refused_with_the_limit_named() -> None:
    h = ehlo(caps=Capabilities(HOST, max_message_size=100)).lines(
        "MAIL FROM:<a@far.example> SIZE=101")
    assert h.last == said(replies.message_too_big(100))


def test_esmtp_parameters_after_plain_helo_are_unknown() -> None:
    h = Harness().lines("HELO c", "MAIL FROM:<a@far.example> SIZE=10",
                        "MAIL FROM:<a@far.example>", "RCPT TO:<b@far.example> NOTIFY=NEVER")
    assert h.replies[1].startswith("555 5.5.4")
    assert h.replies[2].startswith("250")
    assert h.replies[3].startswith("555 5.5.4")


# --- RCPT TO parameters ---------------------------------------------------------------

RCPT_CASES = [
    ("plain", "RCPT TO:<b@far.example>", "250"),
    ("notify_success_failure", "RCPT TO:<b@far.example> NOTIFY=SUCCESS,FAILURE", "250"),
    ("notify_all_three_lower_case", "RCPT TO:<b@far.example> NOTIFY=delay,success,failure",
     "250"),
    ("notify_never", "RCPT TO:<b@far.example> NOTIFY=NEVER", "250"),
    ("notify_never_with_others", "RCPT TO:<b@far.example> NOTIFY=NEVER,SUCCESS",
     said(replies.BAD_DSN_NOTIFY)),
    ("notify_unknown_keyword", "RCPT TO:<b@far.example> NOTIFY=SOMETIMES",
     said(replies.BAD_DSN_NOTIFY)),
    ("notify_without_value", "RCPT TO:<b@far.example> NOTIFY", "501 5.5.4"),
    ("notify_empty_item", "RCPT TO:<b@far.example> NOTIFY=SUCCESS,", "501 5.5.4"),
    ("orcpt", "RCPT TO:<b@far.example> ORCPT=rfc822;b@far.example", "250"),
    ("orcpt_xtext_escape", "RCPT TO:<b@far.example> ORCPT=rfc822;b+2Bx@far.example", "250"),
    ("orcpt_without_type", "RCPT TO:<b@far.example> ORCPT=;b@far.example", "501 5.5.4"),
    ("orcpt_without_address", "RCPT TO:<b@far.example> ORCPT=rfc822;", "501 5.5.4"),
    ("orcpt_without_semicolon", "RCPT TO:<b@far.example> ORCPT=rfc822", "501 5.5.4"),
    ("orcpt_bad_xtext", "RCPT TO:<b@far.example> ORCPT=rfc822;a+zz", "501 5.5.4"),
    ("unknown_parameter", "RCPT TO:<b@far.example> FOO=1", "555 5.5.4"),
    ("mail_parameter_on_rcpt", "RCPT TO:<b@far.example> SIZE=1", "555 5.5.4"),
    ("null_recipient", "RCPT TO:<>", said(replies.BAD_ADDRESS_SYNTAX)),
    ("source_route", "RCPT TO:<@relay.example:b@far.example>", "501 5.1.3"),
    ("double_at", "RCPT TO:<b@far.example@example.test>", "501 5.1.3"),
    ("missing_brackets", "RCPT TO:b@far.example", said(replies.SYNTAX_RCPT)),
    ("non_ascii_without_smtputf8", "RCPT TO:<j\u00f6rg@far.example>", "553 5.6.7"),
]


@pytest.mark.parametrize(("command", "expected"), [c[1:] for c in RCPT_CASES],
                         ids=[c[0] for c in RCPT_CASES])
def test_rcpt_to_parameters_are_validated_before_the_policy_sees_them(
        command: str, expected: str) -> None:
    h = in_transaction().lines(command)
    assert h.last.startswith(expected), h.last
    assert bool(h.of(RcptTo)) == (expected == "250")


def test_non_ascii_recipient_is_allowed_when_mail_from_said_smtputf8() -> None:
    h = ehlo().lines("MAIL FROM:<a@far.example> SMTPUTF8", "RCPT TO:<j\u00f6rg@b\u00fccher.example>")
    (ev,) = h.of(RcptTo)
    assert isinstance(ev, RcptTo)
    assert ev.recipient == Address("j\u00f6rg", "xn--bcher-kva.example")    # IDNA A-label


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_rcpt_to_bare_postmaster_maps_to_the_postmaster_domain(path: str) -> None:
    caps = Capabilities(HOST, postmaster_domain="example.test")
    h = in_transaction(caps=caps).lines(f"RCPT TO:{path}")
    (ev,) = h.of(RcptTo)
    assert isinstance(ev, RcptTo)
    assert ev.recipient == Address("postmaster", "example.test")
    assert h.core.envelope.recipients == [(Address("postmaster", "example.test"), {})]


def test_recipients_beyond_max_recipients_get_452_4_5_3() -> None:
    h = in_transaction(caps=Capabilities(HOST, max_recipients=2)).lines(
        "RCPT TO:<a@far.example>", "RCPT TO:<b@far.example>", "RCPT TO:<c@far.example>")
    assert h.last == said(replies.TOO_MANY_RECIPIENTS)
    assert len(h.of(RcptTo)) == 2
    assert len(h.core.envelope.recipients) == 2


def test_too_many_recipients_is_flow_control_not_an_error_towards_the_limit() -> None:
    caps = Capabilities(HOST, max_recipients=1, max_errors=2)
    h = in_transaction(caps=caps).lines(*(f"RCPT TO:<r{i}@far.example>" for i in range(5)))
    assert h.replies[2:] == [said(replies.RECIPIENT_OK)] + [said(replies.TOO_MANY_RECIPIENTS)] * 4
    assert h.core.phase is Phase.COMMAND
    assert not h.of(Closed)


def test_refused_recipients_do_not_count_against_max_recipients() -> None:
    def answer(ev: object) -> Reply:
        if isinstance(ev, RcptTo) and ev.recipient.local == "nobody":
            return Reply(550, "5.1.1", "no such user")
        return default_answer(ev)

    h = in_transaction(caps=Capabilities(HOST, max_recipients=2), answer=answer).lines(
        "RCPT TO:<nobody@far.example>", "RCPT TO:<a@far.example>", "RCPT TO:<b@far.example>")
    assert [r[:3] for r in h.replies[2:]] == ["550", "250", "250"]
    assert [a.local for a, _ in h.core.envelope.recipients] == ["a", "b"]


# --- command line framing -------------------------------------------------------------

FRAMING_CASES = [
    # id, raw bytes of one command line, expected reply prefix
    ("line_of_exactly_512_octets", b"NOOP " + b"x" * 505 + b"\r\n", said(replies.OK)),
    ("line_of_513_octets", b"NOOP " + b"x" * 506 + b"\r\n",
     said(replies.LINE_TOO_LONG)),
    ("line_of_900_octets", b"NOOP " + b"x" * 893 + b"\r\n", said(replies.LINE_TOO_LONG)),
    ("bare_lf", b"NOOP\n", said(replies.BARE_LINE_ENDING_IN_COMMAND)),
    ("bare_cr_inside", b"NO\rOP\r\n", said(replies.BARE_LINE_ENDING_IN_COMMAND)),
    ("bare_cr_then_lf_later", b"NOOP\rNOOP\r\n", "500 5.5.2"),
    ("cr_cr_lf", b"NOOP\r\r\n", "500 5.5.2"),
    ("nul", b"NO\x00OP\r\n", said(replies.NUL_IN_COMMAND)),
    ("nul_in_argument", b"MAIL FROM:<a@far.example>\x00\r\n", said(replies.NUL_IN_COMMAND)),
    ("invalid_utf8", b"NOOP \xff\xfe\r\n", said(replies.EIGHT_BIT_IN_COMMAND)),
    ("truncated_utf8", b"MAIL FROM:<j\xc3@far.example>\r\n", "500 5.5.2"),
    ("overlong_utf8", b"NOOP \xc0\xaf\r\n", "500 5.5.2"),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in FRAMING_CASES],
                         ids=[c[0] for c in FRAMING_CASES])
def test_command_lines_are_framed_strictly_and_the_session_goes_on(
        raw: bytes, expected: str) -> None:
    h = ehlo().feed(raw + b"NOOP\r\n")
    assert h.replies[1].startswith(expected), h.replies
    assert h.replies[2:] == [said(replies.OK)], h.replies
    assert not h.of(MailFrom)


def test_mail_and_rcpt_lines_may_use_the_extra_500_octets_of_rfc_3461() -> None:
    domain = ".".join(["d" * 60] * 3) + ".example"
    mail = f"MAIL FROM:<{'s' * 64}@{domain}> ENVID={'e' * 100} AUTH={'a' * 200}"
    rcpt = f"RCPT TO:<b@far.example> ORCPT=rfc822;{'x' * 480}@far.example"
    assert len(mail) > 512 and len(rcpt) > 512
    h = ehlo().lines(mail, rcpt)
    assert [r[:3] for r in h.replies[1:]] == ["250", "250"]
    assert len(h.of(MailFrom)) == 1 and len(h.of(RcptTo)) == 1


def test_mail_line_beyond_1012_octets_is_too_long() -> None:
    h = ehlo().lines("MAIL FROM:<a@far.example> AUTH=" + "a" * 1000, "NOOP")
    assert h.replies[1:] == [said(replies.LINE_TOO_LONG),
                             said(replies.OK)]
    assert not h.of(MailFrom)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 511, 1024, 5000, 100_000])
def test_over_long_line_is_answered_once_and_dropped_across_receives(chunk_size: int) -> None:
    # The tail of the long line looks like commands; none of it may be obeyed.
    long_line = b"NOOP " + b"x" * 3000 + b" MAIL FROM:<evil@far.example> " + b"y" * 3000 + b"\r\n"
    stream = long_line + b"NOOP\r\n"
    h = ehlo()
    for i in range(0, len(stream), chunk_size):
        h.feed(stream[i:i + chunk_size])
    assert h.replies[1:] == [said(replies.LINE_TOO_LONG),
                             said(replies.OK)]
    assert not h.of(MailFrom)


def test_over_long_line_without_lf_keeps_no_more_than_a_line_buffered() -> None:
    h = ehlo()
    for _ in range(100):
        h.feed(b"z" * 1000)
    assert h.core.buffered < 1100
    assert h.replies[1:] == [said(replies.LINE_TOO_LONG)]
    h.feed(b"\r\nNOOP\r\n")
    assert h.replies[-1] == said(replies.OK)
    assert len(h.replies) == 3


def test_partial_command_waits_for_its_line_end() -> None:
    h = ehlo().feed(b"NO", b"OP", b"\r")
    assert len(h.replies) == 1
    h.feed(b"\n")
    assert h.replies[1:] == [said(replies.OK)]


# --- DATA -----------------------------------------------------------------------------

DATA_CASES = [
    # id, bytes sent after 354 (terminator included), the message the core hands over
    ("simple", b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: x\r\n\r\nhello\r\n"),
    ("empty_message", b".\r\n", b""),
    ("dot_stuffed_line", b"a\r\n..hidden\r\n.\r\n", b"a\r\n.hidden\r\n"),
    ("dot_stuffed_first_line", b"..x\r\nb\r\n.\r\n", b".x\r\nb\r\n"),
    ("stuffed_lone_dot", b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    ("stuffed_double_dot", b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n"),
    ("consecutive_stuffed_lines", b"..\r\n..\r\n..\r\n.\r\n", b".\r\n.\r\n.\r\n"),
    ("dots_inside_lines_untouched", b"a..b\r\nc.\r\n.\r\n", b"a..b\r\nc.\r\n"),
    ("eight_bit_content", "Subject: \u00e9t\u00e9\r\n\r\nna\u00efve\r\n.\r\n".encode(),
     "Subject: \u00e9t\u00e9\r\n\r\nna\u00efve\r\n".encode()),
    ("line_of_998_characters", b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n"),
    # RFC 5321 4.5.3.1.6: the limit does not count the dot added for transparency.
    ("stuffed_line_of_998_characters", b".." + b"x" * 997 + b"\r\n.\r\n",
     b"." + b"x" * 997 + b"\r\n"),
    # RFC 5321 4.5.2: "If the first character is a period and there are other
    # characters on the line, the first character is deleted."
    ("unstuffed_leading_dot_is_deleted", b"a\r\n.hidden\r\n.\r\n", b"a\r\nhidden\r\n"),
]


@pytest.mark.parametrize(("wire", "message"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_data_is_dot_unstuffed_and_handed_over_once(wire: bytes, message: bytes) -> None:
    h = with_recipient().lines("DATA").feed(wire)
    assert h.replies[-2:] == [said(replies.START_MAIL_INPUT), said(QUEUED)]
    (ev,) = h.of(MessageReceived)
    assert isinstance(ev, MessageReceived)
    assert ev.data == message
    assert ev.envelope.sender == Address("sender", "far.example")
    assert ev.envelope.recipients == [(Address("alice", "example.test"), {})]


@pytest.mark.parametrize("split", ["whole", "byte_by_byte", "terminator_split"])
def test_end_of_data_is_found_however_the_bytes_arrive(split: str) -> None:
    body = b"Subject: x\r\n\r\nline\r\n..dot\r\n"
    stream = body + b".\r\nNOOP\r\n"
    h = with_recipient().lines("DATA")
    if split == "whole":
        h.feed(stream)
    elif split == "byte_by_byte":
        h.feed(*(stream[i:i + 1] for i in range(len(stream))))
    else:
        h.feed(body[:-1], b"\n.", b"\r", b"\nNO", b"OP\r\n")
    (ev,) = h.of(MessageReceived)
    assert isinstance(ev, MessageReceived)
    assert ev.data == b"Subject: x\r\n\r\nline\r\n.dot\r\n"
    assert h.replies[-2:] == [said(QUEUED), said(replies.OK)]


def test_message_reply_comes_only_after_the_terminator() -> None:
    h = with_recipient().lines("DATA").feed(b"hello\r\n", b".", b"\r")
    assert not h.of(MessageReceived)
    assert h.core.phase is Phase.DATA
    h.feed(b"\n")
    assert len(h.of(MessageReceived)) == 1
    assert h.core.phase is Phase.COMMAND


def test_transaction_ends_after_a_message_and_a_new_one_can_follow() -> None:
    h = with_recipient().lines("DATA").feed(b"one\r\n.\r\n").lines(
        "RCPT TO:<b@far.example>", "MAIL FROM:<x@far.example>", "RCPT TO:<b@far.example>",
        "DATA").feed(b"two\r\n.\r\n")
    assert h.replies[-6].startswith(said(QUEUED))
    assert h.replies[-5].startswith(said(replies.NEED_MAIL))
    assert [e.data for e in h.of(MessageReceived)] == [b"one\r\n", b"two\r\n"]  # type: ignore[attr-defined]


SMUGGLING_VECTORS = [
    ("lf_dot_lf", b"\n.\n"),
    ("lf_dot_crlf", b"\n.\r\n"),
    ("cr_dot_cr", b"\r.\r"),
    ("crlf_dot_lf", b"\r\n.\n"),
    ("cr_dot_crlf", b"\r.\r\n"),
    ("crlf_dot_cr", b"\r\n.\r"),
    ("lf_dot_cr_lf_crlf", b"\n.\r\n\r\n"),
]


@pytest.mark.parametrize("chunking", ["whole", "byte_by_byte"])
@pytest.mark.parametrize("vector", [v[1] for v in SMUGGLING_VECTORS],
                         ids=[v[0] for v in SMUGGLING_VECTORS])
def test_bare_line_end_smuggling_never_starts_a_second_transaction(
        vector: bytes, chunking: str) -> None:
    smuggled = (b"MAIL FROM:<evil@far.example>\r\nRCPT TO:<victim@far.example>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nsmuggled\r\n")
    stream = b"Subject: x\r\n\r\nhello" + vector + smuggled + b".\r\nNOOP\r\n"
    h = with_recipient().lines("DATA")
    if chunking == "whole":
        h.feed(stream)
    else:
        h.feed(*(stream[i:i + 1] for i in range(len(stream))))
    after_354 = h.replies[h.replies.index(said(replies.START_MAIL_INPUT)) + 1:]
    assert after_354 == [
        said(replies.BARE_LINE_ENDING_IN_DATA),
        said(replies.OK),
    ]
    assert not h.of(MessageReceived)
    assert len(h.of(MailFrom)) == 1 and len(h.of(RcptTo)) == 1
    assert h.core.in_transaction is False


def test_data_after_a_refused_message_needs_a_new_mail_from() -> None:
    h = with_recipient().lines("DATA").feed(b"a\nb\r\n.\r\n").lines("RCPT TO:<b@far.example>")
    assert h.last.startswith(said(replies.NEED_MAIL))


CONTENT_CASES = [
    ("nul", b"a\x00b\r\n", said(replies.NUL_IN_DATA)),
    ("line_of_999_characters", b"x" * 999 + b"\r\n",
     said(replies.DATA_LINE_TOO_LONG)),
    ("long_line_after_short_ones", b"a\r\nb\r\n" + b"y" * 5000 + b"\r\nc\r\n",
     said(replies.DATA_LINE_TOO_LONG)),
    ("long_last_line", b"a\r\n" + b"z" * 1200 + b"\r\n", said(replies.DATA_LINE_TOO_LONG)),
    ("bare_cr_at_end_of_line", b"a\r\r\n", said(replies.BARE_LINE_ENDING_IN_DATA)),
    ("bare_lf_alone", b"a\nb\r\n", said(replies.BARE_LINE_ENDING_IN_DATA)),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in CONTENT_CASES],
                         ids=[c[0] for c in CONTENT_CASES])
def test_bad_message_content_is_read_to_the_end_and_refused_whole(
        body: bytes, expected: str) -> None:
    h = with_recipient().lines("DATA").feed(body + b".\r\nNOOP\r\n")
    assert h.replies[-2].startswith(expected), h.replies
    assert h.replies[-1] == said(replies.OK)
    assert not h.of(MessageReceived)


@pytest.mark.parametrize("chunk_size", [1, 9, 64, 10_000])
def test_oversize_message_is_read_to_its_real_end_then_refused_with_552(
        chunk_size: int) -> None:
    caps = Capabilities(HOST, max_message_size=100)
    body = (b"x" * 60 + b"\r\n") * 5 + b"MAIL FROM:<evil@far.example>\r\n" + (b"y" * 60 + b"\r\n") * 5
    stream = body + b".\r\nNOOP\r\n"
    h = with_recipient(caps=caps).lines("DATA")
    for i in range(0, len(stream), chunk_size):
        h.feed(stream[i:i + chunk_size])
    after_354 = h.replies[h.replies.index(said(replies.START_MAIL_INPUT)) + 1:]
    assert after_354 == [said(replies.message_too_big(100)),
                         said(replies.OK)]
    assert not h.of(MessageReceived)
    assert len(h.of(MailFrom)) == 1


def test_oversize_message_is_not_held_in_memory_while_it_streams() -> None:
    caps = Capabilities(HOST, max_message_size=1000)
    h = with_recipient(caps=caps).lines("DATA")
    for _ in range(200):
        h.feed(b"z" * 998 + b"\r\n")
    # private, but the memory bound is the point
    assert len(h.core._in) + sum(len(p) for p in h.core._body) < 5000
    h.feed(b".\r\n")
    assert h.last.startswith("552 5.3.4")


@pytest.mark.parametrize("split_at", [None, -1, -2, -3])
def test_message_of_exactly_the_size_limit_is_accepted_however_it_is_split(
        split_at: int | None) -> None:
    body = b"Subject: x\r\n\r\nhello\r\n"
    caps = Capabilities(HOST, max_message_size=len(body))
    stream = body + b".\r\n"
    h = with_recipient(caps=caps).lines("DATA")
    if split_at is None:
        h.feed(stream)
    else:
        h.feed(stream[:split_at], stream[split_at:])
    assert h.last == said(QUEUED)
    assert [e.data for e in h.of(MessageReceived)] == [body]  # type: ignore[attr-defined]


@pytest.mark.parametrize("split", ["whole", "terminator_apart", "line_by_line"])
def test_transparency_dots_do_not_count_towards_the_size_limit_however_it_is_split(
        split: str) -> None:
    # 30 lines of ".." arrive as 120 octets but are a 90-octet message (RFC 5321 4.5.2).
    lines = [b"..\r\n"] * 30
    body = b"".join(lines)
    h = with_recipient(caps=Capabilities(HOST, max_message_size=100)).lines("DATA")
    if split == "whole":
        h.feed(body + b".\r\n")
    elif split == "terminator_apart":
        h.feed(body, b".\r\n")
    else:
        h.feed(*lines, b".\r\n")
    assert h.last == said(QUEUED)
    assert [e.data for e in h.of(MessageReceived)] == [b".\r\n" * 30]  # type: ignore[attr-defined]


def test_message_one_octet_over_the_limit_is_refused() -> None:
    body = b"Subject: x\r\n\r\nhello\r\n"
    caps = Capabilities(HOST, max_message_size=len(body) - 1)
    h = with_recipient(caps=caps).lines("DATA").feed(body + b".\r\n")
    assert h.last.startswith("552 5.3.4")
    assert not h.of(MessageReceived)


# --- pipelining -----------------------------------------------------------------------


def test_pipelined_commands_in_one_receive_are_answered_in_order() -> None:
    def answer(ev: object) -> Reply:
        if isinstance(ev, RcptTo) and ev.recipient.local == "nobody":
            return Reply(550, "5.1.1", "no such user")
        return default_answer(ev)

    h = Harness(answer=answer).feed(
        b"EHLO c\r\nMAIL FROM:<a@far.example>\r\nRCPT TO:<b@far.example>\r\n"
        b"RCPT TO:<nobody@far.example>\r\nRCPT TO:<c@far.example>\r\nDATA\r\n")
    assert [r[:3] for r in h.replies] == ["250", "250", "250", "550", "250", "354"]
    assert h.replies[1] == said(replies.SENDER_OK)
    assert h.replies[3] == "550 5.1.1 no such user"


def test_pipelined_whole_session_including_message_and_quit() -> None:
    h = Harness(greet=True).feed(
        b"EHLO c\r\nMAIL FROM:<a@far.example>\r\nRCPT TO:<b@far.example>\r\nDATA\r\n"
        b"hi\r\n.\r\nRSET\r\nQUIT\r\nNOOP\r\n")
    assert [r[:3] for r in h.replies] == ["220", "250", "250", "250", "354", "250", "250", "221"]
    assert isinstance(h.events[-1], Closed)


def test_nothing_is_answered_before_the_caller_responds_to_an_event() -> None:
    core = ServerProtocol(CAPS)
    core.receive(b"EHLO c\r\nMAIL FROM:<a@far.example>\r\nNOOP\r\n")
    ev = core.next_event()
    assert isinstance(ev, MailFrom)
    with pytest.raises(RuntimeError):
        core.next_event()
    assert parse_replies(core.take_output())[-1].startswith("250-")  # only the EHLO so far
    core.respond(replies.SENDER_OK)
    assert core.next_event() is NEED_DATA
    assert parse_replies(core.take_output()) == [said(replies.SENDER_OK),
                                                 said(replies.OK)]


def test_respond_without_a_pending_event_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        ServerProtocol(CAPS).respond(OK)


# --- STARTTLS -------------------------------------------------------------------------


def test_starttls_discards_plaintext_pipelined_after_it() -> None:
    caps = Capabilities(HOST, starttls=True, auth=True)
    h = Harness(caps=caps).feed(
        b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@far.example>\r\nRCPT TO:<x@far.example>\r\n")
    assert len(h.of(StartTls)) == 1
    assert not h.of(MailFrom)
    assert h.replies[-1] == said(replies.READY_FOR_TLS)
    assert h.core.buffered == 0


def test_tls_started_forgets_helo_and_the_plaintext_transaction() -> None:
    caps = Capabilities(HOST, starttls=True, auth=True)
    h = in_transaction(caps=caps)
    assert h.core.in_transaction
    h.lines("STARTTLS")
    h.core.tls_started()
    h.pump()
    assert h.core.tls_active and h.core.helo is None and h.core.esmtp is False
    assert h.core.in_transaction is False
    h.lines("MAIL FROM:<a@far.example>")
    assert h.last == said(replies.NEED_HELO)
    assert len(h.of(MailFrom)) == 1
    h.lines("EHLO c")
    assert "STARTTLS" not in h.last and "250-AUTH PLAIN LOGIN" in h.last


def test_bytes_received_after_the_handshake_are_kept() -> None:
    # The adapter reads nothing between STARTTLS and the handshake, so what is buffered
    # when tls_started() is called came over TLS (e.g. EHLO sent with the Finished).
    h = ehlo(caps=Capabilities(HOST, starttls=True, auth=True)).lines("STARTTLS")
    h.core.receive(b"EHLO c\r\n")
    h.core.tls_started()
    h.pump()
    assert "250-AUTH PLAIN LOGIN" in h.last and "STARTTLS" not in h.last
    assert h.core.helo == "c"


def test_second_starttls_after_tls_started_is_refused() -> None:
    h = ehlo(caps=Capabilities(HOST, starttls=True)).lines("STARTTLS")
    h.core.tls_started()
    h.lines("EHLO c", "STARTTLS")
    assert h.last == said(replies.ALREADY_TLS)
    assert len(h.of(StartTls)) == 1


# --- AUTH -----------------------------------------------------------------------------

AUTH_CAPS = Capabilities(HOST, starttls=True, auth=True)


def auth_session(**kw: object) -> Harness:
    return ehlo(caps=AUTH_CAPS, tls=True, **kw)


AUTH_CASES = [
    # id, lines after EHLO, expected replies after EHLO, expected (mechanism, user, password)
    ("plain_initial_response", ["AUTH PLAIN " + b64("\0alice@example.test\0s3cret")],
     [said(replies.AUTH_SUCCEEDED)], ("PLAIN", "alice@example.test", "s3cret")),
    ("plain_lower_case_mechanism", ["auth plain " + b64("\0alice\0pw")],
     ["235 2.7.0"], ("PLAIN", "alice", "pw")),
    ("plain_matching_authzid", ["AUTH PLAIN " + b64("alice\0alice\0pw")],
     ["235 2.7.0"], ("PLAIN", "alice", "pw")),
    ("plain_continuation", ["AUTH PLAIN", b64("\0alice\0pw")],
     ["334", "235 2.7.0"], ("PLAIN", "alice", "pw")),
    ("plain_password_with_spaces_and_utf8", ["AUTH PLAIN", b64("\0alice\0p w \u00e9")],
     ["334", "235 2.7.0"], ("PLAIN", "alice", "p w \u00e9")),
    ("login", ["AUTH LOGIN", b64("alice"), b64("pw")],
     ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0"], ("LOGIN", "alice", "pw")),
    ("login_initial_response", ["AUTH LOGIN " + b64("alice"), b64("pw")],
     ["334 UGFzc3dvcmQ6", "235 2.7.0"], ("LOGIN", "alice", "pw")),
    ("plain_cancelled", ["AUTH PLAIN", "*"], ["334", said(replies.AUTH_CANCELLED)], None),
    ("login_cancelled_at_username", ["AUTH LOGIN", "*"], ["334 VXNlcm5hbWU6", "501 5.0.0"], None),
    ("login_cancelled_at_password", ["AUTH LOGIN", b64("alice"), "*"],
     ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", said(replies.AUTH_CANCELLED)], None),
    ("plain_bad_base64_initial", ["AUTH PLAIN !!!notbase64"],
     [said(replies.BAD_BASE64)], None),
    ("plain_bad_base64_continuation", ["AUTH PLAIN", "%%%"], ["334", "501 5.5.2"], None),
    ("login_bad_base64_password", ["AUTH LOGIN", b64("alice"), "YW=Jj"],
     ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "501 5.5.2"], None),
    ("plain_without_nul_separators", ["AUTH PLAIN " + b64("alice pw")],
     [said(replies.AUTH_FAILED)], None),
    ("plain_empty_username", ["AUTH PLAIN " + b64("\0\0pw")], ["535 5.7.8"], None),
    ("plain_foreign_authzid", ["AUTH PLAIN " + b64("root\0alice\0pw")], ["535 5.7.8"], None),
    ("unknown_mechanism", ["AUTH CRAM-MD5"], [said(replies.AUTH_MECHANISM_UNKNOWN)], None),
    ("no_mechanism", ["AUTH"], [said(replies.SYNTAX_AUTH)], None),
    ("too_many_arguments", ["AUTH PLAIN a b"], ["501 5.5.4"], None),
]


@pytest.mark.parametrize(("lines", "expected", "credentials"), [c[1:] for c in AUTH_CASES],
                         ids=[c[0] for c in AUTH_CASES])
def test_auth_sasl_framing(lines: list[str], expected: list[str],
                           credentials: tuple[str, str, str] | None) -> None:
    h = auth_session().lines(*lines)
    got = h.replies[1:]
    assert len(got) == len(expected), got
    for reply, prefix in zip(got, expected, strict=True):
        assert reply.startswith(prefix), (reply, prefix)
    creds = h.of(AuthCredentials)
    if credentials is None:
        assert creds == []
        assert h.core.auth_user is None
    else:
        (ev,) = creds
        assert isinstance(ev, AuthCredentials)
        assert (ev.mechanism, ev.username, ev.password) == credentials
        assert h.core.auth_user == credentials[1]
    assert h.core.phase is Phase.COMMAND


def test_auth_plain_continuation_challenge_is_an_empty_334() -> None:
    h = auth_session().lines("AUTH PLAIN")
    assert h.wire.endswith(b"\r\n334\r\n") or h.wire.endswith(b"\r\n334 \r\n")
    assert h.core.phase is Phase.AUTH


def test_auth_failure_from_the_caller_leaves_the_session_unauthenticated() -> None:
    h = auth_session(answer=lambda ev: replies.AUTH_FAILED).lines(
        "AUTH PLAIN " + b64("\0alice\0wrong"))
    assert h.last == said(replies.AUTH_FAILED)
    assert h.core.auth_user is None
    h.answer = default_answer
    h.lines("AUTH PLAIN " + b64("\0alice\0right"))
    assert h.core.auth_user == "alice"


def test_auth_credentials_never_show_the_password_in_their_repr() -> None:
    h = auth_session().lines("AUTH PLAIN " + b64("\0alice\0sup3rsecret"))
    (ev,) = h.of(AuthCredentials)
    assert "sup3rsecret" not in repr(ev)


def test_the_core_refuses_a_334_answer_to_credentials() -> None:
    core = ServerProtocol(AUTH_CAPS, tls_active=True)
    core.receive(b"EHLO c\r\nAUTH PLAIN " + b64("\0a\0b").encode() + b"\r\n")
    assert isinstance(core.next_event(), AuthCredentials)
    with pytest.raises(RuntimeError):
        core.respond(Reply(334, "", "more"))


AUTH_REFUSED_CASES = [
    ("before_tls", Capabilities(HOST, starttls=True, auth=True), False,
     said(replies.AUTH_NEEDS_TLS)),
    ("auth_disabled_under_tls", Capabilities(HOST, starttls=True, auth=False), True,
     said(replies.AUTH_NOT_AVAILABLE)),
    ("auth_disabled_without_tls", Capabilities(HOST), False,
     said(replies.AUTH_NOT_AVAILABLE)),
]


@pytest.mark.parametrize(("caps", "tls", "expected"), [c[1:] for c in AUTH_REFUSED_CASES],
                         ids=[c[0] for c in AUTH_REFUSED_CASES])
def test_auth_is_refused_where_it_is_not_offered(
        caps: Capabilities, tls: bool, expected: str) -> None:
    h = ehlo(caps=caps, tls=tls).lines("AUTH PLAIN " + b64("\0alice\0pw"))
    assert h.last == expected
    assert not h.of(AuthCredentials)
    assert h.core.auth_user is None


def test_auth_line_may_be_longer_than_a_command_line() -> None:
    password = "p" * 3000
    h = auth_session().lines("AUTH PLAIN", b64("\0alice\0" + password))
    (ev,) = h.of(AuthCredentials)
    assert isinstance(ev, AuthCredentials) and ev.password == password


def test_nul_during_auth_exchange_ends_the_exchange() -> None:
    h = auth_session().lines("AUTH PLAIN").feed(b"AA\x00AA\r\nNOOP\r\n")
    assert h.replies[-2].startswith(said(replies.NUL_IN_COMMAND))
    assert h.replies[-1] == said(replies.OK)
    assert h.core.phase is Phase.COMMAND


# --- errors and closing ---------------------------------------------------------------


def test_too_many_errors_says_421_and_closes() -> None:
    h = Harness(caps=Capabilities(HOST, max_errors=3)).lines("FROB", "FROB", "FROB", "NOOP")
    assert h.replies == [
        said(replies.UNKNOWN_COMMAND),
        said(replies.UNKNOWN_COMMAND),
        said(replies.UNKNOWN_COMMAND),
        said(replies.TOO_MANY_ERRORS),
    ]
    assert h.events == [Closed("too many errors")]
    assert h.core.phase is Phase.CLOSED
    h.feed(b"NOOP\r\n")
    assert len(h.replies) == 4


def test_errors_answered_by_the_caller_count_towards_the_limit_and_close() -> None:
    h = in_transaction(caps=Capabilities(HOST, max_errors=2),
                       answer=lambda ev: Reply(550, "5.1.1", "no")
                       if isinstance(ev, RcptTo) else default_answer(ev))
    h.lines("RCPT TO:<a@far.example>", "RCPT TO:<b@far.example>", "NOOP")
    assert h.replies[-3:] == ["550 5.1.1 no", "550 5.1.1 no",
                              said(replies.TOO_MANY_ERRORS)]
    assert h.core.phase is Phase.CLOSED
    # Documented contract: Closed marks "the core has sent its last reply (QUIT or too
    # many errors)", so the caller's event loop must be told to close here too.
    assert isinstance(h.events[-1], Closed), h.events


def _delays(h: Harness, *commands: str) -> list[float]:
    """Send each command on its own and note the delay the core asks for its reply."""
    out = []
    for command in commands:
        h.lines(command)
        out.append(h.core.take_delay())
    return out


def test_the_default_limits_are_postfix_s_slow_after_10_close_at_20() -> None:
    h = ehlo()
    delays = _delays(h, *["FROB"] * 20)
    assert delays == [0.0] * 10 + [1.0] * 10      # each error reply past the 10th waits 1 s
    assert h.replies[1:] == [said(replies.UNKNOWN_COMMAND)] * 20 + [
        said(replies.TOO_MANY_ERRORS)]
    assert h.events == [Closed("too many errors")]
    # the 421 is the server's verdict, not a 21st error (the log said "11" of 10 before)
    assert h.core.errors == 20


def test_relay_refusals_count_as_errors_and_are_delayed_past_the_soft_limit() -> None:
    caps = Capabilities(HOST, soft_error_limit=2, max_errors=4, error_sleep=0.25)
    h = in_transaction(caps=caps, answer=lambda ev: replies.relay_denied(ev.recipient)
                       if isinstance(ev, RcptTo) else default_answer(ev))
    delays = _delays(h, *(f"RCPT TO:<r{i}@far.example>" for i in range(4)))
    assert delays == [0.0, 0.0, 0.25, 0.25]
    assert h.replies[-1] == said(replies.TOO_MANY_ERRORS)
    assert h.replies[-2] == "550 5.7.1 Relaying mail to <r3@far.example> is not allowed"
    assert h.core.phase is Phase.CLOSED


def test_only_error_replies_wait_past_the_soft_limit() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=1, max_errors=100, error_sleep=0.5))
    delays = _delays(h, "FROB", "FROB", "NOOP", "RSET", "MAIL FROM:<a@far.example>",
                     "RCPT TO:<b@far.example>", "FROB")
    assert delays == [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5]


def test_pipelined_error_replies_add_up_their_delays_for_one_write() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=1, max_errors=100, error_sleep=0.5))
    h.feed(b"FROB\r\nFROB\r\nNOOP\r\nFROB\r\nFROB\r\n")
    assert h.core.take_delay() == 1.5
    assert h.core.take_delay() == 0.0            # taken once
    assert h.codes[1:] == [502, 502, 250, 502, 502]


def test_paced_output_puts_each_delayed_error_reply_in_its_own_part() -> None:
    h = Harness(caps=Capabilities(HOST, soft_error_limit=1, max_errors=4, error_sleep=0.5))
    h.core.greet()
    h.core.receive(b"EHLO c\r\nFROB\r\nNOOP\r\nFROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
    while (ev := h.core.next_event()) is not NEED_DATA:
        h.events.append(ev)
    parts = h.core.take_paced()
    # one wait before each error reply past the first, the 421 straight after the last
    assert [wait for wait, _ in parts] == [0.0, 0.5, 0.5, 0.5]
    assert [parse_replies(out) for _, out in parts] == [
        [said(replies.greeting(HOST)), said(replies.ehlo(HOST, CAPS.max_message_size, starttls=False,
                                 auth=False)),
         said(replies.UNKNOWN_COMMAND), said(replies.OK)],
        [said(replies.UNKNOWN_COMMAND)],
        [said(replies.UNKNOWN_COMMAND)],
        [said(replies.UNKNOWN_COMMAND), said(replies.TOO_MANY_ERRORS)]]
    assert h.events == [Closed("too many errors")]
    assert h.core.take_paced() == [] and h.core.take_delay() == 0.0


def test_paced_output_of_a_delayed_reply_alone_starts_with_its_wait() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=1, max_errors=20, error_sleep=0.5))
    h.lines("FROB")
    h.core.receive(b"FROB\r\n")
    assert h.core.next_event() is NEED_DATA
    assert h.core.take_paced() == [(0.5, replies.UNKNOWN_COMMAND.render())]


def test_a_queued_message_resets_the_count_as_postfix_does_without_delivering_mail() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=2, max_errors=3, error_sleep=1.0))
    h.lines("FROB", "FROB", "MAIL FROM:<a@far.example>", "RCPT TO:<b@far.example>", "DATA")
    h.feed(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert h.last == said(QUEUED)
    assert _delays(h, "FROB", "FROB", "FROB") == [0.0, 0.0, 1.0]
    assert h.core.errors == 5 and h.core.errors_without_mail == 3
    assert h.events[-1] == Closed("too many errors")


def test_a_refused_message_does_not_reset_the_count() -> None:
    h = ehlo(caps=Capabilities(HOST, max_errors=2),
             answer=lambda ev: Reply(554, "5.6.0", "no") if isinstance(ev, MessageReceived)
             else default_answer(ev))
    h.lines("FROB", "MAIL FROM:<a@far.example>", "RCPT TO:<b@far.example>", "DATA")
    h.feed(b"hi\r\n.\r\n")
    assert h.replies[-2:] == ["554 5.6.0 no", said(replies.TOO_MANY_ERRORS)]


def test_a_soft_limit_at_or_above_the_hard_limit_never_delays() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=5, max_errors=5))
    assert _delays(h, *["FROB"] * 5) == [0.0] * 5
    assert h.last == said(replies.TOO_MANY_ERRORS)


def test_error_sleep_zero_never_delays() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=1, max_errors=20, error_sleep=0.0))
    assert _delays(h, *["FROB"] * 5) == [0.0] * 5


def test_close_with_is_not_counted_as_an_error_nor_delayed() -> None:
    h = ehlo(caps=Capabilities(HOST, soft_error_limit=1, max_errors=20))
    _delays(h, "FROB", "FROB")
    h.core.close_with(replies.timeout(HOST))
    assert h.core.errors == 2 and h.core.take_delay() == 0.0


def test_caller_421_closes_the_session() -> None:
    h = in_transaction(answer=lambda ev: Reply(421, "4.3.2", "shutting down")
                       if isinstance(ev, RcptTo) else default_answer(ev))
    h.lines("RCPT TO:<a@far.example>", "NOOP")
    assert h.last == "421 4.3.2 shutting down"
    assert h.core.phase is Phase.CLOSED


def test_quit_says_221_and_closes_even_with_commands_pipelined_after() -> None:
    h = ehlo().feed(b"QUIT\r\nNOOP\r\nMAIL FROM:<a@far.example>\r\n")
    assert h.replies[1:] == [said(replies.closing(HOST))]
    assert h.events == [Closed("QUIT")]
    assert h.core.phase is Phase.CLOSED
    h.feed(b"NOOP\r\n")
    assert len(h.replies) == 2


def test_close_with_sends_a_final_reply_and_stops_reading() -> None:
    h = ehlo()
    h.core.close_with(replies.timeout(HOST))
    h.feed(b"NOOP\r\n")
    assert h.replies[1:] == [said(replies.timeout(HOST))]


# --- properties -----------------------------------------------------------------------

SESSION = (
    b"EHLO client.test\r\n"
    b"AUTH PLAIN\r\n" + b64("\0alice\0pw").encode() + b"\r\n"
    b"MAIL FROM:<a@far.example> SIZE=50 BODY=8BITMIME\r\n"
    b"RCPT TO:<b@far.example> NOTIFY=SUCCESS,FAILURE\r\n"
    b"RCPT TO:<postmaster>\r\n"
    b"DATA\r\n"
    b"Subject: chunks\r\n\r\n..stuffed\r\n\r\n.\r\n"
    b"MAIL FROM:<>\r\nRCPT TO:<c@far.example>\r\nDATA\r\n.\r\n"
    b"NOOP\r\nRSET\r\nFROB\r\nNOOP\r\nQUIT\r\n"
)


def run_chunks(chunks: list[bytes]) -> tuple[list[object], bytes]:
    h = Harness(caps=AUTH_CAPS, tls=True, greet=True)
    h.feed(*chunks)
    return h.events, h.wire


WHOLE_EVENTS, WHOLE_WIRE = run_chunks([SESSION])


def test_reference_session_does_what_the_property_relies_on() -> None:
    kinds = [type(e).__name__ for e in WHOLE_EVENTS]
    assert kinds == ["AuthCredentials", "MailFrom", "RcptTo", "RcptTo", "MessageReceived",
                     "MailFrom", "RcptTo", "MessageReceived", "Closed"]
    assert WHOLE_EVENTS[4].data == b"Subject: chunks\r\n\r\n.stuffed\r\n\r\n"  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(st.integers(min_value=1, max_value=len(SESSION) - 1), max_size=60))
def test_any_chunking_of_a_session_gives_the_same_events_and_replies(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(SESSION)]
    chunks = [SESSION[a:b] for a, b in zip(points, points[1:], strict=False)]
    events, wire = run_chunks(chunks)
    assert events == WHOLE_EVENTS
    assert wire == WHOLE_WIRE


FRAGMENTS = [
    b"\r\n", b"\n", b"\r", b"\x00", b".", b"..", b"\r\n.\r\n", b"\n.\n", b" ", b"<", b">", b"@",
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@far.example>", b"MAIL FROM:<>", b" SIZE=",
    b" SMTPUTF8", b" BODY=8BITMIME", b" ENVID=", b" RET=", b"RCPT TO:<b@far.example>",
    b"RCPT TO:<postmaster>", b" NOTIFY=", b" ORCPT=rfc822;", b"DATA\r\n", b"RSET\r\n",
    b"STARTTLS\r\n", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH PLAIN AGFAYg==\r\n", b"*\r\n",
    b"QUIT\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"\xff", b"\xc3\xa9", b"\"", b"\\", b"%", b"!",
    b"[127.0.0.1]", b"x" * 600, b"y" * 1100,
]


@settings(max_examples=400, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=40),
    starttls=st.booleans(), auth=st.booleans(), tls=st.booleans(),
)
def test_garbage_never_raises_and_every_reply_is_well_formed(
        pieces: list[bytes], starttls: bool, auth: bool, tls: bool) -> None:
    caps = Capabilities(HOST, max_message_size=2000, max_recipients=3, max_errors=1000,
                        starttls=starttls, auth=auth)
    h = Harness(caps=caps, tls=tls, answer=lambda ev: OK)
    for piece in pieces:
        h.feed(piece)
    assert isinstance(h.replies, list)      # parse_replies checks every line's form
    assert h.core.phase in set(Phase)


def test_a_caller_that_takes_the_body_as_it_comes_holds_one_read_at_a_time() -> None:
    line = b"y" * 998 + b"\r\n"
    h = with_recipient().lines("DATA")
    taken: list[bytes] = []
    serials = set()
    for i in range(300):
        h.feed(b"." + line if i == 7 else line)     # one transparency dot to remove
        serial, parts = h.core.take_body()
        serials.add(serial)
        taken += parts
        assert len(h.core._in) < len(line) and not h.core._body
    h.feed(b"tail\r\n.\r\n")
    (ev,) = h.of(MessageReceived)
    assert ev.serial in serials and len(serials) == 1
    whole = b"".join(taken) + ev.data
    assert ev.data == b"tail\r\n"
    assert whole == line * 300 + b"tail\r\n"
    assert ev.size == len(whole)


def test_each_data_command_has_its_own_serial() -> None:
    h = with_recipient().lines("DATA")
    h.feed(b"one\r\n.\r\n")
    h.lines("MAIL FROM:<a@far.example>", "RCPT TO:<alice@example.test>", "DATA")
    h.feed(b"two\r\n.\r\n")
    first, second = h.of(MessageReceived)
    assert (first.data, second.data) == (b"one\r\n", b"two\r\n")
    assert second.serial == first.serial + 1
