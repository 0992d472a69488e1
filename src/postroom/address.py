"""Parsing envelope paths (RFC 5321 §4.1.2) and spotting addresses that route themselves.

Pure: no I/O. ``parse_path`` turns the text inside ``MAIL FROM:`` / ``RCPT TO:`` into an
:class:`Address` or raises :class:`AddressError` with a reason. ``routing_hazard``
names the features that would let an address choose its own next hop (percent hack,
bang path, quoted ``@``, address literal, trailing dot); the relay policy refuses them.
"""

from __future__ import annotations

import re

from .model import Address

__all__ = ["AddressError", "parse_path", "routing_hazard"]

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_ADDRESS_LITERAL = re.compile(r"\[[^\[\]\\]*\]\Z")
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")


class AddressError(ValueError):
    """The path is not a valid RFC 5321 path; ``str()`` says why."""


def _utf8_local_ok(local: str) -> bool:
    # RFC 6531 extends atext with UTF8-non-ascii.
    ascii_version = "".join("a" if ord(c) > 127 else c for c in local)
    return bool(_DOT_STRING.match(ascii_version) or _QUOTED.match(ascii_version))


def _check_domain(domain: str, utf8: bool) -> str:
    if domain.startswith("[") and _ADDRESS_LITERAL.match(domain):
        return domain.lower()
    if domain.endswith("."):
        # Kept for routing_hazard to name; a trailing dot is never a valid Domain.
        body, dot = domain[:-1], "."
    else:
        body, dot = domain, ""
    if not body:
        raise AddressError("empty domain")
    try:
        # IDNA 2003 (nameprep): one spelling per domain, so "bücher.test",
        # "xn--bcher-kva.test", full-width letters and ideographic full stops all
        # compare equal with the configured local domains.
        ascii_domain = body.encode("idna").decode("ascii") if not body.isascii() else body
    except UnicodeError as exc:
        raise AddressError("domain is not a valid internationalised name") from exc
    labels = ascii_domain.lower().split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise AddressError(f"invalid domain label {label!r}")
    if len(ascii_domain) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    return ascii_domain.lower() + dot


def parse_path(text: str, *, allow_null: bool, utf8: bool = False) -> Address:
    """Parse ``<local@domain>`` (the angle brackets are required).

    ``allow_null`` admits ``<>`` (MAIL FROM only). Source routes
    (``<@relay:user@domain>``) are refused outright: RFC 5321 says to ignore them,
    but an address that names its own relays is exactly what a relay check must not
    guess about. ``utf8`` admits non-ASCII (the transaction used SMTPUTF8).
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return Address("", "")
        raise AddressError("null path not allowed here")
    try:
        if len(inner.encode("utf-8")) > MAX_PATH:
            raise AddressError("path longer than 256 octets")
    except UnicodeEncodeError:
        raise AddressError("address is not valid Unicode") from None
    if not utf8 and not inner.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    if inner.startswith("@"):
        raise AddressError("source routes are not accepted")
    if inner.startswith('"'):
        end = 1
        while end < len(inner):
            c = inner[end]
            if c == "\\":
                end += 2
                continue
            if c == '"':
                break
            end += 1
        local, rest = inner[: end + 1], inner[end + 1 :]
        if not rest.startswith("@"):
            raise AddressError("missing @domain after quoted local part")
        domain = rest[1:]
    else:
        if inner.count("@") != 1:
            raise AddressError("address must contain exactly one @")
        local, domain = inner.split("@")
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError("local part longer than 64 octets")
    if utf8:
        if not _utf8_local_ok(local):
            raise AddressError("invalid local part")
    elif not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        raise AddressError("invalid local part")
    address = Address(local, _check_domain(domain, utf8))
    if len(str(address).encode("utf-8")) > MAX_PATH:     # normalising may lengthen it
        raise AddressError("path longer than 256 octets")
    return address


def routing_hazard(address: Address) -> str | None:
    """Why this address could pick its own next hop, or ``None`` when it cannot.

    A mail server that honours ``user%other@local``, ``other!user@local``,
    ``"user@other"@local``, ``user@[192.0.2.1]`` or ``user@local.`` can be steered into
    relaying; Postroom never interprets them, and the policy refuses them.
    """
    local, domain = address.local, address.domain
    if local.startswith('"') and "@" in local:
        return "quoted local part contains '@'"
    if "%" in local:
        return "local part contains '%' (the percent hack)"
    if "!" in local:
        return "local part contains '!' (a bang path)"
    if domain.startswith("["):
        return "address literal instead of a domain name"
    if domain.endswith("."):
        return "domain ends with a dot"
    return None
