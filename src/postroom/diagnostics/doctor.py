"""``doctor``: the seed article's nine steps against the running server and its next hops,
a tenth for the store (the mailboxes users read over IMAP), and an eleventh for the
sender's DNS records (SPF, DKIM, DMARC) that other servers check before they accept.

One function per step, each taking the run's :class:`Context` and returning its step;
``doctor`` runs them in order, hands each to ``progress`` as it completes, and names the
verdict (:func:`name_verdict`): never ``ok`` while a step fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..dns import Resolver
from .dns import mx_json
from .explain import explain
from .probe import probe
from .senderauth import NOT_ON_THE_INTERNET, outbound_route, sender_records, sending_addresses

__all__ = ["VERDICTS", "Context", "doctor", "name_verdict"]

VERDICTS = ("ok", "service-down", "no-route", "client-relay-denied", "nexthop-relay-denied",
            "nexthop-auth-required", "nexthop-auth-failed", "nexthop-unreachable",
            "nexthop-tls-failed", "dns-nxdomain", "dns-no-address", "dns-failure", "null-mx",
            "nexthop-auth-policy", "nexthop-refused-message", "test-message-failed",
            "queue-stuck", "sender-auth-missing", "open-relay", "store-failed", "step-failed")
# which failing step decides, first to last: the cause before its symptoms. Step 5 (the
# test message) comes after the probe: a refusal at RCPT is the cause of its failure;
# a refusal after DATA is seen only there. A refusal for sender authentication names
# what happened; step 11 then names the record.
_PRECEDENCE = (1, 2, 6, 7, 5, 4, 11, 9, 10)
_PROBE_VERDICT = {"relay-denied": "nexthop-relay-denied", "auth-required":
                  "nexthop-auth-required", "auth-failed": "nexthop-auth-failed",
                  "unreachable": "nexthop-unreachable", "tls-failed": "nexthop-tls-failed",
                  "refused": "nexthop-relay-denied"}


class _Steps(list[dict[str, Any]]):
    """The steps so far; tells ``progress`` of each one as it is added."""

    def __init__(self, progress: Callable[[dict[str, Any]], None] | None) -> None:
        super().__init__()
        self.progress = progress

    def append(self, step: dict[str, Any]) -> None:
        super().append(step)
        if self.progress is not None:
            self.progress({k: v for k, v in step.items() if k != "verdict"})


def _step(n: int, name: str, status: str, finding: str, detail: Any = None, fix: str = "",
          verdict: str = "") -> dict[str, Any]:
    return {"step": n, "name": name, "status": status, "finding": finding, "detail": detail,
            "fix": fix, "verdict": verdict}


@dataclass
class NextHop:
    """What step 6 found for step 7 to probe."""

    target: tuple[str, int] | None          # None: no address to connect to
    username: str | None
    password: str | None
    tls_required: bool
    name: str                               # as delivery names it


@dataclass
class Context:
    """One doctor run: its inputs, and what earlier steps found for later ones."""

    config: Config
    resolver: Resolver
    mailbox_exists: Callable[[str], bool]
    fetch: Callable[[str], Any]
    sender: str
    rcpt: str | None
    client_ip: str
    auth_user: str | None
    stuck_after: float
    submit: Callable[[str, str, bytes], Any] | None
    follow_for: float
    server_up: bool = False                     # step 1: the admin API answered
    explained: dict[str, Any] | None = None     # step 2: explain() for rcpt
    next_hop: NextHop | None = None             # step 6: the next hop to probe
    dns_failed: bool = False                    # step 6 failed
    hop_verdict: str = ""                       # step 7: the probe's verdict, if it failed
    probe_source: str | None = None             # step 7: the address our connection used
    test_verdict: str = ""                      # step 5: the test message's, if it failed
    sender_given: bool = False                  # --from was given: step 11 always runs


async def doctor(config: Config, resolver: Resolver, mailbox_exists: Callable[[str], bool],
                 fetch: Callable[[str], Any], *, rcpt: str | None = None,
                 sender: str | None = None, client_ip: str = "127.0.0.1",
                 auth_user: str | None = None, stuck_after: float = 3600.0,
                 submit: Callable[[str, str, bytes], Any] | None = None,
                 follow_for: float = 30.0,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The seed article's nine steps against the running server and its next hops.

    ``fetch(path)`` calls the admin API (an awaitable of its JSON, or raises OSError when
    the server cannot be reached). With ``submit(sender, rcpt, data)`` (an awaitable of
    the API's answer), step 5 sends a real test message and follows it for up to
    ``follow_for`` seconds. Each step is ok, warn, fail or skip; the verdict is
    the first failing step's, in the order cause before symptom (_PRECEDENCE).
    ``progress(step)`` hears each step as it completes (the console shows them so).
    """
    ctx = Context(config, resolver, mailbox_exists, fetch,
                  sender or f"postmaster@{config.local_domains[0]}", rcpt, client_ip,
                  auth_user, stuck_after, submit, follow_for, sender_given=bool(sender))
    steps: list[dict[str, Any]] = _Steps(progress)
    for run in STEPS:
        steps.append(await run(ctx))
    verdict = name_verdict(steps)
    for s in steps:
        del s["verdict"]
    return {"verdict": verdict, "steps": steps}


