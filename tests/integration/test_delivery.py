"""Delivery to other hosts with real peers: dnsmasq for MX, smtp-sink and Postfix as
remote MTAs, and a second Postroom as an authenticating smart host. Every failure ends
in a retry or in an NDR that names the hop, quotes its reply and says what to change.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, client_tls_context, free_port
from tests.integration.dnsmasq import run_dnsmasq
from tests.integration.peers import postfix, sink

MX_IP = "127.0.0.9"
RECORDS = [
    "--mx-host=far.test,mx.far.test,10", f"--host-record=mx.far.test,{MX_IP}",
    "--mx-host=nullmx.test,.,0",
    "--mx-host=dead.test,mx.dead.test,10", "--host-record=mx.dead.test,127.0.0.10",
]


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    with run_dnsmasq(RECORDS) as port:
        yield port


def _config(dns_port: int, mx_port: int, extra: str = "") -> str:
    return f"""
        [dns]
        nameservers = ["127.0.0.1:{dns_port}"]
        [delivery]
        mx_port = {mx_port}
        retry = ["1s"]
        connect_timeout = "2s"
        command_timeout = "10s"
        """ + extra


def _send(sp: ServerProcess, rcpts: list[str], subject: str = "hello", *,
          sender: str = "alice@example.test", rcpt_options: tuple[str, ...] = ()) -> None:
    with sp.smtp() as s:
        s.ehlo()
        s.mail(sender)
        for r in rcpts:
            code, text = s.rcpt(r, list(rcpt_options))
            assert code == 250, text
        code, text = s.data(f"Subject: {subject}\r\nFrom: {sender}\r\n\r\nbody of {subject}\r\n"
                            .encode())
        assert code == 250, text


def _notices(sp: ServerProcess, count: int = 1, timeout: float = 20.0
             ) -> list[email.message.EmailMessage]:
    msgs = sp.wait_messages("alice@example.test", count, timeout)
    return [email.message_from_bytes(m, policy=email.policy.default) for m in msgs]  # type: ignore[misc]


def _report_text(msg: email.message.EmailMessage) -> tuple[str, str]:
    """(part 1 for people, part 2 delivery-status) of an NDR."""
    parts = list(msg.iter_parts())
    human = parts[0].get_content()
    status = parts[1].as_string() if parts[1].get_content_type() == "message/delivery-status" \
        else ""
    return human, status


def _queue_empty(sp: ServerProcess, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(q["recipients"] == 0 for q in sp.queue().values()):
            return True
        time.sleep(0.2)
    return False


def test_mail_for_a_remote_domain_reaches_its_mx_found_in_dns(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    with sink(MX_IP) as remote:
        sp = server_factory(_config(dns_port, remote.port))
        _send(sp, ["carol@far.test", "dave@far.test"], "by mx")
        got = remote.wait(1)
        assert len(got) == 1                       # one transaction, two recipients
        assert got[0]["Subject"] == "by mx"
        assert any("by mx.example.test (Postroom)" in r for r in got[0].get_all("Received"))
        assert _queue_empty(sp)


def test_a_smart_host_route_beats_the_catch_all(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    with sink("127.0.0.1") as smarthost:
        sp = server_factory(_config(dns_port, 9, f"""
            [[route]]
            match = "*"
            via = "mx"
            [[route]]
            match = "*.partner.test"
            via = "smarthost"
            host = "127.0.0.1:{smarthost.port}"
            tls = "none"
            """))
        _send(sp, ["eve@eu.partner.test"], "via smart host")
        got = smarthost.wait(1)
        assert [m["Subject"] for m in got] == ["via smart host"]


def test_seed_case_smart_host_refusing_to_relay_gets_an_ndr_naming_it(  # type: ignore[no-untyped-def]
        server_factory, dns_port, tmp_path: Path) -> None:
    """The KB article's case: the ISP's smart host answers 550 Relaying denied."""
    with postfix(tmp_path / "isp", "127.0.0.20", """
            mynetworks = 127.0.0.99/32
            relay_domains_reject_code = 550
            smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated reject_unauth_destination
            """) as isp:
        sp = server_factory(_config(dns_port, 9, f"""
            [[route]]
            match = "*"
            via = "smarthost"
            host = "{isp.address}:{isp.port}"
            """))
        _send(sp, ["bob@far.test"], "to the internet")
        [ndr] = _notices(sp)
    assert ndr["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.test"
    assert ndr["Subject"] == "Undeliverable: to the internet"
    assert ndr.get_content_type() == "multipart/report"
    human, status = _report_text(ndr)
    assert "550 5.7.1 <bob@far.test>: Relay access denied" in human
    assert "127.0.0.20" in human and "RCPT" in human
    assert "authentication" in human.lower() and "username" in human.lower()
    assert "Diagnostic-Code: smtp; 550 5.7.1 <bob@far.test>: Relay access denied" in status
    assert "Status: 5.7.1" in status and "Action: failed" in status
    assert "Final-Recipient: rfc822; bob@far.test" in status
    assert _queue_empty(sp)


def test_a_temporary_refusal_is_retried_and_then_delivered(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    sp = None
    with sink(MX_IP, port, ("-r", "RCPT")):
        sp = server_factory(_config(dns_port, port))
        _send(sp, ["carol@far.test"], "retry me")
        deadline = time.monotonic() + 10
        while "status=deferred" not in sp.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "status=deferred" in sp.log_text()
    with sink(MX_IP, port) as remote:
        assert [m["Subject"] for m in remote.wait(1)] == ["retry me"]
    assert sp is not None and sp.messages("alice@example.test") == []     # no NDR


def test_a_connection_dropped_after_the_data_is_retried_and_nothing_is_lost(  # type: ignore[no-untyped-def]
        server_factory, dns_port) -> None:
    port = free_port()
    with sink(MX_IP, port, ("-q", ".")):
        sp = server_factory(_config(dns_port, port))
        _send(sp, ["carol@far.test"], "dropped")
        deadline = time.monotonic() + 10
        while "status=deferred" not in sp.log_text() and "closed the connection" not in \
                sp.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    with sink(MX_IP, port) as remote:
        got = remote.wait(1)
        assert "dropped" in [m["Subject"] for m in got]
    assert _queue_empty(sp)


@pytest.mark.parametrize("domain, status, words", [
    ("nowhere.test", "5.1.2", "does not exist"),
    ("nullmx.test", "5.1.10", "null MX"),
])
def test_dns_failures_that_are_permanent_bounce_at_once(  # type: ignore[no-untyped-def]
        server_factory, dns_port, domain: str, status: str, words: str) -> None:
    sp = server_factory(_config(dns_port, 9))
    _send(sp, [f"x@{domain}"], "doomed")
    [ndr] = _notices(sp)
    human, dsn = _report_text(ndr)
    assert f"Status: {status}" in dsn
    assert words.lower() in human.lower()
    assert _queue_empty(sp)


def test_no_address_space_is_refused_at_rcpt_and_an_alias_to_it_bounces(  # type: ignore[no-untyped-def]
        server_factory, dns_port) -> None:
    sp = server_factory(_config(dns_port, 9, """
        [[route]]
        match = "partner.test"
        via = "mx"
        [aliases]
        "away@example.test" = ["someone@elsewhere.test"]
        """))
    with sp.smtp() as s:
        s.ehlo()
        s.mail("alice@example.test")
        code, text = s.rcpt("bob@elsewhere.test")
    assert (code, text) == (550, b"5.4.4 Unable to route: no address space covers elsewhere.test")
    _send(sp, ["away@example.test"], "forwarded nowhere")
    [ndr] = _notices(sp)
    human, dsn = _report_text(ndr)
    assert "Status: 5.4.4" in dsn
    assert "route" in human.lower() and "elsewhere.test" in human


def test_a_dead_destination_gets_a_delay_notice_then_an_ndr(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp = server_factory(_config(dns_port, free_port(), """
        [delivery]
        delay_warning = "1s"
        max_queue_lifetime = "4s"
        """))
    _send(sp, ["carol@dead.test"], "slow")
    notices = _notices(sp, 2, timeout=30)
    subjects = [n["Subject"] for n in notices]
    assert subjects == ["Delayed: slow", "Undeliverable: slow"], subjects
    _, delayed = _report_text(notices[0])
    assert "Action: delayed" in delayed and "Will-Retry-Until:" in delayed
    human, failed = _report_text(notices[1])
    assert "Action: failed" in failed and "Status: 5.4.7" in failed
    assert "127.0.0.10" in human
    assert _queue_empty(sp)


def test_success_notice_is_relayed_when_the_next_hop_has_no_dsn(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    with sink(MX_IP, options=("-N",)) as remote:
        sp = server_factory(_config(dns_port, remote.port))
        _send(sp, ["carol@far.test"], "tell me", rcpt_options=("NOTIFY=SUCCESS,FAILURE",))
        assert remote.wait(1)
        [notice] = _notices(sp)
    assert notice["Subject"] == "Delivered: tell me"
    _, dsn = _report_text(notice)
    assert "Action: relayed" in dsn


def test_local_delivery_honours_notify_success(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp = server_factory(users=("alice@example.test", "bob@example.test"))
    _send(sp, ["bob@example.test"], "for bob", rcpt_options=("NOTIFY=SUCCESS",))
    assert len(sp.wait_messages("bob@example.test", 1)) == 1
    [notice] = _notices(sp)
    assert notice["Subject"] == "Delivered: for bob"
    assert "Action: delivered" in _report_text(notice)[1]


def test_a_null_sender_message_never_bounces(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp = server_factory(_config(dns_port, 9))
    _send(sp, ["x@nowhere.test"], "bounce of a bounce", sender="")
    assert _queue_empty(sp)
    time.sleep(0.5)
    assert sp.messages("alice@example.test") == []
    assert "status=failed" in sp.log_text() or "failed" in sp.log_text()


def test_auth_to_a_smart_host_over_starttls(server_factory, dns_port, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Another Postroom plays the smart host: submission with STARTTLS and AUTH."""
    smarthost = server_factory(users=("pat@partner.test",), domains=("partner.test",))
    smarthost.add_user("relay@partner.test", "Unique-Pw-7731")
    secret = tmp_path / "partner-secret"
    secret.write_text("Unique-Pw-7731\n")
    secret.chmod(0o600)
    sp = server_factory(_config(dns_port, 9, f"""
        [[route]]
        match = "*"
        via = "mx"
        [[route]]
        match = "partner.test"
        via = "smarthost"
        host = "127.0.0.1:{smarthost.sub_port}"
        tls = "required"
        tls_verify = false
        username = "relay@partner.test"
        password_file = "{secret}"
        """))
    _send(sp, ["pat@partner.test"], "authenticated hop")
    got = smarthost.wait_messages("pat@partner.test", 1)
    assert len(got) == 1 and b"Subject: authenticated hop" in got[0]
    assert b"with ESMTPSA" in got[0]
    assert "Unique-Pw-7731" not in sp.log_text()


