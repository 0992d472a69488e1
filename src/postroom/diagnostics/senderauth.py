"""``sender_records``: the DNS records that let other servers accept mail from one of our
domains (SPF, DKIM per ``[[dkim]]`` key, DMARC, and for the console MX), each compared
with what DNS answers through the configured nameservers.

Each record says ``found`` (right), ``missing``, ``different`` (published, but wrong:
SPF does not allow the sending address, DKIM's p= is another key's), or ``error`` (DNS
did not answer, or the key file cannot be read), with the exact record to publish and a
fix. Doctor's step 11 and the admin API's ``/api/domains/{domain}/records`` (the console's
domain page) both call it, so they say the same.

Who must the SPF record allow? The address mail leaves from: this server's own for a
route by MX (the source address of doctor's probe, else the addresses of ``hostname``),
or the smart host's when a smart host sends it on (:func:`sending_addresses`).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable
from typing import Any

from ..config import Config, Route
from ..dns import DnsError, Resolver
from ..mailauth import keys
from ..mailauth.spf import check_host
from .dns import _txt

__all__ = ["NOT_ON_THE_INTERNET", "outbound_route", "sender_records", "sending_addresses"]

# names that are never a sending domain on the Internet (RFC 6761, RFC 2606)
NOT_ON_THE_INTERNET = ("localhost", "localdomain", "invalid", "local", "internal")


async def spf_records(resolver: Resolver, domain: str) -> list[str] | DnsError:
    """The ``v=spf1`` TXT records of ``domain`` (an empty list: none published)."""
    found = await resolver.txt(domain)
    if isinstance(found, DnsError):
        return [] if found.permanent else found
    return [t for t in found if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


async def evaluate(resolver: Resolver, domain: str, ip: str) -> Any:
    """Would ``domain``'s SPF record allow mail from ``ip``? The inbound verifier's own
    evaluation (mailauth.spf, RFC 7208 with macros), as a receiver would run it for a
    message from ``postmaster@domain``."""
    return await check_host(resolver, ip, domain, f"postmaster@{domain}", domain)


def outbound_route(config: Config) -> Route | None:
    """The route mail to the Internet takes: the catch-all, else the first MX or smart
    host route; None when no mail leaves this server."""
    leaving = [r for r in config.routes if r.via in ("mx", "smarthost")]
    return next((r for r in leaving if r.match == "*"), leaving[0] if leaving else None)


async def sending_addresses(config: Config, resolver: Resolver, route: Route | None,
                            source: str | None = None) -> dict[str, Any]:
    """Where mail for the Internet leaves from, as receivers see it: ``{"via": "smarthost"
    | "us" | "none", "addresses": [...], "host": ..., "why": ...}``. ``source`` is the
    address a real connection used (doctor's probe), when there was one."""
    if route is None:
        return {"via": "none", "addresses": [], "host": "",
                "why": "no [[route]] sends mail to other domains"}
    if route.via == "smarthost":
        found = await resolver.addresses(route.host)
        addresses = [] if isinstance(found, DnsError) else list(found)
        return {"via": "smarthost", "addresses": addresses, "host": route.host,
                "why": f"the smart host {route.host} sends our mail on ({route.describe()}): "
                       "receivers see its address, so the SPF record must allow the smart "
                       "host, not this server"
                       + (f" ({found.describe()})" if isinstance(found, DnsError) else "")}
    if source:
        return {"via": "us", "addresses": [source], "host": config.hostname,
                "why": f"this server sends directly ({route.describe()}); its connection "
                       f"left from {source}"}
    found = await resolver.addresses(config.hostname)
    addresses = [] if isinstance(found, DnsError) else list(found)
    return {"via": "us", "addresses": addresses, "host": config.hostname,
            "why": f"this server sends directly ({route.describe()}); its address is taken "
                   f"from its hostname {config.hostname}"
                   + (f", which does not resolve ({found.describe()})"
                      if isinstance(found, DnsError) else "")}


def _record(kind: str, name: str, state: str, severity: str, finding: str, *,
            published: str | None = None, expected: str = "", fix: str = "",
            **more: Any) -> dict[str, Any]:
    return {"kind": kind, "name": name, "type": "MX" if kind == "mx" else "TXT",
            "state": state, "severity": severity, "finding": finding,
            "published": published, "expected": expected, "fix": fix, **more}


def _mechanism(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"ip4:{ip}" if ip.version == 4 else f"ip6:{ip}"


def _spf_with(published: str | None, mechanisms: list[str]) -> str:
    """The record to publish: the published one with the missing mechanisms added after
    ``v=spf1``, or a new one that allows only them."""
    if not published:
        return " ".join(["v=spf1", *mechanisms, "-all"])
    terms = published.split()
    return " ".join([terms[0], *mechanisms, *terms[1:]])


async def _spf(resolver: Resolver, domain: str,
               where: dict[str, Any] | Awaitable[dict[str, Any]]) -> dict[str, Any]:
    sending: dict[str, Any]
    if isinstance(where, dict):
        records, sending = await spf_records(resolver, domain), where
    else:                               # both at once: a dead nameserver costs one timeout
        records, sending = await asyncio.gather(spf_records(resolver, domain), where)
    addresses: list[str] = sending["addresses"]
    if isinstance(records, DnsError):
        return _record("spf", domain, "error", "warn",
                       f"the SPF record of {domain} could not be read: {records.describe()}",
                       fix="check [dns] nameservers (postroom dns " + domain + ")")
    published = records[0] if len(records) == 1 else None
    who = (f"the smart host {sending['host']}" if sending["via"] == "smarthost" else
           "this server")
    if not addresses:
        state = "found" if records else "missing"
        return _record("spf", domain, state, "warn" if records else "fail",
                       (f"{domain} publishes {published or records}; " if records else
                        f"{domain} publishes no SPF record; ")
                       + f"the address {who} sends from is unknown, so doctor cannot tell "
                         "whether it is allowed",
                       published=published, expected=published or "v=spf1 mx -all",
                       fix=f"publish a TXT record at {domain} that allows the address "
                           f"{who} sends from, e.g. v=spf1 ip4:ADDRESS -all")
    answers = await asyncio.gather(*(evaluate(resolver, domain, a) for a in addresses))
    refused = [(a, ans) for a, ans in zip(addresses, answers, strict=True)
               if ans.result != "pass"]
    private = [a for a in addresses if not ipaddress.ip_address(a).is_global]
    nat = (f" ({', '.join(private)} is not a public address: behind NAT, receivers see "
           "your public address, and that is the one SPF must list)"
           if private and sending["via"] == "us" else "")
    results = {a: ans.result for a, ans in zip(addresses, answers, strict=True)}
    if not refused:
        return _record("spf", domain, "found", "ok",
                       f"{published} allows {who} ({', '.join(addresses)}: pass, "
                       f"{answers[0].reason}){nat}", published=published,
                       expected=published or "", results=results)
    if any(ans.result == "temperror" for _, ans in refused):
        return _record("spf", domain, "error", "warn",
                       f"the SPF check of {domain} could not finish: {refused[0][1].reason}",
                       published=published, fix=f"check [dns] nameservers (postroom dns "
                       f"{domain})", results=results)
    missing = [_mechanism(a) for a, _ in refused]
    expected = _spf_with(published, missing)
    smart = (" If your provider documents an include: for its relay (such as "
             "include:_spf.PROVIDER), that does the same." if sending["via"] == "smarthost"
             else "")
    if not records:
        return _record("spf", domain, "missing", "fail",
                       f"{domain} publishes no SPF record, so receivers cannot tell that "
                       f"{who} ({', '.join(addresses)}) may send its mail{nat}",
                       expected=expected, results=results,
                       fix=f"publish a TXT record at {domain}: {expected}.{smart}")
    first = refused[0][1]
    return _record("spf", domain, "different", "fail",
                   f"{published or '; '.join(records)} does not allow {who} "
                   f"({', '.join(a for a, _ in refused)}: {first.result}, {first.reason})"
                   f"{nat}", published=published or "; ".join(records), expected=expected,
                   results=results,
                   fix=f"change the TXT record at {domain} to: {expected}" + (
                       " (one SPF record only: remove the others)" if len(records) > 1
                       else "") + f".{smart}")


def _tags(record: str) -> dict[str, str]:
    out = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            out[name.strip().lower()] = "".join(value.split())
    return out


async def _dkim(config: Config, resolver: Resolver, domain: str) -> list[dict[str, Any]]:
    configured = [k for k in config.dkim if k.domain.lower().rstrip(".") == domain]
    if not configured:
        return [_record("dkim", f"SELECTOR._domainkey.{domain}", "missing", "warn",
                        f"no [[dkim]] key signs mail from {domain}, so it leaves unsigned: "
                        "DMARC then rests on SPF alone, and forwarding breaks it",
                        fix=f"make a key with postroom dkim keygen {domain}, add the "
                            "[[dkim]] table it prints, and publish the record it prints")]

    async def one(k: Any) -> dict[str, Any]:
        name = k.record_name
        try:
            key = keys.load(k.key_file)
        except keys.KeyError_ as exc:
            return _record("dkim", name, "error", "fail", f"the key of selector "
                           f"{k.selector} cannot be used: {exc}", fix=str(exc),
                           selector=k.selector)
        expected = keys.txt_record(key)
        found = await resolver.query(name, "TXT")
        if isinstance(found, DnsError) and not found.permanent:
            return _record("dkim", name, "error", "warn", f"{name} could not be read: "
                           f"{found.describe()}", expected=expected, selector=k.selector,
                           fix=f"check [dns] nameservers (postroom dns {domain})")
        texts = [] if isinstance(found, DnsError) else [
            t for t in _txt(found) if "p=" in t.replace(" ", "")]
        if not texts:
            return _record("dkim", name, "missing", "fail",
                           f"no DKIM record at {name}: receivers cannot check the "
                           f"signatures of selector {k.selector}", expected=expected,
                           selector=k.selector,
                           fix=f"publish a TXT record at {name}: {expected}")
        want = keys.public_p(key)
        have = [_tags(t).get("p", "") for t in texts]
        if want in have:
            return _record("dkim", name, "found", "ok", f"{name} publishes the public key "
                           f"of {k.key_file} ({keys.algorithm_of(key)})", published=texts[0],
                           expected=expected, selector=k.selector)
        why = ("an empty p= (the key is revoked)" if have == [""] else
               "the public key of another key, not of " + str(k.key_file))
        return _record("dkim", name, "different", "fail",
                       f"{name} publishes {why}: signatures made with this key fail",
                       published=texts[0], expected=expected, selector=k.selector,
                       fix=f"replace the TXT record at {name} with: {expected}")
    return list(await asyncio.gather(*(one(k) for k in configured)))


async def _dmarc(resolver: Resolver, domain: str) -> dict[str, Any]:
    labels = domain.split(".")
    names = [f"_dmarc.{domain}"] + ([f"_dmarc.{'.'.join(labels[1:])}"]
                                    if len(labels) > 2 else [])
    expected = f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"
    for name in names:
        found = await resolver.query(name, "TXT")
        if isinstance(found, DnsError):
            if found.permanent:
                continue
            return _record("dmarc", names[0], "error", "warn", f"{name} could not be read: "
                           f"{found.describe()}", expected=expected,
                           fix=f"check [dns] nameservers (postroom dns {domain})")
        records = [t for t in _txt(found) if t.replace(" ", "").lower().startswith("v=dmarc1")]
        if not records:
            continue
        if len(records) > 1:
            return _record("dmarc", name, "different", "fail",
                           f"{name} publishes {len(records)} DMARC records; receivers "
                           "ignore them all (RFC 7489 6.6.3)", published="; ".join(records),
                           expected=expected, fix=f"keep one TXT record at {name}")
        policy = _tags(records[0]).get("p", "")
        inherited = f" (inherited from {name[7:]})" if name != names[0] else ""
        what = {"none": "receivers only report failures",
                "quarantine": "receivers put failing mail in spam",
                "reject": "receivers refuse failing mail"}.get(policy.lower(),
                                                               "an unknown policy")
        return _record("dmarc", name, "found", "ok",
                       f"{name} publishes {records[0]}{inherited}: p={policy}, {what}",
                       published=records[0], expected=records[0], policy=policy)
    return _record("dmarc", names[0], "missing", "fail",
                   f"no DMARC record at {' or '.join(names)}: large providers refuse or "
                   "junk mail from domains without one", expected=expected,
                   fix=f"publish a TXT record at {names[0]}: {expected} (p=none only asks "
                       "for reports; raise it to quarantine or reject once they show only "
                       "your own servers)")


async def _mx(config: Config, resolver: Resolver, domain: str) -> dict[str, Any]:
    expected = f"10 {config.hostname}."
    found = await resolver.mx(domain)
    if found.error is not None and not found.error.permanent:
        return _record("mx", domain, "error", "warn", found.error.describe(),
                       expected=expected, fix=f"check [dns] nameservers (postroom dns {domain})")
    hosts = [h.name for h in found.hosts if not found.implicit]
    published = ", ".join(f"{h.preference} {h.name}." for h in found.hosts
                          if not found.implicit) or None
    if config.hostname.lower() in hosts:
        return _record("mx", domain, "found", "ok", f"{domain}'s MX names {config.hostname}",
                       published=published, expected=expected)
    if not hosts:
        return _record("mx", domain, "missing", "warn",
                       f"{domain} has no MX record: mail for it may not reach this server",
                       expected=expected, fix=f"publish an MX record for {domain}: {expected}")
    return _record("mx", domain, "different", "warn",
                   f"{domain}'s MX names {', '.join(hosts)}, not this server "
                   f"({config.hostname})", published=published, expected=expected,
                   fix=f"if this server should receive mail for {domain}, publish an MX "
                       f"record for it: {expected}")


async def sender_records(config: Config, resolver: Resolver, domain: str,
                         sending: dict[str, Any] | Awaitable[dict[str, Any]], *,
                         mx: bool = False) -> dict[str, Any]:
    """Every record a sending domain needs, compared with DNS; ``sending`` is
    :func:`sending_addresses`'s answer, or its coroutine: the lookups that do not need it
    run meanwhile, so a dead nameserver costs one timeout, not one per lookup in a row.
    The status is ``fail`` when a record is missing or wrong, ``warn`` when one could not
    be checked (or no DKIM key is configured)."""
    domain = domain.lower().rstrip(".")
    known: dict[str, Any] = {}

    async def spf() -> dict[str, Any]:
        async def remembered() -> dict[str, Any]:
            known.update(sending if isinstance(sending, dict) else await sending)
            return known
        return await _spf(resolver, domain, remembered())

    async def no_mx() -> None:
        return None

    found_spf, found_dkim, found_dmarc, found_mx = await asyncio.gather(
        spf(), _dkim(config, resolver, domain), _dmarc(resolver, domain),
        _mx(config, resolver, domain) if mx else no_mx())
    records: list[dict[str, Any]] = [found_spf, *found_dkim, found_dmarc]
    if found_mx is not None:
        records.append(found_mx)
    severities = {r["severity"] for r in records}
    status = "fail" if "fail" in severities else ("warn" if "warn" in severities else "ok")
    bad = [r for r in records if r["severity"] != "ok"]
    summary = ("SPF, DKIM and DMARC records are right" if not bad else
               "; ".join(f"{r['kind'].upper()} {r['state']} ({r['name']})" for r in bad))
    return {"domain": domain, "sending": known, "records": records, "status": status,
            "summary": summary}
