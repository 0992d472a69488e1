"""Finding where mail for a domain goes: MX records, host addresses and raw lookups.

Layer 3: talks to DNS servers through dnspython; imports only the standard library and
dnspython. Invariants:

- Every lookup answers with a value or a :class:`DnsError`, never an exception: the
  delivery agent needs a reason it can put in a log line or an NDR, not a traceback.
- Names are compared and cached lower-case, without the trailing dot, and are always
  queried as absolute names (no search list).
- ``MX`` hosts come sorted by preference; hosts of equal preference are shuffled with the
  injected ``rng`` on every call (RFC 5321 §5.1), also when the records come from the
  cache. A domain without MX records gets an implicit MX: the domain itself with its
  own A/AAAA addresses (RFC 5321 §5.1). A single ``MX 0 .`` is a null MX (RFC 7505).
- The cache is keyed by (name, record type) and honours the answer's TTL (at most
  :data:`POSITIVE_TTL_MAX`). NXDOMAIN and NODATA are cached for the SOA minimum of the
  answer (RFC 2308 §5), or :data:`NEGATIVE_TTL_DEFAULT` without an SOA, at most
  :data:`NEGATIVE_TTL_MAX`. SERVFAIL and timeouts are never cached. The clock is injected.

Which errors are permanent, and why (RFC 5321 §5.1, RFC 3463):

==========  =========  ========  ==================================================
kind        permanent  enhanced  meaning
==========  =========  ========  ==================================================
NXDOMAIN    yes        5.1.2     the name does not exist (or cannot: bad syntax)
NODATA      yes        5.1.2     the name exists without the records asked for; for
                                 a mail domain: neither MX nor A/AAAA, so unroutable
SERVFAIL    no         4.4.3     a server failed or refused (REFUSED maps here)
TIMEOUT     no         4.4.3     no server answered in time
==========  =========  ========  ==================================================

A null MX is not a :class:`DnsError` (the DNS answered fine); :class:`MxResult` says
``null_mx=True`` and the delivery agent fails the recipient with 5.1.10 (RFC 7505 §4.2).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = [
    "DnsError",
    "DnsErrorKind",
    "MxHost",
    "MxResult",
    "Resolver",
    "parse_nameserver",
]

DEFAULT_PORT = 53
NEGATIVE_TTL_DEFAULT = 60.0     # NXDOMAIN/NODATA without an SOA in the answer
NEGATIVE_TTL_MAX = 300.0        # RFC 2308 §5 suggests 1-3 hours; a mail server wants less
POSITIVE_TTL_MAX = 86400.0      # a day: a typo'd TTL of 2^31 must not pin an answer forever
CACHE_MAX_ENTRIES = 10_000
TXT_JOINED = "TXT+"             # the cache's key for TXT records with their strings joined


class DnsErrorKind(Enum):
    NXDOMAIN = "NXDOMAIN"
    NODATA = "NODATA"
    SERVFAIL = "SERVFAIL"
    TIMEOUT = "TIMEOUT"


_PERMANENT = frozenset({DnsErrorKind.NXDOMAIN, DnsErrorKind.NODATA})


@dataclass(frozen=True, slots=True)
class DnsError:
    """Why a lookup of ``name`` gave no usable answer.

    ``detail`` depends on the kind: for NODATA the record types that are missing, in
    words ("MX", "A or AAAA", "MX, A or AAAA"); for SERVFAIL what the servers said
    ("127.0.0.1:53 answered REFUSED"); for TIMEOUT how long we waited; for NXDOMAIN it
    is empty, or says why the name is not a valid DNS name.
    """

    kind: DnsErrorKind
    name: str
    detail: str

    @property
    def permanent(self) -> bool:
        """True for NXDOMAIN and NODATA: asking again will not help."""
        return self.kind in _PERMANENT

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code for a recipient that failed on this error."""
        return "5.1.2" if self.permanent else "4.4.3"

    def describe(self) -> str:
        """Plain words for a log line or an NDR."""
        if self.kind is DnsErrorKind.NXDOMAIN:
            text = f"{self.name} does not exist in DNS (NXDOMAIN)"
            return f"{text}: {self.detail}" if self.detail else text
        if self.kind is DnsErrorKind.NODATA:
            return f"{self.name} has no {self.detail or 'matching'} record in DNS (NODATA)"
        if self.kind is DnsErrorKind.SERVFAIL:
            return f"the DNS lookup of {self.name} failed: {self.detail or 'SERVFAIL'}"
        return f"the DNS lookup of {self.name} timed out: {self.detail or 'no answer'}"


@dataclass(frozen=True, slots=True)
class MxHost:
    """One mail exchanger: its preference, name and addresses (A then AAAA).

    A host whose addresses could not be found keeps ``addresses=()`` and says why in
    ``error``; the delivery agent skips it and tries the next one.
    """

    preference: int
    name: str
    addresses: tuple[str, ...]
    error: DnsError | None = None


