"""Reading the configuration: one TOML file turned into validated, frozen dataclasses.

Config flows one way: file → :func:`load` → :class:`~.schema.Config` → constructors. No
other module reads the file or the environment. Every error names the file and the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import tomllib
from pathlib import Path
from typing import Any

from ..address import AddressError, parse_path
from .schema import (
    DEFAULT_ROUTES,
    DELIVERY_KEYS,
    DKIM_KEYS,
    IMAP_KEYS,
    LOG_CATEGORIES,
    LOG_LEVELS,
    LOGGING_KEYS,
    NODE_KEYS,
    ROUTE_KEYS,
    SMTP_KEYS,
    SPOOL_KEYS,
    TOP_KEYS,
    VERIFY_KEYS,
    AdminConfig,
    Config,
    DeliveryConfig,
    DkimKey,
    ImapConfig,
    LoggingConfig,
    Network,
    Problem,
    Route,
    SmtpConfig,
    SpoolConfig,
    TlsConfig,
    VerifyConfig,
    cores,
    redact_url,
)

__all__ = [
    "ConfigError",
    "Problem",
    "default_hostname",
    "ensure_token",
    "load",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
    "parse_text",
]


class ConfigError(Exception):
    """The config is invalid; ``problems`` names each key and what is wrong with it."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: invalid configuration\n{lines}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def default_hostname() -> str:
    """The machine's name, without any DNS lookup; ``localhost`` if it is not a domain."""
    try:
        return _domain(socket.gethostname().lower())
    except ValueError:
        return "localhost"


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def parse_duration(value: object) -> float:
    """``"90s"``, ``"5m"``, ``"4h"``, ``"5d"`` or a number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"5m\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as \"5m\"")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. \"30s\", \"5m\", \"4h\", \"5d\")")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_endpoint(value: object) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` as (host, port)."""
    if not isinstance(value, str):
        raise ValueError("expected \"address:port\"")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        raise ValueError(f"{value!r} is not \"address:port\" (IPv6 as \"[::1]:2525\")")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    return host, port


