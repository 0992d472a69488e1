"""Dovecot's users: a passwd-file written from Postroom's user store.

Format, one user a line (Dovecot's passwd-file; uid, gid and home come from
``mail_uid``, ``mail_gid`` and ``mail_home`` in ``dovecot.conf``)::

    alice@example.org:{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$...::::::

The file is mode 0600 and holds password hashes: it is never logged or shown. It is
rewritten whole (a temporary file, fsync, rename), so Dovecot never reads half of it.
Only argon2id hashes are written (Dovecot reads them as ``ARGON2ID``); a user with any
other hash could not log in, and :func:`unusable` names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write

__all__ = ["SCHEME", "read_passwd", "render_passwd", "unusable", "write_passwd"]

SCHEME = "{ARGON2ID}"


def _usable(address: str, digest: str) -> bool:
    return digest.startswith("$argon2id$") and ":" not in digest and ":" not in address \
        and "\n" not in address


def unusable(credentials: Sequence[tuple[str, str]]) -> list[str]:
    """The users whose hash Dovecot cannot read (so they cannot log in)."""
    return [address for address, digest in credentials if not _usable(address, digest)]


def render_passwd(credentials: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{address}:{SCHEME}{digest}::::::\n"
                   for address, digest in credentials if _usable(address, digest))


def write_passwd(path: Path, credentials: Sequence[tuple[str, str]]) -> None:
    """Replace ``path`` atomically with the users' passwd-file (mode 0600)."""
    atomic_write(path, render_passwd(credentials), 0o600)


def read_passwd(path: Path) -> dict[str, str]:
    """Address -> hash (without the scheme) as the file holds them; {} when it is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        address, _, rest = line.partition(":")
        digest = rest.split(":", 1)[0]
        if address and not address.startswith("#"):
            out[address] = digest.removeprefix(SCHEME)
    return out
