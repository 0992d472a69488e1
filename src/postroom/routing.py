"""The routing table: which address space covers a domain, and why. Pure: no I/O.

An address space (``[[route]]``) matches ``*``, one exact domain, or ``*.domain`` (its
subdomains). The most specific match wins: an exact match beats any wildcard, a longer
wildcard beats a shorter one, and ``*`` comes last. Among equally specific matches the
lowest cost wins, and routes of equal cost share the load. Local domains never leave
the machine: :func:`choose_route` never routes them.

A local domain's final delivery goes into this server's Maildirs, unless an ``lmtp``
route covers it: :func:`lmtp_route` names that route (as Postfix's
``virtual_transport = lmtp:...``), and the queue manager hands the domain's recipients
to the LMTP agent instead. An ``lmtp`` route that covers a non-local domain is an
ordinary address space: :func:`choose_route` may pick it to relay to an LMTP server.

:func:`choose_route` returns every route it considered with the reason it matched or
not. The SMTP policy and the queue manager both call it, and the diagnostic tools
(``explain``, ``doctor``) are to call it too, so that all of them show one decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import Route

__all__ = ["Candidate", "RouteDecision", "RouteMemo", "choose_route", "describe_destination",
           "destination_ref", "lmtp_route", "specificity"]


def specificity(pattern: str, domain: str) -> tuple[int, int] | None:
    """How specifically ``pattern`` matches ``domain``, or None when it does not match."""
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("*."):
        suffix = pattern[1:]                      # ".example.org"
        return (1, len(suffix)) if domain.endswith(suffix) and len(domain) > len(suffix) \
            else None
    return (2, len(pattern)) if domain == pattern else None


@dataclass(frozen=True, slots=True)
class Candidate:
    route: Route
    matches: bool
    why: str


@dataclass(frozen=True, slots=True)
class RouteDecision:
    domain: str
    local: bool
    candidates: tuple[Candidate, ...]
    chosen: tuple[Route, ...]             # empty: no route; several: equal cost, shared load
    reason: str

    @property
    def routable(self) -> bool:
        return self.local or bool(self.chosen)


def choose_route(domain: str, routes: Sequence[Route], local_domains: frozenset[str] | set[str]
                 ) -> RouteDecision:
    domain = domain.lower()
    if domain in local_domains:
        return RouteDecision(domain, True, (), (), f"{domain} is a local domain: delivered "
                             "to local mailboxes, never routed out")
    scored: list[tuple[tuple[int, int], Route]] = []
    candidates = []
    for route in routes:
        score = specificity(route.match, domain)
        if score is None:
            candidates.append(Candidate(route, False, f"{route.match} does not cover {domain}"))
            continue
        kind = ("the catch-all", "a wildcard", "an exact match")[score[0]]
        candidates.append(Candidate(route, True, f"{route.match} covers {domain} ({kind}, "
                                    f"cost {route.cost})"))
        scored.append((score, route))
    if not scored:
        return RouteDecision(domain, False, tuple(candidates), (),
                             f"no address space covers {domain}: add a [[route]] for it "
                             "(or a catch-all match = \"*\")")
    best = max(score for score, _ in scored)
    tied = [route for score, route in scored if score == best]
    cheapest = min(route.cost for route in tied)
    chosen = tuple(route for route in tied if route.cost == cheapest)
    why = f"{chosen[0].match} is the most specific match"
    if len(tied) > 1:
        why += f"; lowest cost {cheapest}"
    if len(chosen) > 1:
        why += f"; {len(chosen)} routes of equal cost share the load"
    return RouteDecision(domain, False, tuple(candidates), chosen,
                         f"{why}: {', '.join(r.describe() for r in chosen)}")


def lmtp_route(domain: str, routes: Sequence[Route]) -> Route | None:
    """The ``lmtp`` route that takes final delivery for a local ``domain``, if any.

    Only ``via = "lmtp"`` routes count. The most specific match wins (an exact domain,
    then the longest ``*.domain``, then ``*``), then the lowest cost; among routes still
    equal, the first in the file. None: the domain's mail goes into the local Maildirs.
    The caller decides that ``domain`` is local; this function does not know the list.
    """
    domain = domain.lower()
    best: tuple[tuple[int, int], int, int] | None = None
    chosen: Route | None = None
    for position, route in enumerate(routes):
        if route.via != "lmtp":
            continue
        score = specificity(route.match, domain)
        if score is None:
            continue
        rank = (score, -route.cost, -position)
        if best is None or rank > best:
            best, chosen = rank, route
    return chosen


class RouteMemo:
    """:func:`choose_route`, remembered per domain while the routing table and the local
    domains stay the same objects (a reload replaces them): it writes an explanation
    for every route, which many recipients for one domain need not redo."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._memo: dict[str, RouteDecision] = {}
        self._for: tuple[object, object] = ((), frozenset())

    def choose(self, domain: str, routes: Sequence[Route],
               local_domains: frozenset[str] | set[str]) -> RouteDecision:
        if routes is not self._for[0] or local_domains is not self._for[1]:
            self._for = (routes, local_domains)
            self._memo.clear()
        decision = self._memo.get(domain)
        if decision is None:
            if len(self._memo) >= self.LIMIT:
                self._memo.clear()
            decision = self._memo[domain] = choose_route(domain, routes, local_domains)
        return decision


def destination_ref(route: Route, domain: str) -> str:
    """How the spool records where a recipient goes: the route's place in the table, and
    the domain for an MX route ("" for the local Maildirs)."""
    if route.via == "local":
        return ""
    return f"{route.index}|{domain if route.via == 'mx' else ''}"


def describe_destination(route: Route, domain: str) -> str:
    if route.via == "mx":
        return f"MX of {domain} (route {route.match})"
    if route.via == "local":
        return "local mailbox"
    return route.describe()
