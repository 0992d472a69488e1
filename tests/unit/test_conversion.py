"""Trace headers, alias expansion, loop detection and the bytes written to a Maildir."""

from __future__ import annotations

import email
import email.utils
import re

import pytest

from postroom.conversion import (
    MAX_ALIAS_DEPTH,
    MAX_HOPS,
    Expansion,
    count_hops,
    expand,
    local_delivery_bytes,
    missing_headers,
    received_header,
)


def header(**kw: object) -> bytes:
    args: dict[str, object] = {
        "helo": "client.test", "peer": "192.0.2.1", "hostname": "mx.example.test",
        "protocol": "ESMTP", "queue_id": "Q1", "recipient": None, "timestamp": 0.0,
    }
    args.update(kw)
    return received_header(**args)  # type: ignore[arg-type]


# --- Received ---------------------------------------------------------------------------

RECEIVED_CASES = [
    # id, overrides, expected header text
    ("ipv4_peer_no_recipient", {},
     "Received: from client.test ([192.0.2.1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTP id Q1;\r\n"
     "\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
    ("ipv6_peer_is_an_ipv6_literal", {"peer": "2001:db8::1"},
     "Received: from client.test ([IPv6:2001:db8::1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTP id Q1;\r\n"
     "\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
    ("ipv6_peer_is_normalised", {"peer": "2001:DB8:0:0:0:0:0:1"},
     "Received: from client.test ([IPv6:2001:db8::1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTP id Q1;\r\n"
     "\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
    ("single_recipient_gets_a_for_clause",
     {"recipient": "alice@example.test", "protocol": "ESMTPSA", "queue_id": "ABC123"},
     "Received: from client.test ([192.0.2.1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTPSA id ABC123\r\n"
     "\tfor <alice@example.test>;\r\n"
     "\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
    ("timestamp_is_rfc5322_in_utc", {"timestamp": 1700000000.0},
     "Received: from client.test ([192.0.2.1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTP id Q1;\r\n"
     "\tTue, 14 Nov 2023 22:13:20 +0000\r\n"),
    ("helo_controls_and_spaces_are_replaced", {"helo": "evil\r\nX-Injected: 1 \x00"},
     "Received: from evil??X-Injected:?1?? ([192.0.2.1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTP id Q1;\r\n"
     "\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
    ("helo_address_literal_kept", {"helo": "[192.0.2.1]"},
     "Received: from [192.0.2.1] ([192.0.2.1])\r\n"
     "\tby mx.example.test (Postroom) with ESMTP id Q1;\r\n"
     "\tThu, 01 Jan 1970 00:00:00 +0000\r\n"),
]


@pytest.mark.parametrize(("overrides", "expected"), [c[1:] for c in RECEIVED_CASES],
                         ids=[c[0] for c in RECEIVED_CASES])
def test_received_header_format(overrides: dict[str, object], expected: str) -> None:
    assert header(**overrides) == expected.encode()


@pytest.mark.parametrize("protocol", ["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"])
def test_received_header_names_the_rfc_3848_protocol(protocol: str) -> None:
    assert f" with {protocol} id Q1;".encode() in header(protocol=protocol)


def test_received_header_truncates_a_huge_helo() -> None:
    first = header(helo="h" * 5000).split(b"\r\n")[0]
    assert first == b"Received: from " + b"h" * 255 + b" ([192.0.2.1])"


def test_received_header_never_lets_non_ascii_through() -> None:
    h = header(helo="b\u00fccher.example")
    assert h.isascii()
    assert h.startswith(b"Received: from b?cher.example ")


def test_received_header_is_one_parseable_folded_header() -> None:
    raw = header(recipient="alice@example.test", peer="2001:db8::1")
    msg = email.message_from_bytes(raw + b"\r\nbody\r\n")
    values = msg.get_all("Received")
    assert values is not None and len(values) == 1
    assert values[0].split(";")[-1].strip() == "Thu, 01 Jan 1970 00:00:00 +0000"
    date = email.utils.parsedate_to_datetime(values[0].split(";")[-1].strip())
    assert date.timestamp() == 0
    lines = raw.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line.startswith(b"\t") for line in lines[1:-1])


# --- alias expansion -----------------------------------------------------------------------

def chain(n: int) -> dict[str, tuple[str, ...]]:
    """a0 -> a1 -> ... -> a(n-1) -> final@remote.example: n aliases deep."""
    aliases: dict[str, tuple[str, ...]] = {
        f"a{i}@example.test": (f"a{i + 1}@example.test",) for i in range(n - 1)}
    aliases[f"a{n - 1}@example.test"] = ("final@remote.example",)
    return aliases


EXPAND_CASES = [
    # id, address, aliases, expected targets, error substring ("" when none)
    ("not_an_alias", "alice@example.test", {"team@example.test": ("bob@example.test",)},
     ("alice@example.test",), ""),
    ("simple", "team@example.test", {"team@example.test": ("alice@example.test",
                                                         "bob@example.test")},
     ("alice@example.test", "bob@example.test"), ""),
    ("remote_target", "outside@example.test", {"outside@example.test": ("carol@remote.example",)},
     ("carol@remote.example",), ""),
    ("nested", "all@example.test",
     {"all@example.test": ("team@example.test", "carol@remote.example"),
      "team@example.test": ("alice@example.test", "ops@example.test"),
      "ops@example.test": ("bob@example.test",)},
     ("alice@example.test", "bob@example.test", "carol@remote.example"), ""),
    ("diamond_delivers_once", "a@example.test",
     {"a@example.test": ("b@example.test", "c@example.test"),
      "b@example.test": ("d@example.test",), "c@example.test": ("d@example.test",)},
     ("d@example.test",), ""),
    ("duplicate_targets_once", "a@example.test",
     {"a@example.test": ("x@example.test", "x@example.test", "b@example.test"),
      "b@example.test": ("x@example.test",)},
     ("x@example.test",), ""),
    # An address met again is a mailbox, not expanded twice (the Postfix rule):
    ("cycle_ends_at_the_address_that_closes_it", "a@example.test",
     {"a@example.test": ("b@example.test",),
      "b@example.test": ("a@example.test", "x@example.test")},
     ("a@example.test", "x@example.test"), ""),
    ("alias_that_includes_itself_keeps_a_copy", "a@example.test",
     {"a@example.test": ("a@example.test", "x@example.test")},
     ("a@example.test", "x@example.test"), ""),
    ("self_loop_is_the_own_mailbox", "a@example.test", {"a@example.test": ("a@example.test",)},
     ("a@example.test",), ""),
    ("two_alias_loop_ends_at_the_start", "a@example.test",
     {"a@example.test": ("b@example.test",), "b@example.test": ("a@example.test",)},
     ("a@example.test",), ""),
    ("loop_entered_from_outside", "list@example.test",
     {"list@example.test": ("a@example.test",), "a@example.test": ("b@example.test",),
      "b@example.test": ("a@example.test", "y@example.test")},
     ("a@example.test", "y@example.test"), ""),
    ("depth_at_the_limit", "a0@example.test", chain(MAX_ALIAS_DEPTH),
     ("final@remote.example",), ""),
    ("depth_beyond_the_limit", "a0@example.test", chain(MAX_ALIAS_DEPTH + 1), (),
     f"aliases nested deeper than {MAX_ALIAS_DEPTH} levels"),
]


@pytest.mark.parametrize(("address", "aliases", "targets", "error"),
                         [c[1:] for c in EXPAND_CASES], ids=[c[0] for c in EXPAND_CASES])
def test_expand_aliases(address: str, aliases: dict[str, tuple[str, ...]],
                        targets: tuple[str, ...], error: str) -> None:
    result = expand(address, aliases)
    assert isinstance(result, Expansion)
    assert result.targets == targets
    if error:
        assert error in result.error
    else:
        assert result.error == ""


def test_alias_depth_limit_is_twenty() -> None:
    assert MAX_ALIAS_DEPTH == 20


# --- hop counting ---------------------------------------------------------------------------

HOP_CASES = [
    ("no_received", b"Subject: x\r\n\r\nbody\r\n", 0),
    ("two_received", b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\nbody\r\n", 2),
    ("folded_received_counts_once", b"Received: from a\r\n\tby b;\r\n date\r\nSubject: x\r\n\r\n",
     1),
    ("case_insensitive", b"RECEIVED: a\r\nreceived: b\r\n\r\n", 2),
    ("x_received_not_counted", b"X-Received: a\r\nReceived: b\r\n\r\n", 1),
    ("received_in_the_body_not_counted",
     b"Received: a\r\n\r\nReceived: b\r\nReceived: c\r\n", 1),
    ("continuation_that_mentions_received", b"Subject: x\r\n Received: y\r\n\r\n", 0),
    ("headers_only_message", b"Received: a\r\nReceived: b\r\n", 2),
    ("many_hops", b"Received: x\r\n" * (MAX_HOPS + 1) + b"\r\nbody\r\n", MAX_HOPS + 1),
]


@pytest.mark.parametrize(("data", "hops"), [c[1:] for c in HOP_CASES], ids=[c[0] for c in HOP_CASES])
def test_count_hops_counts_received_headers_in_the_header_block(data: bytes, hops: int) -> None:
    assert count_hops(data) == hops


# --- headers added to submitted mail --------------------------------------------------------

MISSING_CASES = [
    # id, message, Message-ID added, Date added
    ("neither", b"Subject: x\r\n\r\nbody\r\n", True, True),
    ("has_message_id", b"Message-ID: <a@b>\r\nSubject: x\r\n\r\nbody\r\n", False, True),
    ("has_date", b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n\r\nbody\r\n", True, False),
    ("has_both_any_case", b"message-id: <a@b>\r\nDATE: Thu, 01 Jan 1970 00:00:00 +0000\r\n\r\n",
     False, False),
    ("only_in_the_body_does_not_count",
     b"Subject: x\r\n\r\nMessage-ID: <a@b>\r\nDate: today\r\n", True, True),
    ("x_prefixed_headers_do_not_count", b"X-Message-ID: <a@b>\r\nX-Date: t\r\n\r\n", True, True),
    ("empty_message", b"", True, True),
]


@pytest.mark.parametrize(("data", "add_id", "add_date"), [c[1:] for c in MISSING_CASES],
                         ids=[c[0] for c in MISSING_CASES])
def test_missing_headers_adds_only_what_is_missing(data: bytes, add_id: bool,
                                                   add_date: bool) -> None:
    added = missing_headers(data, "mx.example.test", 0.0)
    assert (re.search(rb"(?m)^Message-ID: <[0-9a-f]{24}@mx\.example\.test>\r\n", added)
            is not None) is add_id
    assert (b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n" in added) is add_date
    assert added.count(b"\r\n") == int(add_id) + int(add_date)


def test_missing_message_ids_are_unique() -> None:
    ids = {missing_headers(b"\r\n", "mx.example.test", 0.0) for _ in range(50)}
    assert len(ids) == 50


# --- local delivery --------------------------------------------------------------------------

DELIVERY_CASES = [
    ("ordinary", b"Subject: x\r\n\r\nhello\r\n", "s@far.example", "alice@example.test",
     b"Return-Path: <s@far.example>\nDelivered-To: alice@example.test\nSubject: x\n\nhello\n"),
    ("null_sender", b"Subject: bounce\r\n\r\n", "", "alice@example.test",
     b"Return-Path: <>\nDelivered-To: alice@example.test\nSubject: bounce\n\n"),
    ("empty_message", b"", "s@far.example", "bob@example.test",
     b"Return-Path: <s@far.example>\nDelivered-To: bob@example.test\n"),
    ("utf8_addresses", b"\r\n", "j\u00f6rg@far.example", "d\u00e9@example.test",
     "Return-Path: <j\u00f6rg@far.example>\nDelivered-To: d\u00e9@example.test\n\n".encode()),
    ("dot_lines_untouched", b"a\r\n.\r\n..\r\n", "s@far.example", "alice@example.test",
     b"Return-Path: <s@far.example>\nDelivered-To: alice@example.test\na\n.\n..\n"),
]


@pytest.mark.parametrize(("data", "sender", "recipient", "expected"),
                         [c[1:] for c in DELIVERY_CASES], ids=[c[0] for c in DELIVERY_CASES])
def test_local_delivery_bytes_prepends_trace_and_uses_lf(
        data: bytes, sender: str, recipient: str, expected: bytes) -> None:
    out = local_delivery_bytes(data, sender, recipient)
    assert out == expected
    assert b"\r" not in out
