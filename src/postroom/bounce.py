"""Delivery status notifications (RFC 3464 in RFC 6522 multipart/report) that explain.

Layer 2, pure: no I/O; the clock (``now``), the Message-ID and the MIME boundary are
injected, so the same inputs always give the same bytes.

Every report says, in plain words and per recipient, WHICH server refused (name, IP,
the hop that led there), at WHICH step of the conversation, WHAT it said (the exact
reply on its own line), WHAT that means and WHAT TO CHANGE. The words come from one
catalogue (:data:`CATALOGUE`), searched in order: the first entry whose status prefix,
step, hop and pattern all match wins; otherwise a fallback by class and subject
(:data:`CLASSES`, :data:`SUBJECTS`).

Report layout (invariants, tested): CRLF line ends, no line over 998 octets; part 1
``text/plain`` for people (quoted-printable when it is not ASCII); part 2
``message/delivery-status``, 7-bit; part 3 the whole original (``message/rfc822``) or
its header block (``text/rfc822-headers``). Only part 3 may carry 8-bit octets, and
then it and the multipart say ``Content-Transfer-Encoding: 8bit``.
"""

from __future__ import annotations

import datetime
import email.header
import email.utils
import quopri
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CATALOGUE", "CLASSES", "KINDS", "SUBJECTS", "CatalogueEntry", "Explanation",
    "RecipientReport", "build_report", "explain", "find_entry", "is_bounce_allowed",
    "is_sender_auth", "sender_names",
]

KINDS = ("failure", "delay", "success")
_ACTIONS = {"failure": ("failed",), "delay": ("delayed",),
            "success": ("delivered", "relayed", "expanded")}
_LOCAL_STEPS = ("routing", "dns", "local", "lifetime")
_STEP_WORDS = {
    "connect": "connect (opening the connection)",
    "greeting": "greeting (before we said anything)",
    "EHLO": "EHLO (introducing ourselves)",
    "STARTTLS": "STARTTLS (starting encryption)",
    "AUTH": "AUTH (logging in)",
    "MAIL": "MAIL FROM (naming the sender)",
    "RCPT": "RCPT TO (naming the recipient)",
    "DATA": "DATA (sending the message itself)",
    "routing": "routing (choosing where to send it)",
    "dns": "DNS lookup (finding the recipient's mail server)",
    "local": "local delivery (writing to the mailbox)",
    "lifetime": "retry limit (the message stayed in the queue too long)",
}
MAX_SUBJECT = 200
_WIDTH = 76
_MAX_LINE = 990                    # below RFC 5322's 998, leaving room for indentation


@dataclass(frozen=True)
class RecipientReport:
    """The outcome for one recipient, as the queue manager recorded it."""

    final_recipient: str
    original_recipient: str | None
    action: str                    # failed | delayed | delivered | relayed | expanded
    status: str                    # enhanced status code, e.g. "5.7.1"
    diagnostic: str                # the exact reply (lines joined by "\n") or our own error
    remote_host: str | None = None
    remote_ip: str | None = None
    step: str = ""                 # connect greeting EHLO STARTTLS AUTH MAIL RCPT DATA
    #                                routing dns local lifetime
    hop: str = ""                  # e.g. "smart host 127.0.0.1:2626 (route partner.example)"
    last_attempt: float | None = None
    will_retry_until: float | None = None


@dataclass(frozen=True)
class Explanation:
    """Plain words for people: what the failure means and what to do about it."""

    meaning: str
    action: str


@dataclass(frozen=True)
class CatalogueEntry:
    """One known failure. It applies when every given filter matches.

    ``statuses``: dotted prefixes of the enhanced status (``"5.7.1"``, ``"4.7"``, ``"5"``);
    ``*`` matches any class (``"*.2.2"``), ``""`` any status. ``pattern``: a regex searched
    case-insensitively in the diagnostic. ``steps``: the step must be one of these (empty:
    any). ``hop``: a regex searched in the hop. The texts are templates over
    ``{server} {target} {domain} {recipient} {route} {limit_note} {duration}``.
    """

    name: str
    statuses: tuple[str, ...]
    meaning: str
    action: str
    pattern: str | None = None
    steps: tuple[str, ...] = ()
    hop: str | None = None
    then_last_error: bool = False  # lifetime: explain the last error in the diagnostic too


_RELAY = (r"relay(ing)?\s+(access\s+)?(denied|not\s+(allowed|permitted)|prohibited)"
          r"|relaying mail to .* is not allowed|unable to relay|no relaying|we do not relay"
          r"|not\s+(allowed|permitted)\s+to\s+relay")
_AUTH_REQUIRED = ("{server} requires us to log in (SMTP AUTH) before it accepts this mail, "
                  "and we did not log in.",
                  "Set username and password on {route}. If {server} is a recipient's MX "
                  "rather than your smart host, we reached a submission service by mistake: "
                  "check the route's host and port.")
_ENCRYPTION_REQUIRED = ("{server} accepts this only over an encrypted (TLS) connection, and "
                        "we had not started TLS.",
                        "Set tls = \"required\" (or \"opportunistic\") on {route}.")
