"""postroom.dns against a real dnsmasq on loopback: MX order, implicit and null MX,
every error kind, and the TTL cache on an injected clock.

Every resolver here names its servers explicitly (127.0.0.1 only); none reads the
system configuration.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator

import pytest

from postroom.dns import DnsError, DnsErrorKind, MxResult, Resolver
from tests.integration.dnsmasq import free_udp_tcp_port, run_dnsmasq, servfail_records

EQUAL = ["a.eq.test", "b.eq.test", "c.eq.test", "d.eq.test", "e.eq.test"]

RECORDS = [
    "--mx-host=far.test,mx1.far.test,10",
    "--mx-host=far.test,mx2.far.test,20",
    "--host-record=mx1.far.test,127.0.0.9",
    "--host-record=mx2.far.test,127.0.0.10,::1",
    "--host-record=plain.test,127.0.0.11",             # no MX: implicit MX
    "--host-record=plain6.test,::1",
    "--mx-host=nullmx.test,.,0",                       # RFC 7505 null MX
    "--dns-rr=nullmx-raw.test,15,000000",              # the same, as raw RDATA
    "--mx-host=eq.test,first.eq.test,1",
    *(f"--mx-host=eq.test,{name},5" for name in EQUAL),
    "--host-record=first.eq.test,127.0.0.30",
    *(f"--host-record={name},127.0.0.{31 + i}" for i, name in enumerate(EQUAL)),
    "--mx-host=noaddr.test,ghost.noaddr.test,10",      # MX target that does not exist
    "--mx-host=noaddr.test,mx1.far.test,20",
    "--mx-host=nodata.test,txtonly.test,10",           # MX target without A/AAAA
    "--txt-record=txtonly.test,only text",
    "--mx-host=literal.test,127.0.0.9,10",             # an IP literal as MX target
    "--txt-record=nothing.test,v=spf1 -all",           # exists, neither MX nor A/AAAA
    "--txt-record=txt.test,hello world",
    "--cname=alias.test,plain.test",
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with run_dnsmasq(RECORDS) as p:
        yield p


def resolver(port: int, rng: random.Random | None = None) -> Resolver:
    return Resolver([f"127.0.0.1:{port}"], timeout=2.0, rng=rng)


def mx(port: int, domain: str, rng: random.Random | None = None) -> MxResult:
    return asyncio.run(resolver(port, rng).mx(domain))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback UDP port with a socket bound to it that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# --- MX --------------------------------------------------------------------------------

def test_mx_hosts_sorted_by_preference_with_ipv4_and_ipv6_addresses(port: int) -> None:
    result = mx(port, "far.test")
    assert result.error is None and not result.implicit and not result.null_mx
    assert [(h.preference, h.name, h.addresses, h.error) for h in result.hosts] == [
        (10, "mx1.far.test", ("127.0.0.9",), None),
        (20, "mx2.far.test", ("127.0.0.10", "::1"), None),
    ]


def test_domain_is_normalised(port: int) -> None:
    result = mx(port, "FAR.Test.")
    assert result.domain == "far.test"
    assert [h.name for h in result.hosts] == ["mx1.far.test", "mx2.far.test"]


def test_no_mx_means_implicit_mx_from_the_domains_own_addresses(port: int) -> None:
    result = mx(port, "plain.test")
    assert result.implicit and result.error is None
    assert [(h.preference, h.name, h.addresses) for h in result.hosts] == [
        (0, "plain.test", ("127.0.0.11",))]
    assert mx(port, "plain6.test").hosts[0].addresses == ("::1",)


def test_neither_mx_nor_address_is_permanent_unroutable(port: int) -> None:
    result = mx(port, "nothing.test")
    assert result.implicit and result.hosts == ()
    assert result.error == DnsError(DnsErrorKind.NODATA, "nothing.test", "MX, A or AAAA")
    assert result.error.permanent and result.error.enhanced == "5.1.2"
    assert result.error.describe() == "nothing.test has no MX, A or AAAA record in DNS (NODATA)"


@pytest.mark.parametrize("domain", ["nullmx.test", "nullmx-raw.test"])
def test_null_mx(port: int, domain: str) -> None:
    result = mx(port, domain)
    assert result.null_mx and result.hosts == () and result.error is None


def test_nxdomain_is_permanent(port: int) -> None:
    result = mx(port, "unknown.test")
    assert result.hosts == () and not result.implicit
    assert result.error is not None
    assert result.error.kind is DnsErrorKind.NXDOMAIN and result.error.name == "unknown.test"
    assert result.error.permanent and result.error.enhanced == "5.1.2"
    assert result.error.describe() == "unknown.test does not exist in DNS (NXDOMAIN)"


def test_equal_preferences_are_shuffled_by_the_injected_rng(port: int) -> None:
    orders = set()
    for seed in range(20):
        result = mx(port, "eq.test", rng=random.Random(seed))
        names = [h.name for h in result.hosts]
        assert names[0] == "first.eq.test"
        assert sorted(names[1:]) == EQUAL
        expected = sorted(EQUAL)
        random.Random(seed).shuffle(expected)
        assert names[1:] == expected                       # reproducible from the seed
        assert mx(port, "eq.test", rng=random.Random(seed)) == result
        orders.add(tuple(names[1:]))
        for host in result.hosts:
            assert host.addresses and host.error is None
    assert len(orders) > 5


def test_equal_preferences_are_reshuffled_on_every_call_even_from_cache(port: int) -> None:
    r = resolver(port, rng=random.Random(1))

    async def orders() -> set[tuple[str, ...]]:
        return {tuple(h.name for h in (await r.mx("eq.test")).hosts) for _ in range(20)}

    assert len(asyncio.run(orders())) > 1


def test_mx_host_without_address_is_kept_with_its_error(port: int) -> None:
    result = mx(port, "noaddr.test")
    assert result.error is None
    ghost, good = result.hosts
    assert (ghost.preference, ghost.name, ghost.addresses) == (10, "ghost.noaddr.test", ())
    assert ghost.error is not None and ghost.error.kind is DnsErrorKind.NXDOMAIN
    assert (good.name, good.addresses, good.error) == ("mx1.far.test", ("127.0.0.9",), None)

    (host,) = mx(port, "nodata.test").hosts
    assert host.addresses == ()
    assert host.error == DnsError(DnsErrorKind.NODATA, "txtonly.test", "A or AAAA")


def test_ip_literal_mx_target_is_looked_up_as_a_name(port: int) -> None:
    (host,) = mx(port, "literal.test").hosts
    assert host.name == "127.0.0.9"
    assert host.addresses == ()            # never used as an address
    assert host.error is not None and host.error.name == "127.0.0.9"


# --- addresses and raw queries -----------------------------------------------------------

def test_addresses_of_a_host(port: int) -> None:
    r = resolver(port)
    assert asyncio.run(r.addresses("mx2.far.test")) == ("127.0.0.10", "::1")
    assert asyncio.run(r.addresses("alias.test")) == ("127.0.0.11",)       # via CNAME
    missing = asyncio.run(r.addresses("unknown.test"))
    assert isinstance(missing, DnsError) and missing.kind is DnsErrorKind.NXDOMAIN
    empty = asyncio.run(r.addresses("txtonly.test"))
    assert empty == DnsError(DnsErrorKind.NODATA, "txtonly.test", "A or AAAA")


def test_ip_literal_smart_host_needs_no_query(silent_port: int) -> None:
    r = Resolver([f"127.0.0.1:{silent_port}"], timeout=5.0)
    started = time.monotonic()
    assert asyncio.run(r.addresses("192.0.2.7")) == ("192.0.2.7",)
    assert asyncio.run(r.addresses("[::1]")) == ("::1",)
    assert time.monotonic() - started < 1.0


def test_raw_query(port: int) -> None:
    r = resolver(port)
    assert asyncio.run(r.query("txt.test", "TXT")) == ['"hello world"']
    records = asyncio.run(r.query("far.test", "mx"))
    assert isinstance(records, list)
    assert sorted(records) == ["10 mx1.far.test.", "20 mx2.far.test."]
    assert asyncio.run(r.query("mx2.far.test", "AAAA")) == ["::1"]
    assert asyncio.run(r.query("nullmx.test", "MX")) == ["0 ."]
    missing = asyncio.run(r.query("unknown.test", "A"))
    assert isinstance(missing, DnsError) and missing.kind is DnsErrorKind.NXDOMAIN
    nodata = asyncio.run(r.query("plain.test", "TXT"))
    assert nodata == DnsError(DnsErrorKind.NODATA, "plain.test", "TXT")
    with pytest.raises(ValueError):
        asyncio.run(r.query("txt.test", "NOSUCHTYPE"))


# --- transient failures ------------------------------------------------------------------

def test_timeout_when_nothing_answers(silent_port: int) -> None:
    r = Resolver([f"127.0.0.1:{silent_port}"], timeout=0.5)
    started = time.monotonic()
    result = asyncio.run(r.mx("far.test"))
    assert time.monotonic() - started < 2.0
    assert result.error is not None and result.error.kind is DnsErrorKind.TIMEOUT
    assert not result.error.permanent and result.error.enhanced == "4.4.3"
    assert result.error.describe() == \
        "the DNS lookup of far.test timed out: no answer within 0.5 s"


def test_a_and_aaaa_are_asked_at_the_same_time(silent_port: int) -> None:
    r = Resolver([f"127.0.0.1:{silent_port}"], timeout=1.0)
    started = time.monotonic()
    found = asyncio.run(r.addresses("mx2.far.test"))
    assert isinstance(found, DnsError) and found.kind is DnsErrorKind.TIMEOUT
    assert time.monotonic() - started < 1.8          # one timeout, not two in a row


def test_a_dead_first_server_leaves_time_for_the_next(port: int, silent_port: int) -> None:
    # each lookup waits its share (1 s) on the dead server, then asks the live one
    r = Resolver([f"127.0.0.1:{silent_port}", f"127.0.0.1:{port}"], timeout=2.0)
    started = time.monotonic()
    assert asyncio.run(r.addresses("mx1.far.test")) == ("127.0.0.9",)
    assert time.monotonic() - started < 2.0
    result = asyncio.run(r.mx("far.test"))          # MX, then A and AAAA: two lookups
    assert [h.addresses for h in result.hosts] == [("127.0.0.9",), ("127.0.0.10", "::1")]


def test_servfail_from_dnsmasq() -> None:
    records = ["--local=/broken/", "--mx-host=broken,x.broken,10",
               "--host-record=x.broken,127.0.0.12"]
    with run_dnsmasq(records) as upstream, \
            run_dnsmasq([*servfail_records(upstream), "--host-record=ok.test,127.0.0.13"]) as front:
        r = resolver(front)
        result = asyncio.run(r.mx("broken"))
        assert result.error is not None
        assert result.error.kind is DnsErrorKind.SERVFAIL and not result.error.permanent
        assert result.error.enhanced == "4.4.3"
        assert result.error.detail == f"127.0.0.1:{front} answered SERVFAIL"
        assert result.error.describe() == \
            f"the DNS lookup of broken failed: 127.0.0.1:{front} answered SERVFAIL"
        host = asyncio.run(r.addresses("x.broken"))
        assert isinstance(host, DnsError) and host.kind is DnsErrorKind.SERVFAIL
        # the server itself is fine: it answers its own names
        assert asyncio.run(r.addresses("ok.test")) == ("127.0.0.13",)


def test_refused_counts_as_servfail(port: int) -> None:
    result = mx(port, "outside.invalid")          # not under .test: dnsmasq refuses
    assert result.error is not None and result.error.kind is DnsErrorKind.SERVFAIL
    assert result.error.detail == f"127.0.0.1:{port} answered REFUSED"
    assert not result.error.permanent


# --- the cache ---------------------------------------------------------------------------

def test_answers_are_cached_for_their_ttl() -> None:
    clock = Clock()
    with run_dnsmasq(RECORDS, ttl=30) as p:
        r = Resolver([f"127.0.0.1:{p}"], timeout=0.5, clock=clock)
        first = asyncio.run(r.mx("far.test"))
        assert first.hosts
    # dnsmasq is gone: inside the TTL every answer comes from the cache
    clock.now += 29
    assert asyncio.run(r.mx("far.test")) == first
    clock.now += 2                                  # 31 s: expired, asked again
    again = asyncio.run(r.mx("far.test"))
    assert again.error is not None and again.error.kind is DnsErrorKind.TIMEOUT


def test_expired_answer_is_asked_again_and_changes() -> None:
    clock = Clock()
    with run_dnsmasq(["--host-record=moving.test,127.0.0.20"], ttl=10) as p:
        r = Resolver([f"127.0.0.1:{p}"], timeout=1.0, clock=clock)
        assert asyncio.run(r.addresses("moving.test")) == ("127.0.0.20",)
    with run_dnsmasq(["--host-record=moving.test,127.0.0.21"], port=p, ttl=10):
        clock.now += 9
        assert asyncio.run(r.addresses("moving.test")) == ("127.0.0.20",)
        clock.now += 1
        assert asyncio.run(r.addresses("moving.test")) == ("127.0.0.21",)


def test_nxdomain_is_cached_60_s_without_an_soa() -> None:
    clock = Clock()
    with run_dnsmasq([]) as p:
        r = Resolver([f"127.0.0.1:{p}"], timeout=0.5, clock=clock)
        first = asyncio.run(r.mx("unknown.test"))
        assert first.error is not None and first.error.kind is DnsErrorKind.NXDOMAIN
    clock.now += 59
    assert asyncio.run(r.mx("unknown.test")) == first
    clock.now += 1
    again = asyncio.run(r.mx("unknown.test"))
    assert again.error is not None and again.error.kind is DnsErrorKind.TIMEOUT


def test_transient_failures_are_not_cached() -> None:
    clock = Clock()
    p = free_udp_tcp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", p))
        r = Resolver([f"127.0.0.1:{p}"], timeout=0.5, clock=clock)
        failed = asyncio.run(r.mx("far.test"))
        assert failed.error is not None and failed.error.kind is DnsErrorKind.TIMEOUT
    with run_dnsmasq(RECORDS, port=p):
        assert [h.name for h in asyncio.run(r.mx("far.test")).hosts] == [
            "mx1.far.test", "mx2.far.test"]