def name_verdict(steps: list[dict[str, Any]]) -> str:
    """The run's verdict: the first failing step's, in the order of _PRECEDENCE (cause
    before symptom). Never ``ok`` while a step fails: a failing step that names no cause
    of its own (none should) gives ``step-failed``."""
    for n in _PRECEDENCE:
        hit = next((s for s in steps if s["step"] == n and s["verdict"]), None)
        if hit is not None:
            return str(hit["verdict"])
    if any(s["status"] == "fail" for s in steps):
        return next((str(s["verdict"]) for s in steps if s["status"] == "fail"
                     and s["verdict"]), "step-failed")
    return "ok"


async def step1_services(ctx: Context) -> dict[str, Any]:
    """1. services: every component running?"""
    try:
        status = await ctx.fetch("/api/status")
        down = [c for c in status["components"] if c["state"] not in ("running", "disabled")]
        step = _step(1, "services", "fail" if down else "ok",
                     f"stopped: {', '.join(c['name'] for c in down)}" if down else
                     "every component is running", status["components"],
                     " && ".join(c.get("fix") or f"postroom start {c['name']}"
                                 for c in down),
                     "service-down" if down else "")
    except (OSError, ValueError) as exc:
        ctx.server_up = False
        return _step(1, "services", "fail", f"the server does not answer: {exc}", None,
                     "start it: postroom serve (check postroom.log for why it stopped)",
                     "service-down")
    ctx.server_up = True
    return step


async def step2_address_space(ctx: Context) -> dict[str, Any]:
    """2. address space (and, with a client address, the relay decision)."""
    config = ctx.config
    has_catch_all = any(r.match == "*" for r in config.routes)
    if not ctx.rcpt:
        return _step(2, "address space", "ok" if has_catch_all else "warn",
                     "a catch-all route exists" if has_catch_all else
                     "no [[route]] with match = \"*\"", [r.match for r in config.routes],
                     "" if has_catch_all else "add [[route]] match = \"*\"")
    explained = ctx.explained = await explain(
        config, ctx.resolver, ctx.mailbox_exists, sender=ctx.sender, rcpt=ctx.rcpt,
        client_ip=ctx.client_ip, auth_user=ctx.auth_user)
    r = explained["rcpt"]
    if not r["accept"] and "5.7.1" in r["reply"]:
        return _step(2, "address space", "fail", f"{r['reply']} ({r['reason']})",
                     explained, r["fix"], "client-relay-denied")
    if not explained["routing"]["local"] and not explained["next_hops"]:
        return _step(2, "address space", "fail",
                     f"no address space covers {explained['routing']['domain']}",
                     explained, "add a [[route]] for it, or a catch-all "
                     "match = \"*\" (via = \"mx\" or a smart host)", "no-route")
    return _step(2, "address space", "ok" if has_catch_all else "warn",
                 explained["routing"]["reason"], explained,
                 "" if has_catch_all else "no catch-all [[route]] match = \"*\": "
                 "mail for other domains has no route")


async def step3_logging(ctx: Context) -> dict[str, Any]:
    """3. diagnostic logging and recent errors."""
    if not ctx.server_up:
        return _step(3, "logging", "skip", "the server does not answer")
    levels = await ctx.fetch("/api/logging")
    errors = (await ctx.fetch("/api/events?severity=error&since=1h"))["events"]
    return _step(3, "logging", "warn" if errors else "ok",
                 f"{len(errors)} errors in the last hour" if errors else
                 "no errors in the event log in the last hour",
                 {"levels": levels, "errors": errors[-10:]},
                 "read them: postroom events --severity error --since 1h"
                 if errors else "")


