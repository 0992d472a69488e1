"""The store's health, for ``postroom doctor``: can every user log in, can Dovecot and
Postroom both use every Maildir, is Dovecot up. Each problem comes with its fix.

Pure but for reading the file system (:func:`maildir_problems` walks the Maildirs; run
it off the event loop).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .owner import Owner, walk
from .passwd import unusable

__all__ = ["MAX_ENTRIES", "login_problems", "maildir_problems", "problem", "reach_problems"]

MAX_ENTRIES = 100_000          # a doctor run looks at this many files at most
_EXAMPLES = 3


def problem(kind: str, finding: str, fix: str) -> dict[str, str]:
    return {"kind": kind, "finding": finding, "fix": fix}


def login_problems(credentials: Sequence[tuple[str, str]], in_file: dict[str, str],
                   known_to_dovecot: set[str] | None, passwd: Path) -> list[dict[str, str]]:
    """Users who cannot log in over IMAP (or removed users who still can), and why.

    ``in_file``: what the passwd-file holds; ``known_to_dovecot``: the users Dovecot
    lists (None when it could not be asked)."""
    out = []
    restart = f"postroom restart imap (it rewrites {passwd} from the user store)"
    bad = set(unusable(credentials))
    for address in sorted(bad):
        out.append(problem("cannot-log-in", f"{address} cannot log in over IMAP: its "
                           "password hash is not argon2id, which Dovecot reads",
                           f"postroom users passwd {address} --password-stdin"))
    store = {a: d for a, d in credentials if a not in bad}
    stale = sorted(a for a, d in store.items() if in_file.get(a) != d)
    for address in stale:
        out.append(problem("cannot-log-in", f"{address} cannot log in over IMAP with its "
                           f"password: {passwd} " + ("lacks it" if address not in in_file
                                                     else "holds an older password"),
                           restart))
    for address in sorted(set(in_file) - set(store) - bad):
        out.append(problem("removed-can-log-in", f"{address} is no longer a user but can "
                           f"still log in over IMAP ({passwd} still lists it)", restart))
    if known_to_dovecot is not None:
        for address in sorted(set(store) - set(stale) - known_to_dovecot):
            out.append(problem("cannot-log-in", f"{address} cannot log in over IMAP: "
                               "Dovecot does not know it (doveadm user '*')", restart))
    try:
        mode = stat.S_IMODE(os.stat(passwd).st_mode)
        if mode & 0o077:
            out.append(problem("passwd-mode", f"{passwd} is mode {mode:04o}: other users "
                               "can read the password hashes", f"chmod 600 {passwd}"))
    except FileNotFoundError:
        pass
    return out


def reach_problems(mail_dir: Path, owner: Owner) -> list[dict[str, str]]:
    """Folders above ``mail_dir`` that the mail owner cannot pass through."""
    if os.geteuid() != 0 or owner.uid == 0:
        return []               # the owner is this process: it got here
    out = []
    for folder in reversed(mail_dir.resolve().parents):
        try:
            st = os.stat(folder)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid == owner.uid:
            ok = bool(mode & 0o100)
        elif st.st_gid == owner.gid:
            ok = bool(mode & 0o010)
        else:
            ok = bool(mode & 0o001)
        if not ok:
            out.append(problem("unreachable", f"the mail owner {owner.name} cannot reach "
                               f"{mail_dir}: {folder} is mode {mode:04o}",
                               f"chmod o+x {folder} (or move data_dir to a folder every "
                               "user may pass through)"))
    return out


def _open_to_others(mode: int, folder: bool, size: int) -> bool:
    """Whether other users may read or change it. Dovecot's own empty marker files
    (``dovecot-uidvalidity.<hex>``, mode 0444) hold nothing to read."""
    if folder:
        return bool(mode & 0o077)
    return bool(mode & 0o022) or (bool(mode & 0o044) and size > 0)


def maildir_problems(mail_dir: Path, owner: Owner,
                     max_entries: int = MAX_ENTRIES) -> tuple[list[dict[str, str]], int]:
    """Maildirs with files of another owner, without the owner's access, or open to other
    users; and how many entries were looked at."""
    seen = 0
    bad: dict[Path, list[str]] = {}
    for path, st in walk(mail_dir):
        seen += 1
        if seen > max_entries:
            break
        if stat.S_ISLNK(st.st_mode):
            continue
        folder = stat.S_ISDIR(st.st_mode)
        mode = stat.S_IMODE(st.st_mode)
        why = []
        if st.st_uid != owner.uid:
            why.append(f"owned by uid {st.st_uid}, not {owner.name}")
        need = 0o700 if folder else 0o400     # message files are read, never written
        if mode & need != need:
            why.append(f"mode {mode:04o} denies its owner")
        if _open_to_others(mode, folder, st.st_size):
            why.append(f"mode {mode:04o} lets other users in")
        if why:
            rel = path.relative_to(mail_dir).parts
            key = mail_dir.joinpath(*rel[:2]) if len(rel) >= 2 else path
            bad.setdefault(key, []).append(f"{path}: {', '.join(why)}")
    out = []
    sudo = "" if os.geteuid() == 0 or owner.uid == os.getuid() else "as root: "
    for maildir, lines in sorted(bad.items()):
        shown = "; ".join(lines[:_EXAMPLES])
        more = f" (and {len(lines) - _EXAMPLES} more)" if len(lines) > _EXAMPLES else ""
        out.append(problem("maildir-permissions",
                           f"{maildir}: {len(lines)} entr{'y' if len(lines) == 1 else 'ies'} "
                           f"Dovecot and Postroom cannot both use: {shown}{more}",
                           f"{sudo}chown -R {owner.uid}:{owner.gid} {maildir} && "
                           f"chmod -R u+rwX,go-rwx {maildir}"))
    return out, seen


def summary(problems: Sequence[dict[str, Any]]) -> str:
    if not problems:
        return "every user can log in; every Maildir belongs to the mail owner"
    return "; ".join(p["finding"] for p in problems[:3]) + (
        f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
