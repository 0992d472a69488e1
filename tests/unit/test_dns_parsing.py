"""The pure parts of postroom.dns, with no network at all: nameserver strings, MX order,
the TTL cache and the resolver's logic over canned answers.

Resolvers here point at 127.0.0.1 but their dnspython lookup is replaced by a fake
that fails the test if it is ever called for real.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import dns.message
import dns.rrset
import pytest

from postroom import dns as pdns
from postroom.dns import (
    DnsError,
    DnsErrorKind,
    MxHost,
    MxResult,
    Resolver,
    _negative_ttl,
    _order_by_preference,
    _TtlCache,
    parse_nameserver,
)

NX, NODATA, SERVFAIL, TIMEOUT = (DnsErrorKind.NXDOMAIN, DnsErrorKind.NODATA,
                                 DnsErrorKind.SERVFAIL, DnsErrorKind.TIMEOUT)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


# --- nameserver strings ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
    ("[::1]:53", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[::1]", ("::1", 53)),
    ("::1", ("::1", 53)),
    ("2001:db8::0001", ("2001:db8::1", 53)),
    ("[2001:DB8::1]:65535", ("2001:db8::1", 65535)),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", [
    "", "localhost", "ns.example.test:53", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
    "127.0.0.1:x", "[::1", "[::1]53", "[::1]:", "[127.0.0.1:53]", "999.1.1.1", "[ns]:53",
    "127.0.0.1:\uff15\uff13",
])
def test_parse_nameserver_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="nameserver"):
        parse_nameserver(text)


def test_resolver_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        Resolver(["ns.example.test"])
    with pytest.raises(ValueError):
        Resolver(["127.0.0.1"], timeout=0)


# --- MX order ----------------------------------------------------------------------------

def test_order_sorts_by_preference() -> None:
    records = [(20, "b"), (10, "a"), (30, "c"), (0, "z")]
    assert _order_by_preference(records, random.Random(0)) == [
        (0, "z"), (10, "a"), (20, "b"), (30, "c")]


def test_order_keeps_the_best_preference_of_a_repeated_name() -> None:
    assert _order_by_preference([(20, "a"), (10, "a"), (15, "b")], random.Random(0)) == [
        (10, "a"), (15, "b")]


def test_equal_preferences_follow_the_seed_whatever_the_server_order() -> None:
    names = ["a", "b", "c", "d"]
    for seed in range(10):
        expected = sorted(names)
        random.Random(seed).shuffle(expected)
        for permutation in itertools.permutations(names):
            got = _order_by_preference([(5, n) for n in permutation], random.Random(seed))
            assert got == [(5, n) for n in expected]


def test_equal_preferences_are_shuffled_within_their_group_only() -> None:
    rng = random.Random(42)
    seen = set()
    for _ in range(200):
        got = _order_by_preference([(10, "x"), (20, "p"), (20, "q"), (20, "r"), (30, "y")], rng)
        assert got[0] == (10, "x") and got[-1] == (30, "y")
        assert {name for _, name in got[1:4]} == {"p", "q", "r"}
        seen.add(tuple(name for _, name in got[1:4]))
    assert len(seen) == 6                  # every order of three turns up


# --- the cache ---------------------------------------------------------------------------

def test_cache_entry_lives_exactly_its_ttl() -> None:
    clock = Clock()
    cache = _TtlCache(clock)
    cache.put(("a.test", "A"), ("127.0.0.1",), 30)
    clock.now += 29.9
    assert cache.get(("a.test", "A")) == ("127.0.0.1",)
    assert cache.get(("a.test", "AAAA")) is None
    clock.now += 0.1
    assert cache.get(("a.test", "A")) is None
    assert len(cache) == 0                  # the expired entry is gone


def test_cache_stores_errors_and_skips_zero_ttl() -> None:
    clock = Clock()
    cache = _TtlCache(clock)
    error = DnsError(NX, "x.test", "")
    cache.put(("x.test", "MX"), error, 60)
    assert cache.get(("x.test", "MX")) is error
    cache.put(("y.test", "A"), ("127.0.0.1",), 0)
    assert cache.get(("y.test", "A")) is None
    cache.put(("x.test", "MX"), ("10 mx.x.test.",), 0)    # a TTL 0 answer replaces it
    assert cache.get(("x.test", "MX")) is None


def test_cache_is_bounded_expired_then_oldest_first() -> None:
    clock = Clock()
    cache = _TtlCache(clock, max_entries=3)
    cache.put(("old", "A"), ("1",), 100)
    cache.put(("short", "A"), ("2",), 1)
    cache.put(("new", "A"), ("3",), 100)
    clock.now += 2
    cache.put(("newer", "A"), ("4",), 100)           # evicts the expired one
    assert cache.get(("old", "A")) == ("1",)
    cache.put(("newest", "A"), ("5",), 100)          # nothing expired: evicts the oldest
    assert len(cache) == 3
    assert cache.get(("old", "A")) is None
    assert [cache.get((k, "A")) for k in ("new", "newer", "newest")] == [
        ("3",), ("4",), ("5",)]


def _negative_response(soa_ttl: int | None, minimum: int = 0) -> dns.message.Message:
    response = dns.message.make_response(dns.message.make_query("x.test", "A"))
    if soa_ttl is not None:
        response.authority.append(dns.rrset.from_text(
            "test.", soa_ttl, "IN", "SOA", f"ns.test. admin.test. 1 3600 600 86400 {minimum}"))
    return response


@pytest.mark.parametrize(("soa_ttl", "minimum", "expected"), [
    (3600, 120, 120.0),          # the SOA minimum
    (100, 900, 100.0),           # the SOA record's own TTL when lower (RFC 2308 §5)
    (86400, 86400, 300.0),       # capped
    (3600, 0, 0.0),              # "do not cache"
    (None, 0, 60.0),             # no SOA: the default
])
def test_negative_ttl(soa_ttl: int | None, minimum: int, expected: float) -> None:
    assert _negative_ttl(_negative_response(soa_ttl, minimum)) == expected


def test_negative_ttl_without_a_response() -> None:
    assert _negative_ttl(None) == pdns.NEGATIVE_TTL_DEFAULT


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "permanent", "enhanced", "text"), [
    (DnsError(NX, "example.org", ""), True, "5.1.2",
     "example.org does not exist in DNS (NXDOMAIN)"),
    (DnsError(NODATA, "example.org", "MX, A or AAAA"), True, "5.1.2",
     "example.org has no MX, A or AAAA record in DNS (NODATA)"),
    (DnsError(SERVFAIL, "example.org", "127.0.0.1:53 answered REFUSED"), False, "4.4.3",
     "the DNS lookup of example.org failed: 127.0.0.1:53 answered REFUSED"),
    (DnsError(TIMEOUT, "example.org", "no answer within 5 s"), False, "4.4.3",
     "the DNS lookup of example.org timed out: no answer within 5 s"),
])
def test_error_meaning(error: DnsError, permanent: bool, enhanced: str, text: str) -> None:
    assert error.permanent is permanent
    assert error.enhanced == enhanced
    assert error.describe() == text


# --- the resolver's logic over canned answers ---------------------------------------------

Answers = dict[tuple[str, str], tuple[str, ...] | DnsError]


def canned(answers: Answers, ttl: float = 30.0) -> tuple[Resolver, list[tuple[str, str]], Clock]:
    """A resolver whose every DNS question is answered from ``answers`` and counted."""
    clock = Clock()
    r = Resolver(["127.0.0.1:9"], timeout=0.1, clock=clock, rng=random.Random(0))
    asked: list[tuple[str, str]] = []

    async def ask(name: str, rdtype: str) -> tuple[tuple[str, ...] | DnsError, float]:
        asked.append((name, rdtype))
        value = answers.get((name, rdtype))
        if value is None:
            return DnsError(NODATA, name, rdtype), ttl
        return value, ttl

    async def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a real DNS query was attempted")

    r._ask = ask                                   # type: ignore[method-assign]
    r._resolver.resolve = no_network               # type: ignore[method-assign,assignment]
    return r, asked, clock


def test_second_lookup_inside_the_ttl_asks_nothing_and_after_it_asks_again() -> None:
    r, asked, clock = canned({("a.test", "A"): ("127.0.0.1",)}, ttl=30)
    assert asyncio.run(r.addresses("a.test")) == ("127.0.0.1",)
    assert sorted(asked) == [("a.test", "A"), ("a.test", "AAAA")]
    clock.now += 29
    assert asyncio.run(r.addresses("A.TEST.")) == ("127.0.0.1",)
    assert len(asked) == 2
    clock.now += 1
    assert asyncio.run(r.addresses("a.test")) == ("127.0.0.1",)
    assert len(asked) == 4


def test_transient_errors_are_not_cached() -> None:
    r, asked, _ = canned({})
    failing = DnsError(TIMEOUT, "a.test", "no answer within 0.1 s")

    async def ask(name: str, rdtype: str) -> tuple[tuple[str, ...] | DnsError, float]:
        asked.append((name, rdtype))
        return failing, 0.0

    r._ask = ask                                   # type: ignore[method-assign]
    asyncio.run(r.query("a.test", "TXT"))
    asyncio.run(r.query("a.test", "TXT"))
    assert asked == [("a.test", "TXT"), ("a.test", "TXT")]


def test_null_mx_among_real_mx_is_ignored() -> None:
    r, _, _ = canned({("d.test", "MX"): ("0 .", "10 mx.d.test."),
                      ("mx.d.test", "A"): ("127.0.0.5",)})
    assert asyncio.run(r.mx("d.test")) == MxResult(
        "d.test", (MxHost(10, "mx.d.test", ("127.0.0.5",)),))


def test_single_null_mx_asks_for_no_addresses() -> None:
    r, asked, _ = canned({("d.test", "MX"): ("0 .",)})
    assert asyncio.run(r.mx("d.test")) == MxResult("d.test", (), null_mx=True)
    assert asked == [("d.test", "MX")]


def test_every_mx_host_is_resolved_once() -> None:
    r, asked, _ = canned({("d.test", "MX"): ("10 mx.d.test.", "20 MX.d.test."),
                          ("mx.d.test", "AAAA"): ("::1",)})
    assert asyncio.run(r.mx("d.test")).hosts == (MxHost(10, "mx.d.test", ("::1",)),)
    assert sorted(asked) == [("d.test", "MX"), ("mx.d.test", "A"), ("mx.d.test", "AAAA")]


def test_a_transient_error_wins_over_a_permanent_one_for_addresses() -> None:
    timeout = DnsError(TIMEOUT, "h.test", "no answer within 0.1 s")
    r, _, _ = canned({("h.test", "A"): DnsError(NX, "h.test", ""), ("h.test", "AAAA"): timeout})
    assert asyncio.run(r.addresses("h.test")) == timeout


def test_one_address_family_is_enough() -> None:
    r, _, _ = canned({("h.test", "A"): ("127.0.0.7",),
                      ("h.test", "AAAA"): DnsError(SERVFAIL, "h.test", "x")})
    assert asyncio.run(r.addresses("h.test")) == ("127.0.0.7",)


def test_implicit_mx_keeps_a_transient_error() -> None:
    servfail = DnsError(SERVFAIL, "d.test", "127.0.0.1:53 answered SERVFAIL")
    r, _, _ = canned({("d.test", "A"): servfail})
    result = asyncio.run(r.mx("d.test"))
    assert result == MxResult("d.test", (), implicit=True, error=servfail)


@pytest.mark.parametrize("name", ["", "a..b.test", "x" * 64 + ".test", "a." * 130 + "test"])
def test_invalid_names_are_nxdomain_without_a_query(name: str) -> None:
    r = Resolver(["127.0.0.1:9"], timeout=0.1)

    async def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a real DNS query was attempted")

    r._resolver.resolve = no_network               # type: ignore[method-assign,assignment]
    result = asyncio.run(r.mx(name))
    assert result.error is not None and result.error.kind is NX
    assert result.error.detail.startswith("not a valid DNS name")
    assert result.error.permanent


def test_ip_literals_are_their_own_addresses() -> None:
    r, asked, _ = canned({})
    assert asyncio.run(r.addresses("127.0.0.1")) == ("127.0.0.1",)
    assert asyncio.run(r.addresses("[2001:db8::1]")) == ("2001:db8::1",)
    assert asyncio.run(r.addresses("2001:DB8:0::1")) == ("2001:db8::1",)
    assert asked == []


def test_query_refuses_unknown_and_meta_types() -> None:
    r, asked, _ = canned({})
    for rdtype in ("NOSUCH", "ANY", "AXFR"):
        with pytest.raises(ValueError):
            asyncio.run(r.query("a.test", rdtype))
    assert asked == []
    assert asyncio.run(r.query("a.test", "txt")) == DnsError(NODATA, "a.test", "TXT")
