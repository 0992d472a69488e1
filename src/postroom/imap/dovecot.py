"""Dovecot as Postroom runs it: where it is installed, and the configuration Postroom
writes for it.

Everything lives under ``<data_dir>/imap/`` (:class:`Layout`), never in ``/etc`` or
``/run``:

- ``dovecot.conf``: written at every start from ``[imap]``, the TLS files and the mail
  owner (:func:`render_config`); a complete config, nothing of Debian's included;
- ``passwd``: the users (Dovecot's passwd-file, mode 0600), rewritten from the user
  store whenever it changes (:mod:`.passwd`);
- ``run/``: Dovecot's ``base_dir`` (its sockets, ``master.pid``, the LMTP socket);
- ``state/``: its ``state_dir``;
- ``dovecot.log``: its log; ``dovecot.out``: what it prints before its log is open.

What Dovecot 2.3 requires, measured on Debian 12's 2.3.19:

- It never accesses mail as uid 0 (``userdb returned 0 as uid``), and its login
  processes refuse to run as root (``This process must not be run as root``). Started
  by root, the master stays root, the login processes run as ``dovenull`` (or
  ``nobody``), and mail is accessed as the mail owner (:mod:`.owner`).
- Started by another user it cannot change users at all: every process runs as that
  user, the login processes must not chroot, and the mail owner is that user.
- ``first_valid_uid`` is 500 by default: a system account such as ``mail`` (8) or a
  ``postroom`` user would be refused, so the valid range is exactly the mail owner.
- ``hostname`` is set, so that Dovecot never asks a resolver for the machine's name.
- A connection whose remote address is its local address counts as secured: LOGIN
  works there without TLS (``disable_plaintext_auth`` spares it). No
  ``login_trusted_networks``: trusted clients may claim other addresses through ID,
  which would also lift the auth penalty.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from .owner import Owner

__all__ = ["INSTALL_IMAP", "INSTALL_LMTP", "Installation", "Layout", "find_dovecot",
           "render_config", "running_as_root"]

INSTALL_IMAP = "apt-get install dovecot-imapd"
INSTALL_LMTP = "apt-get install dovecot-lmtpd"
_SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"
_LIBEXEC = ("/usr/lib/dovecot", "/usr/libexec/dovecot", "/usr/local/libexec/dovecot")
# the longest name Dovecot 2.3 makes in base_dir: sockets must fit in sun_path (108)
_LONGEST_SOCKET = "replication-notify-fifo"
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Installation:
    """Dovecot's programs on this machine, or None for those that are missing."""

    dovecot: str | None
    doveadm: str | None
    imap: str | None          # the libexec programs of dovecot-imapd and dovecot-lmtpd
    lmtp: str | None

    def missing(self, delivery: str) -> str:
        """The command that installs what ``[imap]`` needs, or "" when it is there."""
        if self.dovecot is None or self.imap is None:
            return INSTALL_IMAP + (" dovecot-lmtpd" if delivery == "lmtp" else "")
        if delivery == "lmtp" and self.lmtp is None:
            return INSTALL_LMTP
        return ""


def find_dovecot() -> Installation:
    libexec = next((d for d in _LIBEXEC if os.path.isfile(os.path.join(d, "imap-login"))
                    or os.path.isfile(os.path.join(d, "lmtp"))), None)

    def program(name: str) -> str | None:
        if libexec is None:
            return None
        path = os.path.join(libexec, name)
        return path if os.access(path, os.X_OK) else None
    return Installation(shutil.which("dovecot", path=_SBIN), shutil.which("doveadm", path=_SBIN),
                        program("imap") if program("imap-login") else None, program("lmtp"))


