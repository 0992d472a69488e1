"""The imap component's pure parts: the [imap] keys, the dovecot.conf Postroom writes,
the passwd-file, the LMTP routes, and the store checks doctor runs (on temporary
folders). The component itself, with a real Dovecot: tests/integration/test_imap.py."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from postroom.config import ConfigError, ImapConfig, default_config_text, parse_config
from postroom.imap import Installation, Layout, Owner, store_routes
from postroom.imap.check import login_problems, maildir_problems
from postroom.imap.dovecot import render_config
from postroom.imap.owner import adopt
from postroom.imap.passwd import read_passwd, render_passwd, unusable, write_passwd
from postroom.routing import lmtp_route

BASE = {"hostname": "mx.example.org", "domains": {"local": ["example.org", "example.net"]}}
INSTALLED = Installation("/usr/sbin/dovecot", "/usr/bin/doveadm", "/usr/lib/dovecot/imap",
                         "/usr/lib/dovecot/lmtp")
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash("pw")


def parse(tmp_path: Path, imap: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    raw: dict[str, object] = dict(BASE)
    if imap is not None:
        raw["imap"] = imap
    return parse_config(raw, tmp_path, "postroom.toml")


# --- [imap] -----------------------------------------------------------------------------
def test_imap_is_off_by_default_with_starttls_on_1143(tmp_path: Path) -> None:
    assert parse(tmp_path).imap == ImapConfig()
    assert ImapConfig() == ImapConfig(False, ("127.0.0.1", 1143), None, "maildir")


def test_imap_keys_are_read(tmp_path: Path) -> None:
    c = parse(tmp_path, {"enabled": True, "listen": "0.0.0.0:143",
                         "listen_tls": "[::1]:993", "delivery": "lmtp"})
    assert c.imap == ImapConfig(True, ("0.0.0.0", 143), ("::1", 993), "lmtp")


@pytest.mark.parametrize(("imap", "key", "says"), [
    ({"delivery": "dovecot"}, "imap.delivery", "use \"maildir\""),
    ({"listen": "1143"}, "imap.listen", "is not \"address:port\""),
    ({"listen_tls": "127.0.0.1:1143"}, "imap.listen_tls", "must differ from listen"),
    ({"enabled": "yes"}, "imap.enabled", "must be a bool"),
    ({"port": 143}, "imap.port", "unknown key"),
])
def test_a_bad_imap_key_is_named(tmp_path: Path, imap: dict[str, object], key: str,
                                 says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, imap)
    assert any(p.key == key and says in p.message for p in err.value.problems), err.value


@pytest.mark.parametrize("installed", [True, False])
def test_the_first_config_turns_imap_on_when_dovecot_is_installed(installed: bool) -> None:
    raw = tomllib.loads(default_config_text("mx.example.org", ["example.org"], imap=installed))
    assert raw["imap"] == {"enabled": installed, "listen": "127.0.0.1:1143",
                           "listen_tls": "", "delivery": "maildir"}


# --- what Dovecot needs -----------------------------------------------------------------
def test_installation_says_what_to_install() -> None:
    assert INSTALLED.missing("lmtp") == ""
    assert Installation(None, None, None, None).missing("maildir") == \
        "apt-get install dovecot-imapd"
    assert Installation(None, None, None, None).missing("lmtp") == \
        "apt-get install dovecot-imapd dovecot-lmtpd"
    no_lmtp = Installation("/usr/sbin/dovecot", None, "/usr/lib/dovecot/imap", None)
    assert no_lmtp.missing("maildir") == "" and \
        no_lmtp.missing("lmtp") == "apt-get install dovecot-lmtpd"


def test_a_data_dir_dovecot_cannot_use_is_refused_with_the_reason(tmp_path: Path) -> None:
    assert Layout(tmp_path / "imap").problem() == ""
    assert "too long for Dovecot's sockets" in Layout(tmp_path / ("d" * 90) / "imap").problem()
    assert "cannot take" in Layout(tmp_path / "100%" / "imap").problem()
    assert "cannot take" in Layout(tmp_path / "my mail" / "imap").problem()


def _conf(tmp_path: Path, **imap: object) -> str:
    c = parse(tmp_path, {"enabled": True, **imap})
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    return render_config(c, Layout(c.data_dir / "imap"), Owner(8, 8), cert, key)


def test_dovecot_conf_serves_the_maildirs_with_postroom_certificate_and_users(
        tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    data = tmp_path / "postroom-data"
    for line in (f'base_dir = "{data}/imap/run"', f'state_dir = "{data}/imap/state"',
                 "hostname = mx.example.org", "protocols = imap",
                 f"ssl_cert = <{tmp_path}/cert.pem", f"ssl_key = <{tmp_path}/key.pem",
                 "disable_plaintext_auth = yes", "mail_location = maildir:~",
                 f'mail_home = "{data}/mail/%d/%n"', "mail_uid = 8", "first_valid_uid = 8",
                 "last_valid_uid = 8", "auth_username_format = %Lu",
                 f"args = scheme=ARGON2ID username_format=%Lu {data}/imap/passwd",
                 "address = 127.0.0.1\n    port = 1143"):
        assert line in conf, line
    for name in ("Drafts", "Junk", "Sent", "Trash"):
        assert f"mailbox {name} {{\n    special_use = \\{name}\n    auto = subscribe" in conf
    assert "inet_listener imaps {\n    port = 0" in conf          # no IMAPS unless asked
    assert "lmtp" not in conf.split("protocols = ")[1].split("\n")[0]
    assert "login_trusted_networks" not in conf


def test_dovecot_conf_with_imaps_and_lmtp(tmp_path: Path) -> None:
    conf = _conf(tmp_path, listen_tls="127.0.0.1:1993", delivery="lmtp")
    assert "protocols = imap lmtp" in conf
    assert "inet_listener imaps {\n    address = 127.0.0.1\n    port = 1993\n    ssl = yes" \
        in conf
    assert "service lmtp {\n  unix_listener lmtp {\n    mode = 0600" in conf


def test_dovecot_conf_as_root_or_not(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    if os.geteuid() == 0:
        # the login processes never run as root; chroot (which needs root) stays
        assert "default_login_user = root" not in conf and "chroot =" not in conf
    else:
        assert "  chroot =" in conf and "user = $default_internal_user" in conf


# --- the passwd-file ----------------------------------------------------------------------
def test_the_passwd_file_holds_argon2id_users_only_mode_0600(tmp_path: Path) -> None:
    users = [("alice@example.org", HASH), ("old@example.org", "$2b$12$notargon")]
    assert render_passwd(users) == f"alice@example.org:{{ARGON2ID}}{HASH}::::::\n"
    assert unusable(users) == ["old@example.org"]
    path = tmp_path / "passwd"
    path.write_text("stale\n")
    os.chmod(path, 0o644)
    write_passwd(path, users)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600           # replaced, not rewritten
    assert read_passwd(path) == {"alice@example.org": HASH}
    assert list(tmp_path.iterdir()) == [path]                    # no temporary file left
    assert read_passwd(tmp_path / "missing") == {}


def test_login_problems_name_each_user_and_the_fix(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    os.chmod(passwd, 0o644)
    store = [("alice@example.org", HASH), ("bob@example.org", HASH),
             ("carol@example.org", HASH), ("old@example.org", "$2b$12$x")]
    in_file = {"alice@example.org": HASH, "bob@example.org": "older", "gone@example.org": HASH}
    found = login_problems(store, in_file, {"alice@example.org"}, passwd)
    by = {(p["kind"], p["finding"].split(" ")[0]): p for p in found}
    assert by[("cannot-log-in", "old@example.org")]["fix"] == \
        "postroom users passwd old@example.org --password-stdin"
    assert "holds an older password" in by[("cannot-log-in", "bob@example.org")]["finding"]
    assert "lacks it" in by[("cannot-log-in", "carol@example.org")]["finding"]
    assert by[("removed-can-log-in", "gone@example.org")]["fix"].startswith(
        "postroom restart imap")
    assert by[("passwd-mode", str(passwd))]["fix"] == f"chmod 600 {passwd}"
    assert ("cannot-log-in", "alice@example.org") not in by
    assert login_problems(store[:1], {"alice@example.org": HASH}, {"alice@example.org"},
                          tmp_path / "none") == []


# --- Maildirs -------------------------------------------------------------------------------
def test_adopt_makes_private_maildirs_and_the_check_finds_what_breaks_them(
        tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    me = Owner(os.getuid(), os.getgid())
    adopt(mail, me, [("example.org", "alice")])
    alice = mail / "example.org" / "alice"
    for folder in (mail, mail / "example.org", alice, alice / "new", alice / "cur"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert maildir_problems(mail, me) == ([], 6)

    (alice / "new" / "m1").write_text("Subject: x\n\nbody\n")
    os.chmod(alice / "new" / "m1", 0o644)
    (alice / "dovecot-uidvalidity.6b14").write_text("")
    os.chmod(alice / "dovecot-uidvalidity.6b14", 0o444)       # Dovecot's own marker: fine
    os.chmod(alice / "cur", 0o500)
    (problem,), seen = maildir_problems(mail, me)
    assert seen == 8 and problem["kind"] == "maildir-permissions"
    assert f"{alice}: 2 entries" in problem["finding"]
    assert f"{alice}/new/m1: mode 0644 lets other users in" in problem["finding"]
    assert f"{alice}/cur: mode 0500 denies its owner" in problem["finding"]
    assert problem["fix"] == (f"chown -R {me.uid}:{me.gid} {alice} && "
                              f"chmod -R u+rwX,go-rwx {alice}")
    others, _ = maildir_problems(mail, Owner(me.uid + 1, me.gid))
    # the mail folder, the domain's and the Maildir: each with its own fix
    assert [p["finding"].split(":")[0] for p in others] == [
        str(mail), str(mail / "example.org"), str(alice)]
    assert all(f"owned by uid {me.uid}, not" in p["finding"] for p in others)
    assert os.system(problem["fix"]) == 0                        # the fix works
    assert maildir_problems(mail, me)[0] == []


# --- LMTP delivery --------------------------------------------------------------------------
def test_lmtp_delivery_routes_each_local_domain_to_the_dovecot_socket(tmp_path: Path) -> None:
    c = parse(tmp_path, {"enabled": True, "delivery": "lmtp"})
    routes = store_routes(c)
    socket = str(tmp_path / "postroom-data" / "imap" / "run" / "lmtp")
    assert [(r.match, r.via, r.path, r.index) for r in routes] == [
        ("example.org", "lmtp", socket, 1), ("example.net", "lmtp", socket, 2)]
    assert lmtp_route("example.net", c.routes + routes) == routes[1]
    assert store_routes(parse(tmp_path, {"enabled": True})) == ()
    assert store_routes(parse(tmp_path, {"delivery": "lmtp"})) == ()
