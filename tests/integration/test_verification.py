"""Inbound verification on real sockets: SPF, DKIM, DMARC and ARC against a real dnsmasq.

Messages come from an untrusted source address (127.0.0.66) to the MX listener, signed
by dkimpy and by OpenDKIM (``opendkim-testmsg``), with their records in dnsmasq. Each
case asserts its Authentication-Results line as stored in the Maildir.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import (
    UNTRUSTED,
    ServerProcess,
    client_tls_context,
    closed_port,
    wait_until,
)
from tests.integration.dnsmasq import run_dnsmasq

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
PUBLIC = base64.b64encode(KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


def txt(name: str, text: str, size: int = 200) -> str:
    """A dnsmasq TXT record, split into strings of ``size`` characters (on the command
    line dnsmasq keeps quotes as they are: commas separate the strings)."""
    assert "," not in text
    parts = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    return f"--txt-record={name}," + ",".join(parts)


def opendkim_key(workdir: Path) -> tuple[Path, str] | None:
    """(private key file, its TXT record) made by opendkim-genkey, or None without it."""
    genkey = shutil.which("opendkim-genkey") or shutil.which("opendkim-genkey", path="/usr/sbin")
    if genkey is None:
        return None
    subprocess.run([genkey, "-b", "1024", "-d", "far.test", "-s", "odk", "-D", str(workdir)],
                   check=True, capture_output=True)
    record = "".join(re.findall(r'"([^"]*)"', (workdir / "odk.txt").read_text()))
    return workdir / "odk.private", record


RECORDS = [
    txt("far.test", "v=spf1 ip4:127.0.0.66 -all"),
    txt("_dmarc.far.test", "v=DMARC1; p=reject"),
    txt("sel._domainkey.far.test", f"v=DKIM1; k=rsa; p={PUBLIC}"),
    txt("nodmarc.test", "v=spf1 ip4:127.0.0.66 -all"),
    txt("quar.test", "v=spf1 -all"),
    txt("_dmarc.quar.test", "v=DMARC1; p=quarantine"),
    txt("bad.test", "v=spf1 ip4:300.1.1.1 -all"),
    txt("loop.test", "v=spf1 include:loop2.test -all"),
    txt("loop2.test", "v=spf1 include:loop.test -all"),
    *[txt(f"c{i}.chain.test", f"v=spf1 include:c{i + 1}.chain.test -all") for i in range(12)],
    txt("chain.test", "v=spf1 include:c0.chain.test -all"),
    txt("void.test", "v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all"),
    txt("macro.test", "v=spf1 exists:%{ir}.%{l}.ok.macro.test -all"),
    "--host-record=66.0.0.127.bob.ok.macro.test,127.0.0.2",
    # a huge answer: one SPF record of 600 terms in 200-character strings (over TCP)
    txt("huge.test", "v=spf1 " + " ".join(f"ip4:10.0.{i // 250}.{i % 250}" for i in range(600))
        + " -all"),
]


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path | None]]:
    workdir = tmp_path_factory.mktemp("dkim")
    odk = opendkim_key(workdir)
    records = list(RECORDS)
    if odk is not None:
        records.append(txt("odk._domainkey.far.test", odk[1]))
    # slow.test: forwarded to a port where nothing answers: SERVFAIL or a timeout
    records.append(f"--server=/slow.test/127.0.0.1#{closed_port()}")
    with run_dnsmasq(records) as port:
        yield port, odk[0] if odk else None


@pytest.fixture(scope="module")
def mx(dns: tuple[int, Path | None], tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[ServerProcess]:
    port, _ = dns
    sp = ServerProcess(tmp_path_factory.mktemp("verify"), f"""
