"""``dns_report`` (NSLookup): MX, implicit or null MX, and SPF, DMARC and MTA-STS, with
the configured nameservers; and the JSON form of MX answers and DNS errors that
``explain`` and ``doctor`` share."""

from __future__ import annotations

import asyncio
from typing import Any

from ..dns import DnsError, MxResult, Resolver

__all__ = ["dns_report", "error_json", "mx_json"]


def error_json(err: DnsError | None) -> dict[str, Any] | None:
    if err is None:
        return None
    return {"kind": err.kind.value, "name": err.name, "detail": err.detail,
            "text": err.describe()}


def mx_json(mx: MxResult) -> dict[str, Any]:
    return {"domain": mx.domain, "implicit": mx.implicit, "null_mx": mx.null_mx,
            "error": error_json(mx.error),
            "mx": [{"preference": h.preference, "host": h.name, "addresses": list(h.addresses),
                    "error": error_json(h.error)} for h in mx.hosts]}


def _txt(records: list[str]) -> list[str]:
    """TXT records as dnspython renders them ('"v=spf1" " -all"'), joined."""
    out = []
    for record in records:
        parts = [p[1:-1] if p.startswith('"') and p.endswith('"') else p
                 for p in record.split('" "')]
        out.append("".join(parts).strip('"'))
    return out


async def dns_report(resolver: Resolver, domain: str) -> dict[str, Any]:
    """MX (with addresses), implicit or null MX, and SPF, DMARC and MTA-STS presence."""
    mx = await resolver.mx(domain)
    out = mx_json(mx)

    async def policy(name: str, prefix: str) -> dict[str, Any]:
        found = await resolver.query(name, "TXT")
        if isinstance(found, DnsError):
            missing = found.permanent
            return {"present": False, "record": None,
                    "error": None if missing else error_json(found)}
        records = [t for t in _txt(found) if t.lower().startswith(prefix)]
        return {"present": bool(records), "record": records[0] if records else None,
                "error": None}

    spf, dmarc, sts = await asyncio.gather(
        policy(mx.domain, "v=spf1"), policy(f"_dmarc.{mx.domain}", "v=dmarc1"),
        policy(f"_mta-sts.{mx.domain}", "v=stsv1"))
    out.update(spf=spf, dmarc=dmarc, mta_sts=sts)
    if mx.null_mx:
        out["summary"] = f"{mx.domain} accepts no mail (null MX, RFC 7505)"
    elif mx.error is not None:
        out["summary"] = mx.error.describe()
    elif mx.implicit:
        out["summary"] = (f"{mx.domain} has no MX record; mail goes to the domain's own "
                          f"address (implicit MX): {', '.join(mx.hosts[0].addresses)}")
    else:
        usable = [h for h in mx.hosts if h.addresses]
        out["summary"] = (f"{len(mx.hosts)} MX hosts, {len(usable)} with addresses"
                          if usable else "no MX host has an address")
    return out