class _Reader:
    """Takes values out of the parsed TOML, recording a Problem per bad key."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.problems: list[Problem] = []

    def section(self, name: str, known: set[str]) -> dict[str, Any]:
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            self.problems.append(Problem(name, "must be a table ([section])"))
            return {}
        for key in value:
            if key not in known and name != "aliases":
                self.problems.append(Problem(f"{name}.{key}", "unknown key (misspelt?)"))
        return value

    def get(self, table: dict[str, Any], prefix: str, key: str, kind: type, default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.problems.append(Problem(f"{prefix}{key}", f"must be an integer, not {value!r}"))
            return default
        if kind is not int and not isinstance(value, kind):
            self.problems.append(Problem(f"{prefix}{key}", f"must be a {kind.__name__}, not {value!r}"))
            return default
        return value

    def positive(self, table: dict[str, Any], prefix: str, key: str, default: int) -> int:
        """An integer greater than zero."""
        value: int = self.get(table, prefix, key, int, default)
        if value <= 0:
            self.problems.append(Problem(f"{prefix}{key}", "must be greater than zero"))
        return value

    def convert(self, table: dict[str, Any], prefix: str, key: str, fn: Any, default: Any) -> Any:
        if key not in table:
            return default
        try:
            return fn(table[key])
        except (ValueError, TypeError) as exc:
            self.problems.append(Problem(f"{prefix}{key}", str(exc)))
            return default


def _endpoints(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of \"address:port\" strings")
    return tuple(parse_endpoint(v) for v in value)


def _schedule(value: object) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of durations")
    return tuple(_positive_duration(v) for v in value)


def _error_sleep(value: object) -> float:
    seconds = parse_duration(value)
    if seconds >= 300:
        raise ValueError(f"{value!r}: less than 5m, the time a client waits for a reply "
                         "(RFC 5321 4.5.3.2); \"0s\" never waits")
    return seconds


def _min_free(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("give a number of bytes, 0 or more (0: no reserve)")
    return value


def _processes(value: object) -> int:
    if value == "auto":
        return cores()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"must be \"auto\" (one per core) or a number of processes from "
                         f"1 to 64, not {value!r}")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"must be a port number (1-65535), not {value!r}")
    return value


def _nameservers(value: object) -> tuple[str, ...]:
    """DNS servers as IP addresses, optionally with a port: "192.0.2.1", "127.0.0.1:5353",
    "::1", "[::1]:5353". Names are refused: the resolver cannot look up its own servers."""
    if not isinstance(value, list):
        raise ValueError("must be a list such as [\"127.0.0.1:5353\"]")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ValueError(f"entry {i}: {v!r} is not a string")
        try:
            host, port = str(ipaddress.ip_address(v)), 53
        except ValueError:
            try:
                host, port = parse_endpoint(v)
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"entry {i}: {v!r} is not an IP address with an optional "
                                 "port (\"127.0.0.1:5353\", \"[::1]:53\")") from None
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return tuple(out)


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value)
    if m is None:
        try:
            return str(ipaddress.IPv6Address(value)), default_port
        except ValueError:
            raise ValueError(f"{value!r} is not host[:port]") from None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    if m.group(3):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            _domain(host)
    return host.lower(), port


def _routes(r: _Reader, raw: object, base_dir: Path) -> tuple[Route, ...]:
    if not isinstance(raw, list):
        r.problems.append(Problem("route", "write routes as [[route]] tables"))
        return DEFAULT_ROUTES
    routes = []
    for i, t in enumerate(raw):
        key = f"route[{i}]."
        if not isinstance(t, dict):
            r.problems.append(Problem(f"route[{i}]", "must be a table"))
            continue
        for k in t:
            if k not in ROUTE_KEYS:
                r.problems.append(Problem(key + k, "unknown key (misspelt?)"))
        match = r.get(t, key, "match", str, "")
        if not match:
            r.problems.append(Problem(key + "match", "required: \"*\", \"example.org\" or "
                                      "\"*.example.org\""))
        elif not _PATTERN.match(match.lower()):
            r.problems.append(Problem(key + "match", f"{match!r} is not \"*\", a domain or "
                                      "\"*.domain\""))
        via = r.get(t, key, "via", str, "mx")
        if via not in ("mx", "smarthost", "lmtp"):
            r.problems.append(Problem(key + "via", f"{via!r}: use \"mx\", \"smarthost\" or "
                                      "\"lmtp\""))
        host, port = "", 25
        host_raw = r.get(t, key, "host", str, "")
        sock = _socket_path(r, key, r.get(t, key, "path", str, None), via, base_dir)
        if via == "smarthost" or (via == "lmtp" and not sock):
            if not host_raw:
                r.problems.append(Problem(key + "host", "a smarthost route needs host = "
                                          "\"name-or-ip[:port]\"" if via == "smarthost" else
                                          "an lmtp route needs host = \"name-or-ip[:port]\" "
                                          "(port 24 by default) or path = \"/unix/socket\""))
            else:
                try:
                    host, port = _host_port(host_raw, 25 if via == "smarthost" else 24)
                except ValueError as exc:
                    r.problems.append(Problem(key + "host", str(exc)))
        elif via == "lmtp" and host_raw:
            r.problems.append(Problem(key + "host", "give either host or path, not both"))
        elif host_raw:
            r.problems.append(Problem(key + "host", "only smarthost and lmtp routes take a "
                                      "host"))
        if via == "lmtp" and sock:
            port = 0
        tls = r.get(t, key, "tls", str, "none" if via == "lmtp" else "opportunistic")
        if tls not in ("none", "opportunistic", "required"):
            r.problems.append(Problem(key + "tls", f"{tls!r}: use \"none\", "
                                      "\"opportunistic\" or \"required\""))
        elif via == "lmtp" and tls != "none":
            r.problems.append(Problem(key + "tls", f"{tls!r}: lmtp routes do not use TLS "
                                      "(LMTP belongs on this machine or a trusted network); "
                                      "leave tls out or set \"none\""))
        username = r.get(t, key, "username", str, "")
        password = ""
        pw_file = r.get(t, key, "password_file", str, "")
        if username and not pw_file:
            r.problems.append(Problem(key + "password_file", "username is set: give the file "
                                      "that holds the password"))
        if pw_file:
            path = Path(pw_file) if Path(pw_file).is_absolute() else base_dir / pw_file
            try:
                password = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                r.problems.append(Problem(key + "password_file",
                                          f"cannot read {path}: {exc.strerror or exc}"))
        if username and via != "smarthost":
            r.problems.append(Problem(key + "username", "AUTH is only for smarthost routes"))
        elif pw_file and via == "lmtp":
            r.problems.append(Problem(key + "password_file", "lmtp routes do not log in: "
                                      "remove password_file"))
        cost = r.get(t, key, "cost", int, 1)
        if cost < 0:
            r.problems.append(Problem(key + "cost", "must be zero or more"))
        routes.append(Route(match.lower(), via, host, port, tls,
                            r.get(t, key, "tls_verify", bool, True), username, password, cost, i,
                            sock))
    return tuple(routes)


# sockaddr_un.sun_path holds 108 bytes on Linux, the final NUL included
_MAX_SOCKET_PATH = 107


def _socket_path(r: _Reader, key: str, raw: str | None, via: str, base_dir: Path) -> str:
    """An lmtp route's ``path``: the Unix socket, relative to the config file's folder.
    None or "": no path (None also when it is not a string: already a problem)."""
    if not raw:
        return ""
    if via != "lmtp":
        r.problems.append(Problem(key + "path", "only lmtp routes take a path (a Unix socket)"))
        return ""
    path = str(Path(raw) if Path(raw).is_absolute() else base_dir / raw)
    if "\0" in path or len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        r.problems.append(Problem(key + "path", f"{path!r} cannot be a Unix socket address "
                                  f"(at most {_MAX_SOCKET_PATH} bytes, no NUL)"))
        return ""
    return path


def _domain(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a domain name")
    try:
        addr = parse_path(f"<x@{value}>", allow_null=False, utf8=True)
    except AddressError as exc:
        raise ValueError(f"{value!r} is not a valid domain: {exc}") from None
    if addr.domain.startswith("[") or addr.domain.endswith("."):
        raise ValueError(f"{value!r}: use a plain domain name")
    return addr.domain


_PATTERN = re.compile(r"(?:\*|(?:\*\.)?[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)\Z")


def parse_config(raw: dict[str, Any], base_dir: Path, source: str) -> Config:
    """Validate parsed TOML. Raises :class:`ConfigError` listing every problem."""
    r = _Reader(raw)
    for key in raw:
        if key not in TOP_KEYS:
            r.problems.append(Problem(key, "unknown key (misspelt?)"))
    hostname = r.get(raw, "", "hostname", str, "")
    if hostname:
        try:
            hostname = _domain(hostname)
        except ValueError as exc:
            r.problems.append(Problem("hostname", str(exc)))
    else:
        hostname = default_hostname()
    data_dir = Path(r.get(raw, "", "data_dir", str, "postroom-data"))
    if not data_dir.is_absolute():
        data_dir = base_dir / data_dir

    s = r.section("smtp", SMTP_KEYS)
    d = SmtpConfig()
    smtp = SmtpConfig(
        listen=r.convert(s, "smtp.", "listen", _endpoints, d.listen),
        submission=r.convert(s, "smtp.", "submission", _endpoints, d.submission),
        submissions=r.convert(s, "smtp.", "submissions", _endpoints, d.submissions),
        max_message_size=r.positive(s, "smtp.", "max_message_size", d.max_message_size),
        max_recipients=r.positive(s, "smtp.", "max_recipients", d.max_recipients),
        command_timeout=r.convert(s, "smtp.", "command_timeout", _positive_duration, d.command_timeout),
        data_timeout=r.convert(s, "smtp.", "data_timeout", _positive_duration, d.data_timeout),
        max_connections=r.positive(s, "smtp.", "max_connections", d.max_connections),
        max_connections_per_peer=r.positive(s, "smtp.", "max_connections_per_peer",
                                            d.max_connections_per_peer),
        max_errors=r.positive(s, "smtp.", "max_errors", d.max_errors),
        soft_error_limit=r.positive(s, "smtp.", "soft_error_limit", d.soft_error_limit),
        error_sleep=r.convert(s, "smtp.", "error_sleep", _error_sleep, d.error_sleep),
        auth_on_mx=r.get(s, "smtp.", "auth_on_mx", bool, d.auth_on_mx),
        auth_failure_limit=r.positive(s, "smtp.", "auth_failure_limit", d.auth_failure_limit),
        auth_failure_window=r.convert(
            s, "smtp.", "auth_failure_window", _positive_duration, d.auth_failure_window),
        processes=r.convert(s, "smtp.", "processes", _processes, d.processes),
        min_free_space=r.convert(s, "smtp.", "min_free_space", _min_free, d.min_free_space),
    )
    if not (smtp.listen or smtp.submission or smtp.submissions):
        r.problems.append(Problem("smtp.listen", "no listener at all: give at least one address"))

    t = r.section("tls", {"cert_file", "key_file"})
    cert = r.get(t, "tls.", "cert_file", str, "")
    key = r.get(t, "tls.", "key_file", str, "")
    if bool(cert) != bool(key):
        r.problems.append(Problem("tls.cert_file", "cert_file and key_file go together: set both or neither"))
    tls = TlsConfig(
        cert_file=(base_dir / cert) if cert else None,
        key_file=(base_dir / key) if key else None,
    )
    for name, path in (("tls.cert_file", tls.cert_file), ("tls.key_file", tls.key_file)):
        if path is not None and not path.is_file():
            r.problems.append(Problem(name, f"file not found: {path}"))

    dom = r.section("domains", {"local"})
    local_raw = r.get(dom, "domains.", "local", list, ["localhost"])
    local_domains: list[str] = []
    for i, v in enumerate(local_raw):
        try:
            local_domains.append(_domain(v))
        except ValueError as exc:
            r.problems.append(Problem(f"domains.local[{i}]", str(exc)))
    if not local_domains:
        r.problems.append(Problem("domains.local", "list at least one local domain"))

    rel = r.section("relay", {"trusted_networks"})
    nets_raw = r.get(rel, "relay.", "trusted_networks", list, ["127.0.0.1/32", "::1/128"])
    nets: list[Network] = []
    for i, v in enumerate(nets_raw):
        if not isinstance(v, str):
            r.problems.append(Problem(f"relay.trusted_networks[{i}]",
                                      f"{v!r}: write networks as strings, e.g. \"192.0.2.0/24\""))
            continue
        try:
            nets.append(ipaddress.ip_network(v, strict=True))
        except (ValueError, TypeError) as exc:
            r.problems.append(Problem(f"relay.trusted_networks[{i}]", f"{v!r}: {exc}"))

    aliases: dict[str, tuple[str, ...]] = {}
    for name, targets in r.section("aliases", set()).items():
        key = f'aliases."{name}"'
        try:
            src = parse_path(f"<{name}>", allow_null=False, utf8=True)
        except AddressError as exc:
            r.problems.append(Problem(key, f"{name!r} is not an address: {exc}"))
            continue
        if src.domain not in local_domains:
            r.problems.append(Problem(key, f"{src.domain} is not a local domain"))
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            r.problems.append(Problem(key, "must be a non-empty list of addresses"))
            continue
        out = []
        for t_ in targets:
            try:
                out.append(parse_path(f"<{t_}>", allow_null=False, utf8=True).key)
            except (AddressError, TypeError) as exc:
                r.problems.append(Problem(key, f"{t_!r} is not an address: {exc}"))
        aliases[src.key] = tuple(out)

    dl = r.section("delivery", DELIVERY_KEYS)
    dd = DeliveryConfig()
    delivery = DeliveryConfig(
        retry=r.convert(dl, "delivery.", "retry", _schedule, dd.retry),
        mx_port=r.convert(dl, "delivery.", "mx_port", _port, dd.mx_port),
        max_queue_lifetime=r.convert(dl, "delivery.", "max_queue_lifetime", _positive_duration,
                                     dd.max_queue_lifetime),
        delay_warning=r.convert(dl, "delivery.", "delay_warning", parse_duration,
                                dd.delay_warning),
        max_connections=r.positive(dl, "delivery.", "max_connections", dd.max_connections),
        max_connections_per_destination=r.positive(dl, "delivery.",
                                                   "max_connections_per_destination",
                                                   dd.max_connections_per_destination),
        connect_timeout=r.convert(dl, "delivery.", "connect_timeout", _positive_duration,
                                  dd.connect_timeout),
        command_timeout=r.convert(dl, "delivery.", "command_timeout", _positive_duration,
                                  dd.command_timeout),
        max_return_size=r.positive(dl, "delivery.", "max_return_size", dd.max_return_size),
    )
    routes = _routes(r, raw.get("route"), base_dir) if "route" in raw else DEFAULT_ROUTES
    dns_t = r.section("dns", {"nameservers"})
    nameservers = tuple(r.convert(dns_t, "dns.", "nameservers", _nameservers, ()))
    adm = r.section("admin", {"listen"})
    admin_listen = r.convert(adm, "admin.", "listen", _optional_endpoint,
                             AdminConfig().listen)
    lg = r.section("logging", LOGGING_KEYS)
    levels = {c: r.convert(lg, "logging.", c, _log_level, "minimum") for c in LOG_CATEGORIES}
    logging_config = LoggingConfig(
        levels=levels, retention=r.positive(lg, "logging.", "retention", 5),
        archive_days=r.positive(lg, "logging.", "archive_days", 7))

    sp = r.section("spool", SPOOL_KEYS)
    spool = SpoolConfig(
        url=r.convert(sp, "spool.", "url", _spool_url, ""),
        lease_seconds=r.convert(sp, "spool.", "lease_seconds", _lease, SpoolConfig().lease_seconds))
    imap = _imap(r, r.section("imap", IMAP_KEYS))
    dkim = _dkim(r, raw.get("dkim", []), base_dir)
    verify = _verify(r, r.section("verify", VERIFY_KEYS))
    nd = r.section("node", NODE_KEYS)
    node = r.convert(nd, "node.", "name", _node_name, "") or socket.gethostname()

    if r.problems:
        raise ConfigError(source, r.problems)
    return Config(
        hostname=hostname, data_dir=data_dir, smtp=smtp, tls=tls,
        local_domains=tuple(dict.fromkeys(local_domains)), trusted_networks=tuple(nets),
        aliases=aliases, delivery=delivery, routes=routes, nameservers=nameservers,
        admin=AdminConfig(admin_listen), logging=logging_config, spool=spool, imap=imap,
        dkim=dkim, verify=verify, node=node, source=source,
    )


def _imap(r: _Reader, t: dict[str, Any]) -> ImapConfig:
    """[imap]: the Dovecot that Postroom runs (the imap component)."""
    d = ImapConfig()
    listen = r.convert(t, "imap.", "listen", parse_endpoint, d.listen)
    listen_tls = r.convert(t, "imap.", "listen_tls", _optional_endpoint, d.listen_tls)
    if listen_tls is not None and listen_tls == listen:
        r.problems.append(Problem("imap.listen_tls", "must differ from listen (one port "
                                  "cannot speak both STARTTLS and implicit TLS)"))
    delivery = r.get(t, "imap.", "delivery", str, d.delivery)
    if delivery not in ("maildir", "lmtp"):
        r.problems.append(Problem("imap.delivery", f"{delivery!r}: use \"maildir\" (Postroom "
                                  "writes the Maildirs) or \"lmtp\" (Dovecot does)"))
    return ImapConfig(enabled=r.get(t, "imap.", "enabled", bool, d.enabled), listen=listen,
                      listen_tls=listen_tls, delivery=delivery)


_VERIFY_POLICIES = ("none", "tag", "quarantine", "reject")


def _verify(r: _Reader, t: dict[str, Any]) -> VerifyConfig:
    """[verify]: inbound verification on the MX listener (docs/verification.md)."""
    d = VerifyConfig()
    policies = {}
    for key in ("spf", "dkim", "dmarc", "arc"):
        value = r.get(t, "verify.", key, str, getattr(d, key))
        if value not in _VERIFY_POLICIES:
            r.problems.append(Problem(f"verify.{key}", f"{value!r}: use \"none\" (not checked), "
                                      "\"tag\", \"quarantine\" or \"reject\""))
            value = getattr(d, key)
        policies[key] = value
    authserv = r.get(t, "verify.", "authserv_id", str, d.authserv_id).strip()
    if authserv and not re.fullmatch(r"[A-Za-z0-9._-]{1,253}", authserv):
        r.problems.append(Problem("verify.authserv_id", f"{authserv!r}: use a host name "
                                  "(letters, digits, dots and hyphens)"))
        authserv = ""
    on_temperror = r.get(t, "verify.", "on_temperror", str, d.on_temperror)
    if on_temperror not in ("accept", "defer"):
        r.problems.append(Problem("verify.on_temperror", f"{on_temperror!r}: use \"accept\" "
                                  "(deliver with the result in the header) or \"defer\" (451)"))
        on_temperror = d.on_temperror
    timeout = r.convert(t, "verify.", "dns_timeout", _positive_duration, d.dns_timeout)
    if timeout > 60:
        r.problems.append(Problem("verify.dns_timeout", "at most 60s: the client waits for "
                                  "the reply to its message meanwhile"))
        timeout = d.dns_timeout
    return VerifyConfig(
        enabled=r.get(t, "verify.", "enabled", bool, d.enabled), authserv_id=authserv,
        dns_timeout=timeout, on_temperror=on_temperror,
        dkim_max_size=r.positive(t, "verify.", "dkim_max_size", d.dkim_max_size), **policies)


_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\Z")


def _dkim(r: _Reader, raw: object, base_dir: Path) -> tuple[DkimKey, ...]:
    """[[dkim]] tables: domain, selector, key_file. The key file must exist; whether it
    holds a usable key is checked when the signer loads it (at start, and by doctor)."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        r.problems.append(Problem("dkim", "write each key as a [[dkim]] table"))
        return ()
    keys: list[DkimKey] = []
    seen: set[tuple[str, str]] = set()
    for i, t in enumerate(raw):
        where = f"dkim[{i}]"
        for k in t:
            if k not in DKIM_KEYS:
                r.problems.append(Problem(f"{where}.{k}", "unknown key (misspelt?)"))
        domain = t.get("domain")
        selector = t.get("selector")
        key_file = t.get("key_file")
        bad = False
        try:
            domain = _domain(domain)
        except (ValueError, TypeError) as exc:
            r.problems.append(Problem(f"{where}.domain", f"{domain!r}: {exc}"))
            bad = True
        if not isinstance(selector, str) or not _SELECTOR.match(selector.lower()):
            r.problems.append(Problem(f"{where}.selector", f"{selector!r}: a selector is one "
                                      "or more DNS labels, e.g. \"s2026\""))
            bad = True
        if not isinstance(key_file, str) or not key_file:
            r.problems.append(Problem(f"{where}.key_file", "give the key's file (made by "
                                      "`postroom dkim keygen DOMAIN`)"))
            continue
        path = base_dir / key_file
        if not path.is_file():
            r.problems.append(Problem(f"{where}.key_file", f"file not found: {path} (make "
                                      "one with `postroom dkim keygen DOMAIN`)"))
            bad = True
        if bad:
            continue
        assert isinstance(selector, str)
        if (domain, selector.lower()) in seen:
            r.problems.append(Problem(f"{where}.selector", f"{selector} is already used for "
                                      f"{domain}: each key of a domain needs its own selector"))
            continue
        seen.add((domain, selector.lower()))
        keys.append(DkimKey(domain=domain, selector=selector.lower(), key_file=path))
    return tuple(keys)


