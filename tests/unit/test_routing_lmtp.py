"""LMTP routes in the routing table: final delivery for local domains, and relaying."""

from __future__ import annotations

import pytest

from postroom.config import Route
from postroom.routing import choose_route, lmtp_route

EXACT = Route("example.org", "lmtp", "10.0.0.1", 24, "none", index=0)
SUBDOMAINS = Route("*.example.org", "lmtp", "10.0.0.2", 24, "none", index=1)
DEEPER = Route("*.eu.example.org", "lmtp", "10.0.0.3", 24, "none", index=2)
EVERYTHING = Route("*", "lmtp", "", 0, "none", index=3, path="/run/dovecot/lmtp")
MX = Route("*", "mx", index=4)
SMARTHOST_EXACT = Route("example.org", "smarthost", "10.0.0.9", 25, index=5)
ALL = (EXACT, SUBDOMAINS, DEEPER, EVERYTHING, MX, SMARTHOST_EXACT)


@pytest.mark.parametrize(("domain", "expected"), [
    ("example.org", EXACT),                 # exact beats every wildcard
    ("EXAMPLE.org", EXACT),                 # domains compare without case
    ("de.example.org", SUBDOMAINS),         # *.x beats *
    ("x.eu.example.org", DEEPER),           # a longer wildcard beats a shorter one
    ("eu.example.org", SUBDOMAINS),         # *.eu.example.org covers only its subdomains
    ("example.net", EVERYTHING),            # * comes last
])
def test_the_most_specific_lmtp_route_wins(domain: str, expected: Route) -> None:
    assert lmtp_route(domain, ALL) == expected


def test_only_lmtp_routes_count() -> None:
    # an exact smart-host route does not beat an lmtp catch-all: local domains are never
    # relayed, so only lmtp routes say anything about them
    assert lmtp_route("example.org", (MX, SMARTHOST_EXACT, EVERYTHING)) == EVERYTHING
    assert lmtp_route("example.org", (MX, SMARTHOST_EXACT)) is None
    assert lmtp_route("example.org", ()) is None


def test_no_lmtp_route_covers_the_domain() -> None:
    assert lmtp_route("example.net", (EXACT, SUBDOMAINS, DEEPER, MX)) is None
    # *.example.org does not cover example.org itself
    assert lmtp_route("example.org", (SUBDOMAINS,)) is None


def test_the_lowest_cost_wins_among_equally_specific_routes_then_the_first() -> None:
    dear = Route("example.org", "lmtp", "10.0.0.1", 24, "none", cost=5, index=0)
    cheap = Route("example.org", "lmtp", "10.0.0.2", 24, "none", cost=2, index=1)
    also_cheap = Route("example.org", "lmtp", "10.0.0.3", 24, "none", cost=2, index=2)
    assert lmtp_route("example.org", (dear, cheap, also_cheap)) == cheap
    assert lmtp_route("example.org", (dear, also_cheap, cheap)) == also_cheap
    # specificity first: a dear exact route beats a cheap wildcard
    cheap_everything = Route("*", "lmtp", "10.0.0.4", 24, "none", cost=0, index=3)
    assert lmtp_route("example.org", (cheap_everything, dear)) == dear


def test_choose_route_relays_to_an_lmtp_route_for_a_domain_that_is_not_local() -> None:
    decision = choose_route("example.org", (EXACT, SUBDOMAINS, EVERYTHING, MX), {"localhost"})
    assert not decision.local and decision.routable
    assert decision.chosen == (EXACT,)
    assert "LMTP 10.0.0.1:24 (route example.org)" in decision.reason
    decision = choose_route("example.net", (EVERYTHING,), {"localhost"})
    assert decision.chosen == (EVERYTHING,)
    assert decision.reason.endswith("LMTP unix:/run/dovecot/lmtp (route *)")


def test_choose_route_never_routes_a_local_domain_even_with_an_lmtp_route() -> None:
    decision = choose_route("example.org", ALL, {"example.org"})
    assert decision.local and decision.chosen == ()
    # ...the queue manager asks lmtp_route instead
    assert lmtp_route("example.org", ALL) == EXACT


def test_lmtp_routes_share_the_load_in_choose_route_like_any_other() -> None:
    a = Route("example.org", "lmtp", "10.0.0.1", 24, "none", index=0)
    b = Route("example.org", "lmtp", "10.0.0.2", 24, "none", index=1)
    decision = choose_route("example.org", (a, b), set())
    assert decision.chosen == (a, b)
    assert "2 routes of equal cost share the load" in decision.reason