@dataclass(frozen=True, slots=True)
class MxResult:
    """Where mail for ``domain`` goes.

    Exactly one of these holds: ``hosts`` is non-empty (``implicit`` when it is the
    domain itself, RFC 5321 §5.1); ``null_mx`` (the domain accepts no mail, RFC 7505);
    ``error`` says why no host could be found.
    """

    domain: str
    hosts: tuple[MxHost, ...]
    implicit: bool = False
    null_mx: bool = False
    error: DnsError | None = None


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"127.0.0.1"``, ``"[::1]:53"``, ``"::1"`` → (address, port).

    Raises :class:`ValueError` for anything but an IP address with an optional port: a
    resolver named by a host name would need a resolver to find it.
    """
    raw = text.strip()
    host, port_text = raw, None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"nameserver {text!r}: missing ']'")
        host, rest = raw[1:end], raw[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {text!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {text!r}: {host!r} is not an IP address") from None
    if port_text is None:
        return str(address), DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"nameserver {text!r}: port must be 1-65535")
    return str(address), int(port_text)


def _normalise(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _order_by_preference(records: Iterable[tuple[int, str]],
                         rng: random.Random) -> list[tuple[int, str]]:
    """Sort by preference; shuffle each group of equal preference with ``rng``.

    A name listed twice keeps its best preference. Each group is sorted before it is
    shuffled, so a seeded ``rng`` gives the same order whatever order the server used.
    """
    best: dict[str, int] = {}
    for preference, name in records:
        if name not in best or preference < best[name]:
            best[name] = preference
    groups: dict[int, list[str]] = {}
    for name, preference in best.items():
        groups.setdefault(preference, []).append(name)
    ordered: list[tuple[int, str]] = []
    for preference in sorted(groups):
        names = sorted(groups[preference])
        rng.shuffle(names)
        ordered.extend((preference, name) for name in names)
    return ordered


def _negative_ttl(response: dns.message.Message | None) -> float:
    """How long an NXDOMAIN/NODATA answer may be cached (RFC 2308 §5)."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                minimum = rrset[0].minimum   # type: ignore[attr-defined]
                return float(max(0, min(rrset.ttl, minimum, NEGATIVE_TTL_MAX)))
    return NEGATIVE_TTL_DEFAULT


_Value = tuple[str, ...] | DnsError


