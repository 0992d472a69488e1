"""The ``postroom`` command line: parse arguments, call the components, print results.

Exit status: 0 on success, 1 on an error the user can fix (the message says how),
2 on a usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import (
    Config,
    ConfigError,
    default_config_text,
    default_hostname,
    ensure_token,
    load,
)
from .ctl import add_commands, add_diagnostics, load_or_defaults, sendmail_main
from .users import UserError, UserStore, add_mailbox

if TYPE_CHECKING:
    from .mailauth.keys import PrivateKey

DEFAULT_CONFIG = "postroom.toml"


def _fail(message: str) -> int:
    print(f"postroom: {message}", file=sys.stderr)
    return 1


# --- serve / check -------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:

    path = Path(args.config)
    if not path.exists():
        domains = ["localhost"] + ([d.lower() for d in args.domain] if args.domain else [])
        from .imap import find_dovecot

        # the imap component is on when Dovecot is installed
        text = default_config_text(default_hostname(), list(dict.fromkeys(domains)),
                                   imap=not find_dovecot().missing("maildir"))
        path.write_text(text, encoding="utf-8")
        print(f"postroom: wrote a new configuration to {path} "
              f"(local domains: {', '.join(dict.fromkeys(domains))})")
    try:
        config = load(path)
        _check_keys(config)               # every [[dkim]] key readable, or no start
    except ConfigError as exc:
        return _fail(str(exc))
    for warning in config.warnings():
        print(f"postroom: WARNING {warning}", file=sys.stderr)
    if config.smtp.processes > 1:
        # every process's counters in files that /metrics adds up; prometheus-client
        # reads this variable when it is first imported, which is just below
        metrics_dir = config.data_dir / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old_file in metrics_dir.glob("*.db"):       # a previous run's counts
            old_file.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from .app import (
        Postroom,
        bind_admin,
        bind_listeners,
        catch_stop_signals,
        fork_front_ends,
        run_loop,
        tls_files,
        tune_gc,
        tune_malloc,
    )
    from .events import connect_events
    from .observability import setup_logging
    from .spool import SqliteSpool

    def started(listeners: list) -> None:  # type: ignore[type-arg]
        domain = config.local_domains[0]
        mx = next((b for b in listeners if b.kind == "mx"), None)
        lines = [f"Postroom {__version__} is running as {config.hostname}, "
                 f"data in {config.data_dir}",
                 *(f"  {b.describe()}" for b in listeners),
                 "Next, add a mailbox:",
                 f"  postroom users add alice@{domain} --password-stdin <<<'s3cret'"]
        if mx is not None:
            lines.append(f"  swaks --server {mx.host}:{mx.port} --to alice@{domain}")
        admin = next((b for b in listeners if b.kind == "admin"), None)
        if admin is not None:
            host = f"[{admin.host}]" if ":" in admin.host else admin.host
            lines += [f"Web console: http://{host}:{admin.port}/ (log in with an admin account:",
                      f"  postroom users add you@{domain} --admin --password-stdin)"]
        lines.append("Stop with Ctrl-C, 'postroom stop' or SIGTERM.")
        # one write, so that log lines from the other thread cannot land inside it
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    catch_stop_signals()
    tune_malloc()
    tune_gc()
    start_time = time.time()
    try:
        # the admin API's token and socket first: once the SMTP port answers, so does
        # the API (its backlog holds connections until it serves them)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        if config.admin.listen is not None:
            ensure_token(config.token_path)
        try:
            admin_socket = bind_admin(config)
        except OSError as exc:
            return _fail(f"cannot start the admin API on [admin] listen "
                         f"{config.admin.listen}: {exc.strerror or exc}")
        listeners = bind_listeners(config)
        tls_files(config)
        # create the spool (SQLite; a PostgreSQL spool is migrated by the main process
        # when it connects) and the user store once, before any process starts threads
        if not config.spool.url:
            SqliteSpool(config.spool_path).close()
        UserStore(config.users_path).close()
        connect_events(config.data_dir / "events.sqlite3").close()
    except ssl.SSLError as exc:
        return _fail(f"cannot load the TLS certificate or key ([tls] cert_file, key_file): "
                     f"{exc.reason or exc}")
    except OSError as exc:
        return _fail(f"cannot start: {exc.strerror or exc} (is another server on that port?)")

    def front_end(notify_fd: int) -> None:
        if admin_socket is not None:
            admin_socket.close()                 # the admin API runs in the main process
        setup_logging(config.data_dir / "logs", stderr=not args.quiet, rotate=False)
        child = Postroom(config, listeners=listeners, main=False, notify_fd=notify_fd)
        run_loop(child.run_until_signalled())

    children, wake_fd = fork_front_ends(config, listeners, config.smtp.processes - 1, front_end)
    setup_logging(config.data_dir / "logs", stderr=not args.quiet)
    server = Postroom(config, listeners=listeners, wake_fd=wake_fd, children=children,
                      started=start_time, admin_socket=admin_socket)
    try:
        run_loop(server.run_until_signalled(started))
    except ssl.SSLError as exc:
        return _fail(f"cannot load the TLS certificate or key ([tls] cert_file, key_file): "
                     f"{exc.reason or exc}")
    except OSError as exc:
        return _fail(f"cannot start: {exc.strerror or exc}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        config = load(path)
        _check_keys(config)
    except ConfigError as exc:
        return _fail(str(exc))
    warnings = list(config.warnings())
    users: set[str] = set()
    if config.users_path.exists():
        store = UserStore(config.users_path)
        users = {u.address for u in store.list()}
        store.close()
    for domain in config.local_domains:
        pm = f"postmaster@{domain}"
        if pm not in users and pm not in config.aliases:
            warnings.append(f"domains.local: {domain} has no postmaster (RFC 5321 4.5.1): "  # type: ignore[arg-type]
                            f"add [aliases] \"{pm}\" = [\"you@{domain}\"] or "
                            f"'postroom users add {pm}'; until then its mail waits in "
                            f"{config.mail_dir / domain / 'postmaster'}")
    for w in warnings:
        print(f"WARNING {w}", file=sys.stderr)
    print(f"{path}: configuration is valid"
          + (f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})" if warnings else ""))
    return 0


# --- users ---------------------------------------------------------------------------
def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if not sys.stdin.isatty():
        raise UserError("no terminal to ask for a password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise UserError("the passwords do not match")
    return first


def cmd_users(args: argparse.Namespace) -> int:
    try:
        config = load_or_defaults(Path(args.config))
    except ConfigError as exc:
        return _fail(str(exc))
    store = UserStore(config.users_path)
    try:
        if args.action == "add":
            key, maildir, warning = add_mailbox(store, config, args.address,
                                                _read_password(args), admin=args.admin)
            print(f"added {key} (mailbox {maildir})")
            if warning:
                print(f"postroom: WARNING {warning}", file=sys.stderr)
        elif args.action == "remove":
            print(f"removed {store.remove(args.address)} (its Maildir is kept)")
        elif args.action == "passwd":
            print(f"password changed for {store.set_password(args.address, _read_password(args))}")
        elif args.action == "list":
            users = store.list()
            if args.json:
                print(json.dumps({"users": [{"address": u.address, "created": u.created,
                                             "admin": u.admin} for u in users]}, indent=2))
            else:
                for u in users:
                    print(u.address + ("  (admin)" if u.admin else ""))
                if not users:
                    print("no users yet: postroom users add ADDRESS", file=sys.stderr)
    except UserError as exc:
        return _fail(str(exc))
    finally:
        store.close()
    return 0


# --- dkim ----------------------------------------------------------------------------
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                     r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+\Z")
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\Z")


def zone_record(name: str, text: str) -> str:
    """A TXT record as a zone file (and most DNS providers' forms) want it: the text in
    quoted strings of at most 255 bytes, which a resolver joins back into one."""
    parts = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    if len(parts) == 1:
        return f'{name}. IN TXT "{parts[0]}"'
    inner = "\n".join(f'    "{p}"' for p in parts)
    return f"{name}. IN TXT (\n{inner} )"


def _selectors(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(algorithm, selector) for keygen: one per algorithm, dated by default, so that
    the next rotation's selector is new and both keys can be published side by side."""
    algorithms = ["rsa", "ed25519"] if args.algorithm == "both" else [args.algorithm]
    month = time.strftime("%Y%m")
    prefix = {"rsa": "rsa", "ed25519": "ed"}
    if args.selector:
        base = args.selector.lower()
        if len(algorithms) == 1:
            return [(algorithms[0], base)]
        return [(a, f"{base}-{prefix[a]}") for a in algorithms]
    return [(a, f"{prefix[a]}{month}") for a in algorithms]


def _shown_path(key_file: Path, config_path: Path) -> str:
    """The key's path as a [[dkim]] key_file: relative to the config's folder if inside."""
    base = config_path.resolve().parent
    try:
        return str(key_file.resolve().relative_to(base))
    except ValueError:
        return str(key_file.resolve())


def _check_keys(config: Config) -> None:
    """Load every [[dkim]] key once (ConfigError names the bad one). Imported only when
    there are keys: cryptography costs each server process about 6 MB, and the front
    ends are forked from this one."""
    if config.dkim:
        from .mailauth.sign import signer_for
        signer_for(config)


def _print_key(domain: str, selector: str, key: PrivateKey, file: str) -> None:
    from .mailauth import keys as dkim_keys
    name = f"{selector}._domainkey.{domain}"
    print(f"# {dkim_keys.algorithm_of(key)} key {file}")
    print(zone_record(name, dkim_keys.txt_record(key)))


def cmd_dkim(args: argparse.Namespace) -> int:
    from .mailauth import keys as dkim_keys
    try:
        config = load_or_defaults(Path(args.config))
    except ConfigError as exc:
        return _fail(str(exc))
    if args.action == "keygen":
        domain = args.domain.lower().rstrip(".")
        if not _DOMAIN.match(domain):
            return _fail(f"{args.domain!r} is not a domain name")
        plan = _selectors(args)
        for _, selector in plan:
            if not _SELECTOR.match(selector):
                return _fail(f"{selector!r}: a selector is one or more DNS labels, e.g. rsa202612")
        folder = config.data_dir / "dkim"
        files = [(a, sel, folder / f"{domain}.{sel}.pem") for a, sel in plan]
        for _, _, f in files:
            if f.exists():
                return _fail(f"{f} exists: keys are never overwritten; choose a new selector "
                             "(--selector) to rotate, or remove the file yourself")
        made = []
        for a, sel, f in files:
            try:
                made.append((sel, dkim_keys.generate(f, a), f))
            except (OSError, dkim_keys.KeyError_) as exc:
                return _fail(f"cannot write {f}: {exc}")
        print(f"Made {len(made)} key{'s' if len(made) > 1 else ''} for {domain}. Publish "
              f"{'these TXT records' if len(made) > 1 else 'this TXT record'} in {domain}'s DNS:\n")
        for sel, key, f in made:
            _print_key(domain, sel, key, str(f))
            print()
        print(f"Then add to {args.config} and run 'postroom reload':\n")
        for sel, _, f in made:
            print(f'[[dkim]]\ndomain = "{domain}"\nselector = "{sel}"\n'
                  f'key_file = "{_shown_path(f, Path(args.config))}"\n')
        print("Mail from " + domain + " (and its subdomains) leaving for other servers is "
              "then signed" + (" with both keys." if len(made) > 1 else "."))
        return 0
    # show
    try:
        _check_keys(config)
    except ConfigError as exc:
        return _fail(str(exc))
    if not config.dkim:
        print("no [[dkim]] keys configured: postroom dkim keygen DOMAIN", file=sys.stderr)
        return 0
    records = []
    for t in config.dkim:
        key = dkim_keys.load(t.key_file)
        records.append({"domain": t.domain, "selector": t.selector,
                        "algorithm": dkim_keys.algorithm_of(key), "key_file": str(t.key_file),
                        "name": t.record_name, "text": dkim_keys.txt_record(key)})
    if args.json:
        print(json.dumps({"keys": records}, indent=2))
        return 0
    for r in records:
        print(f"# {r['domain']}: {r['algorithm']} key {r['key_file']}")
        print(zone_record(r["name"], r["text"]))
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="postroom", description="Postroom mail server")
    p.add_argument("--version", action="version", version=f"postroom {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help=f"config file (default: ./{DEFAULT_CONFIG})")
        return sp

    s = with_config(sub.add_parser("serve", help="run the server in the foreground"))
    s.add_argument("--domain", action="append",
                   help="a local domain for a new config (repeatable)")
    s.add_argument("-q", "--quiet", action="store_true", help="log to the log file only")
    s.set_defaults(fn=cmd_serve)
    with_config(sub.add_parser("check", help="validate the config")).set_defaults(fn=cmd_check)

    u = sub.add_parser("users", help="manage mailbox users")
    usub = u.add_subparsers(dest="action", required=True)
    a = with_config(usub.add_parser("add", help="add a mailbox user"))
    a.add_argument("address")
    a.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    a.add_argument("--admin", action="store_true", help="may log in to the admin console")
    r = with_config(usub.add_parser("remove", help="remove a user (the Maildir is kept)"))
    r.add_argument("address")
    pw = with_config(usub.add_parser("passwd", help="change a user's password"))
    pw.add_argument("address")
    pw.add_argument("--password-stdin", action="store_true")
    ls = with_config(usub.add_parser("list", help="list users"))
    ls.add_argument("--json", action="store_true")
    u.set_defaults(fn=cmd_users)

    d = sub.add_parser("dkim", help="DKIM signing keys: make them, show their DNS records")
    dsub = d.add_subparsers(dest="action", required=True)
    kg = with_config(dsub.add_parser(
        "keygen", help="make a domain's signing keys under data_dir/dkim and print the DNS "
        "records and [[dkim]] tables to add"))
    kg.add_argument("domain")
    kg.add_argument("--selector", help="the selector (default: dated, e.g. rsa202612 and "
                    "ed202612; with both algorithms, SELECTOR-rsa and SELECTOR-ed)")
    kg.add_argument("--algorithm", choices=["rsa", "ed25519", "both"], default="both",
                    help="RSA-2048, Ed25519 (RFC 8463), or both for dual signing (default)")
    sh = with_config(dsub.add_parser("show", help="the configured keys and the TXT records "
                                     "to publish for them"))
    sh.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_dkim)

    add_commands(sub, with_config)
    add_diagnostics(sub, with_config)
    sub.add_parser("sendmail", help="sendmail-compatible local submission "
                   "(postroom sendmail --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:                # sendmail's own option syntax (-oi, -f x)
        return sendmail_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