_NO_ROUTE = ("No address space covers {domain}: this server has no [[route]] that says where "
             "mail for {domain} goes, so it did not try to send it.",
             "Add a [[route]] whose match covers {domain} (for example match = \"*\" with "
             "via = \"mx\" to use DNS, or via = \"smarthost\" with a host), then ask the "
             "sender to send the message again.")
_LIFETIME = ("We kept trying to deliver this message for {duration} and have now given up.",
             "Find the earlier errors for this recipient in the log (search for the "
             "message's queue id), fix their cause, and ask the sender to send the message "
             "again.")
_NO_ANSWER = "Check that {target} is up and reachable from this server: a firewall that " \
             "drops packets is the usual cause. Try telnet to its port from here."

_DOCTOR_FROM = ("postroom doctor --from {sender} on this server checks the SPF, DKIM and "
                "DMARC records and prints the ones to publish.")
_DMARC = ("{server} refused the message under the DMARC policy of {from_domain}: neither "
          "an SPF pass for the sending server nor a valid DKIM signature of {from_domain} "
          "vouched for it, so {server} treated it as unauthenticated.",
          "Check the DMARC record at _dmarc.{from_domain}, the SPF record of "
          "{sender_domain} (it must allow the server that sends the mail out) and the DKIM "
          "record at {dkim_record}: at least one of SPF and DKIM must pass for "
          "{from_domain}. " + _DOCTOR_FROM)
_SPF = ("{server} refused the message because the SPF check of {sender_domain} failed: "
        "its SPF record does not list the address the message came from.",
        "Publish or fix the SPF record (a TXT record at {sender_domain}) so that it allows "
        "this server's outbound address, or the smart host's when one sends your mail on. "
        + _DOCTOR_FROM)
_DKIM = ("{server} refused the message because it carried no valid DKIM signature of "
         "{from_domain}.",
         "Check the DKIM record at {dkim_record}: its p= must be the public key of the "
         "[[dkim]] key that signs for {from_domain}. Without such a key, make one with "
         "postroom dkim keygen {from_domain} and publish the record it prints. "
         + _DOCTOR_FROM)

CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry("delivered", ("2",), "{server} accepted the message.", "Nothing to do."),
    CatalogueEntry(
        "tls-failed", ("",),
        "We could not set up an encrypted (TLS) connection with {server}, and the route "
        "requires encryption, so the message was not sent in clear.",
        "Check that {server} offers STARTTLS and that its certificate is valid for its name "
        "and not expired. If mail to it may travel unencrypted, set tls = \"opportunistic\" "
        "on {route}.", steps=("STARTTLS",)),
    CatalogueEntry(
        "relay-smarthost", ("",),
        "The smart host {server} refused to relay for us: it passes on mail to other "
        "domains only for clients it trusts, and it does not trust this server.",
        "It probably requires authentication: set username and password on {route}. "
        "Otherwise ask the administrator of {server} to allow this server's address to "
        "relay.", pattern=_RELAY, hop=r"^smart host"),
    CatalogueEntry(
        "relay-postroom", ("",),
        "The server refused to relay: the client that handed it the message was neither in "
        "its trusted networks nor logged in, and {domain} is not one of its own domains. "
        "These are Postroom's own words for that refusal (Exchange used the same).",
        "Have the sending program log in (SMTP AUTH on the submission port), or add its "
        "network to [relay] trusted_networks. If {domain} should be delivered here, add it "
        "to [domains] local.",
        pattern=r"relaying mail to .* is not allowed", steps=("", "local", "routing")),
    CatalogueEntry(
        "relay-mx", ("",),
        "The recipient's server {server} refused the message as relaying: it does not "
        "consider itself responsible for {domain}, so it took our delivery for a request "
        "to pass the mail on.",
        "Check the MX records of {domain} (for example: dig MX {domain}); they may point "
        "to a server that no longer takes its mail. If a route of ours sends {domain} to "
        "{server}, check that route. If both are right, only the administrator of {server} "
        "can fix this.", pattern=_RELAY),
    CatalogueEntry("sender-auth-dmarc", ("*.7.26", "*.7.509", "*.7.515"), *_DMARC),
    CatalogueEntry("sender-auth-spf", ("*.7.23", "*.7.24"), *_SPF),
    CatalogueEntry("sender-auth-dkim", ("*.7.20", "*.7.21", "*.7.22"), *_DKIM),
    CatalogueEntry(
        "sender-auth-ptr", ("*.7.25",),
        "{server} refused the message because the address this server sends from has no "
        "reverse DNS (PTR) record, or the name in it does not lead back to that address.",
        "Ask whoever owns the sending address (your ISP or hosting provider) for a PTR "
        "record that names this server's hostname, and give that name an A or AAAA record "
        "with the same address."),
    CatalogueEntry(
        "sender-null-mx", ("*.7.27",),
        "{server} refused the message because the sender's domain {sender_domain} "
        "publishes a null MX: it declares that it receives no mail, so no reply or bounce "
        "could reach the sender.",
        "Send from an address whose domain receives mail, or remove the null MX record of "
        "{sender_domain}."),
    CatalogueEntry("sender-auth-dmarc-text", ("5.7", "4.7", "5.0", "4.0"), *_DMARC,
                   pattern=r"\bdmarc\b|unauthenticated|authentication level"),
    CatalogueEntry("sender-auth-spf-text", ("5.7", "4.7", "5.0", "4.0"), *_SPF,
                   pattern=r"\bspf\b|sender policy framework"),
    CatalogueEntry("sender-auth-dkim-text", ("5.7", "4.7", "5.0", "4.0"), *_DKIM,
                   pattern=r"\bdkim\b"),
    CatalogueEntry(
        "auth-failed", ("*.7.8",), "{server} rejected our username or password.",
        "Check username and password on {route}: the password may have changed or "
        "expired."),
    CatalogueEntry("encryption-required", ("*.7.11",), *_ENCRYPTION_REQUIRED),
    CatalogueEntry("starttls-first", ("*.7.0",), *_ENCRYPTION_REQUIRED,
                   pattern=r"starttls|\btls\b|encrypt"),
    CatalogueEntry("auth-required", ("*.7.57",), *_AUTH_REQUIRED),
    CatalogueEntry("auth-required-text", ("*.7.0",), *_AUTH_REQUIRED, pattern=r"auth"),
    CatalogueEntry(
        "auth-refused", ("",), "{server} did not accept our login (AUTH).",
        "Check username and password on {route}, and that {server} offers PLAIN or LOGIN "
        "over TLS.", steps=("AUTH",)),
    CatalogueEntry(
        "sender-authentication", ("5.7", "4.7", "5.0", "4.0"),
        "{server} refused the message because the sender's domain failed an SPF, DKIM, "
        "DMARC or ARC check: it could not confirm that this server may send mail for "
        "{from_domain}.",
        "Check the SPF record of {sender_domain}, the DKIM record at {dkim_record} and the "
        "DMARC record at _dmarc.{from_domain}. " + _DOCTOR_FROM,
        pattern=r"\b(spf|dkim|dmarc|arc)\b|authentication (information|checks?)"),
    CatalogueEntry(
        "blocklisted", ("5.7", "4.7", "5.0", "4.0"),
        "{server} refused the message because this server's address is on a blocklist it "
        "consults, or has a poor reputation there.",
        "Look up this server's public address on the list named in the reply and follow "
        "its removal procedure, after making sure nothing on your network sends spam.",
        pattern=r"block ?list|black ?list|blocked using|\b(rbl|dnsbl)\b|spamhaus"
                r"|listed (at|on|in)|reputation"),
    CatalogueEntry("no-route", ("*.4.4",), *_NO_ROUTE, steps=("routing",)),
    CatalogueEntry("no-route-reply", ("*.4.4",), *_NO_ROUTE, pattern=r"no address space"),
    CatalogueEntry(
        "unroutable", ("*.4.4",),
        "No mail server could be found for {domain}: it has no usable MX record and no "
        "address (A or AAAA) record.",
        "Check the spelling of {domain} and look up its MX records (for example: dig MX "
        "{domain}). If they look right, the fault is in the DNS of {domain}."),
    CatalogueEntry(
        "unknown-user-local", ("*.1.1",),
        "There is no mailbox {recipient} on this server, and no alias by that name.",
        "Check the spelling. If the person should get mail here, add the mailbox "
        "(postroom users add) or an alias in [aliases].", hop=r"^local"),
    CatalogueEntry(
        "unknown-user", ("*.1.1",),
        "{server} says the mailbox {recipient} does not exist there.",
        "Check the spelling of the address. If it is right, the mailbox has been closed or "
        "renamed: reach the recipient another way and ask for their current address."),
    CatalogueEntry(
        "no-domain", ("*.1.2",),
        "The domain {domain} does not exist: DNS answered that there is no such name "
        "(NXDOMAIN).",
        "Check the spelling of {domain} in the address. If it is right, the domain has "
        "expired or has not been set up yet."),
    CatalogueEntry(
        "null-mx", ("*.1.10",),
        "The domain {domain} publishes a \"null MX\" record (RFC 7505): it declares that it "
        "accepts no email at all.",
        "Nothing on this server can change that. Check that the address is right, and "
        "reach the recipient another way."),
    CatalogueEntry(
        "mailbox-full", ("*.2.2",), "The mailbox of {recipient} is full.",
        "The recipient has to make room before more mail can be delivered: tell them "
        "another way, or send the message again later."),
    CatalogueEntry(
        "too-big", ("*.3.4", "*.2.3"),
        "The message is larger than {server} accepts{limit_note}.",
        "Make the message smaller (send large attachments as a link) and send it again."),
    CatalogueEntry(
        "smtputf8", ("*.6.7",),
        "An address or header contains non-ASCII characters (an internationalised "
        "address), and {server} does not support SMTPUTF8, so it cannot take the message.",
        "Use an ASCII-only address for this recipient or sender if one exists, or ask the "
        "administrator of {server} to enable SMTPUTF8."),
    CatalogueEntry(
        "alias-loop", ("*.4.6",),
        "An alias loops: {recipient} expands, directly or through other aliases, back into "
        "itself, so the message never reaches a mailbox.",
        "Fix [aliases] so that every alias ends at a mailbox or a remote address.",
        pattern=r"alias"),
    CatalogueEntry(
        "mail-loop", ("*.4.6",),
        "The message went round in a loop: it passed through too many mail servers (too "
        "many Received headers), so it was stopped.",
        "Read the Received headers of the returned message to see which servers pass it "
        "back and forth; a forward or a route on one of them points back at the other."),
    CatalogueEntry("lifetime", ("",), *_LIFETIME, steps=("lifetime",), then_last_error=True),
    CatalogueEntry("expired", ("*.4.7",), *_LIFETIME, then_last_error=True),
    CatalogueEntry(
        "connection-refused", ("*.4.1",),
        "Nothing answered at {target}: the connection was refused, so no mail server is "
        "listening there, or a firewall turned us away.",
        "Check that the mail server at {target} is running and that its port is open to "
        "this server (try telnet to it from here).", pattern=r"refused"),
    CatalogueEntry(
        "no-answer", ("*.4.1", "*.4.2"),
        "Nothing answered at {target}: the connection timed out or was cut off before the "
        "conversation finished.", _NO_ANSWER),
    CatalogueEntry(
        "dns-failure", ("*.4.3",),
        "The DNS lookup for {domain} failed: its name servers did not answer, or answered "
        "with an error, so we could not find its mail server.",
        "Check that this server's resolver works (look up any other domain). If only "
        "{domain} fails, its name servers are at fault."),
    CatalogueEntry(
        "try-later", ("4.7",),
        "{server} turned the message away for now and asked us to try again later: a "
        "temporary refusal, usually greylisting or rate limiting.",
        "Usually nothing: greylisting lets the message through on a later attempt. If it "
        "lasts for hours, check whether this server's address is on a blocklist, or sends "
        "{server} too much mail at once."),
)

