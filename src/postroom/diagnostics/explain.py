"""``explain``: what the server would decide for one sender and recipient, and why, from
the same pure functions the server runs (``policy``, ``routing``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from ..address import AddressError, parse_path
from ..config import Config
from ..dns import DnsError, Resolver
from ..policy import RelaySettings, SessionSnapshot, check_mail, check_rcpt
from ..routing import choose_route, lmtp_route
from .dns import error_json, mx_json

__all__ = ["explain"]


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
        from ..bounce import explain as explain_failure
        # no step and no hop: the catalogue's entries for this server's own refusals
        words = explain_failure(verdict.reply.enhanced or "5.0.0", str(verdict.reply), "", "",
                                recipient=env_rcpt.key)
        out["rcpt"]["meaning"], out["rcpt"]["fix"] = words.meaning, words.action
    hops: list[dict[str, Any]] = []
    if decision.local:
        key = env_rcpt.key
        target = config.aliases.get(key)
        store = lmtp_route(decision.domain, config.routes)
        hops.append({"kind": "local", "mailbox": key, "exists": mailbox_exists(key),
                     "alias_for": list(target) if target else None,
                     **({"store": store.describe()} if store is not None else {})})
    for route in decision.chosen:
        if route.via == "lmtp":
            hops.append({"kind": "lmtp", "route": route.match, "store": route.describe()})
        elif route.via == "smarthost":
            host, port = route.host, route.port
            addresses = await resolver.addresses(host)
            hops.append({"kind": "smarthost", "route": route.match, "host": host, "port": port,
                         "tls": route.tls, "auth": route.username or None,
                         "addresses": [] if isinstance(addresses, DnsError) else
                         list(addresses),
                         "error": error_json(addresses) if isinstance(addresses, DnsError)
                         else None})
        else:
            mx = await resolver.mx(decision.domain)
            hops.append({"kind": "mx", "route": route.match, "port": config.delivery.mx_port,
                         **mx_json(mx)})
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
        if hop.get("store"):
            return f"accepted and delivered to the mailbox {hop['mailbox']} over {hop['store']}"
        return f"accepted and delivered to the mailbox {hop['mailbox']}"
    if hop["kind"] == "lmtp":
        return f"accepted and delivered over {hop['store']}"
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
