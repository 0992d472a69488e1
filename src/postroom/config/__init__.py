"""The configuration: one TOML file turned into validated, frozen dataclasses.

Config flows one way: file → :func:`load` → :class:`Config` → constructors. No other
module reads the file or the environment. Every error names the file and the key.

- :mod:`.schema`: the frozen dataclasses, their defaults and the key names;
- :mod:`.parser`: reading and validating a file (:func:`load`, :func:`parse_text`,
  :func:`parse_config`), :class:`ConfigError` and its :class:`Problem` list;
- :mod:`.default`: the commented file that the first ``postroom serve`` writes.

Every name is re-exported here: import from ``postroom.config``.
"""

from __future__ import annotations

from .default import default_config_text
from .parser import (
    ConfigError,
    default_hostname,
    ensure_token,
    load,
    parse_config,
    parse_duration,
    parse_endpoint,
    parse_text,
)
from .schema import (
    DEFAULT_ROUTES,
    DELIVERY_KEYS,
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
    ImapConfig,
    LoggingConfig,
    Network,
    Problem,
    Route,
    SmtpConfig,
    SpoolConfig,
    TlsConfig,
    VerifyConfig,
    redact_url,
)

__all__ = [
    "DEFAULT_ROUTES",
    "DELIVERY_KEYS",
    "IMAP_KEYS",
    "VERIFY_KEYS",
    "LOGGING_KEYS",
    "LOG_CATEGORIES",
    "LOG_LEVELS",
    "ROUTE_KEYS",
    "NODE_KEYS",
    "SMTP_KEYS",
    "SPOOL_KEYS",
    "TOP_KEYS",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "ImapConfig",
    "VerifyConfig",
    "LoggingConfig",
    "Network",
    "Problem",
    "Route",
    "SmtpConfig",
    "SpoolConfig",
    "TlsConfig",
    "redact_url",
    "default_config_text",
    "default_hostname",
    "ensure_token",
    "load",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
    "parse_text",
]
