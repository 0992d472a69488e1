"""Final delivery over LMTP into a real Dovecot (tests/integration/dovecot.py).

The agent tests drive :class:`~postroom.delivery.lmtp.LmtpDeliveryAgent` directly, with
no spool and no queue manager. The last test runs the whole server: it passes only once
the queue manager sends a local domain's recipients to its lmtp route.
"""

from __future__ import annotations

import asyncio
import email
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from postroom.body import Body
from postroom.config import DeliveryConfig, Route
from postroom.delivery import Destination, OutboundMessage, OutboundRecipient
from postroom.delivery.lmtp import LmtpDeliveryAgent
from postroom.model import DeliveryResult
from tests.conftest import closed_port, wait_until
from tests.integration.dovecot import Dovecot, dovecot

CONFIG = DeliveryConfig(connect_timeout=5.0, command_timeout=30.0)


@pytest.fixture(scope="module")
def store() -> Iterator[Dovecot]:
    with dovecot() as d:
        yield d


def tcp_route(port: int, host: str = "127.0.0.1") -> Route:
    return Route("lmtp.test", "lmtp", host, port, "none")


def socket_route(path: Path) -> Route:
    return Route("lmtp.test", "lmtp", "", 0, "none", path=str(path))


_next_id = iter(range(1, 1_000_000))


def message(queue_id: str, recipients: Sequence[str], marker: str,
            sender: str = "sender@example.test") -> OutboundMessage:
    body = (f"From: <{sender}>\r\nTo: {', '.join(recipients)}\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.test>\r\n\r\nHello, this is {marker}.\r\n"
            ".a line that starts with a dot\r\n").encode()
    return OutboundMessage(queue_id, sender, {}, Body(body),
                           [OutboundRecipient(next(_next_id), r, {}) for r in recipients])


def deliver(route: Route, messages: Sequence[OutboundMessage]) -> list[DeliveryResult]:
    agent = LmtpDeliveryAgent("mx.example.test", CONFIG)
    return asyncio.run(agent.deliver(Destination(route, ""), messages))


def by_address(messages: Sequence[OutboundMessage], results: list[DeliveryResult]
               ) -> dict[tuple[str, str], DeliveryResult]:
    ids = {r.id: (m.queue_id, r.address) for m in messages for r in m.recipients}
    assert sorted(res.recipient for res in results) == sorted(ids), "one result per recipient"
    return {ids[res.recipient]: res for res in results}


def stored(store: Dovecot, address: str, marker: str) -> list[email.message.Message]:
    found = [email.message_from_bytes(m) for m in store.messages(address)]
    return [m for m in found if m["Subject"] == marker]


def test_two_messages_to_several_recipients_go_over_one_connection(store: Dovecot) -> None:
    messages = [message("Q1", ["alice@lmtp.test", "bob@lmtp.test"], "first-of-two"),
                message("Q2", ["alice@lmtp.test", "carol@lmtp.test"], "second-of-two")]
    results = by_address(messages, deliver(tcp_route(store.port), messages))

    for key, res in results.items():
        assert res.ok and not res.transient and not res.hop_failure, (key, res)
        assert res.step == "DATA" and res.reply.code == 250 and res.status == "2.0.0"
        # each recipient's own reply after the data (RFC 2033 4.2) names it
        assert f"<{key[1]}>" in res.reply.text and "Saved" in res.reply.text
        assert res.hop == f"LMTP 127.0.0.1:{store.port} (route lmtp.test)"
        assert (res.remote_host, res.remote_ip) == ("127.0.0.1", "127.0.0.1")
        assert not res.dsn_capable              # final delivery: our own DSN duty stays
    transcript = results[("Q2", "carol@lmtp.test")].transcript
    assert transcript.count("C: LHLO mx.example.test") == 1
    assert transcript.count("-- trying") == 1 and "EHLO" not in transcript
    # Dovecot's own word: its log names the LMTP session (one per connection) of each save
    def saves() -> list[str]:
        return re.findall(r"<([^:>]+)[^>]*>: Info: msgid=<(?:first|second)-of-two@example\.test>: "
                          r"saved mail to INBOX", store.log_text())

    assert wait_until(lambda: len(saves()) == 4, timeout=5), store.log_text()
    assert len(set(saves())) == 1, store.log_text()

    for address, markers in (("alice@lmtp.test", ["first-of-two", "second-of-two"]),
                             ("bob@lmtp.test", ["first-of-two"]),
                             ("carol@lmtp.test", ["second-of-two"])):
        for marker in markers:
            (m,) = stored(store, address, marker)
            assert m["Return-Path"] == "<sender@example.test>"
            text = m.get_payload()
            assert f"Hello, this is {marker}." in text
            # dot-stuffed on the wire, one dot again in the mailbox
            assert "\n.a line that starts with a dot" in text


def test_a_user_dovecot_does_not_know_fails_alone_at_rcpt(store: Dovecot) -> None:
    messages = [message("Q3", ["alice@lmtp.test", "nobody@lmtp.test", "bob@lmtp.test"],
                        "with-an-unknown-user")]
    results = by_address(messages, deliver(tcp_route(store.port), messages))

    unknown = results[("Q3", "nobody@lmtp.test")]
    assert not unknown.ok and not unknown.transient and not unknown.hop_failure
    assert unknown.step == "RCPT" and unknown.reply.code == 550
    assert unknown.status == "5.1.1" and "User doesn't exist" in unknown.reply.text
    for address in ("alice@lmtp.test", "bob@lmtp.test"):
        res = results[("Q3", address)]
        assert res.ok and res.step == "DATA", res
        assert len(stored(store, address, "with-an-unknown-user")) == 1
    assert not store.maildir("nobody@lmtp.test").exists()


