"""DMARC (RFC 7489): does the From: domain's policy accept what SPF and DKIM found?

Pure parts (record parsing, alignment, the decision) and one asynchronous step (finding
the record: ``_dmarc.<From domain>``, then ``_dmarc.<organisational domain>``). The
organisational domain comes from the Public Suffix List (the ``publicsuffixlist``
package, loaded once per process on first use).

Invariants: :func:`parse_record` raises only :class:`DmarcError`; :func:`evaluate`
answers with a :class:`DmarcResult` and never raises; a DNS failure is ``temperror``
and never leads to a reject.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from ..dns import DnsError

__all__ = ["DmarcError", "DmarcRecord", "DmarcResult", "aligned", "evaluate",
           "organizational_domain", "parse_record"]

_POLICIES = ("none", "quarantine", "reject")
MAX_RECORD = 4096          # longer records are not DMARC policies (and not parsed)


class DmarcError(Exception):
    """A record that is not a valid DMARC record."""


class TxtResolver(Protocol):
    async def txt(self, name: str) -> list[str] | DnsError: ...


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """``result`` is pass, fail, none, temperror or permerror; ``policy`` is what the
    domain asks for this message (none, quarantine, reject), after ``pct``."""

    result: str
    domain: str                  # the From: domain ("" when there is none)
    policy: str = "none"
    published: str = ""          # p= (or sp=) as published, before pct
    reason: str = ""
    record_domain: str = ""      # where the record was found


@lru_cache(maxsize=1)
def _psl() -> object:
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (``a.b.example.co.uk`` →
    ``example.co.uk``); a name that is itself a public suffix is its own."""
    domain = domain.rstrip(".").lower()
    found = _psl().privatesuffix(domain)        # type: ignore[attr-defined]
    return found if isinstance(found, str) else domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Strict: the same name; relaxed: the same organisational domain."""
    a, b = identifier.rstrip(".").lower(), from_domain.rstrip(".").lower()
    if a == b:
        return True
    return mode != "s" and bool(a) and organizational_domain(a) == organizational_domain(b)


def parse_record(text: str) -> DmarcRecord:
    """``v=DMARC1; p=reject; ...`` → :class:`DmarcRecord`; raises :class:`DmarcError`.

    Unknown tags are ignored (§6.3); a bad value of a known tag is an error, except that a
    missing or bad ``p`` with a valid ``rua`` counts as ``p=none`` (§6.6.3)."""
    if len(text) > MAX_RECORD:
        raise DmarcError(f"the record is longer than {MAX_RECORD} characters")
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    for i, part in enumerate(parts):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not eq:
            raise DmarcError(f"{part[:40]!r} is not a tag=value pair")
        if i == 0 and (name != "v" or value != "DMARC1"):
            raise DmarcError("the record does not start with v=DMARC1")
        if name not in tags:
            tags[name] = value
    if "v" not in tags:
        raise DmarcError("the record does not start with v=DMARC1")
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" in tags:
            p = "none"
        else:
            raise DmarcError(f"p={tags.get('p', '')[:20]} is not none, quarantine or reject")
    sp = tags.get("sp", p).lower()
    if sp not in _POLICIES:
        sp = p
    pct_text = tags.get("pct", "100")
    if not pct_text.isdigit() or int(pct_text) > 100:
        raise DmarcError(f"pct={pct_text[:20]} is not 0-100")
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    if adkim not in ("r", "s") or aspf not in ("r", "s"):
        raise DmarcError("adkim and aspf must be r or s")
    return DmarcRecord(p, sp, int(pct_text), adkim, aspf)


async def _find(resolver: TxtResolver, name: str) -> DmarcRecord | DmarcResult | None:
    found = await resolver.txt(f"_dmarc.{name}")
    if isinstance(found, DnsError):
        if found.permanent:
            return None
        return DmarcResult("temperror", name, reason=found.describe())
    records = [t for t in found if t[:8].upper().replace(" ", "").startswith("V=DMARC1")]
    if len(records) != 1:
        return None                          # none, or several: no policy (§6.6.3)
    try:
        return parse_record(records[0])
    except DmarcError as exc:
        return DmarcResult("permerror", name, reason=f"_dmarc.{name}: {exc}")


async def evaluate(resolver: TxtResolver, from_domain: str,
                   spf: tuple[str, str] | None,
                   dkim: Sequence[tuple[str, str]],
                   rng: Callable[[], float] = random.random) -> DmarcResult:
    """The DMARC result for a message whose From: domain is ``from_domain``.

    ``spf`` is (result, domain) of the MAIL FROM check (HELO for the null sender);
    ``dkim`` is (result, d=) for each signature."""
    from_domain = from_domain.rstrip(".").lower()
    found = await _find(resolver, from_domain)
    record_domain = from_domain
    org = organizational_domain(from_domain)
    if found is None and org != from_domain:
        found = await _find(resolver, org)
        record_domain = org
    if found is None:
        return DmarcResult("none", from_domain, reason="no DMARC record")
    if isinstance(found, DmarcResult):
        return DmarcResult(found.result, from_domain, reason=found.reason,
                           record_domain=record_domain)
    record = found
    published = record.sp if record_domain != from_domain else record.p
    passes: list[str] = []
    temporary: list[str] = []
    for result, d in dkim:
        if aligned(d, from_domain, record.adkim):
            (passes if result == "pass" else temporary if result == "temperror"
             else []).append(f"DKIM d={d}")
    if spf is not None and aligned(spf[1], from_domain, record.aspf):
        if spf[0] == "pass":
            passes.append(f"SPF {spf[1]}")
        elif spf[0] == "temperror":
            temporary.append(f"SPF {spf[1]}")
    if passes:
        return DmarcResult("pass", from_domain, "none", published,
                           f"aligned {passes[0]} passed", record_domain)
    if temporary:
        return DmarcResult("temperror", from_domain, "none", published,
                           f"{', '.join(temporary)} could not be checked", record_domain)
    policy = published
    if record.pct < 100 and rng() * 100 >= record.pct:
        # sampled out (§6.6.4): the next policy down
        policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DmarcResult("fail", from_domain, policy, published,
                       "neither SPF nor DKIM passed aligned", record_domain)
