"""bounce: the catalogue of explanations, and the structure of the reports it builds.

Reports are parsed back with the standard library's ``email`` package, as a mail client
would read them.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message

import pytest

from postroom.bounce import (
    CATALOGUE,
    KINDS,
    MAX_SUBJECT,
    RecipientReport,
    build_report,
    explain,
    find_entry,
    is_bounce_allowed,
)

SMART = "smart host 127.0.0.1:2626 (route partner.example)"
MX = "MX of far.test (route *)"
T0 = 1748858400.0                        # Mon, 02 Jun 2025 10:00:00 +0000

# (expected entry, status, diagnostic, step, hop, remote host, words in meaning + action)
EXPLAIN_CASES: list[tuple[str | None, str, str, str, str, str | None, tuple[str, ...]]] = [
    ("delivered", "2.0.0", "250 2.0.0 Ok: queued as 4XyZ9", "DATA", MX, "mx.far.test",
     ("mx.far.test accepted", "Nothing to do")),
    ("tls-failed", "4.7.0", "454 4.7.0 TLS not available", "STARTTLS", SMART, None,
     ("encrypted (TLS)", 'tls = "opportunistic"', 'match = "partner.example"')),
    ("relay-smarthost", "5.7.1", "550 5.7.1 <bob@far.test>: Relay access denied", "RCPT",
     SMART, "smarthost.test",
     ("smart host smarthost.test refused to relay for us", "requires authentication",
      'username and password on the [[route]] with match = "partner.example"',
      "allow this server's address")),
    ("relay-smarthost", "", "550 Relaying mail to <bob@far.test> is not allowed", "RCPT",
     SMART, None, ("smart host 127.0.0.1:2626 refused to relay",)),
    ("relay-postroom", "5.7.1", "550 5.7.1 Relaying mail to <bob@remote.example> is not allowed",
     "", "", None, ("trusted networks", "[relay] trusted_networks", "remote.example",
                    "[domains] local", "Postroom's own words")),
    ("relay-mx", "5.7.1", "554 5.7.1 <bob@far.test>: Relay access denied", "RCPT", MX,
     "mx.far.test", ("recipient's server mx.far.test refused the message as relaying",
                     "MX records of far.test", "dig MX far.test")),
    ("relay-mx", "", "550 Relaying mail to <bob@far.test> is not allowed", "RCPT", MX,
     "mail.far.test", ("mail.far.test refused the message as relaying",)),
    ("auth-failed", "5.7.8", "535 5.7.8 Error: authentication failed: bad credentials",
     "AUTH", SMART, "smarthost.test",
     ("rejected our username or password", 'match = "partner.example"')),
    ("encryption-required", "5.7.11",
     "538 5.7.11 Encryption required for requested authentication mechanism", "AUTH", SMART,
     None, ("encrypted (TLS)", 'tls = "required"')),
    ("starttls-first", "5.7.0", "530 5.7.0 Must issue a STARTTLS command first", "MAIL",
     SMART, None, ("encrypted (TLS)",)),
    ("auth-required", "5.7.57",
     "530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM",
     "MAIL", SMART, "smarthost.test", ("log in (SMTP AUTH)", "username and password")),
    ("auth-required-text", "5.7.0", "530 5.7.0 Authentication required", "MAIL", SMART,
     None, ("log in (SMTP AUTH)",)),
    ("auth-refused", "5.5.4", "504 5.5.4 Unrecognized authentication type", "AUTH", SMART,
     "smarthost.test", ("did not accept our login", "PLAIN or LOGIN")),
    # sender authentication, in the providers' own words (Gmail, Microsoft, Yahoo)
    ("sender-auth-dmarc", "5.7.26",
     "550-5.7.26 Unauthenticated email from example.test is not accepted due to\n"
     "550-5.7.26 domain's DMARC policy. Please contact the administrator of example.test",
     "DATA", MX, "mx.far.test", ("DMARC policy of the sender's domain", "_dmarc.")),
    ("sender-auth-dmarc", "5.7.515", "550 5.7.515 Access denied, sending domain example.test "
     "does not meet the required authentication level.", "DATA", MX, "mx.far.test",
     ("SPF record of", "postroom doctor --from")),
    ("sender-auth-spf", "5.7.23", "550 5.7.23 The message was rejected because of Sender "
     "Policy Framework violation", "DATA", MX, "mx.far.test", ("SPF check", "TXT record")),
    ("sender-auth-dkim", "5.7.20", "550 5.7.20 No passing DKIM signature found", "DATA", MX,
     "mx.far.test", ("no valid DKIM signature", "SELECTOR._domainkey.")),
    ("sender-auth-ptr", "5.7.25", "550-5.7.25 The IP address sending this message does not "
     "have a PTR record setup", "DATA", MX, "mx.far.test", ("reverse DNS", "PTR record")),
    ("sender-null-mx", "5.7.27", "550 5.7.27 Sender address has null MX", "MAIL", MX,
     "mx.far.test", ("null MX", "remove the null MX")),
    ("sender-auth-dmarc-text", "5.7.9", "550 5.7.9 This mail has been blocked because the "
     "sender is unauthenticated. Yahoo requires all senders to authenticate with either SPF "
     "or DKIM.", "DATA", MX, "mx.far.test", ("DMARC policy", "_dmarc.")),
    ("sender-auth-spf-text", "5.7.1", "550 5.7.1 SPF check failed for example.test", "DATA",
     MX, "mx.far.test", ("SPF check", "SPF record")),
    ("sender-auth-dkim-text", "", "554 DKIM signature verification failed", "DATA", MX,
     "mx.far.test", ("DKIM signature", "[[dkim]]")),
    ("sender-authentication", "5.7.1", "550-5.7.1 This message does not have authentication "
     "information or fails to pass authentication checks.", "DATA", MX, "mx.far.test",
     ("SPF, DKIM, DMARC or ARC", "DKIM record at")),
    ("blocklisted", "5.7.1",
     "554 5.7.1 Service unavailable; Client host [203.0.113.5] blocked using zen.spamhaus.org",
     "RCPT", MX, "mx.far.test", ("blocklist", "removal procedure")),
    ("no-route", "5.4.4", "550 5.4.4 Unable to route: no address space covers example.org",
     "routing", "", None, ("No address space covers example.org", "Add a [[route]]")),
    ("no-route-reply", "5.4.4", "550 5.4.4 Unable to route: no address space covers example.org",
     "", "", None, ("covers example.org", "[[route]]")),
    ("unroutable", "5.4.4", "550 5.4.4 far.test has no MX and no address records", "dns", MX,
     None, ("No mail server could be found for far.test", "dig MX far.test")),
    ("unknown-user-local", "5.1.1",
     "550 5.1.1 <zed@example.test>: Recipient address rejected: no such mailbox here",
     "local", "local mailbox", None, ("no mailbox zed@example.test", "postroom users add")),
    ("unknown-user", "5.1.1", "550 5.1.1 <nobody@far.test>: Recipient address rejected: "
     "User unknown in virtual mailbox table", "RCPT", MX, "mx.far.test",
     ("mx.far.test says the mailbox nobody@far.test does not exist", "spelling")),
    ("no-domain", "5.1.2", "550 5.1.2 <dave@nosuch.test>: domain nosuch.test does not exist",
     "dns", "MX of nosuch.test (route *)", None, ("nosuch.test does not exist", "NXDOMAIN")),
    ("null-mx", "5.1.10", "550 5.1.10 <erin@nomail.test>: nomail.test accepts no mail",
     "dns", "MX of nomail.test (route *)", None, ("nomail.test", "null MX", "RFC 7505")),
    ("mailbox-full", "5.2.2", "552 5.2.2 <bob@far.test>: Mailbox full", "RCPT", MX,
     "mx.far.test", ("mailbox of bob@far.test is full",)),
    ("mailbox-full", "4.2.2", "452 4.2.2 Over quota", "RCPT", MX, None, ("is full",)),
    ("too-big", "5.3.4",
     "552 5.3.4 Message size exceeds fixed maximum message size (10240000 bytes)", "DATA",
     MX, "mx.far.test", ("larger than mx.far.test accepts (its limit: 10240000 bytes, "
                         "about 9.8 MB)", "smaller")),
    ("too-big", "5.2.3", "552 5.2.3 Message length exceeds administrative limit", "DATA", MX,
     "mx.far.test", ("larger than mx.far.test accepts.",)),
    ("smtputf8", "5.6.7", "553 5.6.7 SMTPUTF8 is required, but was not offered by host",
     "MAIL", MX, "mx.far.test", ("non-ASCII", "SMTPUTF8")),
    ("alias-loop", "5.4.6", "550 5.4.6 alias team@example.test expands only into aliases "
     "that loop back", "local", "local mailbox", None, ("alias loops", "[aliases]")),
    ("mail-loop", "5.4.6", "554 5.4.6 Too many hops", "DATA", MX, "mx.far.test",
     ("loop", "Received headers")),
    ("lifetime", "4.4.7", "gave up after 5 days; last error: 451 4.7.1 Try again later",
     "lifetime", MX, "mx.far.test",
     ("kept trying to deliver this message for 5 days", "The last attempt failed like this",
      "greylisting", "ask the sender to send the message again")),
    ("expired", "5.4.7", "message expired after 3 days in the queue", "", "", None,
     ("for 3 days",)),
    ("connection-refused", "4.4.1", "connect to 127.0.0.1:2626: Connection refused",
     "connect", SMART, None, ("Nothing answered at 127.0.0.1:2626", "refused", "telnet")),
    ("no-answer", "4.4.2", "connect to mx.far.test[192.0.2.25]:25: timed out", "connect",
     MX, "mx.far.test", ("Nothing answered at mx.far.test", "firewall")),
    ("dns-failure", "4.4.3", "451 4.4.3 DNS lookup for far.test failed: SERVFAIL", "dns", MX,
     None, ("DNS lookup for far.test failed", "resolver")),
    ("try-later", "4.7.1", "451 4.7.1 Try again later", "RCPT", MX, "mx.far.test",
     ("try again later", "greylisting")),
    (None, "5.5.2", "500 5.5.2 Syntax error", "DATA", MX, "mx.far.test",
     ("mx.far.test refused the message permanently", "SMTP protocol problem")),
    (None, "4.3.0", "451 4.3.0 Internal error", "DATA", MX, "mx.far.test",
     ("temporary failure", "receiving system itself")),
    (None, "5.7.99", "550 5.7.99 Computer says no", "RCPT", MX, None,
     ("The mail server of far.test refused", "security or policy",
      "ask the administrator of the mail server of far.test")),
    (None, "5.1.3", "501 5.1.3 Bad recipient address syntax", "RCPT", MX, None,
     ("because of the address", "typing mistakes")),
    (None, "4.0.0", "", "", "", None, ("The receiving server could not take",)),
]


@pytest.mark.parametrize("expected, status, diagnostic, step, hop, remote, words", EXPLAIN_CASES)
def test_explain_finds_the_entry_and_says_it_in_plain_words(
        expected: str | None, status: str, diagnostic: str, step: str, hop: str,
        remote: str | None, words: tuple[str, ...]) -> None:
    entry = find_entry(status, diagnostic, step, hop)
    assert (entry.name if entry else None) == expected
    why = explain(status, diagnostic, step, hop, remote_host=remote)
    text = f"{why.meaning} {why.action}"
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert "{" not in text and "}" not in text, "a template was not filled in"
    assert not why.meaning.startswith(("the ", "this ", "its ")), "sentences open capitalised"


def test_every_catalogue_entry_is_exercised_by_the_table() -> None:
    names = [e.name for e in CATALOGUE]
    assert len(names) == len(set(names)), "catalogue names are unique"
    assert set(names) == {c[0] for c in EXPLAIN_CASES if c[0]}


def test_catalogue_patterns_compile_and_name_known_steps() -> None:
    steps = {"", "connect", "greeting", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA",
             "routing", "dns", "local", "lifetime"}
    for entry in CATALOGUE:
        for regex in (entry.pattern, entry.hop):
            if regex:
                re.compile(regex)
        assert set(entry.steps) <= steps, entry.name
        assert entry.statuses, entry.name


def test_status_prefixes_match_whole_components() -> None:
    """5.1.10 (null MX) is not 5.1.1 (unknown user), and the reverse."""
    assert find_entry("5.1.10", "550 5.1.10 x", "dns", MX).name == "null-mx"  # type: ignore[union-attr]
    assert find_entry("5.1.1", "550 5.1.1 x", "RCPT", MX).name == "unknown-user"  # type: ignore[union-attr]


def test_a_missing_enhanced_code_is_taken_from_the_reply_or_its_class() -> None:
    assert find_entry("", "451 4.7.1 Try again later", "RCPT", MX).name == "try-later"  # type: ignore[union-attr]
    assert explain("", "550 No", "RCPT", MX).meaning.startswith("The mail server of far.test "
                                                                "refused the message permanently")


def test_recipient_sharpens_the_words() -> None:
    why = explain("5.2.2", "552 5.2.2 Mailbox full", "RCPT", MX, recipient="bob@far.test")
    assert "bob@far.test" in why.meaning


def test_relay_refusal_from_a_smart_host_is_not_blamed_on_the_recipient() -> None:
    seed = "550 5.7.1 <bob@far.test>: Relay access denied"
    assert "smart host" in explain("5.7.1", seed, "RCPT", SMART).meaning
    assert "recipient's server" in explain("5.7.1", seed, "RCPT", MX).meaning


def test_postfix_unknown_user_in_relay_table_is_not_a_relay_refusal() -> None:
    diag = "550 5.1.1 <x@far.test>: Recipient address rejected: User unknown in relay recipient table"
    assert find_entry("5.1.1", diag, "RCPT", SMART).name == "unknown-user"  # type: ignore[union-attr]


@pytest.mark.parametrize("sender, allowed", [
    ("", False), ("<>", False), (" ", False), ("alice@example.test", True),
    ("MAILER-DAEMON@far.test", True),
])
def test_only_the_null_sender_never_gets_a_bounce(sender: str, allowed: bool) -> None:
    assert is_bounce_allowed(sender) is allowed


# --- reports -------------------------------------------------------------------------

ORIGINAL = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@far.test>\r\n"
            b"Subject: Quarterly\r\n\tfigures\r\nMessage-ID: <q2@example.test>\r\n\r\n"
            b"Hello Bob,\r\n\r\nthe figures.\r\n")
SEED = RecipientReport("bob@far.test", "bob@far.test", "failed", "5.7.1",
                       "550 5.7.1 <bob@far.test>: Relay access denied",
                       remote_host="smarthost.test", remote_ip="127.0.0.1", step="RCPT",
                       hop=SMART, last_attempt=T0 + 2)
DELAYED = RecipientReport("carol@slow.test", None, "delayed", "4.4.1",
                          "connect to mx.slow.test[198.51.100.9]:25: Connection refused",
                          remote_host="mx.slow.test", remote_ip="198.51.100.9", step="connect",
                          hop="MX of slow.test (route *)", last_attempt=T0 + 2,
                          will_retry_until=T0 + 5 * 86400)
DELIVERED = RecipientReport("bob@example.test", None, "delivered", "2.0.0", "",
                            step="local", hop="local mailbox", last_attempt=T0 + 1)


def report(**kw: object) -> bytes:
    args: dict[str, object] = dict(
        kind="failure", reporting_mta="mx.example.test", original_sender="alice@example.test",
        original=ORIGINAL, arrival=T0, recipients=[SEED], now=T0 + 3,
        message_id="ndr1@mx.example.test", boundary="=_b1")
    args.update(kw)
    return build_report(**args)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _messages(payload: object) -> list[Message]:
    assert isinstance(payload, list)
    assert all(isinstance(m, Message) for m in payload)
    return payload


def parts(msg: EmailMessage) -> list[Message]:
    return _messages(msg.get_payload())


def status_blocks(msg: EmailMessage) -> list[Message]:
    return _messages(parts(msg)[1].get_payload())


def text(msg: EmailMessage) -> str:
    part = parts(msg)[0]
    assert isinstance(part, EmailMessage)
    return str(part.get_content()).replace("\r\n", "\n")


def test_failure_report_is_a_multipart_report_with_three_parts() -> None:
    msg = parse(report())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert not msg.defects and all(not p.defects for p in parts(msg))


def test_report_headers() -> None:
    msg = parse(report())
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.test>"
    assert msg["To"] == "alice@example.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == "<ndr1@mx.example.test>"
    assert msg["Date"].datetime.timestamp() == T0 + 3
    assert parse(report(message_id="<x@y>"))["Message-ID"] == "<x@y>"


@pytest.mark.parametrize("kind, recipients, prefix", [
    ("failure", [SEED], "Undeliverable: "), ("delay", [DELAYED], "Delayed: "),
    ("success", [DELIVERED], "Delivered: "),
])
def test_subject_names_the_kind_and_the_original_subject_unfolded(
        kind: str, recipients: list[RecipientReport], prefix: str) -> None:
    assert parse(report(kind=kind, recipients=recipients))["Subject"] == \
        prefix + "Quarterly figures"


def test_long_subject_is_truncated_and_missing_subject_is_named() -> None:
    long = b"Subject: " + b"word " * 400 + b"\r\n\r\nbody\r\n"
    subject = parse(report(original=long))["Subject"]
    assert subject.startswith("Undeliverable: word word")
    assert len(subject) <= len("Undeliverable: ") + MAX_SUBJECT + 3
    assert parse(report(original=b"From: a@b.test\r\n\r\nbody\r\n"))["Subject"] == \
        "Undeliverable: (no subject)"


def test_non_ascii_subject_is_encoded_and_reads_back() -> None:
    data = report(original="Subject: Grüße aus Köln\r\n\r\nbody\r\n".encode())
    assert parse(data)["Subject"] == "Undeliverable: Grüße aus Köln"
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()


def test_delivery_status_fields() -> None:
    msg = parse(report(envid="QF7F3K2Q"))
    per_message, per_recipient = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["Original-Envelope-Id"] == "QF7F3K2Q"
    assert per_message["Arrival-Date"] == "Mon, 02 Jun 2025 10:00:00 +0000"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@far.test"
    assert per_recipient["Original-Recipient"] == "rfc822; bob@far.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.7.1"
    assert per_recipient["Remote-MTA"] == "dns; smarthost.test"
    assert per_recipient["Diagnostic-Code"] == \
        "smtp; 550 5.7.1 <bob@far.test>: Relay access denied"
    assert per_recipient["Last-Attempt-Date"] == "Mon, 02 Jun 2025 10:00:02 +0000"
    assert per_recipient["Will-Retry-Until"] is None


def test_optional_fields_are_left_out_when_unknown() -> None:
    bare = RecipientReport("x@far.test", None, "failed", "5.4.4",
                           "550 5.4.4 Unable to route: no address space covers far.test",
                           step="routing")
    per_message, per_recipient = status_blocks(parse(report(recipients=[bare])))
    assert per_message["Original-Envelope-Id"] is None
    for name in ("Original-Recipient", "Remote-MTA", "Last-Attempt-Date"):
        assert per_recipient[name] is None


def test_our_own_error_text_gets_an_x_diagnostic_type_and_an_ip_only_remote() -> None:
    rcpt = RecipientReport("x@far.test", None, "failed", "4.4.1",
                           "connect to 192.0.2.1:25: Connection refused", remote_ip="192.0.2.1",
                           step="connect")
    per_recipient = status_blocks(parse(report(recipients=[rcpt])))[1]
    assert per_recipient["Diagnostic-Code"] == \
        "X-Postroom; connect to 192.0.2.1:25: Connection refused"
    assert per_recipient["Remote-MTA"] == "dns; [192.0.2.1]"


def test_delay_notice_says_until_when_we_keep_trying() -> None:
    msg = parse(report(kind="delay", recipients=[DELAYED], now=T0 + 4 * 3600))
    per_recipient = status_blocks(msg)[1]
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Will-Retry-Until"] == "Sat, 07 Jun 2025 10:00:00 +0000"
    body = " ".join(text(msg).split())
    assert "waiting for 4 hours" in body
    assert "keeps trying until Sat, 07 Jun 2025 10:00:00 +0000" in body
    assert "do not need to send it again" in body


def test_human_part_says_which_server_where_what_and_what_to_change() -> None:
    body = text(parse(report()))
    assert "smarthost.test [127.0.0.1]" in body
    assert "smart host 127.0.0.1:2626 (route partner.example)" in body
    assert "RCPT TO (naming the recipient)" in body
    assert "\n        550 5.7.1 <bob@far.test>: Relay access denied\n" in body
    flat = " ".join(body.split())
    assert "refused to relay for us" in flat
    assert 'set username and password on the [[route]] with match = "partner.example"' in flat


def test_a_failure_report_lists_only_the_failed_recipients() -> None:
    msg = parse(report(recipients=[SEED, DELAYED, DELIVERED]))
    assert [b["Final-Recipient"] for b in status_blocks(msg)[1:]] == ["rfc822; bob@far.test"]
    flat = " ".join(text(msg).split())
    assert "carol@slow.test (delayed)" in flat and "bob@example.test (delivered)" in flat
    assert "still trying" in flat


def test_each_kind_reports_its_own_actions() -> None:
    for kind, rcpt in zip(KINDS, (SEED, DELAYED, DELIVERED), strict=True):
        blocks = status_blocks(parse(report(kind=kind, recipients=[SEED, DELAYED, DELIVERED])))
        assert [b["Final-Recipient"] for b in blocks[1:]] == [f"rfc822; {rcpt.final_recipient}"]


def test_ret_full_returns_the_whole_message() -> None:
    returned = parts(parse(report(ret="FULL")))[2]
    assert returned.get_content_type() == "message/rfc822"
    [inner] = _messages(returned.get_payload())
    assert inner["Message-ID"] == "<q2@example.test>"
    assert b"the figures." in report(ret="FULL")


def test_no_ret_means_the_whole_message_for_a_failure() -> None:
    assert parts(parse(report(ret=None)))[2].get_content_type() == "message/rfc822"


def test_ret_hdrs_returns_only_the_header_block() -> None:
    data = report(ret="HDRS")
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <q2@example.test>" in data
    assert b"the figures." not in data


def test_a_message_over_the_return_limit_falls_back_to_headers_and_says_so() -> None:
    data = report(ret="FULL", max_return_size=50)
    msg = parse(data)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert b"the figures." not in data
    assert f"The original message is {len(ORIGINAL)} bytes" in " ".join(text(msg).split())


@pytest.mark.parametrize("kind, rcpt", [("delay", DELAYED), ("success", DELIVERED)])
def test_delay_and_success_notices_return_headers_only(kind: str, rcpt: RecipientReport) -> None:
    msg = parse(report(kind=kind, recipients=[rcpt], ret="FULL"))
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_lines_are_crlf_and_none_is_over_998_octets() -> None:
    huge = RecipientReport(
        "bob@far.test", None, "failed", "5.7.1",
        "550-5.7.1 " + "x" * 3000 + "\n550 5.7.1 " + "policy words " * 300,
        remote_host="mx.far.test", step="DATA", hop=MX)
    original = b"Subject: " + b"s" * 980 + b"\r\n\r\nbody\r\n"   # a legal 989-octet line
    data = report(recipients=[huge], original=original)
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    msg = parse(data)
    diag = status_blocks(msg)[1]["Diagnostic-Code"]
    assert diag.startswith("smtp; 550-5.7.1 xxx") and "policy words" in diag
    assert "\n" not in str(diag)


def test_an_ascii_report_is_7bit_throughout() -> None:
    data = report()
    assert data.isascii()
    assert b"Content-Transfer-Encoding: 8bit" not in data


def test_an_8bit_original_is_returned_as_8bit_and_declared() -> None:
    original = "Subject: Grüße\r\n\r\nSchöne Grüße\r\n".encode()
    data = report(original=original, ret="FULL")
    head, _, _ = data.partition(b"\r\n\r\n")
    assert b"Content-Transfer-Encoding: 8bit" in head
    assert parts(parse(data))[2]["Content-Transfer-Encoding"] == "8bit"
    assert "Schöne Grüße".encode() in data


def test_non_ascii_addresses_stay_7bit_in_the_status_part() -> None:
    rcpt = RecipientReport("jürgen@far.test", None, "failed", "5.1.1",
                           "550 5.1.1 unknown", remote_host="mx.far.test", step="RCPT", hop=MX)
    data = report(recipients=[rcpt], ret="HDRS")
    assert data.isascii()
    msg = parse(data)
    assert status_blocks(msg)[1]["Final-Recipient"] == "utf-8; j\\x{FC}rgen@far.test"
    assert parts(msg)[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert "jürgen@far.test" in text(msg)


def test_a_boundary_found_in_the_original_is_changed() -> None:
    original = b"Subject: x\r\n\r\n--=_b1\r\n"
    msg = parse(report(original=original, ret="FULL"))
    assert msg.get_boundary() != "=_b1"
    assert len(parts(msg)) == 3


def test_the_same_inputs_give_the_same_bytes() -> None:
    assert report() == report()


@pytest.mark.parametrize("bad", [
    dict(kind="bounce"), dict(ret="SOME"), dict(recipients=[DELAYED]),
    dict(recipients=[RecipientReport("x@y.test", None, "vanished", "5.0.0", "")]),
])
def test_bad_arguments_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        report(**bad)