async def step4_queues(ctx: Context) -> dict[str, Any]:
    """4. the four queues: is any stuck, and for what reason?"""
    if not ctx.server_up:
        return _step(4, "queues", "skip", "the server does not answer")
    stuck_after = ctx.stuck_after
    queues = (await ctx.fetch("/api/queues"))["queues"]
    reasons = (await ctx.fetch("/api/queues/reasons"))["reasons"]
    stuck = [q for q in queues if q["oldest_age_seconds"] is not None
             and q["oldest_age_seconds"] > stuck_after]
    top = reasons[0] if reasons else None
    return _step(
        4, "queues", "fail" if stuck else "ok",
        (f"{', '.join(q['name'] for q in stuck)}: mail older than "
         f"{int(stuck_after)}s" + (f"; the biggest reason: {top['reply']} via {top['hop']}"
                                   if top else "")) if stuck else
        f"{sum(q['messages'] for q in queues)} messages queued, none stuck",
        {"queues": queues, "reasons": reasons[:5]},
        "postroom queue reasons shows why; fix the cause, then postroom queue retry "
        "--reason ID --all" if stuck else "", "queue-stuck" if stuck else "")


async def step5_test_message(ctx: Context) -> dict[str, Any]:
    """5. a real test message through the route in use, followed to its fate."""
    if ctx.submit is None or not ctx.rcpt:
        return _step(5, "test message", "skip", "not sent (--send-test --to ADDRESS sends one)")
    if not ctx.server_up:
        return _step(5, "test message", "skip", "the server does not answer")
    config, fetch, sender, rcpt, follow_for = (ctx.config, ctx.fetch, ctx.sender, ctx.rcpt,
                                               ctx.follow_for)
    data = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: postroom doctor test message\r\n"
            f"\r\nSent by postroom doctor on {config.hostname} to test delivery to {rcpt}."
            "\r\n").encode()
    try:
        sent = await ctx.submit(sender, rcpt, data)
    except (OSError, ValueError) as exc:
        ctx.test_verdict = "test-message-failed"
        return _step(5, "test message", "fail", f"the server refused the test message: {exc}",
                     None, "see step 2: the address space and relay decision",
                     "test-message-failed")
    qid = sent["queue_id"]
    deadline = time.monotonic() + follow_for
    story: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = (await fetch(f"/api/trace?id={qid}"))["messages"]
        story = found[0] if found else {}
        kinds = {e["id"] for e in story.get("events", [])}
        if story.get("state") in ("delivered", "failed") or 3003 in kinds:
            break
        await asyncio.sleep(0.5)
    events = story.get("events", [])
    last = next((e for e in reversed(events) if e["id"] in (3002, 3003, 3004)), None)
    if last is None:
        return _step(5, "test message", "warn", f"{qid} is still queued after "
                     f"{int(follow_for)}s", story, f"follow it: postroom trace {qid}")
    status = {3002: "ok", 3003: "warn", 3004: "fail"}[last["id"]]
    if status != "fail":
        return _step(5, "test message", status, f"{qid}: {last['text']}", story,
                     "" if status == "ok" else f"postroom trace {qid} shows every step; "
                     "steps 6 and 7 below name the cause")
    verdict, fix = _refusal_of_test_message(ctx, last["text"])
    ctx.test_verdict = verdict
    return _step(5, "test message", "fail", f"{qid}: {last['text']}", story,
                 f"{fix} (postroom trace {qid} shows every step)", verdict)


_FAILED_AT = re.compile(r"failed at (\S+) via (.*?)(?:: | \(.*?\): )([245]\d\d[\s\S]*)$")


