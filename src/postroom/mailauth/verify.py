"""Inbound verification: SPF, DKIM, DMARC and ARC for one message, and what to do.

:class:`Verifier` is what the SMTP server calls at the end of DATA for mail from the
Internet (the MX listener, a client that is neither authenticated nor in a trusted
network). It returns a :class:`Verification`: the Authentication-Results field to
prepend, the action (``accept``, ``quarantine``, ``reject``, ``defer``) with its reply,
and a summary for the event log and counters. docs/verification.md is the
administrator's view.

Invariants:

- Every lookup goes through the injected resolver (the configured nameservers), and
  the whole verification of one message takes at most ``dns_timeout`` seconds of DNS:
  a check still waiting then is ``temperror``. Nothing here raises for bad input: a
  malformed signature or record is ``permerror``, with a reason.
- A ``temperror`` never leads to a permanent refusal: it is accepted and tagged, or
  (``on_temperror = "defer"``) answered 451 when its check's policy would act.
- DKIM and ARC keys are fetched asynchronously first, then dkimpy verifies with those
  answers (synchronously: in a worker thread for a message over
  :data:`INLINE_LIMIT`, so that hashing a big body never stalls other sessions).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import dkim
from dkim.util import parse_tag_value

from .. import replies
from ..dns import DnsError, DnsErrorKind
from ..model import Reply
from . import dmarc as dmarc_mod
from . import spf as spf_mod
from .authres import Method, from_domains, header_fields, render

__all__ = ["DkimResult", "Verification", "VerifySettings", "Verifier"]

log = logging.getLogger("postroom.mailauth")

INLINE_LIMIT = 256 * 1024       # larger messages are verified in a worker thread
MAX_SIGNATURES = 8              # DKIM signatures verified per message; the rest ignored
MAX_ARC_SETS = 50               # RFC 8617 §4.2.1
_SELECTOR = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,250})\Z")
T = TypeVar("T")


class Resolver(Protocol):
    async def txt(self, name: str) -> list[str] | DnsError: ...
    async def query(self, name: str, rdtype: str) -> list[str] | DnsError: ...


@dataclass(frozen=True, slots=True)
class VerifySettings:
    """The ``[verify]`` section, as the verifier needs it (see config.schema)."""

    authserv_id: str
    spf: str = "tag"
    dkim: str = "tag"
    dmarc: str = "reject"
    arc: str = "tag"
    dns_timeout: float = 5.0
    on_temperror: str = "accept"
    dkim_max_size: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str                  # pass, fail, neutral, temperror, permerror
    domain: str = ""             # d=
    selector: str = ""           # s=
    algorithm: str = ""          # a=
    b: str = ""                  # the first 8 characters of b= (RFC 6008)
    reason: str = ""


@dataclass(slots=True)
class Verification:
    """What verification found and decided for one message."""

    header: bytes
    action: str = "accept"                  # accept | quarantine | reject | defer
    reply: Reply | None = None              # for reject and defer
    reason: str = ""                        # why the action, in words
    results: dict[str, str] = field(default_factory=dict)   # method → result, for counters
    spf: spf_mod.SpfResult | None = None
    helo: spf_mod.SpfResult | None = None
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: dmarc_mod.DmarcResult | None = None
    arc: str = "none"
    elapsed: float = 0.0

    def summary(self) -> str:
        """One line for the log and the event: ``spf=pass dkim=pass dmarc=pass ...``."""
        return " ".join(f"{k}={v}" for k, v in self.results.items())


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return parse_tag_value(value)    # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - dkimpy raises several types for hostile input
        return None


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    """``s._domainkey.d`` when s= and d= look like DNS names, else None."""
    try:
        s = tags[b"s"].decode("ascii").strip()
        d = tags[b"d"].decode("ascii").strip().rstrip(".")
    except (KeyError, UnicodeDecodeError):
        return None
    if not _SELECTOR.match(s) or not spf_mod._valid_domain(d.lower()):
        return None
    name = f"{s}._domainkey.{d}".lower()
    return name if len(name) <= 253 else None


class _Keys:
    """Key records fetched ahead, served to dkimpy's synchronous ``dnsfunc``."""

    def __init__(self) -> None:
        self.found: dict[str, str | None | DnsError] = {}

    async def fetch(self, resolver: Resolver, names: Sequence[str]) -> None:
        names = [n for n in dict.fromkeys(names) if n not in self.found]
        results = await asyncio.gather(*(resolver.txt(n) for n in names))
        for name, got in zip(names, results, strict=True):
            if isinstance(got, DnsError):
                self.found[name] = None if got.permanent else got
            else:
                self.found[name] = got[0] if got else None

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        key = name.decode("ascii", "replace").rstrip(".").lower()
        got = self.found.get(key)
        if isinstance(got, str):
            return got.encode("latin-1")
        return None

    def temporary(self, name: str | None) -> DnsError | None:
        got = self.found.get(name or "") if name else None
        return got if isinstance(got, DnsError) else None

    def missing(self, name: str | None) -> bool:
        return name is not None and name in self.found and self.found[name] is None