def test_wrong_smart_host_password_defers_instead_of_bouncing(  # type: ignore[no-untyped-def]
        server_factory, dns_port, tmp_path: Path) -> None:
    smarthost = server_factory(users=("relay@partner.test",), domains=("partner.test",))
    secret = tmp_path / "wrong"
    secret.write_text("not-it\n")
    sp = server_factory(_config(dns_port, 9, f"""
        [[route]]
        match = "partner.test"
        via = "smarthost"
        host = "127.0.0.1:{smarthost.sub_port}"
        tls = "required"
        tls_verify = false
        username = "relay@partner.test"
        password_file = "{secret}"
        """))
    _send(sp, ["relay@partner.test"], "bad password")
    deadline = time.monotonic() + 10
    while "status=deferred" not in sp.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "535" in sp.log_text() and "status=deferred" in sp.log_text()
    assert sp.queue()["outbound-delivery"]["recipients"] == 1


def test_a_message_over_the_remote_size_limit_bounces_with_5_3_4(  # type: ignore[no-untyped-def]
        server_factory, dns_port) -> None:
    remote = server_factory("""
        [smtp]
        max_message_size = 2000
        """, users=("carol@far.test",), domains=("far.test",))
    sp = server_factory(_config(dns_port, 9, f"""
        [[route]]
        match = "far.test"
        via = "smarthost"
        host = "127.0.0.1:{remote.mx_port}"
        """))
    with sp.smtp() as s:
        s.sendmail("alice@example.test", ["carol@far.test"],
                   b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 60)
    [ndr] = _notices(sp)
    human, dsn = _report_text(ndr)
    assert "Status: 5.3.4" in dsn and "2000" in human