CLASSES = {
    "2": ("{server} accepted the message", "Nothing to do."),
    "4": ("{server} could not take the message for now (a temporary failure)",
          "Nothing yet: a later attempt may succeed. If it keeps failing, the reply above "
          "is the place to start."),
    "5": ("{server} refused the message permanently",
          "The reply above is {server}'s own explanation; if it does not make the fix "
          "clear, ask the administrator of {server}."),
}
SUBJECTS = {
    "0": ("for a reason it did not classify", ""),
    "1": ("because of the address: the mailbox or domain is wrong or takes no mail",
          "Check the address for typing mistakes."),
    "2": ("because of the recipient's mailbox (full, disabled or not accepting mail)",
          "The recipient has to sort out their mailbox."),
    "3": ("because of a problem on the receiving system itself (out of space, overloaded "
          "or misconfigured)", ""),
    "4": ("because of a network or routing problem between us", "Check the route and "
          "the DNS records for the recipient's domain."),
    "5": ("because of an SMTP protocol problem (a command it did not understand or accept)",
          ""),
    "6": ("because of the message's content or format", ""),
    "7": ("for a security or policy reason (its rules on who may send what)", ""),
}

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPLY_CODE = re.compile(r"^\s*([245])\d\d(?:[ -]([245]\.\d{1,3}\.\d{1,3}))?\b")
_ADDRESS = re.compile(r"<([^<>@\s]+@[^<>\s]+)>")
_SIZE = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)\s*(bytes?|octets?|[kmg]i?b|kilobytes|megabytes)?",
                   re.I)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(days?|hours?|minutes?)\b", re.I)
_LAST_ERROR = re.compile(r"last (?:error|reply|attempt)\s*:?\s*(.+)$", re.I | re.S)


def _status_matches(prefix: str, status: str) -> bool:
    if not prefix:
        return True
    want, have = prefix.split("."), status.split(".")
    return len(want) <= len(have) and all(w in ("*", h) for w, h in zip(want, have, strict=False))


def _effective_status(status: str, diagnostic: str) -> str:
    """The given status, else the one in the reply, else the reply code's class."""
    if _STATUS.match(status):
        return status
    m = _REPLY_CODE.match(diagnostic)
    if m:
        return m.group(2) or f"{m.group(1)}.0.0"
    return ""


def _size_note(diagnostic: str) -> str:
    near = re.search(r"(?:limit|maximum|max|at most|exceeds?)\D{0,40}?" + _SIZE.pattern,
                     diagnostic, re.I)
    m = near or next((s for s in _SIZE.finditer(diagnostic) if s.group(2)), None)
    if m is None or len(m.group(1).replace(",", "")) < 3:
        return ""
    number, unit = m.group(1), (m.group(2) or "bytes")
    note = f"{number} {unit}"
    if unit.lower().startswith(("byte", "octet")):
        note += f", about {int(number.replace(',', '')) / 1_048_576:.1f} MB"
    return f" (its limit: {note})"