def _spool_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {value!r}")
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"{redact_url(value)!r}: give a PostgreSQL URL, "
                         "\"postgresql://USER@HOST:PORT/DB\" (or \"\" for SQLite in data_dir)")
    return value


def _lease(value: object) -> float:
    seconds = _positive_duration(value)
    if seconds < 30:
        raise ValueError(f"{value!r}: at least 30 seconds (a claim is renewed every third of it)")
    return seconds


def _node_name(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or \
            not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"{value!r}: letters, digits, '-', '_' and '.', at most 64 "
                         "(default: the hostname)")
    return value


def _log_level(value: object) -> str:
    if value not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a level: use {', '.join(LOG_LEVELS)}")
    return str(value)


def _optional_endpoint(value: object) -> tuple[str, int] | None:
    if value == "":
        return None
    return parse_endpoint(value)


def load(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem("(file)", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("(file)", f"cannot read: {exc.__class__.__name__}")]) from None
    return parse_text(text, path)


def parse_text(text: str, path: Path) -> Config:
    """Validate the text of a config file that is (or will be) at ``path``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Problem("(syntax)", str(exc))]) from None
    return parse_config(raw, path.resolve().parent, str(path))


def ensure_token(path: Path) -> str:
    """The admin token, made (mode 0600, never group- or world-readable) if missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
