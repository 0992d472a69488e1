"""SPF (RFC 7208): may this client IP address send mail for a domain?

An asynchronous evaluator of ``check_host()`` over our own :class:`~postroom.dns.Resolver`
(the configured nameservers, the TTL cache), so that a check never blocks the event
loop and never asks the system resolver. Why not pyspf: docs/architecture.md.

Invariants:

- :func:`check_host` answers with an :class:`SpfResult`, never an exception: a bad
  record is ``permerror``, a DNS failure ``temperror``, each with a reason in words.
- At most :data:`MAX_DNS_MECHANISMS` terms that cause DNS lookups (``include``, ``a``,
  ``mx``, ``ptr``, ``exists``, ``redirect``) per check, counted across includes and
  redirects (RFC 7208 §4.6.4); at most :data:`MAX_VOID_LOOKUPS` lookups that find
  nothing; at most 10 MX or PTR names looked at per term. An include or redirect loop
  therefore ends at the limit as ``permerror``.
- The whole record is parsed before any term is evaluated: a syntax error anywhere is
  ``permerror`` even when an earlier term would have matched (§4.6).
- Not evaluated: ``exp=`` (the explanation is never fetched: we add no text from the
  sender's DNS to our replies).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..dns import DnsError, DnsErrorKind

__all__ = [
    "MAX_DNS_MECHANISMS",
    "MAX_VOID_LOOKUPS",
    "SpfError",
    "SpfResolver",
    "SpfResult",
    "Term",
    "check_host",
    "expand_macros",
    "parse_record",
]

MAX_DNS_MECHANISMS = 10
MAX_VOID_LOOKUPS = 2
MAX_NAMES_PER_TERM = 10
MAX_RECORD_TERMS = 512          # a record longer than this is not an SPF policy

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = {"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"}
_DNS_TERMS = {"include", "a", "mx", "ptr", "exists", "redirect"}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_MACRO = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])([0-9]*)(r?)([.\-+,/_=]*)\}", re.I)
_CIDR = re.compile(r"(.*?)(?:/([0-9]{1,2}))?(?://([0-9]{1,3}))?\Z")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class SpfError(Exception):
    """A record or a macro that does not follow RFC 7208's syntax (a permerror)."""


class SpfResolver(Protocol):
    """What SPF needs from DNS (:class:`postroom.dns.Resolver` has it)."""

    async def txt(self, name: str) -> list[str] | DnsError: ...
    async def query(self, name: str, rdtype: str) -> list[str] | DnsError: ...


@dataclass(frozen=True, slots=True)
class Term:
    """One directive (``qualifier`` set) or modifier (``qualifier`` empty) of a record."""

    name: str                 # mechanism or modifier name, lower case
    value: str = ""           # the domain-spec or address, unexpanded
    qualifier: str = ""       # "+", "-", "~", "?" for a directive
    cidr4: int | None = None
    cidr6: int | None = None


@dataclass(slots=True)
class SpfResult:
    """The outcome of one check: ``result`` is one of :data:`RESULTS`."""

    result: str
    domain: str
    reason: str = ""
    lookups: int = 0

    def __str__(self) -> str:
        return f"{self.result} ({self.reason})" if self.reason else self.result


def parse_record(text: str) -> list[Term]:
    """The terms of an SPF record (``v=spf1 ...``). Raises :class:`SpfError`."""
    words = text.split(" ")
    if words[0].lower() != "v=spf1":
        raise SpfError("the record does not start with v=spf1")
    terms: list[Term] = []
    seen: set[str] = set()
    for word in words[1:]:
        if not word:
            continue
        if len(terms) >= MAX_RECORD_TERMS:
            raise SpfError(f"more than {MAX_RECORD_TERMS} terms")
        if not word.isascii() or not word.isprintable():
            raise SpfError(f"term {word[:60]!r} has characters outside printable ASCII")
        name, eq, value = word.partition("=")
        if eq and _NAME.match(name) and name.lower() not in _MECHANISMS and ":" not in name:
            low = name.lower()
            if low in ("redirect", "exp"):
                if low in seen:
                    raise SpfError(f"{low}= appears twice")
                seen.add(low)
                _check_domain_spec(value)
            else:
                _check_macro_string(value)     # unknown modifiers are ignored, if valid
            terms.append(Term(low, value))
            continue
        qualifier = "+"
        if word[0] in _QUALIFIERS:
            qualifier, word = word[0], word[1:]
        mech, sep, arg = word.partition(":")
        slash = mech.find("/")
        if slash >= 0 and not sep:
            mech, arg = mech[:slash], mech[slash:]
        mech = mech.lower()
        if mech not in _MECHANISMS:
            raise SpfError(f"unknown mechanism {word[:60]!r}")
        terms.append(_directive(qualifier, mech, arg, bool(sep)))
    return terms