class _TtlCache:
    """(name, rdtype) → answer, each entry until its own deadline on the injected clock."""

    def __init__(self, clock: Callable[[], float], max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: dict[tuple[str, str], tuple[float, _Value]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> _Value | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        deadline, value = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return None
        return value

    def put(self, key: tuple[str, str], value: _Value, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries.pop(key, None)          # re-insert: the dict stays in age order
        if len(self._entries) >= self._max:
            self._evict()
        self._entries[key] = (self._clock() + ttl, value)

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (deadline, _) in self._entries.items() if now >= deadline]:
            del self._entries[key]
        while len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]


def _server_failures(exc: dns.resolver.NoNameservers) -> str:
    """"127.0.0.1:5353 answered REFUSED; ..." from dnspython's error list."""
    parts = []
    for error in exc.kwargs.get("errors") or []:
        server, port, what = str(error[0]), error[2], error[3]
        if server.startswith("Do53:"):
            server = server[len("Do53:"):].rsplit("@", 1)[0]
        host = f"[{server}]" if ":" in server else server
        parts.append(f"{host}:{port} answered {what}")
    return "; ".join(parts) or "no server could answer"


class Resolver:
    """Asynchronous DNS lookups with a TTL cache, for the delivery agent and diagnostics.

    ``nameservers`` are IP addresses with optional ports (see :func:`parse_nameserver`).
    Without any, the system's resolver configuration is used: that is for production
    only; tests always name their servers.
    """

    def __init__(self, nameservers: Sequence[str] = (), *, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port)
                                    for address, port in map(parse_nameserver, nameservers)]
        else:
            resolver = dns.asyncresolver.Resolver(configure=True)
        # ``timeout`` bounds a whole lookup; each server gets its share of it first, so
        # one dead server cannot use it all up.
        resolver.lifetime = timeout
        resolver.timeout = timeout / max(1, len(resolver.nameservers))
        resolver.cache = None                 # ours has the injected clock
        resolver.use_search_by_default = False
        self._resolver = resolver
        self.timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._cache = _TtlCache(clock)

    async def mx(self, domain: str) -> MxResult:
        """The mail exchangers of ``domain``, in the order to try them."""
        domain = _normalise(domain)
        found = await self._lookup(domain, "MX")
        if isinstance(found, DnsError):
            if found.kind is not DnsErrorKind.NODATA:
                return MxResult(domain, (), error=found)
            return await self._implicit_mx(domain)
        records = []
        for text in found:
            number, _, target = text.partition(" ")
            records.append((int(number), _normalise(target)))
        real = [(preference, target) for preference, target in records if target]
        if not real:                          # "MX 0 ." alone (RFC 7505)
            return MxResult(domain, (), null_mx=True)
        # A null MX next to real ones breaks RFC 7505 §3; the real ones are usable.
        ordered = _order_by_preference(real, self._rng)
        results = await asyncio.gather(*(self._host_addresses(name) for _, name in ordered))
        hosts = []
        for (preference, name), result in zip(ordered, results, strict=True):
            if isinstance(result, DnsError):
                hosts.append(MxHost(preference, name, (), result))
            else:
                hosts.append(MxHost(preference, name, result))
        return MxResult(domain, tuple(hosts))

    async def _implicit_mx(self, domain: str) -> MxResult:
        addresses = await self._host_addresses(domain)
        if isinstance(addresses, DnsError):
            if addresses.kind is DnsErrorKind.NODATA:
                addresses = DnsError(DnsErrorKind.NODATA, domain, "MX, A or AAAA")
            return MxResult(domain, (), implicit=True, error=addresses)
        return MxResult(domain, (MxHost(0, domain, addresses),), implicit=True)

    async def addresses(self, host: str) -> tuple[str, ...] | DnsError:
        """IPv4 then IPv6 addresses of ``host``; an IP literal (``[...]`` too) is itself."""
        literal = host.strip()
        if literal.startswith("[") and literal.endswith("]"):
            literal = literal[1:-1]
        try:
            return (str(ipaddress.ip_address(literal)),)
        except ValueError:
            pass
        return await self._host_addresses(_normalise(host))

    async def query(self, name: str, rdtype: str) -> list[str] | DnsError:
        """A raw lookup, each record as dnspython renders it (``"10 mx.example."``)."""
        try:
            kind = dns.rdatatype.from_text(rdtype.strip().upper())
        except dns.exception.DNSException:
            raise ValueError(f"unknown DNS record type {rdtype!r}") from None
        if dns.rdatatype.is_metatype(kind):
            raise ValueError(f"{rdtype!r} is a meta type, not a record type")
        found = await self._lookup(_normalise(name), dns.rdatatype.to_text(kind))
        return found if isinstance(found, DnsError) else list(found)

    async def txt(self, name: str) -> list[str] | DnsError:
        """TXT records of ``name``, each with its strings joined as RFC 7208 §3.3 and
        RFC 6376 §3.6.2.2 join them, decoded as Latin-1 (so any octet survives)."""
        found = await self._lookup(_normalise(name), TXT_JOINED)
        return found if isinstance(found, DnsError) else list(found)

    async def _host_addresses(self, name: str) -> tuple[str, ...] | DnsError:
        """A and AAAA of ``name``, asked at the same time. Any address is success."""
        v4, v6 = await asyncio.gather(self._lookup(name, "A"), self._lookup(name, "AAAA"))
        found = [address for result in (v4, v6) if not isinstance(result, DnsError)
                 for address in result]
        if found:
            return tuple(found)
        errors = [result for result in (v4, v6) if isinstance(result, DnsError)]
        for error in errors:                  # a transient failure may hide an address
            if not error.permanent:
                return error
        for error in errors:
            if error.kind is DnsErrorKind.NXDOMAIN:
                return error
        return DnsError(DnsErrorKind.NODATA, name, "A or AAAA")

    async def _lookup(self, name: str, rdtype: str) -> tuple[str, ...] | DnsError:
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        value, ttl = await self._ask(name, rdtype)
        self._cache.put(key, value, ttl)
        return value

    async def _ask(self, name: str, rdtype: str) -> tuple[tuple[str, ...] | DnsError, float]:
        """One question to the servers: (answer or error, seconds it may be cached)."""
        try:
            if not name:
                raise dns.name.EmptyLabel
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError) as exc:
            detail = f"not a valid DNS name ({str(exc).rstrip('.')})"
            return DnsError(DnsErrorKind.NXDOMAIN, name, detail), 0.0
        try:
            asked = "TXT" if rdtype == TXT_JOINED else rdtype
            answer = await self._resolver.resolve(qname, asked, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            response = next(iter(responses.values()), None)
            return DnsError(DnsErrorKind.NXDOMAIN, name, ""), _negative_ttl(response)
        except dns.resolver.NoNameservers as exc:
            return DnsError(DnsErrorKind.SERVFAIL, name, _server_failures(exc)), 0.0
        except dns.exception.Timeout:
            detail = f"no answer within {self.timeout:g} s"
            return DnsError(DnsErrorKind.TIMEOUT, name, detail), 0.0
        except dns.exception.DNSException as exc:   # YXDOMAIN, malformed answers...
            return DnsError(DnsErrorKind.SERVFAIL, name, str(exc)), 0.0
        if answer.rrset is None:
            return DnsError(DnsErrorKind.NODATA, name, asked), _negative_ttl(answer.response)
        if rdtype == TXT_JOINED:
            texts = tuple(b"".join(rdata.strings).decode("latin-1")  # type: ignore[attr-defined]
                          for rdata in answer.rrset)
        else:
            texts = tuple(rdata.to_text() for rdata in answer.rrset)
        ttl = min(float(answer.chaining_result.minimum_ttl), POSITIVE_TTL_MAX)
        return texts, ttl
