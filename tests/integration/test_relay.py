"""The relay decision on real sockets: who may send where, and the seed case's refusal."""

from __future__ import annotations

import re
import smtplib
import subprocess

import pytest

from tests.conftest import UNTRUSTED, RawClient, ServerProcess, client_tls_context

MSG = b"Subject: hello\r\n\r\nbody\r\n"


def test_local_mailbox_receives_mail_from_anyone(server: ServerProcess) -> None:
    before = len(server.messages("alice@example.test"))
    with server.smtp(source=UNTRUSTED) as s:
        s.sendmail("someone@far.example", ["alice@example.test"], MSG)
    msgs = server.wait_messages("alice@example.test", before + 1)
    assert len(msgs) == before + 1
    body = msgs[-1]
    assert body.startswith(b"Return-Path: <someone@far.example>\nDelivered-To: alice@example.test\n")
    assert b"Received: from client.test ([127.0.0.66])" in body
    assert b"\r\n" not in body


def test_rcpt_to_remote_from_untrusted_peer_is_refused_as_relaying(server: ServerProcess) -> None:
    with server.smtp(source=UNTRUSTED) as s:
        s.ehlo()
        s.mail("someone@far.example")
        code, text = s.rcpt("bob@remote.example")
    assert (code, text) == (550, b"5.7.1 Relaying mail to <bob@remote.example> is not allowed")
    assert "not in trusted_networks" in server.log_text()


def test_rcpt_to_remote_from_trusted_network_is_queued_outbound(server: ServerProcess) -> None:
    with server.smtp() as s:
        s.sendmail("alice@example.test", ["carol@remote.example"], MSG)
    queue = server.queue()
    assert queue["outbound-delivery"]["messages"] >= 1


@pytest.mark.parametrize("rcpt", [
    "bob%remote.example@example.test",
    "remote.example!bob@example.test",
    '"bob@remote.example"@example.test',
    "bob@[127.0.0.1]",
    "bob@remote.example.",
    "alice@example.test.",
])
@pytest.mark.parametrize("source", ["127.0.0.1", UNTRUSTED])
def test_addresses_that_route_themselves_are_refused_even_when_trusted(
        server: ServerProcess, rcpt: str, source: str) -> None:
    c = RawClient(server.mx_port, source=source)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<x@far.example>")[0] == 250
    code, text = c.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 550 and "5.7.1 Relaying mail to" in text, text
    c.close()


@pytest.mark.parametrize("rcpt", ["<@relay.example:bob@remote.example>",
                                  "<bob@remote.example@example.test>"])
def test_source_routes_and_double_at_are_syntax_errors(server: ServerProcess, rcpt: str) -> None:
    c = RawClient(server.mx_port, source=UNTRUSTED)
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<x@far.example>")
    code, _ = c.cmd(f"RCPT TO:{rcpt}")
    assert code == 501
    c.close()


def test_case_games_do_not_make_a_remote_domain_local(server: ServerProcess) -> None:
    with server.smtp(source=UNTRUSTED) as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt("ALICE@EXAMPLE.TEST")[0] == 250
        assert s.rcpt("bob@EXAMPLE.test.remote.example")[0] == 550


def test_unknown_local_user_is_550_5_1_1(server: ServerProcess) -> None:
    with server.smtp(source=UNTRUSTED) as s:
        s.ehlo()
        s.mail("x@far.example")
        code, text = s.rcpt("nobody@example.test")
    assert code == 550 and text.startswith(b"5.1.1")


@pytest.mark.parametrize("rcpt", ["postmaster@example.test", "POSTMASTER@localhost", "postmaster"])
def test_postmaster_is_always_accepted(server: ServerProcess, rcpt: str) -> None:
    with server.smtp(source=UNTRUSTED) as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt(rcpt)[0] == 250


def test_alias_expands_to_each_mailbox(server: ServerProcess) -> None:
    a0 = len(server.messages("alice@example.test"))
    b0 = len(server.messages("bob@example.test"))
    with server.smtp(source=UNTRUSTED) as s:
        s.sendmail("x@far.example", ["team@example.test"], MSG)
    assert len(server.wait_messages("alice@example.test", a0 + 1)) == a0 + 1
    assert len(server.wait_messages("bob@example.test", b0 + 1)) == b0 + 1


