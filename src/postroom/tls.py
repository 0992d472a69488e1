"""TLS for the listeners: the server context, and a self-signed certificate when none is set.

The generated certificate lives in ``<data_dir>/tls/`` (key mode 0600), names the
configured hostname and ``localhost``, and is valid for ten years. Replace it with a
real one through ``[tls] cert_file`` and ``key_file``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

__all__ = ["ensure_self_signed", "server_context"]


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) in ``directory``, creating a self-signed pair if missing.

    The pair is made by a short-lived Python process (``python -m postroom.tls``): the
    cryptography package it needs would otherwise stay loaded for good, in the server
    and in every front end forked from it (measured, idle with two processes: RSS 60 +
    36 MB after a first start that made the pair in-process, 56 + 33 MB now)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "postroom.tls", str(directory), hostname],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not (cert_path.is_file() and key_path.is_file()):
        raise OSError(f"could not create a self-signed certificate in {directory}: "
                      f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return cert_path, key_path


def _make_self_signed(directory: Path, hostname: str) -> None:
    """The pair itself (in the short-lived process)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        sans.append(x509.DNSName("localhost"))
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


if __name__ == "__main__":          # ensure_self_signed's helper process
    _make_self_signed(Path(sys.argv[1]), sys.argv[2])
