"""DKIM signing: RFC 8463's vectors, canonicalisation, key choice (mailauth.sign)."""

from __future__ import annotations

import base64

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postroom.mailauth.keys import public_p, txt_record
from postroom.mailauth.sign import (
    BodyHasher,
    LoadedKey,
    Signer,
    dkim_signature,
    from_domain,
    split_message,
)

# RFC 8463 Appendix A (data): the Ed25519 key (A.1), its record (A.2), and the message
# signed with it and with an RSA key (A.3).
RFC_SEED = base64.b64decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
RFC_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC_ED25519_SIGNATURE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n")
RFC_RSA_SIGNATURE = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n")
RFC_MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n")
RFC_TIME = 1528637909


def _rfc_dns(name: bytes, timeout: float = 5) -> bytes | None:
    if name == b"brisbane._domainkey.football.example.com.":
        return f"v=DKIM1; k=ed25519; p={RFC_PUBLIC}".encode()
    return None


def test_dkimpy_verifies_the_rfc_8463_ed25519_signature_with_the_rfcs_public_key() -> None:
    assert dkim.verify(RFC_ED25519_SIGNATURE + RFC_MESSAGE, dnsfunc=_rfc_dns)
    tampered = RFC_ED25519_SIGNATURE + RFC_MESSAGE.replace(b"hungry", b"thirsty")
    assert not dkim.verify(tampered, dnsfunc=_rfc_dns)


def test_the_rfc_8463_private_key_gives_the_rfcs_public_key() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(RFC_SEED)
    assert public_p(key) == RFC_PUBLIC
    assert txt_record(key) == f"v=DKIM1; k=ed25519; p={RFC_PUBLIC}"


def test_our_signer_reproduces_the_rfc_8463_ed25519_signature() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(RFC_SEED)
    header, body = split_message(RFC_MESSAGE)
    h = BodyHasher()
    h.update(body)
    sig = dkim_signature(header, h.digest(), domain="football.example.com",
                         selector="brisbane", key=key, timestamp=RFC_TIME,
                         headers=("from", "to", "subject", "date", "message-id"),
                         oversign=("from", "subject", "date"))

    def b_value(field: bytes) -> bytes:
        text = field.replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b"")
        return text.split(b"b=")[-1]

    assert b"bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=" in sig
    assert b_value(sig) == b_value(RFC_ED25519_SIGNATURE)
    assert dkim.verify(sig + RFC_MESSAGE, dnsfunc=_rfc_dns)


def test_the_rfc_body_hash_is_the_same_fed_in_any_chunks() -> None:
    _, body = split_message(RFC_MESSAGE + b"\r\n  \r\n\r\n")
    for size in (1, 2, 3, 7, 1000):
        h = BodyHasher()
        for i in range(0, len(body), size):
            h.update(body[i:i + size])
        assert base64.b64encode(h.digest()) == b"2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="


@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n", b"x", b"a \t b \r\n\r\n c\t\r\n",
                                  b"no end of line", b" \r\nlead\r\n \t\r\n"])
def test_body_canonicalisation_agrees_with_dkimpy(body: bytes) -> None:
    # (a last line without CRLF that ends in WSP is left out: dkimpy keeps that WSP, RFC
    # 6376 §3.4.4 drops it; SMTP mail always ends in CRLF, so it never reaches us)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(RFC_SEED)
    message = b"From: a@football.example.com\r\nSubject:  x \r\n\t y\r\n\r\n" + body
    signer = Signer([LoadedKey("football.example.com", "brisbane", key, "ed25519-sha256")])
    header, b = split_message(message)
    sig = signer.sign(header, [b], RFC_TIME)
    assert dkim.verify(sig + message, dnsfunc=_rfc_dns)


def _rsa(domain: str, selector: str) -> LoadedKey:
    return LoadedKey(domain, selector, rsa.generate_private_key(public_exponent=65537,
                                                                key_size=2048), "rsa-sha256")


def test_a_domain_with_both_keys_gets_two_signatures_each_verified_by_dkimpy() -> None:
    r = _rsa("example.org", "r1")
    e = LoadedKey("example.org", "e1", ed25519.Ed25519PrivateKey.generate(), "ed25519-sha256")
    records = {b"r1._domainkey.example.org.": txt_record(r.key).encode(),
               b"e1._domainkey.example.org.": txt_record(e.key).encode()}
    message = (b"From: Alice <alice@mail.example.org>\r\nTo: bob@far.test\r\n"
               b"Subject: two\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n")
    header, body = split_message(message)
    sigs = Signer([r, e]).sign(header, [body], 1_700_000_000)
    signed = sigs + message
    assert signed.count(b"DKIM-Signature:") == 2

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)
    d = dkim.DKIM(signed)
    assert d.verify(idx=0, dnsfunc=dns) and d.verify(idx=1, dnsfunc=dns)
    assert b"h=from : to : subject : message-id : from;" in sigs.replace(b"\r\n", b"")
    assert b"a=rsa-sha256" in sigs and b"a=ed25519-sha256" in sigs
    assert b"l=" not in sigs and b"c=relaxed/relaxed" in sigs


def test_keys_are_chosen_by_the_from_domain_or_its_closest_parent() -> None:
    parent, child = _rsa("example.org", "a"), _rsa("eu.example.org", "b")
    signer = Signer([parent, child])
    assert signer.keys_for("example.org") == [parent]
    assert signer.keys_for("mail.example.org") == [parent]
    assert signer.keys_for("x.eu.example.org") == [child]
    assert signer.keys_for("example.net") == []
    assert signer.keys_for("org") == []


@pytest.mark.parametrize(("header", "domain"), [
    (b"From: Alice <alice@Example.ORG>\r\n", "example.org"),
    (b"From: alice@example.org (Alice)\r\n", "example.org"),
    (b"From:\r\n \"A, B\" <a@example.org>\r\n", "example.org"),
    (b"To: x@y\r\n", None),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n", None),
    (b"From: a@example.org, b@example.net\r\n", None),
    (b"From: nobody\r\n", None),
])
def test_from_domain(header: bytes, domain: str | None) -> None:
    assert from_domain(header) == domain


def test_mail_whose_from_domain_has_no_key_is_not_signed() -> None:
    signer = Signer([_rsa("example.org", "a")])
    header, body = split_message(b"From: x@example.net\r\n\r\nhi\r\n")
    assert signer.sign(header, [body], 0) == b""
