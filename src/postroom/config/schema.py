"""The configuration's shape: frozen dataclasses, their defaults, and the key names.

What :mod:`.parser` builds from a TOML file and every other module reads. No parsing
and no I/O here.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_ROUTES",
    "DELIVERY_KEYS",
    "DKIM_KEYS",
    "IMAP_KEYS",
    "LOGGING_KEYS",
    "LOG_CATEGORIES",
    "LOG_LEVELS",
    "ROUTE_KEYS",
    "SMTP_KEYS",
    "TOP_KEYS",
    "VERIFY_KEYS",
    "AdminConfig",
    "Config",
    "DeliveryConfig",
    "DkimKey",
    "ImapConfig",
    "LoggingConfig",
    "Network",
    "Problem",
    "Route",
    "SmtpConfig",
    "TlsConfig",
    "VerifyConfig",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or dangerous) in a config, named by its key. Here rather than in
    :mod:`.parser`, which re-exports it, because :meth:`Config.warnings` returns them."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def cores() -> int:
    """What ``[smtp] processes = "auto"`` (the default) means: the cores this process
    may run on, from 1 to 64."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(64, n))


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 2525),)
    submission: tuple[tuple[str, int], ...] = (("127.0.0.1", 2587),)
    submissions: tuple[tuple[str, int], ...] = ()
    max_message_size: int = 26214400
    max_recipients: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int = 1000
    max_connections_per_peer: int = 50
    # Postfix's smtpd_hard_error_limit, smtpd_soft_error_limit, smtpd_error_sleep_time:
    # errors "without delivering mail"; past the soft limit each error reply waits
    # error_sleep; at max_errors the session gets 421 4.7.0 and is closed
    max_errors: int = 20
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    auth_on_mx: bool = False
    auth_failure_limit: int = 5
    auth_failure_window: float = 600.0
    processes: int = field(default_factory=cores)      # "auto": one per core
    # free space the data directory must keep for MAIL to be accepted (452 4.3.1 below
    # it); None: 1.5 × max_message_size, Postfix's rule
    min_free_space: int | None = None

    @property
    def free_space_needed(self) -> int:
        if self.min_free_space is not None:
            return self.min_free_space
        return self.max_message_size * 3 // 2


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    mx_port: int = 25
    max_queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    max_connections: int = 100
    max_connections_per_destination: int = 10
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    max_return_size: int = 1_000_000


@dataclass(frozen=True)
class Route:
    """One address space: a domain pattern and how mail for it leaves.

    ``match`` is ``*``, an exact domain, or ``*.domain`` (its subdomains only).
    """

    match: str
    via: str = "mx"                       # "mx" | "smarthost" | "lmtp"
    host: str = ""                        # smarthost, lmtp: a name or an IP address
    port: int = 25                        # lmtp: 24 unless host says otherwise
    tls: str = "opportunistic"            # "none" | "opportunistic" | "required"; lmtp: "none"
    tls_verify: bool = True               # with tls = "required": verify the certificate
    username: str = ""
    password: str = field(default="", repr=False)
    cost: int = 1
    index: int = 0                        # position in the config, for messages
    path: str = ""                        # lmtp: a Unix socket instead of host

    def describe(self) -> str:
        if self.via == "smarthost":
            return f"smart host {self.next_hop} (route {self.match})"
        if self.via == "lmtp":
            return f"LMTP {self.next_hop} (route {self.match})"
        return f"MX lookup (route {self.match})"

    @property
    def next_hop(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


DEFAULT_ROUTES = (Route("*", "mx"),)


@dataclass(frozen=True)
class LoggingConfig:
    levels: dict[str, str] = field(default_factory=dict)   # category -> level name
    retention: int = 5            # rotated files kept of each log
    archive_days: int = 7         # message_archival copies kept this many days


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", 8025)   # None: no admin API


@dataclass(frozen=True)
class ImapConfig:
    """[imap]: the Dovecot that Postroom runs to serve the Maildirs over IMAP."""

    enabled: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 1143)          # IMAP with STARTTLS
    listen_tls: tuple[str, int] | None = None              # IMAPS (implicit TLS); None: off
    delivery: str = "maildir"            # "maildir": Postroom writes; "lmtp": Dovecot does


