"""DKIM signing (RFC 6376, RFC 8463): the signatures for mail leaving for other servers.

A :class:`Signer` holds the ``[[dkim]]`` keys, loaded once. For a message it picks the
keys of the From: header's domain, or of its closest parent that has keys, and makes
one DKIM-Signature per key (RSA and Ed25519 for a dual-signed domain), to be put on
top of the message. Canonicalisation is relaxed/relaxed, without ``l=``; the body is
hashed as a stream, so a big message is never held whole. The tags are in the order
and form of RFC 8463's examples (``v a c d i q s t h bh b``, ``h=`` joined by `` : ``),
so the RFC's vector reproduces byte for byte.

Pure apart from the key files read by :meth:`Signer.load`: no clock (``now`` is given),
no DNS. The caller decides *whether* mail is signed (intake: mail of our own users that
leaves; the queue manager: its notices).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..config.parser import ConfigError
from ..config.schema import Config, Problem
from .keys import KeyError_, PrivateKey, algorithm_of, load

__all__ = ["SIGNED_HEADERS", "BodyHasher", "LoadedKey", "Signer", "dkim_signature",
           "from_domain", "signer_for", "relaxed_header", "split_message"]

# What a signature covers, each as often as it occurs; From once more (oversigned), so
# that a From: added on the way invalidates the signature.
SIGNED_HEADERS = ("from", "reply-to", "to", "cc", "subject", "date", "message-id",
                  "in-reply-to", "references", "mime-version", "content-type",
                  "content-transfer-encoding")
OVERSIGNED = ("from",)

_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class LoadedKey:
    domain: str
    selector: str
    key: PrivateKey
    algorithm: str              # rsa-sha256 | ed25519-sha256


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header section with its last CRLF, body). No blank line: all header, no body."""
    at = message.find(_HEADER_END)
    if at < 0:
        return message if message.endswith(b"\r\n") else message + b"\r\n", b""
    return message[: at + 2], message[at + 4:]


def _fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """The header section as (name, the whole field with its CRLF), in order."""
    out: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n")[:-1] if header.endswith(b"\r\n") else header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            name, text = out[-1]
            out[-1] = (name, text + line + b"\r\n")
        elif b":" in line:
            out.append((line.split(b":", 1)[0].strip().lower(), line + b"\r\n"))
    return out


def relaxed_header(field: bytes) -> bytes:
    """RFC 6376 §3.4.2: name in lower case, unfolded, runs of WSP as one SP, no WSP
    around the colon or at the end; CRLF-terminated."""
    name, _, value = field.partition(b":")
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