def _directive(qualifier: str, mech: str, arg: str, colon: bool) -> Term:
    if mech == "all":
        if arg:
            raise SpfError("all takes no argument")
        return Term("all", "", qualifier)
    if mech in ("ip4", "ip6"):
        if not colon:
            raise SpfError(f"{mech} needs an address")
        address, _, bits = arg.partition("/")
        try:
            net = ipaddress.ip_address(address)
        except ValueError:
            raise SpfError(f"{mech}:{arg[:60]} is not an address") from None
        if (mech == "ip4") != (net.version == 4):
            raise SpfError(f"{mech}:{arg[:60]} is the wrong address family")
        limit = 32 if mech == "ip4" else 128
        length = limit
        if bits:
            if not bits.isdigit() or int(bits) > limit or (len(bits) > 1 and bits[0] == "0"):
                raise SpfError(f"{mech}:{arg[:60]} has a bad prefix length")
            length = int(bits)
        return Term(mech, address, qualifier, length if mech == "ip4" else None,
                    length if mech == "ip6" else None)
    if mech in ("include", "exists"):
        if not colon or not arg:
            raise SpfError(f"{mech} needs a domain")
        _check_domain_spec(arg)
        return Term(mech, arg, qualifier)
    # a, mx, ptr: an optional domain-spec, a and mx with optional dual CIDR lengths
    m = _CIDR.match(arg) if mech != "ptr" else None
    domain, c4, c6 = (m.group(1), m.group(2), m.group(3)) if m else (arg, None, None)
    if colon and not domain:
        raise SpfError(f"{mech}: has an empty domain")
    if domain:
        _check_domain_spec(domain)
    if (c4 is not None and int(c4) > 32) or (c6 is not None and int(c6) > 128):
        raise SpfError(f"{mech} has a bad prefix length")
    return Term(mech, domain, qualifier, int(c4) if c4 is not None else None,
                int(c6) if c6 is not None else None)


def _check_macro_string(text: str) -> None:
    i = 0
    while True:
        j = text.find("%", i)
        if j < 0:
            return
        nxt = text[j + 1:j + 2]
        if nxt in ("%", "_", "-"):
            i = j + 2
            continue
        m = _MACRO.match(text, j)
        if m is None:
            raise SpfError(f"bad macro in {text[:60]!r}")
        i = m.end()


def _check_domain_spec(text: str) -> None:
    _check_macro_string(text)
    if "%" not in text:
        last = text.rstrip(".").rsplit(".", 1)[-1]
        if "." not in text.strip(".") or not last or not _LABEL.match(last) or last.isdigit():
            raise SpfError(f"{text[:60]!r} is not a domain name")