def running_as_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class Layout:
    """The imap component's files under ``<data_dir>/imap/`` (see the module's docstring)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def out(self) -> Path:
        return self.root / "dovecot.out"

    @property
    def lmtp_socket(self) -> Path:
        return self.base_dir / "lmtp"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "master.pid"

    def problem(self) -> str:
        """Why Dovecot cannot run in this folder, or "" (its sockets' paths, characters
        that Dovecot's config would read as variables or quotes)."""
        text = str(self.root)
        if any(c in text for c in '"\\%$') or any(c.isspace() for c in text):
            return (f"the data directory {text} holds a character Dovecot's configuration "
                    "cannot take (a space, \" \\ % or $): choose another data_dir")
        longest = len(os.fsencode(str(self.base_dir / _LONGEST_SOCKET)))
        if longest > _MAX_SOCKET_PATH:
            return (f"the data directory {text} is too long for Dovecot's sockets "
                    f"({longest} bytes, at most {_MAX_SOCKET_PATH}): choose a shorter data_dir")
        return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _login_user() -> str:
    """Who runs the login processes: never root (Dovecot refuses), and as root never the
    mail owner either, so that a broken login process cannot read mail."""
    if not running_as_root():
        return _user_name(os.getuid())
    for name in ("dovenull", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise LookupError("no dovenull or nobody user for Dovecot's login processes")


def _q(value: object) -> str:
    """A value in Dovecot's config syntax (quoted: paths may hold spaces)."""
    return f'"{value}"'


def _endpoint(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def render_config(config: Config, layout: Layout, owner: Owner, cert: Path, key: Path) -> str:
    """The whole of ``dovecot.conf`` for this config (no I/O but the user database)."""
    imap = config.imap
    root = running_as_root()
    me = _user_name(os.getuid())
    group = _group_name(os.getgid())
    protocols = "imap lmtp" if imap.delivery == "lmtp" else "imap"
    host, port = imap.listen
    lines = [
        "# Written by Postroom at every start of the imap component: edits are lost.",
        "# Change [imap] in postroom.toml instead (docs/store.md).",
        f"base_dir = {_q(layout.base_dir)}",
        f"state_dir = {_q(layout.state_dir)}",
        f"log_path = {_q(layout.log)}",
        f"hostname = {config.hostname}",
        f"postmaster_address = postmaster@{config.local_domains[0]}",
        f"protocols = {protocols}",
        f"listen = {_endpoint(host)}",
        "login_greeting = Postroom IMAP (Dovecot) ready.",
        # who runs what (see the module's docstring)
        f"default_internal_user = {me}",
        f"default_internal_group = {group}",
        f"default_login_user = {_login_user()}",
        f"first_valid_uid = {owner.uid}",
        f"last_valid_uid = {owner.uid}",
        f"first_valid_gid = {owner.gid}",
        f"last_valid_gid = {owner.gid}",
        # TLS with Postroom's certificate; LOGIN only after it (or from this machine to
        # its own address, which Dovecot counts as secured)
        "ssl = yes",
        f"ssl_cert = <{_file_value(cert)}",
        f"ssl_key = <{_file_value(key)}",
        "ssl_min_protocol = TLSv1.2",
        "disable_plaintext_auth = yes",
        "auth_mechanisms = plain login",
        "auth_username_format = %Lu",
        "auth_verbose = yes",
        # a failed login waits 2 s; the auth penalty grows the wait per client address
        "auth_failure_delay = 2 secs",
        # the Maildirs: <data_dir>/mail/<domain>/<local> is the home and the Maildir
        "mail_location = maildir:~",
        f"mail_home = {_q(str(config.mail_dir.resolve()) + '/%d/%n')}",
        f"mail_uid = {owner.uid}",
        f"mail_gid = {owner.gid}",
        "namespace inbox {",
        "  inbox = yes",
        "  separator = /",
    ]
    for name in ("Drafts", "Junk", "Sent", "Trash"):
        lines += [f"  mailbox {name} {{", f"    special_use = \\{name}",
                  "    auto = subscribe", "  }"]
    lines += [
        "}",
        "passdb {",
        "  driver = passwd-file",
        f"  args = scheme=ARGON2ID username_format=%Lu {layout.passwd}",
        "}",
        "userdb {",
        "  driver = passwd-file",
        f"  args = username_format=%Lu {layout.passwd}",
        "}",
        "service imap-login {",
        f"  inet_listener imap {{\n    address = {_endpoint(host)}\n    port = {port}\n  }}",
    ]
    if imap.listen_tls is not None:
        tls_host, tls_port = imap.listen_tls
        lines.append(f"  inet_listener imaps {{\n    address = {_endpoint(tls_host)}\n"
                     f"    port = {tls_port}\n    ssl = yes\n  }}")
    else:
        lines.append("  inet_listener imaps {\n    port = 0\n  }")
    if not root:
        lines.append("  chroot =")        # chroot needs root
    lines.append("}")
    if not root:
        lines += ["service anvil {", "  chroot =", "}", "service ipc {", "  chroot =", "}",
                  "service old-stats {", "  chroot =", "}",
                  "service auth-worker {", "  user = $default_internal_user", "}"]
    if imap.delivery == "lmtp":
        lines += ["service lmtp {", "  unix_listener lmtp {", "    mode = 0600",
                  f"    user = {me}", "  }", "}"]
    return "\n".join(lines) + "\n"


def _file_value(path: Path) -> str:
    """An absolute path for ``<file`` values (Dovecot reads them at start, unquoted)."""
    text = str(path.resolve())
    if any(c.isspace() for c in text):
        raise ValueError(f"Dovecot cannot read a TLS file whose path holds a space: {text}")
    return text


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
