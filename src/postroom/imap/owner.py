"""Who owns the mail: one uid and gid for every file under ``<data_dir>/mail``, so that
Postroom's deliveries and Dovecot's IMAP and LMTP processes never fight over permissions.

- Postroom running as a user: that user. Dovecot runs as it too.
- Postroom running as root: Dovecot never accesses mail as root, so the mail belongs to
  the owner of ``<data_dir>/mail`` when that is not root, else to the ``mail`` system
  user (uid 8 on Debian; ``nobody`` where there is none). The first start hands a
  root-owned ``mail`` tree to it (:func:`adopt`). Postroom, as root, then makes every
  new folder and message file for that owner (:class:`OwnedMaildirStore`).

Modes: folders 0700, message files 0600 (the Maildir store's own). Dovecot gives the
files it makes the mode of the Maildir's folder, so 0700 there keeps them private.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..store import MaildirStore

__all__ = ["FOLDER_MODE", "Owner", "OwnedMaildirStore", "adopt", "mail_owner", "walk"]

FOLDER_MODE = 0o700
log = logging.getLogger("postroom.imap")


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            user = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            user = str(self.uid)
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{user}:{group}"

    @property
    def foreign(self) -> bool:
        """Whether this process must chown what it makes (it runs as root for another)."""
        return os.geteuid() == 0 and self.uid != 0


def mail_owner(mail_dir: Path) -> Owner:
    """The owner of the mail for this process (see the module's docstring)."""
    if os.geteuid() != 0:
        return Owner(os.getuid(), os.getgid())
    try:
        st = os.stat(mail_dir)
        if st.st_uid != 0:
            return Owner(st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    for name in ("mail", "nobody"):
        try:
            pw = pwd.getpwnam(name)
            return Owner(pw.pw_uid, pw.pw_gid)
        except KeyError:
            continue
    raise LookupError("no user to own the mail: Dovecot never reads it as root; create a "
                      "user and give it data_dir/mail (chown -R)")


def _fix(path: Path, owner: Owner, st: os.stat_result, folder: bool) -> None:
    if owner.foreign and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
        os.lchown(path, owner.uid, owner.gid)
    if folder and stat.S_IMODE(st.st_mode) != FOLDER_MODE:
        os.chmod(path, FOLDER_MODE)


def _ensure_folder(path: Path, owner: Owner) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(mode=FOLDER_MODE)
        st = os.lstat(path)
    _fix(path, owner, st, folder=True)


def walk(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every folder and file under ``top`` (itself included), without following links."""
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    yield top, st
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        yield from walk(Path(entry.path))


def adopt(mail_dir: Path, owner: Owner, maildirs: Iterable[tuple[str, str]]) -> int:
    """Make ``mail_dir`` and each ``(domain, local)`` Maildir ready for both writers:
    created if missing, with mode 0700 and the owner. A root-owned ``mail_dir`` that the
    mail now belongs to another user is handed over whole (every file). Returns how many
    entries were handed over that way (0 on later starts)."""
    mail_dir.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    handed = 0
    if owner.foreign and os.lstat(mail_dir).st_uid == 0:
        for path, st in walk(mail_dir):
            if stat.S_ISLNK(st.st_mode):
                continue
            _fix(path, owner, st, folder=stat.S_ISDIR(st.st_mode))
            handed += 1
        log.warning("gave %s (%d entr%s) to %s: Dovecot never reads mail as root",
                    mail_dir, handed, "y" if handed == 1 else "ies", owner.name)
    _ensure_folder(mail_dir, owner)
    for domain, local in maildirs:
        _ensure_folder(mail_dir / domain, owner)
        base = mail_dir / domain / local
        _ensure_folder(base, owner)
        for sub in ("tmp", "new", "cur"):
            _ensure_folder(base / sub, owner)
    return handed


class OwnedMaildirStore(MaildirStore):
    """The Maildir store, for a process that runs as root while the mail belongs to
    another user: every folder it makes and every message it writes is given to that
    user (a message before Dovecot's change notification, 0.5 s, could see it)."""

    def __init__(self, root: Path, hostname: str, owner: Owner) -> None:
        super().__init__(root, hostname)
        self.owner = owner
        self._owned: set[Path] = set()

    def create(self, local: str, domain: str, folder: str = "") -> Path:
        base = self.maildir(local, domain)
        if base not in self._owned:
            adopt(self.root, self.owner, [(domain, local)])
            self._owned.add(base)
        made = super().create(local, domain, folder)
        if folder and made not in self._owned:
            self._owned.add(made)
            if self.owner.foreign:              # a folder we made (Junk) is the owner's too
                for path in (made, made / "tmp", made / "new", made / "cur"):
                    try:
                        os.chown(path, self.owner.uid, self.owner.gid)
                    except OSError as exc:
                        log.warning("cannot give %s to %s: %s", path, self.owner.name, exc)
        return made

    def deliver(self, local: str, domain: str, data: bytes | Iterable[bytes], *,
                sync_dir: bool = True, folder: str = "") -> Path:
        final = super().deliver(local, domain, data, sync_dir=sync_dir, folder=folder)
        if self.owner.foreign:
            try:
                os.chown(final, self.owner.uid, self.owner.gid)
            except OSError as exc:       # delivered all the same; doctor names the file
                log.warning("cannot give %s to %s: %s", final, self.owner.name, exc)
        return final