@dataclass(slots=True)
class _Context:
    """What macros expand to, and the check's shared counters."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str               # local-part@domain (postmaster@helo for the null sender)
    helo: str
    receiver: str
    lookups: int = 0
    voids: int = 0
    trail: list[str] = field(default_factory=list)


class _Fail(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result, self.reason = result, reason


def expand_macros(text: str, ip: str, sender: str, domain: str, helo: str,
                  receiver: str = "unknown", *, exp: bool = False) -> str:
    """RFC 7208 §7: ``%{s}``, ``%{l}``, ``%{o}``, ``%{d}``, ``%{i}``, ``%{p}`` (always
    "unknown": we do not do the extra PTR lookups), ``%{h}``, ``%{v}``, and in ``exp``
    only ``%{c}``, ``%{r}``, ``%{t}``; with digits (rightmost parts kept), ``r``
    (reversed) and delimiters; an upper-case letter URL-escapes. Raises
    :class:`SpfError` for a bad macro."""
    address = ipaddress.ip_address(ip)
    local, _, sender_domain = sender.rpartition("@")
    values = {
        "s": sender, "l": local or "postmaster", "o": sender_domain, "d": domain,
        "i": (str(address) if address.version == 4
              else ".".join(address.exploded.replace(":", ""))),
        "p": "unknown", "h": helo, "v": "in-addr" if address.version == 4 else "ip6",
        "c": str(address), "r": receiver, "t": "0",
    }
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt == "%":
            out.append("%")
            i += 2
            continue
        if nxt == "_":
            out.append(" ")
            i += 2
            continue
        if nxt == "-":
            out.append("%20")
            i += 2
            continue
        m = _MACRO.match(text, i)
        if m is None:
            raise SpfError(f"bad macro in {text[:60]!r}")
        letter, digits, reverse, delimiters = m.groups()
        if letter.lower() in "crt" and not exp:
            raise SpfError(f"%{{{letter}}} is only allowed in exp=")
        value = values[letter.lower()]
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            count = int(digits)
            if count == 0:
                raise SpfError("a macro keeps zero parts")
            parts = parts[-count:]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="")
        out.append(value)
        i = m.end()
    return "".join(out)


def _target(ctx: _Context, spec: str, domain: str) -> str:
    """A domain-spec expanded and cut to 253 octets from the left (§7.3)."""
    name = expand_macros(spec, str(ctx.ip), ctx.sender, domain, ctx.helo, ctx.receiver) \
        if "%" in spec else spec
    name = name.rstrip(".")
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


async def check_host(resolver: SpfResolver, ip: str, domain: str, sender: str, helo: str,
                     receiver: str = "unknown") -> SpfResult:
    """RFC 7208 §4: the SPF result for ``ip`` sending as ``sender`` from ``domain``.

    ``sender`` is the MAIL FROM address, or ``postmaster@<helo>`` for the null sender
    and for the HELO check.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return SpfResult("permerror", domain, f"{ip!r} is not an IP address")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    ctx = _Context(address, sender, helo, receiver)
    domain = domain.rstrip(".").lower()
    if not _valid_domain(domain):
        return SpfResult("none", domain, f"{domain[:80]!r} is not a domain name")
    try:
        result, reason = await _check(resolver, ctx, domain, 0)
    except _Fail as exc:
        result, reason = exc.result, exc.reason
    return SpfResult(result, domain, reason, ctx.lookups)


def _valid_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (len(domain) <= 253 and len(labels) >= 2
            and all(label and len(label) <= 63 and label.isascii() for label in labels)
            and not labels[-1].isdigit())


async def _record(resolver: SpfResolver, domain: str) -> list[Term] | None:
    """The parsed SPF record of ``domain``; None when it has none."""
    found = await resolver.txt(domain)
    if isinstance(found, DnsError):
        if found.permanent:
            return None
        raise _Fail("temperror", found.describe())
    records = [t for t in found if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]
    if not records:
        return None
    if len(records) > 1:
        raise _Fail("permerror", f"{domain} has {len(records)} SPF records")
    try:
        return parse_record(records[0])
    except SpfError as exc:
        raise _Fail("permerror", f"{domain}: {exc}") from None


async def _check(resolver: SpfResolver, ctx: _Context, domain: str, depth: int
                 ) -> tuple[str, str]:
    terms = await _record(resolver, domain)
    if terms is None:
        return "none", f"{domain} has no SPF record"
    redirect = next((t for t in terms if t.name == "redirect"), None)
    for term in terms:
        if not term.qualifier:
            continue                          # modifiers
        if await _matches(resolver, ctx, term, domain, depth):
            result = _QUALIFIERS[term.qualifier]
            shown = term.name + (":" + term.value if term.value else "")
            return result, f"{domain}: matched {term.qualifier}{shown}"
    if redirect is not None:
        _count(ctx)
        target = _target(ctx, redirect.value, domain)
        if not _valid_domain(target):
            raise _Fail("permerror", f"{domain}: redirect to {target[:80]!r}, not a domain")
        result, reason = await _check(resolver, ctx, target, depth + 1)
        if result == "none":
            raise _Fail("permerror", f"{domain}: redirect to {target}, which has no SPF record")
        return result, reason
    return "neutral", f"{domain}: no term matched"


def _count(ctx: _Context) -> None:
    ctx.lookups += 1
    if ctx.lookups > MAX_DNS_MECHANISMS:
        raise _Fail("permerror", f"more than {MAX_DNS_MECHANISMS} DNS lookups (RFC 7208 §4.6.4)")