def _context(diagnostic: str, step: str, hop: str, recipient: str, remote_host: str | None,
             sender: str = "", from_domain: str = "", dkim_records: Sequence[str] = ()
             ) -> dict[str, str]:
    smart = re.search(r"smart host (\S+)", hop)
    route = re.search(r"\(route ([^)\s]+)\)", hop)
    found = _ADDRESS.search(diagnostic)
    recipient = recipient or (found.group(1) if found else "")
    domain = recipient.rpartition("@")[2] if "@" in recipient else ""
    for source, rx in ((hop, r"(?:MX of|address of|for) ([\w.-]+\.[\w-]+)"),
                       (diagnostic, r"covers ([\w.-]+\.[\w-]+)")):
        hit = re.search(rx, source)
        if not domain and hit:
            domain = hit.group(1)
    domain = domain or "the recipient's domain"
    if remote_host:
        server = remote_host
    elif smart:
        server = smart.group(1)
    elif step in _LOCAL_STEPS or hop.startswith("local"):
        server = "this server"
    elif domain != "the recipient's domain":
        server = f"the mail server of {domain}"
    else:
        server = "the receiving server"
    duration = _DURATION.search(diagnostic)
    return {
        "server": server,
        "target": smart.group(1) if smart else (remote_host or server),
        "domain": domain,
        "recipient": recipient or "the recipient",
        "route": (f"the [[route]] with match = \"{route.group(1)}\"" if route
                  else "its [[route]]"),
        "limit_note": _size_note(diagnostic),
        "duration": duration.group(0) if duration else "the whole retry period",
        **_sender_context(sender, from_domain, dkim_records),
    }


def _sender_context(sender: str, from_domain: str, dkim_records: Sequence[str]
                    ) -> dict[str, str]:
    """The sender's names for the sender-authentication entries: the envelope sender's
    domain (SPF), the From header's domain (DMARC) and the DKIM records its signatures
    name (``selector._domainkey.domain``)."""
    sender = sender.strip().strip("<>")
    sender_domain = sender.rpartition("@")[2].lower() if "@" in sender else ""
    from_domain = from_domain.lower() or sender_domain
    sender_domain = sender_domain or from_domain
    return {
        "sender": sender or "ADDRESS",
        "sender_domain": sender_domain or "the sender's domain",
        "from_domain": from_domain or "the sender's domain",
        "dkim_record": " and ".join(dkim_records) if dkim_records else
        f"SELECTOR._domainkey.{from_domain or 'DOMAIN'}",
    }


def _entry_matches(entry: CatalogueEntry, status: str, diagnostic: str, step: str, hop: str
                   ) -> bool:
    return (any(_status_matches(p, status) for p in entry.statuses)
            and (not entry.steps or step in entry.steps)
            and (entry.hop is None or re.search(entry.hop, hop, re.I) is not None)
            and (entry.pattern is None or re.search(entry.pattern, diagnostic, re.I) is not None))


def _sentence(template: str, ctx: dict[str, str]) -> str:
    """The template filled in; capitalised unless it opens with a name (mx.far.test)."""
    text = template.format_map(ctx).strip()
    if text.startswith(("the ", "this ", "its ")) or not template.startswith("{"):
        return text[:1].upper() + text[1:]
    return text


def find_entry(status: str, diagnostic: str, step: str, hop: str) -> CatalogueEntry | None:
    """The first catalogue entry that applies, or None (then the fallback applies)."""
    status = _effective_status(status, diagnostic)
    for entry in CATALOGUE:
        if _entry_matches(entry, status, diagnostic, step, hop):
            return entry
    return None


def explain(status: str, diagnostic: str, step: str, hop: str, *,
            recipient: str = "", remote_host: str | None = None, sender: str = "",
            from_domain: str = "", dkim_records: Sequence[str] = ()) -> Explanation:
    """Plain words for one failure: what it means, and what to change.

    ``recipient`` and ``remote_host`` only sharpen the wording (names instead of "the
    recipient", "the receiving server"). A lifetime diagnostic may carry the last error
    after "last error:" (``"gave up after 5 days; last error: 451 4.7.1 Try again"``);
    that error is then explained too. ``sender`` (the envelope sender), ``from_domain``
    (the From header's domain) and ``dkim_records`` (``selector._domainkey.domain`` of
    the message's signatures) name the records a sender-authentication refusal concerns.
    """
    status = _effective_status(status, diagnostic)
    ctx = _context(diagnostic, step, hop, recipient, remote_host, sender, from_domain,
                   dkim_records)
    entry = find_entry(status, diagnostic, step, hop)
    if entry is not None:
        meaning, action = _sentence(entry.meaning, ctx), _sentence(entry.action, ctx)
        last = _LAST_ERROR.search(diagnostic) if entry.then_last_error else None
        if last:
            inner_text = last.group(1).strip()
            inner_status = _effective_status("", inner_text)
            if inner_status and not _status_matches("*.4.7", inner_status):
                inner = explain(inner_status, inner_text, "", hop, recipient=recipient,
                                remote_host=remote_host, sender=sender,
                                from_domain=from_domain, dkim_records=dkim_records)
                meaning = f"{meaning} The last attempt failed like this: {inner.meaning}"
                action = f"{inner.action} Then ask the sender to send the message again."
        return Explanation(meaning, action)
    klass, _, rest = status.partition(".")
    subject = rest.partition(".")[0]
    class_meaning, class_action = CLASSES.get(klass, CLASSES["5"])
    subject_meaning, subject_action = SUBJECTS.get(subject, SUBJECTS["0"])
    if klass == "2":
        return Explanation(_sentence(class_meaning + ".", ctx), class_action)
    action = " ".join(a for a in (subject_action, class_action) if a)
    return Explanation(_sentence(f"{class_meaning} {subject_meaning}.", ctx),
                       _sentence(action, ctx))