def _refusal_of_test_message(ctx: Context, text: str) -> tuple[str, str]:
    """The verdict and fix for a failed test message, from its event's text ("<rcpt>
    failed at DATA via HOP: REPLY"): a refusal for sender authentication (SPF, DKIM,
    DMARC...) is ``nexthop-auth-policy``; any other refusal after DATA, whatever its
    words, ``nexthop-refused-message``; anything else ``test-message-failed``. The fix is
    the NDR's own words for the reply."""
    from ..bounce import explain as explain_failure
    from ..bounce import find_entry, is_sender_auth

    m = _FAILED_AT.search(text)
    step, hop, reply = (m.group(1), m.group(2), m.group(3)) if m else ("", "", text)
    domain = ctx.sender.rpartition("@")[2].lower()
    dkim = tuple(k.record_name for k in ctx.config.dkim if k.domain.lower() == domain)
    words = explain_failure(_status_of(reply), reply, step, hop, recipient=ctx.rcpt or "",
                            sender=ctx.sender, from_domain=domain, dkim_records=dkim)
    fix = f"{words.meaning} {words.action}"
    if is_sender_auth(find_entry(_status_of(reply), reply, step, hop)):
        return "nexthop-auth-policy", fix + " Step 11 shows what DNS publishes now."
    if step == "DATA":
        return "nexthop-refused-message", fix
    return "test-message-failed", fix


def _remote_hop(ctx: Context) -> dict[str, Any] | None:
    """The first next hop for rcpt when it is remote (steps 6 and 7), else None."""
    explained = ctx.explained
    if explained is not None and explained["next_hops"] and not explained["routing"]["local"]:
        hop: dict[str, Any] = explained["next_hops"][0]
        return hop
    return None


def _no_hop_reason(ctx: Context) -> str:
    return "give --to ADDRESS to test a destination" if not ctx.rcpt else \
        "the destination is local, or has no route"


async def step6_dns(ctx: Context) -> dict[str, Any]:
    """6. DNS of the destination, or of the route's smart host."""
    hop = _remote_hop(ctx)
    if hop is None:
        return _step(6, "dns", "skip", _no_hop_reason(ctx))
    if hop["kind"] == "mx":
        v = _dns_verdict(hop["error"], hop["null_mx"])
        usable = [h for h in hop["mx"] if h["addresses"]]
        if not v and not usable:
            v = "dns-no-address"
        step = _step(6, "dns", "fail" if v else "ok",
                     hop["error"]["text"] if hop["error"] else
                     ("null MX: the domain accepts no mail" if hop["null_mx"] else
                      f"{len(usable)} of {len(hop['mx'])} MX hosts have addresses"),
                     hop, _dns_fix(v, hop["domain"]), v)
        ctx.next_hop = NextHop((usable[0]["host"], hop["port"]) if usable else None,
                               None, None, False,
                               f"MX of {hop['domain']} (route {hop['route']})")
    else:
        v = "dns-no-address" if hop["error"] or not hop["addresses"] else ""
        step = _step(6, "dns", "fail" if v else "ok",
                     hop["error"]["text"] if hop["error"] else
                     f"smart host {hop['host']}: {', '.join(hop['addresses'])}",
                     hop, "fix host = in the [[route]], or its DNS" if v else "", v)
        route = next(r for r in ctx.config.routes if r.match == hop["route"]
                     and r.via == "smarthost")
        ctx.next_hop = NextHop((hop["host"], hop["port"]) if not v else None,
                               route.username or None, route.password or None,
                               route.tls == "required", route.describe())
    ctx.dns_failed = bool(v)
    return step


async def step7_probe(ctx: Context) -> dict[str, Any]:
    """7. probe of the next hop that step 6 found, as delivery would talk to it."""
    from ..bounce import explain as explain_failure

    if _remote_hop(ctx) is None:
        return _step(7, "probe", "skip", _no_hop_reason(ctx))
    hop = ctx.next_hop
    assert hop is not None
    if hop.target is None:
        return _step(7, "probe", "skip", "no address to connect to")
    target = hop.target
    result = await probe(target[0], target[1], resolver=ctx.resolver,
                         helo=ctx.config.hostname, sender=ctx.sender, rcpt=ctx.rcpt,
                         starttls=hop.tls_required or hop.username is not None,
                         username=hop.username, password=hop.password)
    v = "" if result["verdict"] == "accepts" else _PROBE_VERDICT[result["verdict"]]
    ctx.probe_source = result.get("source")
    fix = ""
    if v:
        why = explain_failure(_status_of(result["reply"]), result["reply"] or "",
                              "RCPT" if "relay" in v else "connect",
                              hop.name, recipient=ctx.rcpt or "",
                              remote_host=target[0])
        fix = f"{why.meaning} {why.action}"
    ctx.hop_verdict = v
    return _step(7, "probe", "fail" if v else "ok",
                 f"{target[0]}:{target[1]} {result['verdict']}"
                 + (f": {result['reply']}" if result["reply"] else ""),
                 result, fix, v)


