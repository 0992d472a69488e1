"""A small SPF evaluator for doctor: would a domain's SPF record (RFC 7208) allow mail
from one address?

It evaluates ``all``, ``ip4``, ``ip6``, ``a``, ``mx``, ``include``, ``exists`` and
``redirect`` through the configured nameservers, with the ten-lookup limit (§4.6.4) and
the two-void-lookup limit (§4.6.4). Macros (§7) and ``ptr`` are not evaluated: a record
that needs them is reported as such, never guessed. It answers doctor's question ("does
the record list this server?"); inbound verification is not its job.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..dns import DnsError, Resolver
from .dns import _txt

__all__ = ["SpfAnswer", "evaluate", "spf_records"]

MAX_LOOKUPS = 10
MAX_VOID = 2
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


@dataclass
class SpfAnswer:
    """The result (``pass fail softfail neutral none permerror temperror``), the record
    that decided it, why, and the mechanism that matched."""

    result: str
    record: str | None = None
    reason: str = ""
    matched: str = ""
    lookups: int = 0
    notes: list[str] = field(default_factory=list)


class _Stop(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result, self.reason = result, reason


async def spf_records(resolver: Resolver, domain: str) -> list[str] | DnsError:
    """The ``v=spf1`` TXT records of ``domain`` (an empty list: none published)."""
    found = await resolver.query(domain, "TXT")
    if isinstance(found, DnsError):
        return [] if found.permanent else found
    return [t for t in _txt(found) if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


class _Evaluation:
    def __init__(self, resolver: Resolver, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
                 ) -> None:
        self.resolver = resolver
        self.ip = ip
        self.lookups = 0
        self.void = 0
        self.notes: list[str] = []

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _Stop("permerror", f"more than {MAX_LOOKUPS} DNS lookups (RFC 7208 4.6.4)")

    async def addresses(self, name: str, rdtype: str) -> list[str]:
        found = await self.resolver.query(name, rdtype)
        if isinstance(found, DnsError):
            if not found.permanent:
                raise _Stop("temperror", found.describe())
            self.void += 1
            if self.void > MAX_VOID:
                raise _Stop("permerror", f"more than {MAX_VOID} lookups found nothing "
                                         "(void lookups, RFC 7208 4.6.4)")
            return []
        return found

    async def a_of(self, name: str) -> list[str]:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        return await self.addresses(name, rdtype)

    def within(self, addresses: list[str], v4: int, v6: int) -> bool:
        prefix = v4 if self.ip.version == 4 else v6
        for text in addresses:
            try:
                net = ipaddress.ip_network(f"{text}/{prefix}", strict=False)
            except ValueError:
                continue
            if self.ip in net:
                return True
        return False

    async def check(self, domain: str, depth: int = 0) -> tuple[str, str, str]:
        """(result, matched mechanism, record) for ``domain``."""
        if depth > MAX_LOOKUPS:
            raise _Stop("permerror", "include or redirect loop")
        records = await spf_records(self.resolver, domain)
        if isinstance(records, DnsError):
            raise _Stop("temperror", records.describe())
        if not records:
            return "none", "", ""
        if len(records) > 1:
            raise _Stop("permerror", f"{domain} publishes {len(records)} SPF records; "
                                     "RFC 7208 3.2 allows one")
        record = records[0]
        redirect = ""
        for term in record.split()[1:]:
            if "%" in term:
                raise _Stop("permerror", f"{term!r} uses macros, which doctor does not "
                                         "evaluate")
            low = term.lower()
            if low.startswith("redirect="):
                redirect = term.split("=", 1)[1]
                continue
            if "=" in low.split(":", 1)[0]:
                continue                                  # exp= and unknown modifiers
            qualifier = _QUALIFIERS.get(term[0], "")
            body = term[1:] if qualifier else term
            qualifier = qualifier or "pass"
            if await self.matches(body, domain, depth):
                return qualifier, term, record
        if redirect:
            self.count()
            result, matched, inner = await self.check(redirect, depth + 1)
            if result == "none":
                raise _Stop("permerror", f"redirect={redirect} has no SPF record")
            return result, matched, inner
        return "neutral", "", record

    async def matches(self, body: str, domain: str, depth: int) -> bool:
        name, _, arg = body.partition(":")
        name = name.lower()
        if "/" in name:                              # a/24, mx/24: no domain given
            name, _, cidr = name.partition("/")
            arg = f"{domain}/{cidr}"
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            try:
                return self.ip in ipaddress.ip_network(arg, strict=False)
            except ValueError:
                raise _Stop("permerror", f"{body!r} is not a network") from None
        target, v4, v6 = self.split_cidr(arg or domain)
        if name == "a":
            self.count()
            return self.within(await self.a_of(target), v4, v6)
        if name == "mx":
            self.count()
            hosts = await self.addresses(target, "MX")
            for host in hosts[:MAX_LOOKUPS]:
                exchange = host.split()[-1].rstrip(".")
                if exchange and self.within(await self.a_of(exchange), v4, v6):
                    return True
            return False
        if name == "include":
            self.count()
            result, _, _ = await self.check(target, depth + 1)
            if result == "none":
                raise _Stop("permerror", f"include:{target} has no SPF record")
            if result in ("permerror", "temperror"):
                raise _Stop(result, f"include:{target}")
            return result == "pass"
        if name == "exists":
            self.count()
            return bool(await self.addresses(target, "A"))
        if name == "ptr":
            self.count()
            self.notes.append("ptr is not evaluated (RFC 7208 5.5 says not to use it)")
            return False
        raise _Stop("permerror", f"unknown mechanism {body!r}")

    @staticmethod
    def split_cidr(text: str) -> tuple[str, int, int]:
        parts = text.split("/")
        target, v4, v6 = parts[0], 32, 128
        try:
            if len(parts) >= 2 and parts[1]:
                v4 = int(parts[1])
            if len(parts) >= 3 and parts[-1]:
                v6 = int(parts[-1])
        except ValueError:
            raise _Stop("permerror", f"{text!r}: a bad prefix length") from None
        return target, v4, v6


async def evaluate(resolver: Resolver, domain: str, ip: str) -> SpfAnswer:
    """Would ``domain``'s SPF record allow mail from ``ip``?"""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    run = _Evaluation(resolver, address)
    try:
        result, matched, record = await run.check(domain)
    except _Stop as stop:
        top = await spf_records(resolver, domain)
        record_text = top[0] if isinstance(top, list) and top else None
        return SpfAnswer(stop.result, record_text, stop.reason, "", run.lookups, run.notes)
    if result == "none":
        return SpfAnswer("none", None, f"{domain} publishes no SPF record", "", run.lookups)
    reason = (f"{matched} matches {ip}" if matched else
              f"no mechanism matches {ip}, and the record has no all")
    return SpfAnswer(result, record, reason, matched, run.lookups, run.notes)
