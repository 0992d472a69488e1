"""The relay decision as a table: who may send to whom, with which reply and reason."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from postroom.address import parse_path
from postroom.config import Route
from postroom.policy import (
    LOCAL,
    REFUSED,
    RELAY,
    RelaySettings,
    SessionSnapshot,
    check_mail,
    check_rcpt,
    peer_address,
)

SETTINGS = RelaySettings(
    local_domains=frozenset({"example.test", "localhost"}),
    trusted_networks=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"),
                      ipaddress.ip_network("10.0.0.0/8")),
    aliases=frozenset({"team@example.test", "outside@example.test"}),
)
MAILBOXES = {"alice@example.test", "bob@example.test", "root@localhost"}

UNTRUSTED = "127.0.0.66"

RCPT_CASES = [
    # id, peer, listener, auth_user, rcpt, accept, code, enhanced, reason substring, kind
    ("remote_from_untrusted_is_relaying", UNTRUSTED, "mx", None, "bob@remote.example",
     False, 550, "5.7.1", "127.0.0.66 is not in trusted_networks", REFUSED),
    ("refusal_says_session_not_authenticated", UNTRUSTED, "mx", None, "bob@remote.example",
     False, 550, "5.7.1", "the session is not authenticated", REFUSED),
    ("refusal_says_domain_not_local", UNTRUSTED, "mx", None, "bob@remote.example",
     False, 550, "5.7.1", "remote.example is not a local domain", REFUSED),
    ("refusal_lists_the_trusted_networks", UNTRUSTED, "mx", None, "bob@remote.example",
     False, 550, "5.7.1", "(127.0.0.1/32, ::1/128, 10.0.0.0/8)", REFUSED),
    ("remote_from_untrusted_ipv6", "2001:db8::1", "mx", None, "bob@remote.example",
     False, 550, "5.7.1", "2001:db8::1 is not in trusted_networks", REFUSED),
    ("remote_from_neighbour_of_trusted_host", "127.0.0.2", "mx", None, "bob@remote.example",
     False, 550, "5.7.1", "not in trusted_networks", REFUSED),
    ("remote_postmaster_is_still_relaying", UNTRUSTED, "mx", None, "postmaster@remote.example",
     False, 550, "5.7.1", "not a local domain", REFUSED),
    ("local_domain_as_prefix_of_remote", UNTRUSTED, "mx", None,
     "bob@example.test.remote.example", False, 550, "5.7.1", "not a local domain", REFUSED),
    ("local_domain_as_suffix_label", UNTRUSTED, "mx", None, "bob@notexample.test",
     False, 550, "5.7.1", "not a local domain", REFUSED),
    ("local_mailbox_from_anyone", UNTRUSTED, "mx", None, "alice@example.test",
     True, 250, "2.1.5", "mailbox in local domain example.test", LOCAL),
    ("local_mailbox_any_case", UNTRUSTED, "mx", None, "ALICE@EXAMPLE.TEST",
     True, 250, "2.1.5", "mailbox in local domain", LOCAL),
    ("second_local_domain", UNTRUSTED, "mx", None, "root@localhost",
     True, 250, "2.1.5", "mailbox in local domain localhost", LOCAL),
    ("unknown_local_user", UNTRUSTED, "mx", None, "nobody@example.test",
     False, 550, "5.1.1", "nobody@example.test is neither a mailbox nor an alias", REFUSED),
    ("unknown_local_user_from_trusted_is_not_relayed", "127.0.0.1", "mx", None,
     "nobody@example.test", False, 550, "5.1.1", "neither a mailbox nor an alias", REFUSED),
    ("alias_from_anyone", UNTRUSTED, "mx", None, "team@example.test",
     True, 250, "2.1.5", "alias in local domain example.test", LOCAL),
    ("alias_to_remote_target_from_anyone", UNTRUSTED, "mx", None, "Outside@example.test",
     True, 250, "2.1.5", "alias", LOCAL),
    ("postmaster_without_mailbox", UNTRUSTED, "mx", None, "postmaster@localhost",
     True, 250, "2.1.5", "postmaster of local domain localhost", LOCAL),
    ("postmaster_any_case", UNTRUSTED, "mx", None, "PostMaster@example.test",
     True, 250, "2.1.5", "RFC 5321 4.5.1", LOCAL),
    ("remote_from_trusted_ipv4", "127.0.0.1", "mx", None, "carol@remote.example",
     True, 250, "2.1.5", "relay for trusted network 127.0.0.1/32: 127.0.0.1 is in it", RELAY),
    ("remote_from_trusted_ipv6", "::1", "mx", None, "carol@remote.example",
     True, 250, "2.1.5", "trusted network ::1/128", RELAY),
    ("remote_from_ipv4_mapped_trusted", "::ffff:127.0.0.1", "mx", None, "carol@remote.example",
     True, 250, "2.1.5", "trusted network 127.0.0.1/32", RELAY),
    ("remote_from_inside_trusted_range", "10.20.30.40", "mx", None, "carol@remote.example",
     True, 250, "2.1.5", "trusted network 10.0.0.0/8", RELAY),
    ("remote_from_authenticated_untrusted", UNTRUSTED, "submission", "alice@example.test",
     "carol@remote.example", True, 250, "2.1.5",
     "relay for authenticated user alice@example.test", RELAY),
    ("remote_from_authenticated_on_mx", UNTRUSTED, "mx", "alice@example.test",
     "carol@remote.example", True, 250, "2.1.5", "authenticated user", RELAY),
    ("percent_hack_even_from_trusted", "127.0.0.1", "mx", None,
     "bob%remote.example@example.test", False, 550, "5.7.1", "percent hack", REFUSED),
    ("bang_path_even_when_authenticated", UNTRUSTED, "submission", "alice@example.test",
     "remote.example!bob@example.test", False, 550, "5.7.1", "bang path", REFUSED),
    ("quoted_at_even_from_trusted", "127.0.0.1", "mx", None,
     '"bob@remote.example"@example.test', False, 550, "5.7.1", "quoted local part", REFUSED),
    ("address_literal_even_from_trusted", "127.0.0.1", "mx", None, "bob@[127.0.0.1]",
     False, 550, "5.7.1", "address literal", REFUSED),
    ("trailing_dot_remote_even_when_authenticated", UNTRUSTED, "submission",
     "alice@example.test", "bob@remote.example.", False, 550, "5.7.1", "ends with a dot",
     REFUSED),
    ("trailing_dot_on_local_domain", UNTRUSTED, "mx", None, "alice@example.test.",
     False, 550, "5.7.1", "never routed", REFUSED),
]


@pytest.mark.parametrize(
    ("peer", "listener", "auth_user", "rcpt", "accept", "code", "enhanced", "reason", "kind"),
    [c[1:] for c in RCPT_CASES], ids=[c[0] for c in RCPT_CASES])
def test_check_rcpt_decides_on_the_final_destination(
        peer: str, listener: str, auth_user: str | None, rcpt: str, accept: bool, code: int,
        enhanced: str, reason: str, kind: str) -> None:
    session = SessionSnapshot(peer_address(peer), listener, tls=auth_user is not None,
                              auth_user=auth_user)
    address = parse_path(f"<{rcpt}>", allow_null=False)
    verdict = check_rcpt(session, address, SETTINGS, MAILBOXES.__contains__)
    assert verdict.accept is accept
    assert (verdict.reply.code, verdict.reply.enhanced) == (code, enhanced)
    assert reason in verdict.reason, verdict.reason
    assert verdict.kind == kind
    assert verdict.reply.is_positive is accept


def test_refused_relay_uses_the_seed_wording_on_the_wire() -> None:
    session = SessionSnapshot(peer_address(UNTRUSTED))
    verdict = check_rcpt(session, parse_path("<bob@remote.example>", allow_null=False),
                         SETTINGS, MAILBOXES.__contains__)
    assert verdict.reply.render() == \
        b"550 5.7.1 Relaying mail to <bob@remote.example> is not allowed\r\n"


def test_self_routing_address_is_refused_with_the_relay_wording() -> None:
    session = SessionSnapshot(peer_address("127.0.0.1"))
    verdict = check_rcpt(session, parse_path("<bob%remote.example@example.test>",
                                             allow_null=False), SETTINGS, lambda key: True)
    assert verdict.reply.render() == \
        b"550 5.7.1 Relaying mail to <bob%remote.example@example.test> is not allowed\r\n"


def test_unknown_local_user_reply_names_the_address() -> None:
    verdict = check_rcpt(SessionSnapshot(peer_address(UNTRUSTED)),
                         parse_path("<nobody@example.test>", allow_null=False),
                         SETTINGS, MAILBOXES.__contains__)
    assert verdict.reply.render() == (b"550 5.1.1 <nobody@example.test>: Recipient address "
                                      b"rejected: no such mailbox here\r\n")


def test_mailbox_lookup_uses_the_lower_cased_key() -> None:
    asked: list[str] = []

    def exists(key: str) -> bool:
        asked.append(key)
        return True

    check_rcpt(SessionSnapshot(peer_address(UNTRUSTED)),
               parse_path("<Alice.Smith@Example.Test>", allow_null=False), SETTINGS, exists)
    assert asked == ["alice.smith@example.test"]


def test_no_trusted_networks_at_all_says_none() -> None:
    settings = RelaySettings(frozenset({"example.test"}), ())
    verdict = check_rcpt(SessionSnapshot(peer_address("127.0.0.1")),
                         parse_path("<bob@remote.example>", allow_null=False), settings,
                         lambda key: False)
    assert not verdict.accept
    assert "trusted_networks (none)" in verdict.reason


MAIL_CASES = [
    # id, listener, auth_user, accept, code, enhanced, reason substring
    ("mx_without_auth", "mx", None, True, 250, "2.1.0", "sender accepted"),
    ("mx_with_auth", "mx", "alice@example.test", True, 250, "2.1.0", "sender accepted"),
    ("submission_without_auth", "submission", None, False, 530, "5.7.0",
     "submission listener requires AUTH before MAIL"),
    ("submissions_without_auth", "submissions", None, False, 530, "5.7.0",
     "submissions listener requires AUTH"),
    ("submission_with_auth", "submission", "alice@example.test", True, 250, "2.1.0",
     "sender accepted"),
]


@pytest.mark.parametrize(("listener", "auth_user", "accept", "code", "enhanced", "reason"),
                         [c[1:] for c in MAIL_CASES], ids=[c[0] for c in MAIL_CASES])
def test_check_mail_requires_auth_on_submission_listeners(
        listener: str, auth_user: str | None, accept: bool, code: int, enhanced: str,
        reason: str) -> None:
    verdict = check_mail(SessionSnapshot(peer_address("127.0.0.1"), listener, True, auth_user))
    assert verdict.accept is accept
    assert (verdict.reply.code, verdict.reply.enhanced) == (code, enhanced)
    assert reason in verdict.reason


PEERS = [
    ("ipv4", "192.0.2.7", "192.0.2.7"),
    ("ipv6", "2001:db8::7", "2001:db8::7"),
    ("ipv4_mapped_ipv6_is_unwrapped", "::ffff:192.0.2.7", "192.0.2.7"),
    ("scope_id_is_dropped", "fe80::1%eth0", "fe80::1"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in PEERS], ids=[c[0] for c in PEERS])
def test_peer_address_normalises_what_the_socket_reports(text: str, expected: str) -> None:
    assert peer_address(text) == ipaddress.ip_address(expected)


ROUTED = RelaySettings(
    local_domains=frozenset({"example.test"}),
    trusted_networks=(ipaddress.ip_network("127.0.0.1/32"),),
    routes=(Route("partner.example", "smarthost", host="smtp.partner.example"),
            Route("*.corp.example", "mx")),
)

ROUTE_CASES = [
    # id, peer, auth_user, rcpt, accept, code, enhanced, reason substring
    ("exact_route", "127.0.0.1", None, "bob@partner.example", True, 250, "2.1.5",
     "partner.example is the most specific match"),
    ("wildcard_route", "127.0.0.1", None, "bob@eu.corp.example", True, 250, "2.1.5",
     "*.corp.example"),
    ("wildcard_does_not_cover_the_bare_domain", "127.0.0.1", None, "bob@corp.example",
     False, 550, "5.4.4", "no address space covers corp.example"),
    ("no_route_for_an_authenticated_user", "127.0.0.66", "alice@example.test",
     "bob@elsewhere.example", False, 550, "5.4.4", "no address space covers"),
    ("untrusted_is_still_relaying_not_routing", "127.0.0.66", None, "bob@partner.example",
     False, 550, "5.7.1", "not in trusted_networks"),
    ("local_needs_no_route", "127.0.0.66", None, "alice@example.test", True, 250, "2.1.5",
     "mailbox"),
]


@pytest.mark.parametrize(("peer", "auth_user", "rcpt", "accept", "code", "enhanced", "reason"),
                         [c[1:] for c in ROUTE_CASES], ids=[c[0] for c in ROUTE_CASES])
def test_a_permitted_relay_also_needs_an_address_space_that_covers_it(
        peer: str, auth_user: str | None, rcpt: str, accept: bool, code: int, enhanced: str,
        reason: str) -> None:
    session = SessionSnapshot(peer_address(peer), "mx", False, auth_user)
    verdict = check_rcpt(session, parse_path(f"<{rcpt}>", allow_null=False), ROUTED,
                         MAILBOXES.__contains__)
    assert verdict.accept is accept
    assert (verdict.reply.code, verdict.reply.enhanced) == (code, enhanced)
    assert reason in verdict.reason, verdict.reason


@pytest.mark.parametrize("rcpt", ["postmaster@b\u00fccher.test", "postmaster@xn--bcher-kva.test",
                                  "postmaster@B\u00dcCHER.test"])
def test_every_spelling_of_an_internationalised_local_domain_is_local(rcpt: str) -> None:
    from postroom.config import parse_config
    cfg = parse_config({"domains": {"local": ["b\u00fccher.test"]}}, Path("."), "t")
    settings = RelaySettings(frozenset(cfg.local_domains), cfg.trusted_networks)
    address = parse_path(f"<{rcpt}>", allow_null=False, utf8=True)
    verdict = check_rcpt(SessionSnapshot(peer_address("192.0.2.7")), address, settings,
                         lambda key: False)
    assert verdict.accept and verdict.kind == "local", verdict.reason