def _verify_dkim_sync(message: bytes, sigs: list[tuple[dict[bytes, bytes] | None, str | None]],
                      keys: _Keys) -> list[DkimResult]:
    results = []
    try:
        d = dkim.DKIM(message, minkey=1024)
    except Exception as exc:  # noqa: BLE001 - a message dkimpy cannot parse at all
        return [DkimResult("permerror", reason=f"message not parseable: {type(exc).__name__}")
                for _ in sigs]
    for idx, (tags, name) in enumerate(sigs):
        dom = sel = alg = b = ""
        if tags is not None:
            dom = tags.get(b"d", b"").decode("ascii", "replace")[:253]
            sel = tags.get(b"s", b"").decode("ascii", "replace")[:253]
            alg = tags.get(b"a", b"").decode("ascii", "replace")[:30]
            b = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]

        def done(result: str, reason: str = "", dom: str = dom, sel: str = sel,
                 alg: str = alg, b: str = b) -> None:
            results.append(DkimResult(result, dom, sel, alg, b, reason))

        if tags is None:
            done("permerror", "malformed DKIM-Signature tag list")
            continue
        if name is None:
            done("permerror", "bad d= or s=")
            continue
        temporary = keys.temporary(name)
        if temporary is not None:
            done("temperror", f"key {name}: {temporary.describe()}")
            continue
        if keys.missing(name):
            done("permerror", f"no key published at {name}")
            continue
        try:
            ok = d.verify(idx=idx, dnsfunc=keys.dnsfunc)
        except dkim.ValidationError as exc:
            text = str(exc)
            done("fail" if "body hash mismatch" in text else "permerror", text[:120])
            continue
        except dkim.KeyFormatError as exc:
            done("permerror", f"key {name}: {str(exc)[:100]}")
            continue
        except dkim.DKIMException as exc:
            done("permerror", str(exc)[:120])
            continue
        except Exception as exc:  # noqa: BLE001 - hostile input must not crash a session
            done("permerror", f"malformed signature ({type(exc).__name__})")
            continue
        done("pass" if ok else "fail", "" if ok else "signature did not verify")
    return results


def _verify_arc_sync(message: bytes, keys: _Keys, names: list[str]) -> tuple[str, str]:
    """(arc result, the chain's cv or a reason)."""
    try:
        cv, _, reason = dkim.ARC(message, minkey=1024).verify(dnsfunc=keys.dnsfunc)
    except Exception as exc:  # noqa: BLE001 - hostile input
        return "fail", f"malformed ARC set ({type(exc).__name__})"
    if cv == dkim.CV_Pass:
        return "pass", "cv=pass"
    if cv == dkim.CV_None:
        return "none", "no ARC sets"
    for name in names:
        if keys.temporary(name) is not None:
            return "temperror", f"key {name} could not be fetched"
    text = reason if isinstance(reason, str) else str(reason)
    return "fail", f"cv=fail: {text[:120]}"