def test_submission_requires_auth_before_mail(server: ServerProcess) -> None:
    with server.smtp(port=server.sub_port) as s:
        s.ehlo()
        assert "auth" not in s.esmtp_features          # never before TLS
        s.starttls(context=client_tls_context())
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"]
        code, text = s.mail("alice@example.test")
    assert code == 530 and text.startswith(b"5.7.0")


def test_authenticated_submission_relays_from_an_untrusted_address(server: ServerProcess) -> None:
    with server.smtp(source=UNTRUSTED, port=server.sub_port) as s:
        s.starttls(context=client_tls_context())
        s.login("bob@example.test", "hunter2")
        s.mail("bob@example.test")
        assert s.rcpt("dave@remote.example")[0] == 250
        code, resp = s.data(b"Subject: out\r\n\r\nhi\r\n")
    assert code == 250 and resp.startswith(b"2.0.0 Ok: queued as ")


def test_wrong_password_is_535(server: ServerProcess) -> None:
    with server.smtp(source="127.0.0.77", port=server.sub_port) as s:
        s.starttls(context=client_tls_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("bob@example.test", "wrong")
    assert err.value.smtp_code == 535
    assert "wrong" not in server.log_text()


def _swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--timeout", "15", *args], capture_output=True, text=True,
                          timeout=60)


def test_swaks_from_an_untrusted_address_gets_the_seed_case_refusal(server: ServerProcess) -> None:
    cp = _swaks("--server", f"127.0.0.1:{server.mx_port}", "--local-interface", UNTRUSTED,
                "--from", "x@far.example", "--to", "bob@remote.example")
    assert cp.returncode != 0
    assert "<** 550 5.7.1 Relaying mail to <bob@remote.example> is not allowed" in cp.stdout


def test_swaks_delivers_to_a_local_mailbox(server: ServerProcess) -> None:
    before = len(server.messages("bob@example.test"))
    cp = _swaks("--server", f"127.0.0.1:{server.mx_port}", "--to", "bob@example.test",
                "--header", "X-Test-Id: swaks-local")
    assert cp.returncode == 0, cp.stdout
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as [0-9A-F]+", cp.stdout)
    msgs = server.wait_messages("bob@example.test", before + 1)
    # any of them, not the last by name: other tests' aliases deliver here too
    assert any(b"X-Test-Id: swaks-local" in m for m in msgs)


def test_swaks_starttls_and_auth_on_submission_relays(server: ServerProcess) -> None:
    cp = _swaks("--server", f"127.0.0.1:{server.sub_port}", "--local-interface", UNTRUSTED,
                "--tls", "--auth", "LOGIN", "--auth-user", "bob@example.test",
                "--auth-password", "hunter2", "--from", "bob@example.test",
                "--to", "erin@remote.example")
    assert cp.returncode == 0, cp.stdout
    assert "<~  235 2.7.0 Authentication successful" in cp.stdout     # <~ : inside TLS
    assert "hunter2" not in server.log_text()


def test_implicit_tls_submissions_port_authenticates(server: ServerProcess) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.subs_port, context=client_tls_context(),
                          source_address=(UNTRUSTED, 0), timeout=15) as s:
        s.ehlo("client.test")
        assert "starttls" not in s.esmtp_features
        s.login("alice@example.test", "s3cret")
        s.mail("alice@example.test")
        assert s.rcpt("zed@remote.example")[0] == 250
        code, _ = s.data(b"Subject: implicit\r\n\r\nhi\r\n")
    assert code == 250


def test_received_header_records_tls_and_auth(server: ServerProcess) -> None:
    before = len(server.messages("alice@example.test"))
    with server.smtp(source=UNTRUSTED, port=server.sub_port) as s:
        s.starttls(context=client_tls_context())
        s.login("bob@example.test", "hunter2")
        s.sendmail("bob@example.test", ["alice@example.test"], b"Subject: a\r\n\r\nb\r\n")
    body = server.wait_messages("alice@example.test", before + 1)[-1]
    assert b"with ESMTPSA id " in body
    assert b"\nMessage-ID: <" in body and b"\nDate: " in body    # added for submissions


def test_auth_is_not_offered_on_the_mx_listener(server: ServerProcess) -> None:
    with server.smtp() as s:
        s.starttls(context=client_tls_context())
        s.ehlo()
        assert "auth" not in s.esmtp_features
