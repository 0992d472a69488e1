"""Golden NDRs: each case's report, byte for byte, against tests/golden/ndr/<case>.eml.

The generator is deterministic (clock, Message-ID and boundary are injected); the
comparison still normalises the report's own Date, Message-ID and boundary, so a case
may change its clock without touching the golden text. Golden files are stored with
LF line ends so they read and diff well; the reports themselves are CRLF (checked here
and in test_bounce.py).

Regenerate after a deliberate change, then read every file as an administrator would:

    python3 -m tests.unit.test_bounce_golden --regenerate
    UPDATE_GOLDEN=1 python3 -m pytest tests/unit/test_bounce_golden.py
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from postroom.bounce import RecipientReport, build_report

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "ndr"
T0 = 1748858400.0                       # Mon, 02 Jun 2025 10:00:00 +0000
HOUR, DAY = 3600.0, 86400.0

ORIGINAL = (
    b"Received: from client.example.test ([192.168.10.7])\r\n"
    b"\tby mx.example.test (Postroom) with ESMTPSA id 7F3K2Q;\r\n"
    b"\tMon, 02 Jun 2025 10:00:00 +0000\r\n"
    b"From: Alice Example <alice@example.test>\r\n"
    b"To: Bob Far <bob@far.test>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <q2-figures@example.test>\r\n"
    b"Date: Mon, 02 Jun 2025 09:59:58 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the figures for the second quarter are below.\r\n"
    b"\r\n"
    b"Alice\r\n"
)

SMART_HOST = "smart host 127.0.0.1:2626 (route partner.example)"
# the same message as it left, signed by the [[dkim]] key of selector mail2025
SIGNED = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;\r\n"
          b"\ts=mail2025; h=from:to:subject:date:message-id;\r\n"
          b"\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=dGVzdA==\r\n" + ORIGINAL)


def _failed(rcpt: str, status: str, diagnostic: str, **kw: object) -> RecipientReport:
    return RecipientReport(rcpt, kw.pop("orcpt", None), "failed", status,  # type: ignore[arg-type]
                           diagnostic, **kw)  # type: ignore[arg-type]


# case name -> build_report keyword arguments (now/message_id/boundary added below)
CASES: dict[str, dict[str, object]] = {
    # (a) the seed case: the smart host refuses to relay for us at RCPT
    "a-smarthost-relay-denied": dict(kind="failure", recipients=[_failed(
        "bob@far.test", "5.7.1", "550 5.7.1 <bob@far.test>: Relay access denied",
        orcpt="bob@far.test", remote_host="smarthost.test", remote_ip="127.0.0.1",
        step="RCPT", hop=SMART_HOST, last_attempt=T0 + 2)], now=T0 + 3),
    # (b) no address space covers the domain: never left this server
    "b-no-route": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "carol@example.org", "5.4.4",
        "550 5.4.4 Unable to route: no address space covers example.org",
        step="routing", last_attempt=T0 + 1)], now=T0 + 1),
    # (c) the domain does not exist
    "c-nxdomain": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "dave@nosuch.test", "5.1.2",
        "550 5.1.2 <dave@nosuch.test>: domain nosuch.test does not exist (DNS: NXDOMAIN)",
        step="dns", hop="MX of nosuch.test (route *)", last_attempt=T0 + 1)], now=T0 + 1),
    # (d) the domain publishes a null MX
    "d-null-mx": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "erin@nomail.test", "5.1.10",
        "550 5.1.10 <erin@nomail.test>: nomail.test accepts no mail (null MX, RFC 7505)",
        step="dns", hop="MX of nomail.test (route *)", last_attempt=T0 + 1)], now=T0 + 1),
    # (e) the recipient's MX does not know the mailbox
    "e-unknown-user": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "nobody@far.test", "5.1.1",
        "550 5.1.1 <nobody@far.test>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
        remote_host="mx.far.test", remote_ip="192.0.2.25", step="RCPT",
        hop="MX of far.test (route *)", last_attempt=T0 + 2)], now=T0 + 3),
    # (f) delay notice after four hours of greylisting-like refusals
    "f-delay-try-later": dict(kind="delay", envid="QF7F3K2Q", recipients=[RecipientReport(
        "bob@far.test", "bob@far.test", "delayed", "4.7.1", "451 4.7.1 Try again later",
        remote_host="mx.far.test", remote_ip="192.0.2.25", step="RCPT",
        hop="MX of far.test (route *)", last_attempt=T0 + 4 * HOUR - 60,
        will_retry_until=T0 + 5 * DAY)], now=T0 + 4 * HOUR),
    # (g) success notice, NOTIFY=SUCCESS: one local mailbox, one remote server that does
    # not support DSN (so this is the last word on it)
    "g-success": dict(kind="success", envid="QF7F3K2Q", recipients=[
        RecipientReport("bob@example.test", "bob@example.test", "delivered", "2.0.0", "",
                        step="local", hop="local mailbox", last_attempt=T0 + 1),
        RecipientReport("bob@far.test", "bob@far.test", "relayed", "2.0.0",
                        "250 2.0.0 Ok: queued as 4XyZ9",
                        remote_host="mx.far.test", remote_ip="192.0.2.25", step="DATA",
                        hop="MX of far.test (route *)", last_attempt=T0 + 5)], now=T0 + 5),
    # (h) two recipients, one failed and one delayed: the failure report lists only the
    # failed one and names the other, which gets its own delay notice later if needed
    "h-one-failed-one-delayed": dict(kind="failure", recipients=[
        _failed("nobody@far.test", "5.1.1",
                "550 5.1.1 <nobody@far.test>: Recipient address rejected: "
                "User unknown in virtual mailbox table",
                remote_host="mx.far.test", remote_ip="192.0.2.25", step="RCPT",
                hop="MX of far.test (route *)", last_attempt=T0 + 2),
        RecipientReport("frank@slow.test", None, "delayed", "4.4.1",
                        "connect to mx.slow.test[198.51.100.9]:25: Connection refused",
                        remote_host="mx.slow.test", remote_ip="198.51.100.9",
                        step="connect", hop="MX of slow.test (route *)",
                        last_attempt=T0 + 2, will_retry_until=T0 + 5 * DAY)], now=T0 + 3),
    # (i) the lifetime ran out; the last error was a timeout
    "i-lifetime-expired": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "bob@far.test", "4.4.7",
        "gave up after 5 days; last error: 421 4.4.2 mx.far.test: connection timed out",
        remote_host="mx.far.test", remote_ip="192.0.2.25", step="lifetime",
        hop="MX of far.test (route *)", last_attempt=T0 + 5 * DAY)], now=T0 + 5 * DAY),
    # (k) the smart host accepts RCPT, then refuses after DATA under the sender's DMARC
    # policy (Gmail's words): the report names the three records, the DKIM one from the
    # message's own signature
    "k-smarthost-dmarc-after-data": dict(kind="failure", ret="HDRS", original=SIGNED,
                                         recipients=[_failed(
        "bob@far.test", "5.7.26",
        "550-5.7.26 Unauthenticated email from example.test is not accepted due to\n"
        "550-5.7.26 domain's DMARC policy. Please contact the administrator of\n"
        "550 5.7.26 example.test domain if this was a legitimate mail.",
        remote_host="smarthost.test", remote_ip="127.0.0.1", step="DATA", hop=SMART_HOST,
        last_attempt=T0 + 2)], now=T0 + 3),
    # (l) a recipient's MX refuses for SPF (Microsoft's words), unsigned mail
    "l-mx-spf-fail": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "bob@far.test", "5.7.23",
        "550 5.7.23 The message was rejected because of Sender Policy Framework violation",
        remote_host="mx.far.test", remote_ip="192.0.2.25", step="DATA",
        hop="MX of far.test (route *)", last_attempt=T0 + 2)], now=T0 + 3),
    # (j) the KB seed's own words, from a recipient's MX without an enhanced code
    "j-mx-relaying-not-allowed": dict(kind="failure", ret="HDRS", recipients=[_failed(
        "bob@far.test", "5.0.0", "550 Relaying mail to <bob@far.test> is not allowed",
        remote_host="mail.far.test", remote_ip="192.0.2.26", step="RCPT",
        hop="MX of far.test (route *)", last_attempt=T0 + 2)], now=T0 + 3),
}


def render(name: str) -> bytes:
    kw = dict(CASES[name])
    original = kw.pop("original", ORIGINAL)
    return build_report(reporting_mta="mx.example.test", original_sender="alice@example.test",
                        original=original, arrival=T0, message_id=f"ndr-{name}@mx.example.test",
                        boundary=f"=_postroom_{name}", **kw)  # type: ignore[arg-type]


_DATE = re.compile(r"\b(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{1,2} [A-Z][a-z]{2} \d{4} "
                   r"\d\d:\d\d:\d\d [+-]\d{4}\b")


def normalise(text: str) -> str:
    """LF line ends; the report's own Date, Message-ID and boundary replaced by tokens."""
    text = text.replace("\r\n", "\n")
    boundary = re.search(r'boundary="([^"]+)"', text)
    if boundary:
        text = text.replace(boundary.group(1), "BOUNDARY")
    text = re.sub(r"(?m)^Message-ID: <[^>]*>$", "Message-ID: <MESSAGE-ID>", text, count=1)
    return re.sub(r"(?m)^Date: .*$", "Date: DATE", text, count=1)


def golden_path(name: str) -> Path:
    return GOLDEN / f"{name}.eml"


def regenerate() -> list[Path]:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CASES:
        path = golden_path(name)
        path.write_text(render(name).decode("utf-8").replace("\r\n", "\n"), encoding="utf-8")
        written.append(path)
    return written


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_matches_its_golden_file(name: str) -> None:
    report = render(name)
    assert b"\n" not in report.replace(b"\r\n", b""), "bare LF in the report"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden_path(name).write_text(report.decode("utf-8").replace("\r\n", "\n"),
                                     encoding="utf-8")
    path = golden_path(name)
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1"
    assert normalise(report.decode("utf-8")) == normalise(path.read_text(encoding="utf-8"))


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.eml")} == set(CASES)


def test_the_generator_is_deterministic() -> None:
    for name in CASES:
        assert render(name) == render(name)


if __name__ == "__main__":
    if "--regenerate" not in sys.argv[1:]:
        sys.exit("usage: python3 -m tests.unit.test_bounce_golden --regenerate")
    for written in regenerate():
        print(f"wrote {written}")