def _void(ctx: _Context, name: str) -> None:
    ctx.voids += 1
    if ctx.voids > MAX_VOID_LOOKUPS:
        raise _Fail("permerror", f"more than {MAX_VOID_LOOKUPS} lookups found nothing "
                    f"(the last: {name})")


async def _answers(resolver: SpfResolver, ctx: _Context, name: str, rdtype: str
                   ) -> list[str]:
    """Records of one lookup; NXDOMAIN and NODATA count as void; other errors raise."""
    found = await resolver.query(name, rdtype)
    if isinstance(found, DnsError):
        if found.kind in (DnsErrorKind.NXDOMAIN, DnsErrorKind.NODATA):
            return []
        raise _Fail("temperror", found.describe())
    return found


async def _addresses(resolver: SpfResolver, ctx: _Context, name: str, *, voids: bool = True
                     ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    rdtype = "A" if ctx.ip.version == 4 else "AAAA"
    found = await _answers(resolver, ctx, name, rdtype)
    if not found and voids:
        _void(ctx, name)
    out = []
    for text in found:
        try:
            out.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    return out


def _in(ctx: _Context, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        term: Term) -> bool:
    if address.version != ctx.ip.version:
        return False
    bits = (term.cidr4 if address.version == 4 else term.cidr6)
    if bits is None:
        return address == ctx.ip
    net = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    return ctx.ip in net


async def _matches(resolver: SpfResolver, ctx: _Context, term: Term, domain: str,
                   depth: int) -> bool:
    name = term.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        bits = term.cidr4 if name == "ip4" else term.cidr6
        net = ipaddress.ip_network(f"{term.value}/{bits}", strict=False)
        return ctx.ip.version == net.version and ctx.ip in net
    if name in _DNS_TERMS:
        _count(ctx)
    target = _target(ctx, term.value, domain) if term.value else domain
    if not _valid_domain(target):
        if name == "include":
            raise _Fail("permerror", f"{domain}: include of {target[:80]!r}, not a domain")
        return False                          # §4.8: an invalid target does not match
    if name == "include":
        if target in ctx.trail:
            raise _Fail("permerror", f"{domain}: include loop through {target}")
        ctx.trail.append(target)
        try:
            result, reason = await _check(resolver, ctx, target, depth + 1)
        finally:
            ctx.trail.pop()
        if result == "pass":
            return True
        if result == "temperror":
            raise _Fail("temperror", reason)
        if result in ("permerror", "none"):
            raise _Fail("permerror", f"{domain}: include:{target}: {reason}")
        return False
    if name == "a":
        return any(_in(ctx, a, term) for a in await _addresses(resolver, ctx, target))
    if name == "mx":
        hosts = await _answers(resolver, ctx, target, "MX")
        if not hosts:
            _void(ctx, target)
        if len(hosts) > MAX_NAMES_PER_TERM:
            raise _Fail("permerror", f"{target} has more than {MAX_NAMES_PER_TERM} MX hosts")
        for record in hosts:
            host = record.partition(" ")[2].rstrip(".")
            if host and any(_in(ctx, a, term)
                            for a in await _addresses(resolver, ctx, host, voids=False)):
                return True
        return False
    if name == "exists":
        found = await _answers(resolver, ctx, target, "A")
        if not found:
            _void(ctx, target)
        return bool(found)
    if name == "ptr":
        return await _ptr_matches(resolver, ctx, target)
    return False


async def _ptr_matches(resolver: SpfResolver, ctx: _Context, target: str) -> bool:
    """§5.5: a validated reverse name of the client equal to or under ``target``."""
    names = await _answers(resolver, ctx, ctx.ip.reverse_pointer, "PTR")
    if not names:
        _void(ctx, ctx.ip.reverse_pointer)
    for name in names[:MAX_NAMES_PER_TERM]:
        host = name.rstrip(".").lower()
        if not (host == target or host.endswith("." + target)):
            continue
        try:
            found = await _addresses(resolver, ctx, host, voids=False)
        except _Fail as exc:
            if exc.result == "temperror":
                continue                      # §5.5: a failed lookup is skipped
            raise
        if ctx.ip in found:
            return True
    return False


def records_of(texts: Sequence[str]) -> list[str]:
    """The SPF records among a name's TXT records (for diagnostics)."""
    return [t for t in texts if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]