[dns]
nameservers = ["127.0.0.1:{port}"]
[verify]
enabled = true
dns_timeout = "2s"
""")
    sp.add_user("alice@example.test")
    sp.add_user("bob@example.test", "hunter2")
    sp.start()
    yield sp
    sp.stop()


def message(from_: str = "a@far.test", subject: str = "hi", extra: bytes = b"") -> bytes:
    return (f"From: {from_}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@far.test>\r\n"
            ).encode() + extra + b"\r\nhello\r\n"


def signed(msg: bytes, selector: bytes = b"sel", domain: bytes = b"far.test") -> bytes:
    sig = dkim.sign(msg, selector, domain, PRIVATE,
                    include_headers=[b"from", b"to", b"subject", b"date"])
    return bytes(sig) + msg


def send(server: ServerProcess, sender: str, msg: bytes, *, source: str = UNTRUSTED,
         helo: str = "client.far.test", rcpt: str = "alice@example.test"
         ) -> tuple[int, str, bytes | None]:
    """(code, text of the reply to the data, the stored message or None)."""
    folder = server.maildir(rcpt)
    before = set(folder.iterdir()) if folder.is_dir() else set()
    with server.smtp(source=source) as s:
        s.ehlo(helo)
        s.mail(sender)
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(msg)
    return code, text.decode(), arrived(folder, before) if code == 250 else None


def arrived(folder: Path, before: set[Path]) -> bytes:
    """The one message that arrived in ``folder`` since ``before`` (Maildir names do
    not sort by arrival)."""
    assert wait_until(lambda: folder.is_dir() and len(set(folder.iterdir()) - before) == 1)
    return (set(folder.iterdir()) - before).pop().read_bytes()


def authres(stored: bytes | None) -> str:
    """The Authentication-Results field, unfolded."""
    assert stored is not None
    m = re.search(rb"^Authentication-Results: (.*?)\n(?=\S)", stored, re.M | re.S)
    assert m, stored[:600]
    return re.sub(r"\s*\n\s+", " ", m.group(1).decode())


def test_spf_dkim_and_dmarc_pass_for_a_dkimpy_signature(mx: ServerProcess) -> None:
    code, _, stored = send(mx, "a@far.test", signed(message()))
    assert code == 250
    ar = authres(stored)
    assert ar.startswith("mx.example.test;"), ar
    assert "spf=pass (far.test: matched +ip4:127.0.0.66) smtp.mailfrom=a@far.test" in ar
    assert "spf=none (client.far.test has no SPF record) smtp.helo=client.far.test" in ar
    assert re.search(r"dkim=pass header\.d=far\.test header\.s=sel header\.a=rsa-sha256 "
                     r"header\.b=\S{8}", ar), ar
    assert "dmarc=pass" in ar and "header.from=far.test policy.dmarc=none" in ar
    assert "arc=none" in ar


def test_an_opendkim_signature_passes(mx: ServerProcess, dns: tuple[int, Path | None]) -> None:
    key = dns[1]
    if key is None:
        pytest.skip("opendkim-tools is not installed")
    tool = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"
    lf = message().replace(b"\r\n", b"\n")
    out = subprocess.run([tool, "-d", "far.test", "-k", str(key), "-s", "odk"], input=lf,
                         capture_output=True, check=True).stdout.replace(b"\n", b"\r\n")
    # opendkim-testmsg 2.11 prints the last b= fold's tail twice: keep one 1024-bit value
    head, _, body = out.partition(b"\r\n\r\n")
    m = re.search(rb"b=([A-Za-z0-9+/=\s]+?)\r\n(?=\S)", head)
    assert m, head
    value = re.sub(rb"\s", b"", m.group(1))[:172]
    fixed = head[:m.start(1)] + value + b"\r\n" + head[m.end():] + b"\r\n\r\n" + body
    code, _, stored = send(mx, "a@far.test", fixed)
    assert code == 250
    ar = authres(stored)
    assert "dkim=pass header.d=far.test header.s=odk header.a=rsa-sha1" in ar, ar


def test_a_changed_body_fails_dkim_but_spf_keeps_dmarc_passing(mx: ServerProcess) -> None:
    msg = signed(message()).replace(b"hello", b"HELLO")
    code, _, stored = send(mx, "a@far.test", msg)
    assert code == 250
    ar = authres(stored)
    assert "dkim=fail (body hash mismatch" in ar, ar
    assert "dmarc=pass (p=reject aligned SPF far.test passed)" in ar


def test_dmarc_reject_is_honoured_with_550_naming_the_domain(mx: ServerProcess) -> None:
    code, text, _ = send(mx, "x@nodmarc.test", message("ceo@far.test"))
    assert code == 550
    assert text == ("5.7.1 Message rejected: DMARC policy of far.test is reject and "
                    "neither SPF nor DKIM passed aligned")
    assert "Message rejected: DMARC policy of far.test" in mx.log_text()


def test_dmarc_quarantine_files_the_message_in_junk(mx: ServerProcess) -> None:
    junk = mx.maildir("alice@example.test").parent / ".Junk" / "new"
    before = len(list(junk.iterdir())) if junk.is_dir() else 0
    inbox = len(mx.messages("alice@example.test"))
    with mx.smtp(source=UNTRUSTED) as s:
        s.ehlo("client.far.test")
        s.mail("x@quar.test")
        s.rcpt("alice@example.test")
        code, _ = s.data(message("x@quar.test"))
    assert code == 250
    assert wait_until(lambda: junk.is_dir() and len(list(junk.iterdir())) > before)
    stored = sorted(junk.iterdir(), key=lambda p: p.stat().st_mtime)[-1].read_bytes()
    ar = authres(stored)
    assert "spf=fail (quar.test: matched -all) smtp.mailfrom=x@quar.test" in ar
    assert "dmarc=fail" in ar and "policy.dmarc=quarantine" in ar
    assert len(mx.messages("alice@example.test")) == inbox      # not in the inbox


def test_no_records_give_none(mx: ServerProcess) -> None:
    code, _, stored = send(mx, "x@none.test", message("x@none.test"), helo="client.none.test")
    assert code == 250
    ar = authres(stored)
    assert "spf=none (none.test has no SPF record) smtp.mailfrom=x@none.test" in ar
    assert "dkim=none" in ar and "dmarc=none (no DMARC record) header.from=none.test" in ar


@pytest.mark.parametrize(("domain", "reason"), [
    ("bad.test", "ip4:300.1.1.1 is not an address"),
    ("loop.test", "include loop"),
    ("chain.test", "more than 10 DNS lookups"),
    ("void.test", "more than 2 lookups found nothing"),
    ("huge.test", "more than 512 terms"),
])
def test_broken_spf_records_are_permerror_with_the_reason(mx: ServerProcess, domain: str,
                                                          reason: str) -> None:
    code, _, stored = send(mx, f"x@{domain}", message(f"x@{domain}"))
    assert code == 250
    ar = authres(stored)
    assert re.search(rf"spf=permerror \([^)]*{re.escape(reason)}[^)]*\) "
                     rf"smtp\.mailfrom=x@{re.escape(domain)}", ar), ar


def test_spf_macros_expand_the_reversed_ip_and_local_part(mx: ServerProcess) -> None:
    code, _, stored = send(mx, "bob@macro.test", message("bob@macro.test"))
    assert code == 250
    assert "spf=pass (macro.test: matched +exists:%{ir}.%{l}.ok.macro.test) " \
        "smtp.mailfrom=bob@macro.test" in authres(stored)


def test_an_unanswered_lookup_is_temperror_and_the_message_is_accepted(
        mx: ServerProcess) -> None:
    code, _, stored = send(mx, "x@slow.test", message("x@slow.test"))
    assert code == 250
    ar = authres(stored)
    assert "spf=temperror" in ar and "smtp.mailfrom=x@slow.test" in ar
    assert "dmarc=temperror" in ar


def test_a_missing_key_is_permerror_and_malformed_signatures_do_not_crash(
        mx: ServerProcess) -> None:
    bogus = b"DKIM-Signature: v=1; a=rsa-sha256; d=far.test; s=nokey; h=from; bh=AAAA; b=AAAA\r\n"
    junk = b"DKIM-Signature: ;;;==;; v=1 ; ; d\r\n"
    huge = b"DKIM-Signature: v=1; d=far.test; s=" + b"\r\n x" * 3000 + b"; b=A\r\n"
    msg = bogus + junk + huge + signed(message())
    code, _, stored = send(mx, "a@far.test", msg)
    assert code == 250
    ar = authres(stored)
    assert "dkim=permerror (no key published at nokey._domainkey.far.test)" in ar, ar
    assert ar.count("dkim=permerror") == 3, ar
    assert "dkim=pass header.d=far.test header.s=sel" in ar


def test_forged_results_with_our_authserv_id_are_renamed(mx: ServerProcess) -> None:
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
    other = b"Authentication-Results: elsewhere.test; spf=pass\r\n"
    code, _, stored = send(mx, "a@far.test", signed(message(extra=forged + other)))
    assert code == 250
    assert stored is not None
    assert b"X-Forged-Authn-Results: mx.example.test; dkim=pass header.d=bank.test" in stored
    assert b"Authentication-Results: elsewhere.test; spf=pass" in stored
    assert stored.count(b"Authentication-Results: mx.example.test") == 1


def test_a_big_message_is_verified_from_its_file_and_stored_as_it_came(mx: ServerProcess
                                                                      ) -> None:
    """Over 1 MiB a message is spooled to a file as it arrives: the field goes into the
    queued row after our Received, the file keeps the client's bytes (a forged field
    renamed in place, same length), and the signature over it still verifies."""
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
    body = b"".join(b"line %07d of a big message, to be hashed from its file\r\n" % i
                    for i in range(40_000))                      # about 2.3 MB
    msg = signed(message(extra=forged).replace(b"\r\nhello\r\n", b"\r\n" + body))
    assert len(msg) > 2 * 1024 * 1024
    code, _, stored = send(mx, "a@far.test", msg)
    assert code == 250
    ar = authres(stored)
    assert "dkim=pass header.d=far.test" in ar and "dmarc=pass" in ar, ar
    assert stored is not None
    head = stored[:stored.index(b"\nDKIM-Signature:")]
    assert head.index(b"Received: ") < head.index(b"Authentication-Results: mx.example.test")
    assert b"X-Forged-Authn-Results: mx.example.test; dkim=pass header.d=bank.test" in stored
    assert stored.count(b"Authentication-Results: mx.example.test") == 1
    assert stored.replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n"))


def test_trusted_and_authenticated_senders_are_not_verified(mx: ServerProcess) -> None:
    code, _, stored = send(mx, "ceo@far.test", message("ceo@far.test"), source="127.0.0.1")
    assert code == 250 and stored is not None
    assert b"Authentication-Results:" not in stored
    folder = mx.maildir("alice@example.test")
    before = set(folder.iterdir())
    with mx.smtp(source=UNTRUSTED, port=mx.sub_port) as s:
        s.starttls(context=client_tls_context())
        s.login("bob@example.test", "hunter2")
        s.sendmail("ceo@far.test", ["alice@example.test"], message("ceo@far.test"))
    stored = arrived(folder, before)
    assert b"Authentication-Results:" not in stored


def test_results_are_in_the_event_log(mx: ServerProcess) -> None:
    send(mx, "a@far.test", signed(message(subject="event")))
    cp = mx.cli("events", "--json")
    assert '"id": 3101' in cp.stdout
    assert "spf=pass dkim=pass dmarc=pass arc=none; accept" in cp.stdout


def test_null_sender_is_checked_with_the_helo_identity(mx: ServerProcess) -> None:
    code, _, stored = send(mx, "", message("x@none.test"), helo="far.test")
    assert code == 250
    assert "spf=pass (far.test: matched +ip4:127.0.0.66) smtp.mailfrom=postmaster@far.test" \
        in authres(stored)


def test_spf_reject_policy_and_deferred_temperror(tmp_path: Path,
                                                  dns: tuple[int, Path | None]) -> None:
    sp = ServerProcess(tmp_path / "strict", f"""