def test_a_full_mailbox_fails_alone_after_the_data(store: Dovecot) -> None:
    """Dovecot accepts the over-quota user at RCPT and refuses the message for that user
    alone after the final dot: the per-recipient replies of RFC 2033 4.2."""
    messages = [message("Q4", ["alice@lmtp.test", "full@lmtp.test", "carol@lmtp.test"],
                        "one-mailbox-full" + " padding" * 200)]
    results = by_address(messages, deliver(tcp_route(store.port), messages))

    full = results[("Q4", "full@lmtp.test")]
    assert not full.ok and not full.transient
    assert full.step == "DATA" and full.reply.code == 552 and full.status == "5.2.2"
    assert "<full@lmtp.test>" in full.reply.text and "Quota exceeded" in full.reply.text
    assert results[("Q4", "alice@lmtp.test")].ok and results[("Q4", "carol@lmtp.test")].ok
    assert results[("Q4", "alice@lmtp.test")].reply.code == 250


def test_delivery_over_the_unix_socket(store: Dovecot) -> None:
    messages = [message("Q5", ["bob@lmtp.test", "carol@lmtp.test"], "over-the-socket")]
    results = by_address(messages, deliver(socket_route(store.socket), messages))

    for address in ("bob@lmtp.test", "carol@lmtp.test"):
        res = results[("Q5", address)]
        assert res.ok and res.step == "DATA" and res.reply.code == 250, res
        assert res.hop == f"LMTP unix:{store.socket} (route lmtp.test)"
        assert (res.remote_host, res.remote_ip) == (f"unix:{store.socket}", None)
        assert len(stored(store, address, "over-the-socket")) == 1


def test_a_refused_connection_is_a_transient_hop_failure_for_every_recipient() -> None:
    port = closed_port()
    messages = [message("Q6", ["alice@lmtp.test", "bob@lmtp.test"], "nobody-listens"),
                message("Q7", ["carol@lmtp.test"], "nobody-listens-2")]
    results = deliver(tcp_route(port), messages)

    assert len(results) == 3
    for res in results:
        assert not res.ok and res.transient and res.hop_failure
        assert res.step == "connect" and res.status == "4.4.1" and res.reply.code == 451
        assert res.reply.text == f"cannot connect to 127.0.0.1:{port}: Connection refused"
        assert res.hop == f"LMTP 127.0.0.1:{port} (route lmtp.test)"


def test_a_missing_socket_is_a_transient_hop_failure(tmp_path: Path) -> None:
    messages = [message("Q8", ["alice@lmtp.test"], "no-socket")]
    (res,) = deliver(socket_route(tmp_path / "lmtp"), messages)
    assert not res.ok and res.transient and res.hop_failure and res.step == "connect"
    assert res.reply.text.endswith(": No such file or directory")


def test_a_server_that_is_not_lmtp_is_retried_not_bounced(tmp_path: Path) -> None:
    """A route that points at an SMTP port: LHLO gets a 5xx. That is our configuration,
    so the recipients wait, as for a refused connection."""
    from tests.integration.peers import sink

    with sink() as s:
        messages = [message("Q9", ["alice@lmtp.test"], "wrong-port")]
        (res,) = deliver(tcp_route(s.port), messages)
    assert not res.ok and res.transient and res.hop_failure, res
    assert res.step == "LHLO" and res.reply.code >= 500 and res.status.startswith("4.")


# --- end to end: the whole server (needs the queue manager's lmtp wiring) -------------------


def test_end_to_end_a_local_domain_with_an_lmtp_route_is_delivered_into_dovecot(
        server_factory, store: Dovecot) -> None:  # type: ignore[no-untyped-def]
    """END TO END. Postroom with ``[domains] local = ["lmtp.test"]`` and an lmtp route for
    it: mail received over SMTP for a local mailbox lands in Dovecot's Maildir, not in
    Postroom's own. Passes once the queue manager hands local recipients to
    ``routing.lmtp_route`` and app registers the LMTP agent."""
    srv = server_factory(f"""
        [[route]]
        match = "lmtp.test"
        via = "lmtp"
        host = "127.0.0.1:{store.port}"
        """, users=("alice@lmtp.test",), domains=("lmtp.test",))
    with srv.smtp() as client:                           # smtplib, to the MX port
        client.sendmail("sender@example.test", ["alice@lmtp.test"],
                        b"Subject: end-to-end over LMTP\r\n\r\nThrough Postroom into Dovecot.\r\n")

    def arrived() -> list[bytes]:
        return [m for m in store.messages("alice@lmtp.test") if b"end-to-end over LMTP" in m]

    assert wait_until(lambda: bool(arrived()), timeout=30), \
        "not in Dovecot's Maildir:\n" + srv.log_text()[-3000:] + "\n" + store.log_text()[-2000:]
    (m,) = arrived()
    assert b"Through Postroom into Dovecot." in m
    assert b"Return-Path: <sender@example.test>" in m
    assert b"by mx.example.test (Postroom)" in m          # our Received header
    assert srv.messages("alice@lmtp.test") == [], "also delivered into Postroom's Maildir"