@dataclass(frozen=True)
class DkimKey:
    """One ``[[dkim]]`` table: a key that signs mail from ``domain`` (and its subdomains)
    leaving for other servers. Two tables for one domain (an RSA key and an Ed25519 key,
    different selectors) sign each message twice (RFC 8463's dual signing)."""

    domain: str
    selector: str
    key_file: Path            # PEM; the algorithm is read from it (mailauth.keys.load)

    @property
    def record_name(self) -> str:
        """Where the public key is published in DNS."""
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class VerifyConfig:
    """[verify]: inbound SPF, DKIM, DMARC and ARC checks on the MX listener
    (docs/verification.md). Each check's policy: none | tag | quarantine | reject."""

    enabled: bool = True
    authserv_id: str = ""           # "": the hostname
    spf: str = "tag"
    dkim: str = "tag"
    dmarc: str = "reject"           # reject: honour the domain's p=; quarantine: at most Junk
    arc: str = "tag"
    dns_timeout: float = 5.0        # all DNS of one message, in seconds
    on_temperror: str = "accept"    # accept (and tag) | defer (451 when a policy would act)
    dkim_max_size: int = 16 * 1024 * 1024   # bigger messages: DKIM and ARC not verified


@dataclass(frozen=True)
class SpoolConfig:
    url: str = ""                  # postgresql://...: the shared queue; "": SQLite in data_dir
    lease_seconds: float = 600.0   # how long a claim lasts without renewal

    @property
    def redacted_url(self) -> str:
        """The URL without its password, for logs and status."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    return f"{scheme}://{auth.split(':', 1)[0]}:***@{host}"


@dataclass(frozen=True)
class Config:
    hostname: str
    data_dir: Path
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    local_domains: tuple[str, ...] = ("localhost",)
    trusted_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    nameservers: tuple[str, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    dkim: tuple[DkimKey, ...] = ()  # [[dkim]]: signing keys, in the config's order
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    node: str = ""                 # [node] name: this node in leases, events and status
    source: str = "<defaults>"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool.sqlite3"

    @property
    def users_path(self) -> Path:
        return self.data_dir / "users.sqlite3"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    def warnings(self) -> list[Problem]:
        """Things that are valid but dangerous: an open relay, a missing postmaster."""
        found = []
        for net in self.trusted_networks:
            if net.prefixlen == 0 or (not net.is_private and not net.is_loopback and (
                (net.version == 4 and net.prefixlen < 16) or (net.version == 6 and net.prefixlen < 32)
            )):
                found.append(Problem(
                    "relay.trusted_networks",
                    f"OPEN RELAY: {net} lets a large part of the Internet relay through this "
                    "server without authentication; list only your own networks",
                ))
        s = self.smtp
        if s.max_errors <= s.soft_error_limit:
            found.append(Problem(
                "smtp.max_errors",
                f"{s.max_errors} is not above soft_error_limit ({s.soft_error_limit}): a "
                "session is closed before it is ever slowed down, and an open-relay "
                "scanner (16 tricks on one connection) gets no verdict; Postfix's limits "
                "are 20 and 10 (files written before soft_error_limit said max_errors = 10)"))
        return found


TOP_KEYS = {"hostname", "data_dir", "smtp", "tls", "domains", "relay", "aliases", "delivery",
            "route", "dns", "admin", "logging", "spool", "node", "imap", "dkim",
            "verify"}
DKIM_KEYS = {"domain", "selector", "key_file"}
VERIFY_KEYS = {"enabled", "authserv_id", "spf", "dkim", "dmarc", "arc", "dns_timeout",
               "on_temperror", "dkim_max_size"}
IMAP_KEYS = {"enabled", "listen", "listen_tls", "delivery"}
SPOOL_KEYS = {"url", "lease_seconds"}
NODE_KEYS = {"name"}
LOG_CATEGORIES = ("initialization", "addressing", "message_transfer", "smtp_interface",
                  "internal_processing", "smtp_protocol", "message_archival")
LOG_LEVELS = ("none", "minimum", "medium", "maximum")
LOGGING_KEYS = {*LOG_CATEGORIES, "retention", "archive_days"}
DELIVERY_KEYS = {"retry", "mx_port", "max_queue_lifetime", "delay_warning", "max_connections",
                 "max_connections_per_destination", "connect_timeout", "command_timeout",
                 "max_return_size"}
ROUTE_KEYS = {"match", "via", "host", "path", "tls", "tls_verify", "username", "password_file",
              "cost"}
SMTP_KEYS = {
    "listen", "submission", "submissions", "max_message_size", "max_recipients",
    "command_timeout", "data_timeout", "max_connections", "max_connections_per_peer",
    "max_errors", "soft_error_limit", "error_sleep", "auth_on_mx", "auth_failure_limit",
    "auth_failure_window", "processes", "min_free_space",
}