class BodyHasher:
    """SHA-256 of a body in relaxed canonicalisation (RFC 6376 §3.4.4), fed in chunks:
    WSP at line ends dropped, runs of WSP as one SP, empty lines at the end dropped."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._carry = b""           # a line not ended yet
        self._empty = 0             # empty lines held back: they may be the trailing ones

    def update(self, data: bytes) -> None:
        data = self._carry + data
        end = data.rfind(b"\r\n")
        if end < 0:
            self._carry = data
            return
        self._carry = data[end + 2:]
        self._lines(data[: end + 2])

    def _lines(self, block: bytes) -> None:
        block = _WSP_RUN.sub(b" ", _WSP_BEFORE_CRLF.sub(b"\r\n", block))
        block = block.replace(b" \r\n", b"\r\n")
        text = block.rstrip(b"\r\n")
        if not text:
            self._empty += block.count(b"\r\n")
            return
        self._hash.update(b"\r\n" * self._empty + text + b"\r\n")
        self._empty = (len(block) - len(text)) // 2 - 1

    def digest(self) -> bytes:
        if self._carry:
            self._lines(self._carry + b"\r\n")
            self._carry = b""
        return self._hash.digest()


def _fold(tags: list[tuple[str, str]], width: int = 76) -> str:
    """The tag list as a folded header value: breaks only at existing spaces, so that
    relaxed canonicalisation sees the same value folded or not."""
    words = "; ".join(f"{k}={v}" for k, v in tags).split(" ")
    lines, line = [], "DKIM-Signature:"
    for word in words:
        if len(line) + 1 + len(word) > width and line.strip():
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


def _sign_bytes(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    # RFC 8463 §3: Ed25519 signs the SHA-256 of the data (PureEdDSA over the hash)
    return key.sign(hashlib.sha256(data).digest())


def dkim_signature(header: bytes, body_hash: bytes, *, domain: str, selector: str,
                   key: PrivateKey, timestamp: int,
                   headers: Sequence[str] = SIGNED_HEADERS,
                   oversign: Sequence[str] = OVERSIGNED) -> bytes:
    """One DKIM-Signature field (CRLF-terminated) over ``header`` (the header section)
    and a body whose relaxed hash is ``body_hash``. ``headers`` lists the names to sign,
    each as often as it occurs, then ``oversign`` once more."""
    fields = _fields(header)
    present = [name for name, _ in fields]
    names = [n for n in (h.lower() for h in headers) for _ in range(present.count(n.encode()))]
    names += [n.lower() for n in oversign]
    # RFC 6376 §5.4.2: each name takes the last instance not taken yet, bottom up
    used: dict[bytes, int] = {}
    signed = b""
    for n in names:
        nb = n.encode()
        instances = [f for name, f in fields if name == nb]
        k = used.get(nb, 0)
        used[nb] = k + 1
        if k < len(instances):
            signed += relaxed_header(instances[len(instances) - 1 - k])
    algorithm = algorithm_of(key)
    tags = [("v", "1"), ("a", algorithm), ("c", "relaxed/relaxed"), ("d", domain),
            ("i", "@" + domain), ("q", "dns/txt"), ("s", selector), ("t", str(timestamp)),
            ("h", " : ".join(names)), ("bh", base64.b64encode(body_hash).decode()), ("b", "")]
    unsigned = _fold(tags)
    # the field itself, b= empty, without its CRLF (RFC 6376 §3.7)
    signed += relaxed_header(unsigned.encode())[:-2]
    b = base64.b64encode(_sign_bytes(key, signed)).decode()
    chunks = [b[i:i + 72] for i in range(0, len(b), 72)]
    return (unsigned + "\r\n\t".join(chunks) + "\r\n").encode()


def from_domain(header: bytes) -> str | None:
    """The domain of the one address in the From: field, lower case; None when there is
    no From:, more than one, or no domain."""
    froms = [f for name, f in _fields(header) if name == b"from"]
    if len(froms) != 1:
        return None
    value = froms[0].split(b":", 1)[1].replace(b"\r\n", b"").decode("utf-8", "replace")
    addresses = email.utils.getaddresses([value])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return None
    return addresses[0][1].rpartition("@")[2].strip().lower().rstrip(".") or None


class Signer:
    """The configured keys, loaded once, and the signatures they make."""

    def __init__(self, keys: Iterable[LoadedKey]) -> None:
        self.by_domain: dict[str, list[LoadedKey]] = {}
        for k in keys:
            self.by_domain.setdefault(k.domain, []).append(k)

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def keys_for(self, domain: str) -> list[LoadedKey]:
        """The keys of ``domain`` or of its closest parent that has keys."""
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            found = self.by_domain.get(".".join(labels[i:]))
            if found:
                return found
        return []

    def sign(self, header: bytes, body: Iterable[bytes], now: float) -> bytes:
        """The DKIM-Signature fields to put on top of a message (``header``, its header
        section; ``body``, its body in chunks); b"" when its From: domain has no key."""
        domain = from_domain(header)
        keys = self.keys_for(domain) if domain else []
        if not keys:
            return b""
        hasher = BodyHasher()
        for chunk in body:
            hasher.update(chunk)
        body_hash = hasher.digest()
        return b"".join(dkim_signature(header, body_hash, domain=k.domain, selector=k.selector,
                                       key=k.key, timestamp=int(now)) for k in keys)


def signer_for(config: Config) -> Signer:
    """The signer of ``config``'s ``[[dkim]]`` keys, each read once; a key file that
    cannot serve is a :class:`~postroom.config.ConfigError` naming its table and file,
    so that ``postroom check``, ``serve`` and ``reload`` refuse it like any other
    config error."""
    loaded, problems = [], []
    for i, t in enumerate(config.dkim):
        try:
            key = load(t.key_file)
        except KeyError_ as exc:
            problems.append(Problem(f"dkim[{i}].key_file", str(exc)))
            continue
        loaded.append(LoadedKey(t.domain, t.selector, key, algorithm_of(key)))
    if problems:
        raise ConfigError(config.source, problems)
    return Signer(loaded)
