"""Steps 6 and 7 of the seed case, and the server's own reasoning, as functions:
``dns_report`` (NSLookup), ``probe`` (telnet to port 25) and ``explain`` (what the
server would decide for one sender and recipient).

They use the configured nameservers, never the system's, and the same pure functions
the server runs (``policy``, ``routing``), so what they say is what the server does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections.abc import Callable
from typing import Any

from .address import AddressError, parse_path
from .config import Config
from .dns import DnsError, MxResult, Resolver
from .policy import RelaySettings, SessionSnapshot, check_mail, check_rcpt
from .routing import choose_route
from .smtp.client import Client, HopError, Transcript

__all__ = ["PROBE_VERDICTS", "VERDICTS", "dns_report", "doctor", "explain", "probe"]


def _error(err: DnsError | None) -> dict[str, Any] | None:
    if err is None:
        return None
    return {"kind": err.kind.value, "name": err.name, "detail": err.detail,
            "text": err.describe()}


def _mx_json(mx: MxResult) -> dict[str, Any]:
    return {"domain": mx.domain, "implicit": mx.implicit, "null_mx": mx.null_mx,
            "error": _error(mx.error),
            "mx": [{"preference": h.preference, "host": h.name, "addresses": list(h.addresses),
                    "error": _error(h.error)} for h in mx.hosts]}


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
    out = _mx_json(mx)

    async def policy(name: str, prefix: str) -> dict[str, Any]:
        found = await resolver.query(name, "TXT")
        if isinstance(found, DnsError):
            missing = found.permanent
            return {"present": False, "record": None,
                    "error": None if missing else _error(found)}
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


# --- probe ----------------------------------------------------------------------------
PROBE_VERDICTS = ("accepts", "relay-denied", "auth-required", "auth-failed", "tls-failed",
                  "unreachable", "refused")


def _cert_info(der: bytes | None) -> dict[str, Any]:
    if not der:
        return {}
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat()}


async def probe(host: str, port: int, *, resolver: Resolver, helo: str,
                sender: str | None = None, rcpt: str | None = None, starttls: bool = False,
                username: str | None = None, password: str | None = None,
                send: bool = False, timeout: float = 15.0,
                source: str | None = None) -> dict[str, Any]:
    """Talk to one SMTP server the way delivery would, and say what it would do.

    Never sends DATA unless ``send``; ends with RSET and QUIT. The verdict is one of
    :data:`PROBE_VERDICTS`; ``reply`` quotes the answer it rests on.
    """
    transcript = Transcript()
    out: dict[str, Any] = {"host": host, "port": port, "verdict": "", "reply": None}
    addresses = await resolver.addresses(host)
    if isinstance(addresses, DnsError):
        out.update(verdict="unreachable", reply=addresses.describe(), addresses=[],
                   transcript="")
        return out
    out["addresses"] = list(addresses)
    client: Client | None = None
    verdict, reply = "", ""
    try:
        for ip in addresses:
            client = Client(helo_name=helo, command_timeout=timeout, transcript=transcript)
            started = time.monotonic()
            try:
                banner = await client.connect(ip, port, timeout, source)
            except HopError as exc:
                out.setdefault("attempts", []).append(f"{ip}: {exc.detail}")
                client = None
                continue
            out.update(ip=ip, connect_ms=round((time.monotonic() - started) * 1000, 1),
                       banner=str(banner))
            break
        if client is None:
            out.update(verdict="unreachable",
                       reply="; ".join(out.get("attempts", [])) or "no address")
            return out
        ehlo = await client.ehlo()
        out["ehlo"] = str(ehlo)
        out["extensions"] = sorted(client.extensions)
        if starttls:
            if not client.offers("STARTTLS"):
                verdict, reply = "tls-failed", f"{host} does not offer STARTTLS"
                return out
            verified, why = True, ""
            try:
                await client.starttls(ssl.create_default_context(), host)
            except HopError as exc:
                verified, why = False, exc.detail
                client.close()
                # once more without checking the certificate, to see the rest
                client = Client(helo_name=helo, command_timeout=timeout, transcript=transcript)
                transcript.note("-- again without certificate verification")
                await client.connect(out["ip"], port, timeout)
                await client.ehlo()
                loose = ssl.create_default_context()
                loose.check_hostname = False
                loose.verify_mode = ssl.CERT_NONE
                try:
                    await client.starttls(loose, None)
                except HopError as exc2:
                    verdict, reply = "tls-failed", exc2.detail
                    return out
            assert client.writer is not None
            obj = client.writer.get_extra_info("ssl_object")
            out["tls"] = {"protocol": obj.version() if obj else None,
                          "cipher": obj.cipher()[0] if obj else None,
                          "verified": verified, "verify_error": why or None,
                          **_cert_info(obj.getpeercert(binary_form=True) if obj else None)}
            await client.ehlo()
            out["extensions_after_tls"] = sorted(client.extensions)
        auth_line = client.extensions.get("AUTH", "")
        out["auth_mechanisms"] = auth_line.split() if auth_line else []
        if username is not None:
            try:
                out["auth"] = str(await client.auth(username, password or ""))
            except HopError as exc:
                verdict, reply = "auth-failed", str(exc.reply or exc.detail)
                return out
        if sender is None and rcpt is None:
            verdict, reply = "accepts", str(ehlo)
            return out
        mail = await client.command(f"MAIL FROM:<{sender or ''}>", "MAIL")
        out["mail"] = str(mail)
        if not mail.is_positive:
            verdict, reply = _refusal(mail), str(mail)
            return out
        if rcpt is not None:
            answer = await client.command(f"RCPT TO:<{rcpt}>", "RCPT")
            out["rcpt"] = str(answer)
            if not answer.is_positive:
                verdict, reply = _refusal(answer), str(answer)
                return out
            if send:
                tx = await client.command("DATA", "DATA")
                if tx.code == 354:
                    message = (f"Subject: postroom probe\r\nFrom: <{sender or ''}>\r\n"
                               f"To: <{rcpt}>\r\n\r\nA test message sent by postroom probe."
                               "\r\n.").replace("\r\n.\r\n", "\r\n..\r\n")
                    tx = await client.command(message, "DATA", "<test message>")
                out["data"] = str(tx)
                if not tx.is_positive:
                    verdict, reply = _refusal(tx), str(tx)
                    return out
            verdict, reply = "accepts", str(answer)
        else:
            verdict, reply = "accepts", str(mail)
        return out
    except HopError as exc:
        verdict = "tls-failed" if exc.step == "STARTTLS" else (
            "unreachable" if exc.reply is None else _refusal(exc.reply))
        reply = str(exc.reply) if exc.reply is not None else exc.detail
        return out
    finally:
        if not out["verdict"]:
            out["verdict"], out["reply"] = verdict, reply
        if client is not None:
            try:
                if client.writer is not None and not client.writer.is_closing():
                    await client.reset()
            finally:
                await client.quit()
        out["transcript"] = transcript.text()


def _refusal(reply: Any) -> str:
    text = str(reply).lower()
    if reply.code == 530 or reply.enhanced == "5.7.0" or "authentication required" in text:
        return "auth-required"
    if reply.enhanced == "5.7.1" or "relay" in text:
        return "relay-denied"
    return "refused"


# --- explain --------------------------------------------------------------------------
async def explain(config: Config, resolver: Resolver, mailbox_exists: Callable[[str], bool],
                  *, sender: str, rcpt: str, client_ip: str = "127.0.0.1",
                  auth_user: str | None = None, listener: str = "mx") -> dict[str, Any]:
    """What the server would decide for this sender and recipient, and why."""
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        raise ValueError(f"{client_ip!r} is not an IP address") from None
    if listener not in ("mx", "submission", "submissions"):
        raise ValueError("listener must be mx, submission or submissions")
    try:
        env_sender = parse_path(f"<{sender}>", allow_null=True, utf8=True)
        env_rcpt = parse_path(f"<{rcpt}>", allow_null=False, utf8=True)
    except AddressError as exc:
        raise ValueError(f"bad address: {exc}") from None
    who = SessionSnapshot(ip, listener, listener != "mx" or auth_user is not None, auth_user)
    settings = RelaySettings(frozenset(config.local_domains), config.trusted_networks,
                             frozenset(config.aliases), config.routes)
    mail = check_mail(who)
    verdict = check_rcpt(who, env_rcpt, settings, mailbox_exists)
    decision = choose_route(env_rcpt.domain, config.routes, frozenset(config.local_domains))
    out: dict[str, Any] = {
        "sender": str(env_sender), "recipient": env_rcpt.key, "client_ip": str(ip),
        "listener": listener, "auth": auth_user,
        "mail": {"accept": mail.accept, "reply": str(mail.reply), "reason": mail.reason},
        "rcpt": {"accept": verdict.accept, "reply": str(verdict.reply),
                 "reason": verdict.reason},
        "routing": {"domain": decision.domain, "local": decision.local,
                    "reason": decision.reason,
                    "candidates": [{"match": c.route.match, "via": c.route.via,
                                    "host": c.route.host, "cost": c.route.cost,
                                    "matches": c.matches, "why": c.why,
                                    "chosen": c.route in decision.chosen}
                                   for c in decision.candidates]},
    }
    if not verdict.accept:
        from .bounce import explain as explain_failure
        # no step and no hop: the catalogue's entries for this server's own refusals
        words = explain_failure(verdict.reply.enhanced or "5.0.0", str(verdict.reply), "", "",
                                recipient=env_rcpt.key)
        out["rcpt"]["meaning"], out["rcpt"]["fix"] = words.meaning, words.action
    hops: list[dict[str, Any]] = []
    if decision.local:
        key = env_rcpt.key
        target = config.aliases.get(key)
        hops.append({"kind": "local", "mailbox": key, "exists": mailbox_exists(key),
                     "alias_for": list(target) if target else None})
    for route in decision.chosen:
        if route.via == "smarthost":
            host, port = route.host, route.port
            addresses = await resolver.addresses(host)
            hops.append({"kind": "smarthost", "route": route.match, "host": host, "port": port,
                         "tls": route.tls, "auth": route.username or None,
                         "addresses": [] if isinstance(addresses, DnsError) else
                         list(addresses),
                         "error": _error(addresses) if isinstance(addresses, DnsError)
                         else None})
        else:
            mx = await resolver.mx(decision.domain)
            hops.append({"kind": "mx", "route": route.match, "port": config.delivery.mx_port,
                         **_mx_json(mx)})
    out["next_hops"] = hops
    out["outcome"] = _outcome(out)
    return out


def _outcome(e: dict[str, Any]) -> str:
    if not e["mail"]["accept"]:
        return f"refused at MAIL FROM: {e['mail']['reply']}"
    if not e["rcpt"]["accept"]:
        return f"refused at RCPT TO: {e['rcpt']['reply']} ({e['rcpt']['reason']})"
    hops = e["next_hops"]
    if not hops:
        return "accepted, then returned: no address space covers the domain"
    hop = hops[0]
    if hop["kind"] == "local":
        if hop["alias_for"]:
            return f"accepted; the alias expands to {', '.join(hop['alias_for'])}"
        return f"accepted and delivered to the mailbox {hop['mailbox']}"
    if hop["kind"] == "smarthost":
        if hop["error"]:
            return f"accepted; delivery will wait: {hop['error']['text']}"
        return (f"accepted and forwarded to the smart host {hop['host']}:{hop['port']} "
                f"({', '.join(hop['addresses'])}), TLS {hop['tls']}"
                + (f", AUTH as {hop['auth']}" if hop["auth"] else ""))
    if hop["null_mx"]:
        return "accepted, then returned at once: the domain accepts no mail (null MX, 5.1.10)"
    if hop["error"]:
        kind = hop["error"]["kind"]
        if kind in ("NXDOMAIN", "NODATA"):
            return f"accepted, then returned: {hop['error']['text']} (5.1.2)"
        return f"accepted; delivery waits and retries: {hop['error']['text']} (4.4.3)"
    first = hop["mx"][0]
    return (f"accepted and sent to {first['host']} "
            f"({', '.join(first['addresses']) or 'no address'}) port {hop['port']}, "
            f"the first of {len(hop['mx'])} MX hosts")


# --- doctor ---------------------------------------------------------------------------
VERDICTS = ("ok", "service-down", "no-route", "client-relay-denied", "nexthop-relay-denied",
            "nexthop-auth-required", "nexthop-auth-failed", "nexthop-unreachable",
            "nexthop-tls-failed", "dns-nxdomain", "dns-no-address", "dns-failure", "null-mx",
            "queue-stuck", "open-relay")
# which failing step decides, first to last: the cause before its symptoms
_PRECEDENCE = (1, 2, 6, 7, 4, 9)
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


def _dns_verdict(err: dict[str, Any] | None, null_mx: bool) -> str:
    if null_mx:
        return "null-mx"
    if err is None:
        return ""
    return {"NXDOMAIN": "dns-nxdomain", "NODATA": "dns-no-address"}.get(err["kind"],
                                                                          "dns-failure")


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
    from .bounce import explain as explain_failure

    steps: list[dict[str, Any]] = _Steps(progress)
    sender = sender or f"postmaster@{config.local_domains[0]}"
    # 1. services
    try:
        status = await fetch("/api/status")
        down = [c for c in status["components"] if c["state"] not in ("running", "disabled")]
        steps.append(_step(1, "services", "fail" if down else "ok",
                           f"stopped: {', '.join(c['name'] for c in down)}" if down else
                           "every component is running", status["components"],
                           "postroom start " + " && postroom start ".join(
                               c["name"] for c in down) if down else "",
                           "service-down" if down else ""))
        server_up = True
    except (OSError, ValueError) as exc:
        steps.append(_step(1, "services", "fail", f"the server does not answer: {exc}", None,
                           "start it: postroom serve (check postroom.log for why it stopped)",
                           "service-down"))
        server_up = False
    # 2. address space (and, with a client address, the relay decision)
    has_catch_all = any(r.match == "*" for r in config.routes)
    explained: dict[str, Any] | None = None
    if rcpt:
        explained = await explain(config, resolver, mailbox_exists, sender=sender, rcpt=rcpt,
                                  client_ip=client_ip, auth_user=auth_user)
        r = explained["rcpt"]
        if not r["accept"] and "5.7.1" in r["reply"]:
            steps.append(_step(2, "address space", "fail", f"{r['reply']} ({r['reason']})",
                               explained, r["fix"], "client-relay-denied"))
        elif not explained["routing"]["local"] and not explained["next_hops"]:
            steps.append(_step(2, "address space", "fail",
                               f"no address space covers {explained['routing']['domain']}",
                               explained, "add a [[route]] for it, or a catch-all "
                               "match = \"*\" (via = \"mx\" or a smart host)", "no-route"))
        else:
            steps.append(_step(2, "address space", "ok" if has_catch_all else "warn",
                               explained["routing"]["reason"], explained,
                               "" if has_catch_all else "no catch-all [[route]] match = \"*\": "
                               "mail for other domains has no route"))
    else:
        steps.append(_step(2, "address space", "ok" if has_catch_all else "warn",
                           "a catch-all route exists" if has_catch_all else
                           "no [[route]] with match = \"*\"", [r.match for r in config.routes],
                           "" if has_catch_all else "add [[route]] match = \"*\""))
    # 3. diagnostic logging and recent errors
    if server_up:
        levels = await fetch("/api/logging")
        errors = (await fetch("/api/events?severity=error&since=1h"))["events"]
        steps.append(_step(3, "logging", "warn" if errors else "ok",
                           f"{len(errors)} errors in the last hour" if errors else
                           "no errors in the event log in the last hour",
                           {"levels": levels, "errors": errors[-10:]},
                           "read them: postroom events --severity error --since 1h"
                           if errors else ""))
    else:
        steps.append(_step(3, "logging", "skip", "the server does not answer"))
    # 4. the four queues
    if server_up:
        queues = (await fetch("/api/queues"))["queues"]
        reasons = (await fetch("/api/queues/reasons"))["reasons"]
        stuck = [q for q in queues if q["oldest_age_seconds"] is not None
                 and q["oldest_age_seconds"] > stuck_after]
        top = reasons[0] if reasons else None
        steps.append(_step(
            4, "queues", "fail" if stuck else "ok",
            (f"{', '.join(q['name'] for q in stuck)}: mail older than "
             f"{int(stuck_after)}s" + (f"; the biggest reason: {top['reply']} via {top['hop']}"
                                       if top else "")) if stuck else
            f"{sum(q['messages'] for q in queues)} messages queued, none stuck",
            {"queues": queues, "reasons": reasons[:5]},
            "postroom queue reasons shows why; fix the cause, then postroom queue retry "
            "--reason ID --all" if stuck else "", "queue-stuck" if stuck else ""))
    else:
        steps.append(_step(4, "queues", "skip", "the server does not answer"))
    # 5. a real test message through the route in use, followed to its fate
    if submit is None or not rcpt:
        steps.append(_step(5, "test message", "skip",
                           "not sent (--send-test --to ADDRESS sends one)"))
    elif not server_up:
        steps.append(_step(5, "test message", "skip", "the server does not answer"))
    else:
        steps.append(await _send_test(config, fetch, submit, sender, rcpt, follow_for))
    # 6. DNS of the destination and of the smart hosts; 7. probe of the next hop
    hop_verdict = ""
    if explained is not None and explained["next_hops"] and not explained["routing"]["local"]:
        hop = explained["next_hops"][0]
        if hop["kind"] == "mx":
            v = _dns_verdict(hop["error"], hop["null_mx"])
            usable = [h for h in hop["mx"] if h["addresses"]]
            if not v and not usable:
                v = "dns-no-address"
            steps.append(_step(6, "dns", "fail" if v else "ok",
                               hop["error"]["text"] if hop["error"] else
                               ("null MX: the domain accepts no mail" if hop["null_mx"] else
                                f"{len(usable)} of {len(hop['mx'])} MX hosts have addresses"),
                               hop, _dns_fix(v, hop["domain"]), v))
            target = (usable[0]["host"], hop["port"]) if usable else None
            username = password = None
            tls_required = False
            hop_name = f"MX of {hop['domain']} (route {hop['route']})"   # as delivery says it
        else:
            v = "dns-no-address" if hop["error"] or not hop["addresses"] else ""
            steps.append(_step(6, "dns", "fail" if v else "ok",
                               hop["error"]["text"] if hop["error"] else
                               f"smart host {hop['host']}: {', '.join(hop['addresses'])}",
                               hop, "fix host = in the [[route]], or its DNS" if v else "", v))
            target = (hop["host"], hop["port"]) if not v else None
            route = next(r for r in config.routes if r.match == hop["route"]
                         and r.via == "smarthost")
            username, password = route.username or None, route.password or None
            tls_required = route.tls == "required"
            hop_name = route.describe()
        if target is not None:
            result = await probe(target[0], target[1], resolver=resolver,
                                 helo=config.hostname, sender=sender, rcpt=rcpt,
                                 starttls=tls_required or username is not None,
                                 username=username, password=password)
            v = "" if result["verdict"] == "accepts" else _PROBE_VERDICT[result["verdict"]]
            fix = ""
            if v:
                why = explain_failure(_status_of(result["reply"]), result["reply"] or "",
                                      "RCPT" if "relay" in v else "connect",
                                      hop_name, recipient=rcpt or "",
                                      remote_host=target[0])
                fix = f"{why.meaning} {why.action}"
            steps.append(_step(7, "probe", "fail" if v else "ok",
                               f"{target[0]}:{target[1]} {result['verdict']}"
                               + (f": {result['reply']}" if result["reply"] else ""),
                               result, fix, v))
            hop_verdict = v
        else:
            steps.append(_step(7, "probe", "skip", "no address to connect to"))
    else:
        reason = "give --to ADDRESS to test a destination" if not rcpt else \
            "the destination is local, or has no route"
        steps.append(_step(6, "dns", "skip", reason))
        steps.append(_step(7, "probe", "skip", reason))
    # 8. the other way out
    if hop_verdict or any(s["step"] == 6 and s["status"] == "fail" for s in steps):
        kind = explained["next_hops"][0]["kind"] if explained is not None else "mx"
        steps.append(await _alternative(config, resolver, kind, sender, rcpt))
    else:
        steps.append(_step(8, "alternative route", "skip", "the route in use works"))
    # 9. config lint
    warnings = config.warnings()
    open_relay = [w for w in warnings if "OPEN RELAY" in str(w)]
    detail: dict[str, Any] = {"warnings": [str(w) for w in warnings]}
    finding = "; ".join(str(w) for w in warnings) or "no warnings"
    if open_relay and server_up and config.smtp.listen:
        test = await _relay_self_test(config, resolver)
        detail["relay_self_test"] = test
        finding += (f"; the relay self-test from [{test.get('source')}] was "
                    f"{'ACCEPTED' if test['verdict'] == 'accepts' else 'refused'}: "
                    f"{test.get('reply')}")
    steps.append(_step(9, "configuration", "fail" if open_relay else
                       ("warn" if warnings else "ok"), finding, detail,
                       "list only your own networks in [relay] trusted_networks, then "
                       "postroom reload" if open_relay else "",
                       "open-relay" if open_relay else ""))
    verdict = "ok"
    for n in _PRECEDENCE:
        hit = next((s for s in steps if s["step"] == n and s["verdict"]), None)
        if hit is not None:
            verdict = hit["verdict"]
            break
    for s in steps:
        del s["verdict"]
    return {"verdict": verdict, "steps": steps}


async def _send_test(config: Config, fetch: Callable[[str], Any],
                     submit: Callable[[str, str, bytes], Any], sender: str, rcpt: str,
                     follow_for: float) -> dict[str, Any]:
    data = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: postroom doctor test message\r\n"
            f"\r\nSent by postroom doctor on {config.hostname} to test delivery to {rcpt}."
            "\r\n").encode()
    try:
        sent = await submit(sender, rcpt, data)
    except (OSError, ValueError) as exc:
        return _step(5, "test message", "fail", f"the server refused the test message: {exc}",
                     None, "see step 2: the address space and relay decision")
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
    return _step(5, "test message", status, f"{qid}: {last['text']}", story,
                 "" if status == "ok" else f"postroom trace {qid} shows every step; "
                 "steps 6 and 7 below name the cause")


async def _alternative(config: Config, resolver: Resolver, kind: str, sender: str,
                       rcpt: str | None) -> dict[str, Any]:
    """Step 8: would the other kind of route work (an MX route for a refusing smart host,
    a smart host for a failing MX route)? Probes it when one is configured."""
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
        mx = await resolver.mx(rcpt.rpartition("@")[2])
        usable = [h for h in mx.hosts if h.addresses]
        if not usable:
            return _step(8, "alternative route", "warn", f"{route.describe()} would not work "
                         f"either: {mx.error.describe() if mx.error else 'no MX address'}",
                         _mx_json(mx), fix)
        host, port = usable[0].name, config.delivery.mx_port
    result = await probe(host, port, resolver=resolver, helo=config.hostname, sender=sender,
                         rcpt=rcpt, starttls=route.tls == "required" or bool(route.username),
                         username=route.username or None, password=route.password or None)
    works = result["verdict"] == "accepts"
    return _step(8, "alternative route", "warn",
                 f"{route.describe()} would {'work' if works else 'not work either'}: "
                 f"{host}:{port} {result['verdict']}"
                 + (f" ({result['reply']})" if result.get("reply") else ""), result,
                 f"make it the route for this destination (a more specific [[route]] "
                 f"with via = \"{route.via}\")" if works else fix)


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


def _status_of(reply: str | None) -> str:
    import re

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
