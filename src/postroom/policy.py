"""Who may send what to whom: the relay decision, as pure functions.

Layer 2: no I/O. The SMTP session, ``postroom explain`` and ``postroom doctor`` all call
these functions, so what the tools say is what the server does. Every verdict carries
the reply for the wire and a plain-words reason for the log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from . import replies
from .address import routing_hazard
from .config import DEFAULT_ROUTES, Route
from .model import Address, Reply
from .routing import choose_route

__all__ = ["AUTH_REQUIRED", "NO_ROUTE", "RELAY_DENIED", "UNKNOWN_USER", "RelaySettings",
           "SessionSnapshot", "Verdict", "check_mail", "check_rcpt", "peer_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOCAL = "local"        # delivered to a mailbox on this server
RELAY = "relay"        # accepted for another host
REFUSED = "refused"

# Why a refusal: callers branch on these, never on the reply's text.
RELAY_DENIED = "relay-denied"      # not ours to relay (the seed case), or an address that
                                   # carries its own routing
UNKNOWN_USER = "unknown-user"      # a local domain without that mailbox or alias
NO_ROUTE = "no-route"              # a relay we would make, but no address space covers it
AUTH_REQUIRED = "auth-required"    # a submission listener before AUTH


def peer_address(text: str) -> IPAddress:
    """The peer's IP, with IPv4-mapped IPv6 (``::ffff:a.b.c.d``) unwrapped."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What the policy may look at: who is talking, how, and as whom."""

    peer: IPAddress
    listener: str = "mx"              # "mx" | "submission" | "submissions"
    tls: bool = False
    auth_user: str | None = None


@dataclass(frozen=True, slots=True)
class RelaySettings:
    local_domains: frozenset[str]
    trusted_networks: tuple[Network, ...]
    aliases: frozenset[str] = frozenset()
    routes: tuple[Route, ...] = DEFAULT_ROUTES


@dataclass(frozen=True, slots=True)
class Verdict:
    accept: bool
    reply: Reply
    reason: str
    kind: str = REFUSED
    refusal: str = ""                 # with kind REFUSED: RELAY_DENIED, UNKNOWN_USER, ...


def trusted_network(peer: IPAddress, settings: RelaySettings) -> Network | None:
    for net in settings.trusted_networks:
        if peer.version == net.version and peer in net:
            return net
    return None


def check_mail(session: SessionSnapshot) -> Verdict:
    """MAIL FROM: submission listeners need AUTH first (RFC 6409 §4.3)."""
    if session.listener != "mx" and session.auth_user is None:
        return Verdict(False, replies.AUTH_REQUIRED,
                       f"{session.listener} listener requires AUTH before MAIL",
                       refusal=AUTH_REQUIRED)
    return Verdict(True, replies.SENDER_OK, "sender accepted", kind=LOCAL)


def check_rcpt(
    session: SessionSnapshot,
    rcpt: Address,
    settings: RelaySettings,
    mailbox_exists: Callable[[str], bool],
) -> Verdict:
    """Decide one recipient on its final destination.

    - An address that carries its own routing is refused from everyone.
    - A local domain: accepted from anyone if a mailbox, an alias, or postmaster.
    - Any other domain: accepted only from a trusted network or an authenticated
      session; otherwise the seed case's ``550 5.7.1 Relaying mail to <…> is not allowed``.
    """
    hazard = routing_hazard(rcpt)
    if hazard is not None:
        return Verdict(False, replies.relay_denied(rcpt),
                       f"{hazard}; such addresses are never routed", refusal=RELAY_DENIED)
    if rcpt.domain in settings.local_domains:
        key = rcpt.key
        if rcpt.local.lower() == "postmaster":
            return Verdict(True, replies.RECIPIENT_OK,
                           f"postmaster of local domain {rcpt.domain} (RFC 5321 4.5.1)", LOCAL)
        if key in settings.aliases:
            return Verdict(True, replies.RECIPIENT_OK, f"alias in local domain {rcpt.domain}", LOCAL)
        if mailbox_exists(key):
            return Verdict(True, replies.RECIPIENT_OK, f"mailbox in local domain {rcpt.domain}", LOCAL)
        return Verdict(False, replies.unknown_user(rcpt),
                       f"{rcpt.domain} is a local domain but {key} is neither a mailbox nor an "
                       "alias", refusal=UNKNOWN_USER)
    why_not = []
    net = trusted_network(session.peer, settings)
    if net is not None:
        return _routed(rcpt, settings, f"relay for trusted network {net}: {session.peer} is in it")
    why_not.append(f"{session.peer} is not in trusted_networks "
                   f"({', '.join(map(str, settings.trusted_networks)) or 'none'})")
    if session.auth_user is not None:
        return _routed(rcpt, settings, f"relay for authenticated user {session.auth_user}")
    why_not.append("the session is not authenticated")
    why_not.append(f"{rcpt.domain} is not a local domain")
    return Verdict(False, replies.relay_denied(rcpt), "; ".join(why_not), refusal=RELAY_DENIED)


def _routed(rcpt: Address, settings: RelaySettings, why: str) -> Verdict:
    """A relay the sender may make: accepted only if an address space covers it."""
    decision = choose_route(rcpt.domain, settings.routes, settings.local_domains)
    if not decision.chosen:
        return Verdict(False, replies.no_route(rcpt.domain), f"{why}, but {decision.reason}",
                       refusal=NO_ROUTE)
    return Verdict(True, replies.RECIPIENT_OK, f"{why}; {decision.reason}", RELAY)