class Verifier:
    """Verifies inbound messages with one resolver and one settings snapshot."""

    def __init__(self, resolver: Resolver, settings: VerifySettings,
                 executor: Executor | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolver = resolver
        self.settings = settings
        self.executor = executor
        self.clock = clock

    async def _bounded(self, work: Awaitable[T], deadline: float, late: T) -> T:
        remaining = deadline - self.clock()
        try:
            return await asyncio.wait_for(work, timeout=max(0.001, remaining))
        except TimeoutError:
            return late

    async def _off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        if size <= INLINE_LIMIT:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def verify(self, message: bytes | None, *, ip: str, helo: str | None, sender: str,
                     head: bytes | None = None) -> Verification:
        """Check one message. ``message`` is the whole message as received (CRLF), or
        None when it is too big to verify DKIM and ARC (``head`` is then its start);
        ``sender`` is the MAIL FROM address ("" for the null sender)."""
        started = self.clock()
        cfg = self.settings
        deadline = started + cfg.dns_timeout
        helo_name = (helo or "").strip().rstrip(".").lower()
        helo_domain = helo_name if helo_name and not helo_name.startswith("[") else ""
        fields = header_fields(message if message is not None else (head or b""))
        timed_out = "the DNS time limit ([verify] dns_timeout) ran out"

        async def spf_check(domain: str, who: str) -> spf_mod.SpfResult:
            late = spf_mod.SpfResult("temperror", domain, timed_out)
            return await self._bounded(
                spf_mod.check_host(self.resolver, ip, domain, who, helo_domain or "unknown"),
                deadline, late)

        jobs: dict[str, asyncio.Future[Any]] = {}
        if cfg.spf != "none":
            if helo_domain:
                jobs["helo"] = asyncio.ensure_future(
                    spf_check(helo_domain, f"postmaster@{helo_domain}"))
            if sender:
                jobs["mailfrom"] = asyncio.ensure_future(
                    spf_check(sender.rpartition("@")[2].lower(), sender))
        sigs: list[tuple[dict[bytes, bytes] | None, str | None]] = []
        keys = _Keys()
        key_names: list[str] = []
        arc_names: list[str] = []
        arc_sets = 0
        if message is not None:
            if cfg.dkim != "none" or cfg.dmarc != "none":
                for name, value, _ in fields:
                    if name.lower() == b"dkim-signature" and len(sigs) < MAX_SIGNATURES:
                        tags = _tags(value)
                        sigs.append((tags, _key_name(tags) if tags else None))
                key_names = [n for _, n in sigs if n]
            if cfg.arc != "none":
                for name, value, _ in fields:
                    low = name.lower()
                    if low == b"arc-seal":
                        arc_sets += 1
                    if low in (b"arc-seal", b"arc-message-signature"):
                        tags = _tags(value)
                        kn = _key_name(tags) if tags else None
                        if kn:
                            arc_names.append(kn)
            names = key_names + (arc_names if 0 < arc_sets <= MAX_ARC_SETS else [])
            if names:
                jobs["keys"] = asyncio.ensure_future(
                    self._bounded(keys.fetch(self.resolver, names[:2 * MAX_SIGNATURES + 10]),
                                  deadline, None))
        if jobs:
            await asyncio.gather(*jobs.values())
        for key_name in key_names + arc_names:
            if key_name not in keys.found:
                keys.found[key_name] = DnsError(DnsErrorKind.TIMEOUT, key_name, timed_out)

        v = Verification(b"")
        methods: list[Method] = []
        helo_res: spf_mod.SpfResult | None = jobs["helo"].result() if "helo" in jobs else None
        mail_res: spf_mod.SpfResult | None = \
            jobs["mailfrom"].result() if "mailfrom" in jobs else None
        if cfg.spf != "none":
            if mail_res is None and helo_res is not None:
                mail_res = helo_res             # the null sender: the HELO identity
            if mail_res is not None:
                who = sender or f"postmaster@{helo_domain}"
                methods.append(Method("spf", mail_res.result, props=(
                    ("smtp.mailfrom", who),), comment=mail_res.reason))
            if helo_res is not None and sender:
                methods.append(Method("spf", helo_res.result, props=(
                    ("smtp.helo", helo_domain),), comment=helo_res.reason))
            if mail_res is None and helo_res is None:
                methods.append(Method("spf", "none", comment="no HELO domain and no sender"))
            v.results["spf"] = mail_res.result if mail_res else "none"
        v.spf, v.helo = mail_res, helo_res

        size = len(message) if message is not None else 0
        if message is not None and sigs:
            v.dkim = await self._off_loop(size, _verify_dkim_sync, message, sigs, keys)
        if cfg.dkim != "none" or cfg.dmarc != "none":
            if message is None:
                methods.append(Method("dkim", "neutral", comment="message too big to verify "
                                      "([verify] dkim_max_size)"))
                v.results["dkim"] = "neutral"
            elif not v.dkim:
                methods.append(Method("dkim", "none"))
                v.results["dkim"] = "none"
            else:
                for r in v.dkim:
                    props = tuple((k, val) for k, val in (
                        ("header.d", r.domain), ("header.s", r.selector),
                        ("header.a", r.algorithm), ("header.b", r.b)) if val)
                    methods.append(Method("dkim", r.result, props=props, comment=r.reason))
                order = ("pass", "fail", "permerror", "temperror", "neutral")
                v.results["dkim"] = next(o for o in order if any(r.result == o for r in v.dkim))

        if cfg.dmarc != "none":
            v.dmarc = await self._dmarc(fields, mail_res, v.dkim, message is None, deadline,
                                        timed_out)
            d = v.dmarc
            dprops: list[tuple[str, str]] = [("header.from", d.domain)] if d.domain else []
            if d.published:
                dprops.append(("policy.dmarc", d.policy))
            methods.append(Method("dmarc", d.result, props=tuple(dprops),
                                  comment=(f"p={d.published} " if d.published else "")
                                  + d.reason))
            v.results["dmarc"] = d.result

        if cfg.arc != "none":
            if arc_sets == 0:
                v.arc, why = "none", ""
            elif message is None:
                v.arc, why = "none", "message too big to verify"
            elif arc_sets > MAX_ARC_SETS:
                v.arc, why = "fail", f"more than {MAX_ARC_SETS} ARC sets"
            else:
                v.arc, why = await self._off_loop(size, _verify_arc_sync, message, keys,
                                                  arc_names)
            methods.append(Method("arc", v.arc, comment=why))
            v.results["arc"] = v.arc

        v.header = render(cfg.authserv_id, methods)
        self._decide(v, sender, helo_domain, ip)
        v.elapsed = self.clock() - started
        return v

    async def _dmarc(self, fields: list[tuple[bytes, bytes, int]],
                     spf: spf_mod.SpfResult | None, dkims: list[DkimResult], too_big: bool,
                     deadline: float, timed_out: str) -> dmarc_mod.DmarcResult:
        domains = from_domains(fields)
        unique = set(domains)
        if len(unique) != 1 or not domains[0]:
            why = "no From: address" if not domains else \
                "more than one From: domain" if len(unique) > 1 else "From: has no domain"
            return dmarc_mod.DmarcResult("permerror", "", reason=why)
        spf_pair = (spf.result, spf.domain) if spf is not None else None
        dk = [(r.result, r.domain) for r in dkims]
        if too_big:
            dk.append(("temperror", domains[0]))   # unknown: never a reject on it
        late = dmarc_mod.DmarcResult("temperror", domains[0], reason=timed_out)
        return await self._bounded(
            dmarc_mod.evaluate(self.resolver, domains[0], spf_pair, dk), deadline, late)

    def _decide(self, v: Verification, sender: str, helo: str, ip: str) -> None:
        """The action: the strongest that a check's policy asks for."""
        cfg = self.settings
        wants: list[tuple[str, str, str]] = []          # (action, check, why)
        temporary: list[str] = []
        spf = v.spf
        if spf is not None and cfg.spf in ("quarantine", "reject"):
            if spf.result == "fail":
                who = f"<{sender}>" if sender else f"HELO {helo}"
                wants.append((cfg.spf, "SPF", f"SPF of {spf.domain} does not allow {ip} to "
                              f"send for {who}"))
            elif spf.result == "temperror":
                temporary.append("SPF")
        if v.dkim and cfg.dkim in ("quarantine", "reject") \
                and not any(r.result == "pass" for r in v.dkim):
            if any(r.result in ("fail", "permerror") for r in v.dkim):
                bad = next(r for r in v.dkim if r.result in ("fail", "permerror"))
                wants.append((cfg.dkim, "DKIM", f"no valid DKIM signature (d={bad.domain or '?'}"
                              f": {bad.reason or bad.result})"))
            elif any(r.result == "temperror" for r in v.dkim):
                temporary.append("DKIM")
        d = v.dmarc
        if d is not None and cfg.dmarc in ("quarantine", "reject"):
            if d.result == "fail" and d.policy in ("quarantine", "reject"):
                action = "quarantine" if cfg.dmarc == "quarantine" else d.policy
                wants.append((action, "DMARC", f"DMARC policy of {d.domain} is {d.published} "
                              "and neither SPF nor DKIM passed aligned"))
            elif d.result == "temperror":
                temporary.append("DMARC")
        if v.arc == "fail" and cfg.arc in ("quarantine", "reject"):
            wants.append((cfg.arc, "ARC", "the ARC chain did not validate"))
        for action in ("reject", "quarantine"):
            for wanted, _check, why in wants:
                if wanted == action:
                    v.action, v.reason = action, why
                    if action == "reject":
                        v.reply = replies.auth_rejected(why)
                    return
        if temporary and cfg.on_temperror == "defer":
            v.action = "defer"
            v.reason = f"{', '.join(temporary)} could not be checked (DNS)"
            v.reply = replies.auth_deferred(v.reason)

