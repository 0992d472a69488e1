"""The Authentication-Results header field (RFC 8601): written, and read back.

:func:`render` writes the one field this server adds; :func:`authserv_id` reads the
authserv-id of a field found in a message; :func:`neutralise_forged` renames the fields
that claim to be ours (§5: a receiver must not trust, and should remove, results that
claim its own authserv-id before its border). The rename keeps the length, so it works
on a big message's file in place.

Also the small header reading that verification needs (:func:`header_fields`,
:func:`from_domains`): pure, bounded, never raising.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FORGED_NAME", "Method", "authserv_id", "from_domains", "header_fields",
           "neutralise_forged", "render"]

NAME = b"Authentication-Results"
FORGED_NAME = b"X-Forged-Authn-Results"       # the same length as NAME
assert len(FORGED_NAME) == len(NAME)
MAX_FIELDS = 1000                             # header fields looked at in one message
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_TOKEN_SAFE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+\Z")


@dataclass(frozen=True, slots=True)
class Method:
    """One ``method=result`` with its reason and properties, e.g.
    ``Method("dkim", "pass", props=(("header.d", "example.com"),))``."""

    method: str
    result: str
    reason: str = ""
    props: tuple[tuple[str, str], ...] = ()
    comment: str = ""


def _value(text: str) -> str:
    """A pvalue: as it is when it is a token (or an address), else quoted."""
    if text and _TOKEN_SAFE.match(text):
        return text
    cleaned = text.replace("\\", "\\\\").replace('"', '\\"')
    cleaned = "".join(c if c.isprintable() else "?" for c in cleaned)
    return f'"{cleaned}"'


def _comment(text: str) -> str:
    cleaned = "".join(c if c.isprintable() and c not in "()\\" else " " for c in text)
    return f"({cleaned[:200]})"


def render(authserv: str, methods: Sequence[Method]) -> bytes:
    """The whole field, folded one method per line, CRLF-terminated."""
    lines = [f"Authentication-Results: {authserv}"]
    if not methods:
        lines[0] += "; none"
    for m in methods:
        part = f"{m.method}={m.result}"
        if m.comment:
            part += " " + _comment(m.comment)
        if m.reason:
            part += f" reason={_value(m.reason[:200])}"
        for key, value in m.props:
            part += f" {key}={_value(value[:255])}"
        lines[-1] += ";"
        lines.append("\t" + part)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def header_fields(head: bytes) -> list[tuple[bytes, bytes, int]]:
    """(name, unfolded value, offset of the name) for each field of a message's header
    (the bytes before the first empty line), at most :data:`MAX_FIELDS`."""
    end = head.find(b"\r\n\r\n")
    block = head if end < 0 else head[:end + 2]
    fields: list[tuple[bytes, bytes, int]] = []
    starts = [m for m in _FIELD.finditer(block) if m.start() == 0 or block[m.start() - 1:
                                                                           m.start()] == b"\n"]
    for i, m in enumerate(starts[:MAX_FIELDS]):
        stop = starts[i + 1].start() if i + 1 < len(starts) else len(block)
        raw = block[m.end():stop]
        value = re.sub(rb"\r?\n[ \t]", b" ", raw).strip()
        fields.append((m.group(1), value, m.start()))
    return fields


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value: the first token, before any
    version number and the first ';' (comments removed). Lower case; "" if none."""
    text = value.decode("utf-8", "replace")[:2000]
    before = 0
    while before < 5 and "(" in text:
        text = _COMMENT.sub(" ", text)
        before += 1
    text = text.split(";", 1)[0].strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end if end > 0 else None].strip().lower()
    return text.split()[0].lower() if text.split() else ""


def neutralise_forged(head: bytearray, ours: str) -> int:
    """Rename, in place, each Authentication-Results field of ``head`` (a message's
    first bytes) whose authserv-id is ``ours``; returns how many."""
    ours = ours.lower()
    count = 0
    for name, value, offset in header_fields(bytes(head)):
        if name.lower() == NAME.lower() and authserv_id(value) == ours:
            head[offset:offset + len(NAME)] = FORGED_NAME
            count += 1
    return count


def from_domains(fields: Sequence[tuple[bytes, bytes, int]]) -> list[str]:
    """The domains of the addresses in the From: fields (RFC 7489 §6.6.1 wants one)."""
    out: list[str] = []
    for name, value, _ in fields:
        if name.lower() != b"from":
            continue
        text = value.decode("utf-8", "replace")[:2000]
        for _, address in email.utils.getaddresses([text]):
            if "@" in address:
                out.append(address.rpartition("@")[2].strip().rstrip(".").lower())
            else:
                out.append("")
    return out