def test_starttls_is_used_opportunistically_with_a_postroom_mx(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    remote = server_factory(users=("carol@far.test",), domains=("far.test",))
    sp = server_factory(_config(dns_port, 9, f"""
        [[route]]
        match = "far.test"
        via = "smarthost"
        host = "127.0.0.1:{remote.mx_port}"
        """))
    _send(sp, ["carol@far.test"], "encrypted")
    got = remote.wait_messages("carol@far.test", 1)
    assert len(got) == 1 and b"with ESMTPS" in got[0]


def test_submission_client_tls_context_is_usable() -> None:
    # guards the helper the smart-host tests rely on
    assert client_tls_context().check_hostname is False
    assert smtplib.SMTP is not None


def test_an_authenticated_user_from_anywhere_reaches_a_remote_mx(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    with sink(MX_IP) as remote:
        sp = server_factory(_config(dns_port, remote.port))
        with sp.smtp(source="127.0.0.66", port=sp.sub_port) as s:
            s.starttls(context=client_tls_context())
            s.login("alice@example.test", "s3cret")
            s.sendmail("alice@example.test", ["carol@far.test"],
                       b"Subject: from a laptop\r\n\r\nhi\r\n")
        assert [m["Subject"] for m in remote.wait(1)] == ["from a laptop"]


def test_the_next_mx_is_tried_when_the_first_refuses_connections(  # type: ignore[no-untyped-def]
        server_factory) -> None:
    port = free_port()
    records = ["--mx-host=two.test,mx1.two.test,10", "--host-record=mx1.two.test,127.0.0.11",
               "--mx-host=two.test,mx2.two.test,20", f"--host-record=mx2.two.test,{MX_IP}"]
    with run_dnsmasq(records) as dns, sink(MX_IP, port) as remote:
        sp = server_factory(_config(dns, port))
        _send(sp, ["x@two.test"], "second choice")
        assert [m["Subject"] for m in remote.wait(1)] == ["second choice"]


def test_queued_messages_for_one_destination_share_one_connection(  # type: ignore[no-untyped-def]
        server_factory, dns_port) -> None:
    smarthost = server_factory(users=("pat@partner.test",), domains=("partner.test",),
                               start=False)
    sp = server_factory(_config(dns_port, 9, f"""
        [[route]]
        match = "partner.test"
        via = "smarthost"
        host = "127.0.0.1:{smarthost.mx_port}"
        """))
    for i in range(5):                      # the smart host is down: all five wait
        _send(sp, ["pat@partner.test"], f"batch {i}")
    time.sleep(0.5)
    smarthost.start()
    got = smarthost.wait_messages("pat@partner.test", 5)
    assert len(got) == 5
    log = smarthost.log_text()
    assert log.count(" queued queue_id=") == 5
    # new mail waited with the suspended destination, then all of it went together
    # (counted by the sessions that queued mail: the harness's port probe queues none)
    sessions = {line.split("session=")[1].split()[0] for line in log.splitlines()
                if " queued queue_id=" in line}
    assert len(sessions) == 1, log


def test_a_message_refused_after_its_data_costs_the_next_on_the_connection_nothing(  # type: ignore[no-untyped-def]
        server_factory, dns_port, tmp_path: Path) -> None:
    """Postfix keeps a transaction it refused at the end of data until RSET, and answers
    the next MAIL "503 5.5.1 Error: nested MAIL command": the next message over that
    connection (in the same batch, or when the cached connection is reused) is sent
    after an RSET and accepted, and only the refused one bounces."""
    refusals = tmp_path / "end-of-data"
    refusals.write_text("/^bob@/ REJECT 5.7.1 not from this sender\n")
    refusals.chmod(0o644)
    with postfix(tmp_path / "isp", "127.0.0.20", f"""
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
            smtpd_end_of_data_restrictions = check_sender_access regexp:{refusals}
            """) as isp:
        sp = server_factory(_config(dns_port, 9, f"""
            [[route]]
            match = "far.test"
            via = "smarthost"
            host = "{isp.address}:{isp.port}"
            tls = "none"
            """), users=("alice@example.test", "bob@example.test"))
        for n, sender in enumerate(["bob@example.test", "alice@example.test"] * 3):
            _send(sp, ["carol@far.test"], f"message {n}", sender=sender)
        bounces = sp.wait_messages("bob@example.test", 3, timeout=30)
        assert _queue_empty(sp)
        deadline = time.monotonic() + 10
        while isp.log.read_text().count("from=<alice@example.test>") < 3 and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert isp.log.read_text().count("from=<alice@example.test>") == 3
    assert len(bounces) == 3 and all(b"5.7.1" in b for b in bounces)
    assert sp.messages("alice@example.test") == []                # no NDR for alice
    assert "nested MAIL" not in sp.log_text()


def test_a_message_needing_smtputf8_to_a_server_without_it_bounces_with_5_6_7(  # type: ignore[no-untyped-def]
        server_factory, dns_port, tmp_path: Path) -> None:
    with postfix(tmp_path / "old", "127.0.0.21", """
            smtputf8_enable = no
            mynetworks = 127.0.0.0/8
            relay_domains = far.test
            relay_transport = discard:
            """) as old:
        sp = server_factory(_config(dns_port, 9, f"""
            [[route]]
            match = "far.test"
            via = "smarthost"
            host = "{old.address}:{old.port}"
            """))
        with sp.smtp() as s:
            s.ehlo()
            s.mail("alice@example.test", ["SMTPUTF8", "BODY=8BITMIME"])
            assert s.rcpt("jörg@far.test")[0] == 250
            assert s.data("Subject: ünïcode\r\n\r\nhallo\r\n".encode())[0] == 250
        [ndr] = _notices(sp)
    human, dsn = _report_text(ndr)
    assert "5.6.7" in dsn and "SMTPUTF8" in human