def is_bounce_allowed(sender: str) -> bool:
    """False for the null reverse path: a bounce is never bounced (RFC 5321 §4.5.5)."""
    return sender.strip().strip("<>").strip() != ""


# --- the report ----------------------------------------------------------------------

def _date(timestamp: float) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(timestamp, datetime.UTC))


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    days, hours, mins = minutes // 1440, minutes % 1440 // 60, minutes % 60
    parts = [(days, "day"), (hours, "hour")] if days else [(hours, "hour"), (mins, "minute")]
    words = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n]
    return " ".join(words) or "less than a minute"


def _header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data


def _original_subject(original: bytes) -> str:
    """The Subject field's raw value, unfolded, control characters blanked, truncated."""
    lines = _header_block(original).decode("utf-8", "replace").split("\r\n")
    for i, line in enumerate(lines):
        if line[:8].lower() == "subject:":
            value = line[8:] + "".join(_continuations(lines[i + 1:]))
            text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", value).split())
            if len(text) > MAX_SUBJECT:
                text = text[:MAX_SUBJECT].rstrip() + "..."
            return text or "(no subject)"
    return "(no subject)"


def _continuations(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line[:1] not in (" ", "\t"):
            break
        out.append(line)
    return out


def _field(original: bytes, name: str) -> list[str]:
    """Every value of one header field, unfolded."""
    lines = _header_block(original).decode("utf-8", "replace").split("\r\n")
    name = name.lower() + ":"
    return [(line[len(name):] + "".join(_continuations(lines[i + 1:]))).strip()
            for i, line in enumerate(lines) if line[:len(name)].lower() == name]


def sender_names(original: bytes) -> tuple[str, tuple[str, ...]]:
    """The From header's domain (DMARC's), and the DNS names of the message's DKIM
    signatures' keys (``s=`` and ``d=``: ``selector._domainkey.domain``)."""
    found = email.utils.getaddresses(_field(original, "From"))
    address = next((a for _, a in found if "@" in a), "")
    records = []
    for value in _field(original, "DKIM-Signature"):
        tags = dict((k.strip().lower(), "".join(v.split())) for k, _, v in
                    (t.partition("=") for t in value.split(";")) if k.strip())
        if tags.get("s") and tags.get("d") and re.fullmatch(r"[\w.-]+", tags["s"] + tags["d"]):
            records.append(f"{tags['s']}._domainkey.{tags['d'].lower()}")
    return address.rpartition("@")[2].lower(), tuple(dict.fromkeys(records))


def is_sender_auth(entry: CatalogueEntry | None) -> bool:
    """Whether a catalogue entry is a refusal for SPF, DKIM, DMARC, ARC, PTR or a null
    MX of the sender: one that DNS records of the sender's domain fix."""
    return entry is not None and entry.name.startswith("sender-")


def _fold(name: str, value: str) -> str:
    """A header field, folded at spaces near 78 columns; no line over 998 octets.

    Runs of white space become one space; a word too long for a line is cut.
    """
    words: list[str] = []
    for word in value.split():
        words += [word[i:i + _MAX_LINE - 40] for i in range(0, len(word), _MAX_LINE - 40)]
    lines: list[str] = []
    line = f"{name}:"
    for n, word in enumerate(words):
        if n and len(line) + 1 + len(word) > 78:
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _ascii(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)


def _printable(text: str) -> str:
    """Text with control characters (CR, LF, NUL, C1...) replaced; Unicode letters kept."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _address_field(name: str, address: str) -> str:
    """``rfc822; addr``, or RFC 6533's ``utf-8;`` form with ``\\x{HEX}`` for non-ASCII."""
    if address.isascii():
        return _fold(name, f"rfc822; {_ascii(address)}")
    encoded = "".join(c if 0x21 <= ord(c) <= 0x7e and c not in "\\+=" else f"\\x{{{ord(c):X}}}"
                      for c in address)
    return _fold(name, f"utf-8; {encoded}")


def _subject_header(prefix: str, subject: str) -> str:
    value = f"{prefix}: {subject}"
    if value.isascii():
        return _fold("Subject", value)
    encoded = email.header.Header(value, "utf-8", header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {encoded}\r\n"


def _indented(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False) or [indent.rstrip()]


def _reply_lines(diagnostic: str, indent: str) -> list[str]:
    out = []
    for line in diagnostic.split("\n"):
        line = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", "?", line.rstrip("\r"))
        out += [indent + line[i:i + _MAX_LINE] for i in range(0, max(len(line), 1), _MAX_LINE)]
    return out


def _server_words(r: RecipientReport, reporting_mta: str) -> str:
    if r.remote_host and r.remote_ip:
        return f"{r.remote_host} [{r.remote_ip}]"
    if r.remote_host or r.remote_ip:
        return r.remote_host or f"[{r.remote_ip}]"
    if r.step in _LOCAL_STEPS or r.hop.startswith("local"):
        return f"this server, {reporting_mta}"
    return ""


_SUCCESS_NOTES = {
    "relayed": "It went to a server that does not send delivery notices: this is the last "
               "notice you will get for this recipient.",
    "expanded": "The address is a list or alias; it was passed to all of its members, and "
                "you will get no notices for them.",
}


def _recipient_block(kind: str, r: RecipientReport, reporting_mta: str,
                     names: dict[str, object]) -> list[str]:
    head = f"  {r.final_recipient}"
    if r.original_recipient and r.original_recipient.lower() != r.final_recipient.lower():
        # ORCPT comes from the sender: no control characters reach the text
        head += f" (you wrote to {_printable(r.original_recipient)})"
    lines = [head]

    def row(label: str, value: str) -> None:
        wrapped = _indented(value, " " * 18)
        lines.append(f"    {label:<14}{wrapped[0].lstrip()}")
        lines.extend(wrapped[1:])

    row("Result:", f"{r.action}, status {r.status}")
    if r.last_attempt is not None:
        row("When:" if kind == "success" else "Last attempt:", _date(r.last_attempt))
    if kind == "delay" and r.will_retry_until is not None:
        row("Trying until:", _date(r.will_retry_until))
    server = _server_words(r, reporting_mta)
    if server:
        row("Server:", server)
    if r.hop:
        row("Reached via:", r.hop)
    if r.step:
        row("Step:", _STEP_WORDS.get(r.step, r.step))
    if r.diagnostic:
        remote = bool(r.remote_host or r.remote_ip)
        lines.append("    It answered:" if remote and _REPLY_CODE.match(r.diagnostic)
                     else "    Details:")
        lines += _reply_lines(r.diagnostic, " " * 8)
    if kind == "success":
        if r.action in _SUCCESS_NOTES:
            lines += _indented(_SUCCESS_NOTES[r.action], " " * 4)
        return lines
    why = explain(r.status, r.diagnostic, r.step, r.hop, recipient=r.final_recipient,
                  remote_host=r.remote_host, **names)  # type: ignore[arg-type]
    lines += ["    What it means:", *_indented(why.meaning, " " * 8),
              "    What to do:", *_indented(why.action, " " * 8)]
    return lines


def _intro(kind: str, reported: Sequence[RecipientReport], arrival: float, now: float
           ) -> str:
    who = "the recipient below" if len(reported) == 1 else f"the {len(reported)} recipients below"
    if kind == "failure":
        return (f"Your message could not be delivered to {who}. This is final: this server "
                "will not try again. For each recipient, this report says which server "
                "refused the message, at which step, its exact words, what they mean and "
                "what to change.")
    if kind == "delay":
        until = [r.will_retry_until for r in reported if r.will_retry_until is not None]
        keep = (f"This server keeps trying until {_date(max(until))} and will tell you if "
                "it gives up." if until else "This server keeps trying and will tell you "
                "if it gives up.")
        return (f"Your message has not been delivered yet to {who}; it has been waiting "
                f"for {_span(now - arrival)}. This is only a warning: you do not need to "
                f"send it again. {keep}")
    return (f"Your message reached {who}. You asked to be told (NOTIFY=SUCCESS); this is "
            "that notice.")


def _human_part(kind: str, reporting_mta: str, subject: str, arrival: float, now: float,
                reported: Sequence[RecipientReport], others: Sequence[RecipientReport],
                returned: str, names: dict[str, object]) -> str:
    lines = [f"This is the mail system at {reporting_mta}.", "",
             *textwrap.wrap(_intro(kind, reported, arrival, now), _WIDTH), "",
             *_indented(f"Subject:  {subject}", "  "),
             f"  Arrived:  {_date(arrival)}", ""]
    for r in reported:
        lines += [*_recipient_block(kind, r, reporting_mta, names), ""]
    if others:
        note = "Other recipients of this message, not covered by this report: " + ", ".join(
            f"{r.final_recipient} ({r.action})" for r in others) + "."
        if kind == "failure" and any(r.action == "delayed" for r in others):
            note += (" This server is still trying to deliver to those marked delayed, and "
                     "will tell you if it gives up.")
        lines += [*textwrap.wrap(note, _WIDTH), ""]
    lines += textwrap.wrap(returned, _WIDTH)
    if kind != "success":
        lines += ["", *textwrap.wrap("If you cannot fix this yourself, forward this whole "
                                     "report to your mail administrator: it holds what they "
                                     "need to find the cause.", _WIDTH)]
    return "\n".join(lines) + "\n"


def _status_part(reporting_mta: str, envid: str | None, arrival: float, kind: str,
                 reported: Sequence[RecipientReport]) -> str:
    out = _fold("Reporting-MTA", f"dns; {_ascii(reporting_mta)}")
    if envid:
        out += _fold("Original-Envelope-Id", _ascii(envid))
    out += _fold("Arrival-Date", _date(arrival))
    for r in reported:
        out += "\r\n" + _address_field("Final-Recipient", r.final_recipient)
        if r.original_recipient:
            out += _address_field("Original-Recipient", r.original_recipient)
        out += _fold("Action", r.action) + _fold("Status", r.status)
        if r.remote_host or r.remote_ip:
            out += _fold("Remote-MTA", f"dns; {_ascii(r.remote_host or f'[{r.remote_ip}]')}")
        if r.diagnostic:
            # RFC 3464 2.3.6: "smtp" for a server's reply; our own errors get an X- type.
            kind_of = "smtp" if _REPLY_CODE.match(r.diagnostic) else "X-Postroom"
            out += _fold("Diagnostic-Code",
                         f"{kind_of}; " + _ascii(" ".join(r.diagnostic.split())))
        if r.last_attempt is not None:
            out += _fold("Last-Attempt-Date", _date(r.last_attempt))
        if kind == "delay" and r.will_retry_until is not None:
            out += _fold("Will-Retry-Until", _date(r.will_retry_until))
    return out


def build_report(*, kind: str, reporting_mta: str, original_sender: str, original: bytes,
                 arrival: float, recipients: Sequence[RecipientReport],
                 ret: str | None = None, envid: str | None = None,
                 max_return_size: int = 1_000_000, now: float, message_id: str,
                 boundary: str, original_size: int | None = None) -> bytes:
    """The whole report as CRLF bytes, to enqueue with the null reverse path.

    ``kind`` picks the recipients reported: a failure report lists the failed ones, a
    delay notice the delayed ones, a success notice the delivered, relayed or expanded
    ones; any others are only named in the text. ``ret`` is the RFC 3461 RET parameter
    (None when the sender gave none): a failure report returns the whole original unless
    RET=HDRS or it is larger than ``max_return_size``; delay and success notices return
    only the headers (RET governs failure reports only, RFC 3461 §4.3).
    ``original_size`` is the whole original's size when ``original`` is only its start
    (a big message is read no further than ``max_return_size`` + 1 bytes).
    Raises ValueError for an unknown kind, RET or action, or when nothing is reported.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}: use one of {', '.join(KINDS)}")
    ret = ret.upper() if ret else None
    if ret not in (None, "FULL", "HDRS"):
        raise ValueError(f"RET must be FULL or HDRS, not {ret!r}")
    known = {a for actions in _ACTIONS.values() for a in actions}
    for r in recipients:
        if r.action not in known:
            raise ValueError(f"unknown action {r.action!r} for {r.final_recipient}")
    reported = [r for r in recipients if r.action in _ACTIONS[kind]]
    others = [r for r in recipients if r.action not in _ACTIONS[kind]]
    if not reported:
        raise ValueError(f"no recipient has an action for a {kind} report")

    size = len(original) if original_size is None else original_size
    full = kind == "failure" and ret != "HDRS" and size <= max_return_size
    if full:
        body, ctype, described = original, "message/rfc822", "Undelivered message"
        returned = "The original message is attached."
    else:
        body, ctype = _header_block(original), "text/rfc822-headers"
        described = "Headers of the undelivered message" if kind == "failure" else \
            "Headers of the message"
        returned = "The headers of the original message are attached."
        if kind == "failure" and ret != "HDRS":
            returned = (f"The original message is {size} bytes, more than the "
                        f"{max_return_size} this server returns, so only its headers are "
                        "attached.")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    eight_bit = not body.isascii()
    while f"--{boundary}".encode() in body:
        boundary += "_"

    subject = _original_subject(original)
    prefix = {"failure": "Undeliverable", "delay": "Delayed", "success": "Delivered"}[kind]
    from_domain, dkim_records = sender_names(original)
    names: dict[str, object] = {"sender": original_sender, "from_domain": from_domain,
                                "dkim_records": dkim_records}
    text = _human_part(kind, reporting_mta, subject, arrival, now, reported, others, returned,
                       names)
    if text.isascii():
        text_cte, text_bytes = "7bit", text.replace("\n", "\r\n").encode("ascii")
    else:
        text_cte = "quoted-printable"
        text_bytes = quopri.encodestring(text.encode("utf-8")).replace(b"\n", b"\r\n")
    msgid = message_id.strip().strip("<>")

    head = (f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
            f"To: <{original_sender}>\r\n"
            + _subject_header(prefix, subject)
            + f"Date: {_date(now)}\r\n"
            f"Message-ID: <{msgid}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Auto-Submitted: auto-replied\r\n"
            "Content-Type: multipart/report; report-type=delivery-status;\r\n"
            f"\tboundary=\"{boundary}\"\r\n"
            + ("Content-Transfer-Encoding: 8bit\r\n" if eight_bit else "")
            + "\r\nThis is a MIME-encapsulated message.\r\n\r\n")
    parts = (
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {text_cte}\r\n"
        "Content-Description: Notification\r\n\r\n").encode() + text_bytes + (
        f"\r\n--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n\r\n"
        + _status_part(reporting_mta, envid, arrival, kind, reported)
        + f"\r\n--{boundary}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Description: {described}\r\n"
        + ("Content-Transfer-Encoding: 8bit\r\n" if eight_bit else "")
        + "\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    return head.encode("utf-8") + parts
