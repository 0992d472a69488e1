"""Content conversion: trace headers, alias expansion and loop detection. Pure: no I/O.

- At receipt: a ``Received`` header (RFC 5321 §4.4) on every message; ``Message-ID``
  and ``Date`` added to submitted messages that lack them (RFC 6409 §8).
- In the queue: aliases expand to their targets, recursively, without loops.
- At local delivery: ``Return-Path`` and ``Delivered-To`` go on top, and line ends
  become LF for the Maildir.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CRLF_PARAM", "FOLDER_PARAM", "MAX_HOPS", "Expansion", "count_hops", "delivery_headers", "expand",
    "local_delivery_bytes", "missing_headers", "received_header", "xtext_decode", "xtext_encode",
]

# A queued message's MAIL parameter naming the Maildir folder of its local deliveries
# ("Junk" for a message that inbound verification quarantined). Not a valid
# esmtp-keyword (lower case, a dot), so no client can send it.
FOLDER_PARAM = "postroom.folder"
# ... and one saying that its line ends are all CRLF, with no CR or LF alone (the SMTP
# core checked every line of a big message as it came): its Maildir copy is then made
# by deleting every CR, one pass about twice as fast as replacing CRLF.
CRLF_PARAM = "postroom.crlf"
MAX_HOPS = 100          # RFC 5321 §6.3: a simple "hop count" of Received headers
MAX_ALIAS_DEPTH = 20

_HEADER_END = re.compile(rb"\r\n\r\n")
_RECEIVED = re.compile(rb"(?im)^received:")


def _date(timestamp: float) -> str:
    return _date_of(int(timestamp))


@functools.lru_cache(maxsize=4)
def _date_of(second: int) -> str:
    """The RFC 5322 date of a second (seconds are all it shows): made once a second."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


@functools.lru_cache(maxsize=1024)
def _literal(peer: str) -> str:
    ip = ipaddress.ip_address(peer)
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def received_header(
    *, helo: str, peer: str, hostname: str, protocol: str, queue_id: str,
    recipient: str | None, timestamp: float,
) -> bytes:
    """A Received header, folded, CRLF-terminated. ``protocol`` as RFC 3848 names it."""
    # printable ASCII without parentheses: the HELO name sits before a comment
    helo_text = re.sub(r"[^\x21-\x7e]|[()]", "?", helo)[:255]
    date = _date(timestamp)
    for_part = f"\r\n\tfor <{recipient}>" if recipient else ""
    return (
        f"Received: from {helo_text} ({_literal(peer)})\r\n"
        f"\tby {hostname} (Postroom) with {protocol} id {queue_id}{for_part};\r\n"
        f"\t{date}\r\n"
    ).encode()


def header_block(data: bytes) -> bytes:
    m = _HEADER_END.search(data)
    return data[: m.start() + 2] if m else data


def count_hops(data: bytes) -> int:
    return len(_RECEIVED.findall(header_block(data)))


def missing_headers(data: bytes, hostname: str, timestamp: float) -> bytes:
    """Date and Message-ID lines to add to a submitted message that lacks them."""
    head = header_block(data).lower()
    add = b""
    if not re.search(rb"(?m)^message-id:", head):
        add += f"Message-ID: <{secrets.token_hex(12)}@{hostname}>\r\n".encode()
    if not re.search(rb"(?m)^date:", head):
        add += f"Date: {_date(timestamp)}\r\n".encode()
    return add


@dataclass(frozen=True)
class Expansion:
    """Where one recipient ends up: final addresses, or why it cannot be expanded."""

    targets: tuple[str, ...]
    error: str = ""


def expand(address: str, aliases: Mapping[str, tuple[str, ...]]) -> Expansion:
    """Expand an alias (lower-case key) into its final targets, depth first.

    A target that is itself an alias expands in turn. An address met again during the
    expansion is a mailbox, not expanded a second time: ``a = [a, b]`` keeps a copy in
    a's own mailbox (as in Postfix), and a cycle ends at the address that closes it.
    Addresses that are not aliases are returned unchanged.
    """
    if address not in aliases:
        return Expansion((address,))
    seen: set[str] = set()
    out: list[str] = []

    def walk(addr: str, depth: int) -> str:
        if depth > MAX_ALIAS_DEPTH:
            return f"aliases nested deeper than {MAX_ALIAS_DEPTH} levels at {addr}"
        if addr in seen or addr not in aliases:
            out.append(addr)
            return ""
        seen.add(addr)
        for target in aliases[addr]:
            err = walk(target, depth + 1)
            if err:
                return err
        return ""

    error = walk(address, 0)
    if error:
        return Expansion((), error)
    return Expansion(tuple(dict.fromkeys(out)))


def delivery_headers(sender: str, recipient: str) -> bytes:
    """The trace lines a local delivery adds (RFC 5321 4.4), CRLF ends."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()


def local_delivery_bytes(data: bytes, sender: str, recipient: str) -> bytes:
    """The Maildir file's content: Return-Path and Delivered-To, then the message, LF ends."""
    return (delivery_headers(sender, recipient) + data).replace(b"\r\n", b"\n")


def xtext_encode(text: str) -> str:
    """RFC 3461 §4 xtext: '+', '=' and characters outside '!'..'~' as "+HH"."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode()) for c in text)


def xtext_decode(text: str) -> str:
    """The inverse of :func:`xtext_encode`; malformed escapes are kept as they are."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "replace")
    while i < len(raw):
        if raw[i:i + 1] == b"+" and re.fullmatch(rb"[0-9A-F]{2}", raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")