async def step8_alternative(ctx: Context) -> dict[str, Any]:
    """8. the other way out: would the other kind of route work (an MX route for a
    refusing smart host, a smart host for a failing MX route)? Probes it when one is
    configured."""
    if ctx.test_verdict == "nexthop-auth-policy":
        return _step(8, "alternative route", "warn", "the route in use refused the test "
                     "message for sender authentication (step 5): another route does not "
                     "change what the sender's domain publishes", None,
                     "publish the records step 11 names")
    if not (ctx.hop_verdict or ctx.dns_failed or ctx.test_verdict):
        return _step(8, "alternative route", "skip", "the route in use works")
    config, rcpt = ctx.config, ctx.rcpt
    kind = ctx.explained["next_hops"][0]["kind"] if ctx.explained is not None else "mx"
    others = [r for r in config.routes if r.via != kind]
    fix = ("deliver directly instead: a [[route]] with via = \"mx\" (this needs outbound "
           "port 25, which many ISPs block), or fix the smart host as step 7 says"
           if kind == "smarthost" else
           "forward through your provider's relay instead: a [[route]] with "
           "via = \"smarthost\", host, username and password_file")
    if not others or not rcpt:
        return _step(8, "alternative route", "warn", "no other kind of route is configured",
                     None, fix)
    route = others[0]
    if route.via == "smarthost":
        host, port = route.host, route.port
    else:
        mx = await ctx.resolver.mx(rcpt.rpartition("@")[2])
        usable = [h for h in mx.hosts if h.addresses]
        if not usable:
            return _step(8, "alternative route", "warn", f"{route.describe()} would not work "
                         f"either: {mx.error.describe() if mx.error else 'no MX address'}",
                         mx_json(mx), fix)
        host, port = usable[0].name, config.delivery.mx_port
    result = await probe(host, port, resolver=ctx.resolver, helo=config.hostname,
                         sender=ctx.sender, rcpt=rcpt,
                         starttls=route.tls == "required" or bool(route.username),
                         username=route.username or None, password=route.password or None)
    works = result["verdict"] == "accepts"
    return _step(8, "alternative route", "warn",
                 f"{route.describe()} would {'work' if works else 'not work either'}: "
                 f"{host}:{port} {result['verdict']}"
                 + (f" ({result['reply']})" if result.get("reply") else ""), result,
                 f"make it the route for this destination (a more specific [[route]] "
                 f"with via = \"{route.via}\")" if works else fix)


async def step9_configuration(ctx: Context) -> dict[str, Any]:
    """9. config lint; for an open relay, a relay self-test against our own MX listener."""
    config = ctx.config
    warnings = config.warnings()
    open_relay = [w for w in warnings if "OPEN RELAY" in str(w)]
    detail: dict[str, Any] = {"warnings": [str(w) for w in warnings]}
    finding = "; ".join(str(w) for w in warnings) or "no warnings"
    if open_relay and ctx.server_up and config.smtp.listen:
        test = await _relay_self_test(config, ctx.resolver)
        detail["relay_self_test"] = test
        finding += (f"; the relay self-test from [{test.get('source')}] was "
                    f"{'ACCEPTED' if test['verdict'] == 'accepts' else 'refused'}: "
                    f"{test.get('reply')}")
    return _step(9, "configuration", "fail" if open_relay else
                 ("warn" if warnings else "ok"), finding, detail,
                 "list only your own networks in [relay] trusted_networks, then "
                 "postroom reload" if open_relay else "",
                 "open-relay" if open_relay else "")


async def step10_store(ctx: Context) -> dict[str, Any]:
    """10. the store: can every user log in over IMAP, can Dovecot and Postroom both use
    every Maildir, does Dovecot run? (The server checks; ``/api/store``.)"""
    if not ctx.server_up:
        return _step(10, "store", "skip", "the server does not answer")
    try:
        store = await ctx.fetch("/api/store")
    except (OSError, ValueError) as exc:
        return _step(10, "store", "skip", f"the server cannot check its store: {exc}")
    if not store.get("enabled"):
        return _step(10, "store", "skip", "IMAP is off ([imap] enabled = false): the "
                     "Maildirs are for whatever reads them", store)
    problems = store["problems"]
    fixes = list(dict.fromkeys(p["fix"] for p in problems))
    return _step(10, "store", "fail" if problems else "ok", store["summary"], store,
                 "; ".join(fixes), "store-failed" if problems else "")


