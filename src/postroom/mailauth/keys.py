"""DKIM keys: made, read, and turned into the TXT record to publish.

A key file is PEM (PKCS#8, mode 0600): an RSA key (at least 1024 bits, 2048 made) for
``rsa-sha256``, or an Ed25519 key for ``ed25519-sha256`` (RFC 8463). The algorithm is read
from the file, never configured beside it, so the two cannot disagree.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = ["ALGORITHMS", "KeyError_", "PrivateKey", "algorithm_of", "dkimpy_private",
           "generate", "load", "public_p", "txt_record"]

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
RSA_MIN_BITS = 1024          # RFC 8301: verifiers must not accept less


class KeyError_(ValueError):
    """A key file that cannot serve for DKIM; the message says why and what to do."""


def generate(path: Path, algorithm: str) -> PrivateKey:
    """Make a key of ``algorithm`` ("rsa" or "ed25519") at ``path`` (mode 0600; the folder
    is made 0700). Refuses to overwrite an existing file."""
    if algorithm not in ALGORITHMS:
        raise KeyError_(f"{algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    key: PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return key


def load(path: Path) -> PrivateKey:
    """Read a key file; :class:`KeyError_` names what is wrong with it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyError_(f"{path}: no such file (make one with `postroom dkim keygen`)") from None
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyError_(f"{path}: not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyError_(f"{path}: an RSA key of {key.key_size} bits; DKIM verifiers "
                            f"refuse keys under {RSA_MIN_BITS} bits (RFC 8301): make a new one")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyError_(f"{path}: a {type(key).__name__}; DKIM uses RSA or Ed25519 keys")


def algorithm_of(key: PrivateKey) -> str:
    """The DKIM signing algorithm (the signature's a= tag) for a key."""
    return "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"


def public_p(key: PrivateKey) -> str:
    """The p= value of the key's DNS record: base64 of the DER SubjectPublicKeyInfo for
    RSA (RFC 6376), of the raw 32-byte public key for Ed25519 (RFC 8463)."""
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        raw = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def txt_record(key: PrivateKey) -> str:
    """The TXT record's text to publish at ``SELECTOR._domainkey.DOMAIN``."""
    k = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"
    return f"v=DKIM1; k={k}; p={public_p(key)}"


def dkimpy_private(key: PrivateKey) -> bytes:
    """The private key in the form dkimpy's signer takes: PEM for RSA, base64 of the raw
    32-byte seed for Ed25519."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return base64.b64encode(raw)