[dns]
nameservers = ["127.0.0.1:{dns[0]}"]
[verify]
enabled = true
dns_timeout = "2s"
spf = "reject"
on_temperror = "defer"
authserv_id = "auth.example.test"
""")
    sp.add_user("alice@example.test")
    sp.start()
    try:
        code, text, _ = send(sp, "x@quar.test", message("x@none.test"))
        assert (code, text) == (550, "5.7.1 Message rejected: SPF of quar.test does not allow "
                                "127.0.0.66 to send for <x@quar.test>")
        code, text, _ = send(sp, "x@slow.test", message("x@none.test"))
        assert code == 451 and text.startswith("4.7.0 Message deferred: SPF could not be "
                                               "checked"), text
        code, _, stored = send(sp, "a@far.test", message())
        assert code == 250 and authres(stored).startswith("auth.example.test;")
    finally:
        sp.stop()


def test_verification_off_adds_nothing(tmp_path: Path) -> None:
    sp = ServerProcess(tmp_path / "off", "[verify]\nenabled = false\n[dns]\nnameservers = "
                       f'["127.0.0.1:{closed_port()}"]\n')
    sp.add_user("alice@example.test")
    sp.start()
    try:
        code, _, stored = send(sp, "ceo@far.test", message("ceo@far.test"))
        assert code == 250 and stored is not None
        assert b"Authentication-Results:" not in stored
    finally:
        sp.stop()