async def step11_sender_auth(ctx: Context) -> dict[str, Any]:
    """11. the sender's DNS records: does the SPF record of the sender's domain allow the
    address our mail leaves from (ours, or the smart host's), does each [[dkim]] key's
    record publish its public key, is there a DMARC record? Without --from it runs only
    when mail would leave this server (no --to, or a remote one)."""
    domain = ctx.sender.rpartition("@")[2].lower().rstrip(".")
    name = "sender auth"
    if not domain or domain.rsplit(".", 1)[-1] in NOT_ON_THE_INTERNET or "." not in domain:
        return _step(11, name, "skip", f"{domain or 'the null sender'} is not a domain on "
                     "the Internet: give --from ADDRESS to check a sending domain")
    hop = _remote_hop(ctx)
    if not ctx.sender_given and ctx.rcpt and hop is None:
        return _step(11, name, "skip", "the test destination is local: give --from "
                     "ADDRESS to check the sender's SPF, DKIM and DMARC records")
    if hop is not None:
        route = next((r for r in ctx.config.routes if r.match == hop["route"]
                      and r.via == hop["kind"]), None)
    else:
        route = outbound_route(ctx.config)
    if route is None:
        return _step(11, name, "skip", "no [[route]] sends mail to other domains")
    sending = sending_addresses(ctx.config, ctx.resolver, route, ctx.probe_source)
    checked = await sender_records(ctx.config, ctx.resolver, domain, sending)
    bad = [r for r in checked["records"] if r["severity"] != "ok"]
    failing = [r for r in bad if r["severity"] == "fail"]
    finding = (f"{domain}: " + ("; ".join(r["finding"] for r in bad) if bad else
                                "SPF allows " + (", ".join(checked["sending"]["addresses"])
                                                 or "it")
                                + ", every DKIM key's record matches, DMARC is published"))
    fix = " ".join(f"{r['kind'].upper()}: {r['fix']}." for r in bad if r["fix"])
    return _step(11, name, checked["status"], finding, checked, fix,
                 "sender-auth-missing" if failing else "")


# the steps, in the order they run (and are shown)
STEPS: tuple[Callable[[Context], Awaitable[dict[str, Any]]], ...] = (
    step1_services, step2_address_space, step3_logging, step4_queues, step5_test_message,
    step6_dns, step7_probe, step8_alternative, step9_configuration, step10_store,
    step11_sender_auth)


async def _relay_self_test(config: Config, resolver: Resolver) -> dict[str, Any]:
    """Step 9 for an open relay: from an address outside the trusted networks when one
    can be had (a loopback address on this machine), ask our own MX listener to relay."""
    host, port = config.smtp.listen[0]
    target = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
    source = None
    if target.startswith("127."):
        for last in range(66, 250):
            candidate = ipaddress.ip_address(f"127.0.0.{last}")
            if not any(candidate in net for net in config.trusted_networks
                       if net.prefixlen > 0):
                source = str(candidate)
                break
    result = await probe(target, port, resolver=resolver, helo=config.hostname,
                         sender="relay-test@relay-test.invalid",
                         rcpt="relay-test@relay-test.invalid", source=source)
    result["source"] = source or "this host"
    return result


def _dns_verdict(err: dict[str, Any] | None, null_mx: bool) -> str:
    if null_mx:
        return "null-mx"
    if err is None:
        return ""
    return {"NXDOMAIN": "dns-nxdomain", "NODATA": "dns-no-address"}.get(err["kind"],
                                                                          "dns-failure")


def _status_of(reply: str | None) -> str:
    m = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", reply or "")
    return m.group(1) if m else ("5.0.0" if (reply or "").startswith("5") else "4.4.1")


def _dns_fix(verdict: str, domain: str) -> str:
    return {
        "null-mx": f"{domain} publishes a null MX: it takes no mail; check the address",
        "dns-nxdomain": f"{domain} does not exist: check the address for a typo",
        "dns-no-address": f"{domain}'s MX hosts have no A/AAAA record: its owner must fix "
                          "DNS; meanwhile a smart host route may help",
        "dns-failure": "the nameservers did not answer: check [dns] nameservers and that "
                       "they are running (postroom dns DOMAIN)",
    }.get(verdict, "")
