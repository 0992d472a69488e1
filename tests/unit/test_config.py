"""The config file: defaults, every error naming its key, open-relay warnings, the template."""

from __future__ import annotations

import ipaddress
import textwrap
import tomllib
from pathlib import Path

import pytest

from postroom.config import (
    Config,
    ConfigError,
    DeliveryConfig,
    SmtpConfig,
    default_config_text,
    load,
    parse_config,
    parse_duration,
    parse_endpoint,
)

BASE = 'hostname = "mx.example.test"\n'


def parse(text: str, base_dir: Path) -> Config:
    return parse_config(tomllib.loads(textwrap.dedent(text)), base_dir, "test.toml")


def problems(text: str, base_dir: Path) -> dict[str, str]:
    """Each key named by a problem, with all its messages joined by " | "."""
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir)
    found: dict[str, list[str]] = {}
    for p in info.value.problems:
        found.setdefault(p.key, []).append(p.message)
    return {key: " | ".join(messages) for key, messages in found.items()}


# --- defaults -------------------------------------------------------------------------


def test_a_config_with_only_a_hostname_gets_every_default(tmp_path: Path) -> None:
    c = parse(BASE, tmp_path)
    assert c.hostname == "mx.example.test"
    assert c.data_dir == tmp_path / "postroom-data"
    assert c.smtp == SmtpConfig()
    assert c.smtp.listen == (("127.0.0.1", 2525),)
    assert c.smtp.submission == (("127.0.0.1", 2587),)
    assert c.smtp.submissions == ()
    assert c.smtp.max_message_size == 26214400
    assert c.smtp.max_recipients == 100
    assert c.smtp.command_timeout == 300.0 and c.smtp.data_timeout == 600.0
    # Postfix's smtpd_hard_error_limit, smtpd_soft_error_limit, smtpd_error_sleep_time
    assert (c.smtp.max_errors, c.smtp.soft_error_limit, c.smtp.error_sleep) == (20, 10, 1.0)
    assert c.smtp.auth_on_mx is False
    assert c.tls.cert_file is None and c.tls.key_file is None
    assert c.local_domains == ("localhost",)
    assert c.trusted_networks == (ipaddress.ip_network("127.0.0.1/32"),
                                  ipaddress.ip_network("::1/128"))
    assert c.aliases == {}
    assert c.delivery == DeliveryConfig()
    assert c.source == "test.toml"
    assert c.warnings() == []


def test_paths_derive_from_data_dir(tmp_path: Path) -> None:
    c = parse(BASE + 'data_dir = "/srv/mail"\n', tmp_path)
    assert c.data_dir == Path("/srv/mail")
    assert c.spool_path == Path("/srv/mail/spool.sqlite3")
    assert c.users_path == Path("/srv/mail/users.sqlite3")
    assert c.mail_dir == Path("/srv/mail/mail")


def test_a_full_config_is_read_into_the_dataclasses(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "k.pem").write_text("key")
    c = parse(BASE + """
        data_dir = "data"
        [smtp]
        listen = ["0.0.0.0:25", "[::]:25"]
        submission = []
        submissions = ["127.0.0.1:465"]
        max_message_size = 1000
        max_recipients = 7
        command_timeout = "90s"
        data_timeout = 120
        auth_on_mx = true
        [tls]
        cert_file = "c.pem"
        key_file = "k.pem"
        [domains]
        local = ["Example.Test", "example.org", "example.test"]
        [relay]
        trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]
        [aliases]
        "Postmaster@example.test" = "alice@example.test"
        "team@example.org" = ["alice@example.test", "Carol@Remote.Example"]
        [delivery]
        retry = ["30s", "1h"]
        """, tmp_path)
    assert c.data_dir == tmp_path / "data"
    assert c.smtp.listen == (("0.0.0.0", 25), ("::", 25))
    assert c.smtp.submission == ()
    assert c.smtp.submissions == (("127.0.0.1", 465),)
    assert (c.smtp.max_message_size, c.smtp.max_recipients) == (1000, 7)
    assert (c.smtp.command_timeout, c.smtp.data_timeout) == (90.0, 120.0)
    assert c.smtp.auth_on_mx is True
    assert c.tls.cert_file == tmp_path / "c.pem" and c.tls.key_file == tmp_path / "k.pem"
    assert c.local_domains == ("example.test", "example.org")
    assert c.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),
                                  ipaddress.ip_network("2001:db8::/32"))
    assert c.aliases == {"postmaster@example.test": ("alice@example.test",),
                         "team@example.org": ("alice@example.test", "carol@remote.example")}
    assert c.delivery.retry == (30.0, 3600.0)


# --- every error names its key -----------------------------------------------------------

ERROR_CASES = [
    # id, config text (after the hostname), key the problem must name, message substring
    ("unknown_top_level_key", 'hostnme = "x"', "hostnme", "unknown key"),
    ("unknown_smtp_key", "[smtp]\nlisten_on = []", "smtp.listen_on", "unknown key"),
    ("unknown_tls_key", '[tls]\ncert = "x"', "tls.cert", "unknown key"),
    ("unknown_domains_key", "[domains]\nlocals = []", "domains.locals", "unknown key"),
    ("unknown_relay_key", "[relay]\ntrusted = []", "relay.trusted", "unknown key"),
    ("unknown_delivery_key", "[delivery]\nretries = []", "delivery.retries", "unknown key"),
    ("section_not_a_table", "smtp = 5", "smtp", "must be a table"),
    ("hostname_not_a_string", "hostname = 5", "hostname", "must be a str"),
    ("hostname_not_a_domain", 'hostname = "not a host"', "hostname", "not a valid domain"),
    ("hostname_address_literal", 'hostname = "[127.0.0.1]"', "hostname", "plain domain name"),
    ("data_dir_not_a_string", "data_dir = 5", "data_dir", "must be a str"),
    ("size_not_an_integer", '[smtp]\nmax_message_size = "big"', "smtp.max_message_size",
     "must be an integer"),
    ("size_is_a_float", "[smtp]\nmax_message_size = 1.5", "smtp.max_message_size",
     "must be an integer"),
    ("recipients_is_a_bool", "[smtp]\nmax_recipients = true", "smtp.max_recipients",
     "must be an integer"),
    ("recipients_zero", "[smtp]\nmax_recipients = 0", "smtp.max_recipients",
     "greater than zero"),
    ("size_negative", "[smtp]\nmax_message_size = -1", "smtp.max_message_size",
     "greater than zero"),
    ("max_errors_zero", "[smtp]\nmax_errors = 0", "smtp.max_errors", "greater than zero"),
    ("soft_error_limit_zero", "[smtp]\nsoft_error_limit = 0", "smtp.soft_error_limit",
     "greater than zero"),
    ("error_sleep_not_a_duration", '[smtp]\nerror_sleep = "soon"', "smtp.error_sleep",
     "is not a duration"),
    ("error_sleep_negative", "[smtp]\nerror_sleep = -1", "smtp.error_sleep",
     "cannot be negative"),
    ("error_sleep_past_a_client_s_patience", '[smtp]\nerror_sleep = "5m"', "smtp.error_sleep",
     "less than 5m"),
    ("connections_zero", "[smtp]\nmax_connections = 0", "smtp.max_connections",
     "greater than zero"),
    ("per_peer_string", '[smtp]\nmax_connections_per_peer = "5"', "smtp.max_connections_per_peer",
     "must be an integer"),
    ("auth_failure_limit_zero", "[smtp]\nauth_failure_limit = 0", "smtp.auth_failure_limit",
     "greater than zero"),
    ("auth_on_mx_not_a_bool", '[smtp]\nauth_on_mx = "yes"', "smtp.auth_on_mx", "must be a bool"),
    ("listen_not_a_list", '[smtp]\nlisten = "127.0.0.1:25"', "smtp.listen", "must be a list"),
    ("listen_without_port", '[smtp]\nlisten = ["127.0.0.1"]', "smtp.listen",
     "is not \"address:port\""),
    ("listen_port_zero", '[smtp]\nlisten = ["127.0.0.1:0"]', "smtp.listen", "out of range"),
    ("listen_port_too_big", '[smtp]\nlisten = ["127.0.0.1:70000"]', "smtp.listen",
     "out of range"),
    ("listen_on_a_host_name", '[smtp]\nlisten = ["mx.example.test:25"]', "smtp.listen",
     "is not an IP address"),
    ("listen_ipv6_without_brackets", '[smtp]\nlisten = ["::1:25"]', "smtp.listen",
     "is not \"address:port\""),
    ("submission_bad_ipv6", '[smtp]\nsubmission = ["[::1]25"]', "smtp.submission",
     "is not \"address:port\""),
    ("submissions_not_strings", "[smtp]\nsubmissions = [465]", "smtp.submissions",
     "expected \"address:port\""),
    ("no_listener_at_all", "[smtp]\nlisten = []\nsubmission = []\nsubmissions = []",
     "smtp.listen", "no listener"),
    ("command_timeout_words", '[smtp]\ncommand_timeout = "5 minutes"', "smtp.command_timeout",
     "is not a duration"),
    ("data_timeout_negative", "[smtp]\ndata_timeout = -1", "smtp.data_timeout",
     "cannot be negative"),
    ("data_timeout_unit_unknown", '[smtp]\ndata_timeout = "5y"', "smtp.data_timeout",
     "is not a duration"),
    ("auth_failure_window_bool", "[smtp]\nauth_failure_window = true",
     "smtp.auth_failure_window", "expected a duration"),
    ("command_timeout_zero", "[smtp]\ncommand_timeout = 0", "smtp.command_timeout",
     "longer than zero"),
    ("retry_empty", "[delivery]\nretry = []", "delivery.retry", "non-empty list"),
    ("retry_zero", '[delivery]\nretry = ["0s"]', "delivery.retry", "longer than zero"),
    ("mx_port_zero", "[delivery]\nmx_port = 0", "delivery.mx_port", "port number"),
    ("route_not_tables", 'route = "x"', "route", "[[route]]"),
    ("route_without_match", '[[route]]\nvia = "mx"', "route[0].match", "required"),
    ("route_bad_via", '[[route]]\nmatch = "*"\nvia = "uucp"', "route[0].via",
     "'uucp': use \"mx\", \"smarthost\" or \"lmtp\""),
    ("route_unknown_key", '[[route]]\nmatch = "*"\nhots = "x"', "route[0].hots", "unknown key"),
    ("smarthost_without_host", '[[route]]\nmatch = "*"\nvia = "smarthost"', "route[0].host",
     "needs host"),
    ("lmtp_without_host_or_path", '[[route]]\nmatch = "*"\nvia = "lmtp"', "route[0].host",
     "needs host = \"name-or-ip[:port]\" (port 24 by default) or path"),
    ("lmtp_with_host_and_path",
     '[[route]]\nmatch = "*"\nvia = "lmtp"\nhost = "127.0.0.1"\npath = "/run/lmtp"',
     "route[0].host", "either host or path, not both"),
    ("lmtp_empty_path", '[[route]]\nmatch = "*"\nvia = "lmtp"\npath = ""', "route[0].host",
     "an lmtp route needs host"),
    ("lmtp_path_not_a_string", '[[route]]\nmatch = "*"\nvia = "lmtp"\npath = 24',
     "route[0].path", "must be a str"),
    ("lmtp_path_too_long", f'[[route]]\nmatch = "*"\nvia = "lmtp"\npath = "/{"x" * 107}"',
     "route[0].path", "at most 107 bytes"),
    ("lmtp_bad_host", '[[route]]\nmatch = "*"\nvia = "lmtp"\nhost = "127.0.0.1:0"',
     "route[0].host", "port 0 out of range"),
    ("lmtp_tls_required", '[[route]]\nmatch = "*"\nvia = "lmtp"\nhost = "::1"\ntls = "required"',
     "route[0].tls", "lmtp routes do not use TLS"),
    ("lmtp_tls_opportunistic",
     '[[route]]\nmatch = "*"\nvia = "lmtp"\nhost = "::1"\ntls = "opportunistic"',
     "route[0].tls", "leave tls out or set \"none\""),
    ("lmtp_username", '[[route]]\nmatch = "*"\nvia = "lmtp"\nhost = "::1"\nusername = "u"\n'
     'password_file = "cert.pem"', "route[0].username", "AUTH is only for smarthost routes"),
    ("lmtp_password_file", '[[route]]\nmatch = "*"\nvia = "lmtp"\nhost = "::1"\n'
     'password_file = "cert.pem"', "route[0].password_file", "lmtp routes do not log in"),
    ("path_on_smarthost",
     '[[route]]\nmatch = "*"\nvia = "smarthost"\nhost = "::1"\npath = "/run/lmtp"',
     "route[0].path", "only lmtp routes take a path"),
    ("path_on_mx", '[[route]]\nmatch = "*"\npath = "/run/lmtp"', "route[0].path",
     "only lmtp routes take a path"),
    ("host_on_mx", '[[route]]\nmatch = "*"\nhost = "relay.test"', "route[0].host",
     "only smarthost and lmtp routes take a host"),
    ("nameservers_not_a_list", '[dns]\nnameservers = "127.0.0.1"', "dns.nameservers",
     "must be a list"),
    ("retry_not_a_list", '[delivery]\nretry = "1m"', "delivery.retry", "non-empty list"),
    ("retry_bad_item", '[delivery]\nretry = ["1m", "soon"]', "delivery.retry",
     "is not a duration"),
    ("network_host_bits_set", '[relay]\ntrusted_networks = ["10.0.0.1/8"]',
     "relay.trusted_networks[0]", "host bits set"),
    ("network_garbage", '[relay]\ntrusted_networks = ["127.0.0.1/32", "banana"]',
     "relay.trusted_networks[1]", "banana"),
    ("network_prefix_too_long", '[relay]\ntrusted_networks = ["10.0.0.0/33"]',
     "relay.trusted_networks[0]", "10.0.0.0/33"),
    ("network_is_a_number", "[relay]\ntrusted_networks = [2130706433]",
     "relay.trusted_networks[0]", "2130706433"),
    ("networks_not_a_list", '[relay]\ntrusted_networks = "10.0.0.0/8"',
     "relay.trusted_networks", "must be a list"),
    ("local_domains_empty", "[domains]\nlocal = []", "domains.local", "at least one"),
    ("local_domains_not_a_list", '[domains]\nlocal = "example.test"', "domains.local",
     "must be a list"),
    ("local_domain_invalid", '[domains]\nlocal = ["example.test", "bad domain"]',
     "domains.local[1]", "not a valid domain"),
    ("local_domain_literal", '[domains]\nlocal = ["[192.0.2.1]"]', "domains.local[0]",
     "plain domain name"),
    ("local_domain_trailing_dot", '[domains]\nlocal = ["example.test."]', "domains.local[0]",
     "plain domain name"),
    ("alias_source_not_local", '[aliases]\n"x@remote.example" = ["root@localhost"]',
     'aliases."x@remote.example"', "remote.example is not a local domain"),
    ("alias_source_not_an_address", '[aliases]\n"postmaster" = ["root@localhost"]',
     'aliases."postmaster"', "is not an address"),
    ("alias_target_not_an_address", '[aliases]\n"a@localhost" = ["nobody"]',
     'aliases."a@localhost"', "'nobody' is not an address"),
    ("alias_target_not_a_string", '[aliases]\n"a@localhost" = [5]',
     'aliases."a@localhost"', "is not an address"),
    ("alias_without_targets", '[aliases]\n"a@localhost" = []', 'aliases."a@localhost"',
     "non-empty list"),
    ("alias_target_table", '[aliases]\n"a@localhost" = { x = 1 }', 'aliases."a@localhost"',
     "non-empty list"),
    ("cert_without_key", '[tls]\ncert_file = "cert.pem"', "tls.cert_file",
     "set both or neither"),
    ("key_without_cert", '[tls]\nkey_file = "key.pem"', "tls.cert_file",
     "set both or neither"),
    ("cert_file_missing", '[tls]\ncert_file = "nope.pem"\nkey_file = "key.pem"',
     "tls.cert_file", "file not found"),
    ("key_file_missing", '[tls]\ncert_file = "cert.pem"\nkey_file = "nope.pem"',
     "tls.key_file", "file not found"),
    ("cert_file_not_a_string", "[tls]\ncert_file = 5\nkey_file = \"key.pem\"", "tls.cert_file",
     "must be a str"),
]


@pytest.mark.parametrize(("text", "key", "message"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_every_config_error_names_its_key(tmp_path: Path, text: str, key: str,
                                          message: str) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    source = text if text.startswith("hostname") else BASE + text
    found = problems(source, tmp_path)
    assert key in found, found
    assert message in found[key], found[key]


def test_every_problem_is_reported_at_once_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(BASE + """
            bogus = 1
            [smtp]
            max_recipients = 0
            listen = ["nowhere"]
            [relay]
            trusted_networks = ["banana"]
            """, tmp_path)
    keys = [p.key for p in info.value.problems]
    assert sorted(keys) == sorted(["bogus", "smtp.max_recipients", "smtp.listen",
                                   "relay.trusted_networks[0]"])
    text = str(info.value)
    assert text.startswith("test.toml: invalid configuration")
    for key in keys:
        assert f"\n  {key}: " in text


# --- load --------------------------------------------------------------------------------


def test_load_reads_a_file_relative_to_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text(BASE + 'data_dir = "d"\n[domains]\nlocal = ["example.test"]\n')
    c = load(path)
    assert c.data_dir == tmp_path.resolve() / "d"
    assert c.local_domains == ("example.test",)
    assert c.source == str(path)


LOAD_ERRORS = [
    ("missing_file", None, "(file)", "no such file"),
    ("toml_syntax_error", "hostname = \n", "(syntax)", ""),
    ("not_utf8", b"hostname = \"\xff\"\n", "(file)", "cannot read"),
    ("invalid_value", '[smtp]\nmax_errors = "many"\n', "smtp.max_errors", "integer"),
]


@pytest.mark.parametrize(("content", "key", "message"), [c[1:] for c in LOAD_ERRORS],
                         ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors_name_the_file_and_the_problem(
        tmp_path: Path, content: str | bytes | None, key: str, message: str) -> None:
    path = tmp_path / "postroom.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    found = {p.key: p.message for p in info.value.problems}
    assert key in found and message in found[key], found


# --- durations and endpoints ---------------------------------------------------------------

DURATIONS = [
    ("seconds", "90s", 90.0), ("minutes", "5m", 300.0), ("hours", "4h", 14400.0),
    ("days", "5d", 432000.0), ("weeks", "1w", 604800.0), ("no_unit", "45", 45.0),
    ("fraction", "1.5h", 5400.0), ("spaces", " 5 m ", 300.0), ("integer", 30, 30.0),
    ("float", 2.5, 2.5), ("zero", 0, 0.0),
]


@pytest.mark.parametrize(("value", "seconds"), [c[1:] for c in DURATIONS],
                         ids=[c[0] for c in DURATIONS])
def test_parse_duration_understands_units(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "-5s", "5M", "1h30m", "", True, None, -1,
                                   [5]])
def test_parse_duration_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


ENDPOINTS = [
    ("ipv4", "127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("ipv6", "[::1]:2525", ("::1", 2525)),
    ("ipv6_any", "[::]:25", ("::", 25)),
    ("localhost", "localhost:25", ("localhost", 25)),
    ("highest_port", "0.0.0.0:65535", ("0.0.0.0", 65535)),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in ENDPOINTS],
                         ids=[c[0] for c in ENDPOINTS])
def test_parse_endpoint_reads_address_and_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", ":25", "127.0.0.1:", "127.0.0.1:0",
                                   "127.0.0.1:65536", "[::1]", "::1:25", "example.test:25",
                                   "[127.0.0.1:25", 2525, None])
def test_parse_endpoint_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(value)


# --- warnings ------------------------------------------------------------------------------

WARNING_CASES = [
    ("ipv4_everything", "0.0.0.0/0", True),
    ("ipv6_everything", "::/0", True),
    ("public_slash_8", "8.0.0.0/8", True),
    ("public_ipv6_slash_16", "2000::/16", True),
    ("private_slash_8", "10.0.0.0/8", False),
    ("loopback_host", "127.0.0.1/32", False),
    ("ipv6_loopback", "::1/128", False),
    ("public_slash_24", "192.0.2.0/24", False),
    ("private_ipv6", "fd00::/8", False),
]


@pytest.mark.parametrize(("network", "open_relay"), [c[1:] for c in WARNING_CASES],
                         ids=[c[0] for c in WARNING_CASES])
def test_warnings_flag_trusted_networks_that_make_an_open_relay(
        tmp_path: Path, network: str, open_relay: bool) -> None:
    c = parse(BASE + f'[relay]\ntrusted_networks = ["127.0.0.1/32", "{network}"]\n', tmp_path)
    flagged = [w for w in c.warnings() if "OPEN RELAY" in w.message]
    assert bool(flagged) is open_relay
    if open_relay:
        (w,) = flagged
        assert w.key == "relay.trusted_networks"
        assert network in w.message
        assert str(w).startswith("relay.trusted_networks: OPEN RELAY")


@pytest.mark.parametrize(("smtp", "warned"), [
    ("max_errors = 10", True),                      # what files written before said
    ("max_errors = 5\nsoft_error_limit = 5", True),
    ("max_errors = 11", False),
    ("soft_error_limit = 3\nmax_errors = 4", False),
])
def test_warnings_flag_a_hard_error_limit_that_never_lets_the_soft_one_act(
        tmp_path: Path, smtp: str, warned: bool) -> None:
    c = parse(BASE + f"[smtp]\n{smtp}\n", tmp_path)
    flagged = [w for w in c.warnings() if w.key == "smtp.max_errors"]
    assert bool(flagged) is warned
    if warned:
        assert "soft_error_limit" in flagged[0].message and "scanner" in flagged[0].message


@pytest.mark.parametrize(("value", "seconds"), [('"0s"', 0.0), ('"250ms"', None), ("0.05", 0.05),
                                                ('"2s"', 2.0)])
def test_error_sleep_is_a_duration_that_may_be_zero(tmp_path: Path, value: str,
                                                     seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ConfigError):
            parse(BASE + f"[smtp]\nerror_sleep = {value}\n", tmp_path)
        return
    assert parse(BASE + f"[smtp]\nerror_sleep = {value}\n", tmp_path).smtp.error_sleep == seconds


# --- the template written on first start ----------------------------------------------------


def test_default_config_text_parses_cleanly_into_the_defaults(tmp_path: Path) -> None:
    text = default_config_text("mx.example.test", ["example.test", "localhost"])
    c = parse_config(tomllib.loads(text), tmp_path, "postroom.toml")
    assert c.hostname == "mx.example.test"
    assert c.data_dir == tmp_path / "postroom-data"
    assert c.smtp == SmtpConfig()
    assert c.local_domains == ("example.test", "localhost")
    assert c.trusted_networks == Config("h", tmp_path).trusted_networks
    assert c.delivery == DeliveryConfig()
    assert c.aliases == {}
    assert c.warnings() == []


TEMPLATE_KEYS = [
    ("hostname",), ("data_dir",), ("smtp", "listen"), ("smtp", "submission"),
    ("smtp", "submissions"), ("smtp", "max_message_size"), ("smtp", "max_recipients"),
    ("tls", "cert_file"), ("tls", "key_file"), ("domains", "local"),
    ("relay", "trusted_networks"), ("aliases",),
]


@pytest.mark.parametrize("path", TEMPLATE_KEYS, ids=[".".join(k) for k in TEMPLATE_KEYS])
def test_default_config_text_shows_the_key(path: tuple[str, ...]) -> None:
    raw = tomllib.loads(default_config_text("mx.example.test", ["example.test"]))
    node: object = raw
    for part in path:
        assert isinstance(node, dict) and part in node, path
        node = node[part]


def test_default_config_text_documents_the_relay_refusal_and_the_alias_example() -> None:
    text = default_config_text("mx.example.test", ["example.test"])
    assert "550 5.7.1 Relaying mail to <address> is not allowed" in text
    assert "0.0.0.0/0" in text
    assert '# "postmaster@example.test" = ["alice@example.test"]' in text


def test_min_free_space_defaults_to_one_and_a_half_times_the_message_size(
        tmp_path: Path) -> None:
    from postroom.config import ConfigError, parse_config
    c = parse_config({"smtp": {"max_message_size": 1000}}, tmp_path, "t")
    assert c.smtp.min_free_space is None and c.smtp.free_space_needed == 1500
    c = parse_config({"smtp": {"min_free_space": 0}}, tmp_path, "t")
    assert c.smtp.free_space_needed == 0
    with pytest.raises(ConfigError) as err:
        parse_config({"smtp": {"min_free_space": -5}}, tmp_path, "t")
    assert "smtp.min_free_space" in str(err.value)


# --- LMTP routes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "expected_host", "port", "hop"), [
    ("127.0.0.1", "127.0.0.1", 24, "127.0.0.1:24"),
    ("127.0.0.1:2424", "127.0.0.1", 2424, "127.0.0.1:2424"),
    ("Mailstore.Example.ORG", "mailstore.example.org", 24, "mailstore.example.org:24"),
    ("[::1]:24", "::1", 24, "[::1]:24"),
    ("::1", "::1", 24, "[::1]:24"),
])
def test_an_lmtp_route_over_tcp_defaults_to_port_24_and_no_tls(
        tmp_path: Path, host: str, expected_host: str, port: int, hop: str) -> None:
    c = parse(BASE + f"""
        [[route]]
        match = "example.org"
        via = "lmtp"
        host = "{host}"
        """, tmp_path)
    (route,) = c.routes
    assert (route.via, route.host, route.port, route.path) == ("lmtp", expected_host, port, "")
    assert route.tls == "none" and not route.username and not route.password
    assert route.next_hop == hop
    assert route.describe() == f"LMTP {hop} (route example.org)"


def test_an_lmtp_route_over_a_unix_socket(tmp_path: Path) -> None:
    c = parse(BASE + """
        [[route]]
        match = "*.example.org"
        via = "lmtp"
        path = "/run/dovecot/lmtp"
        tls = "none"
        cost = 3

        [[route]]
        match = "example.net"
        via = "lmtp"
        path = "sockets/lmtp"
        """, tmp_path)
    absolute, relative = c.routes
    assert (absolute.via, absolute.host, absolute.path, absolute.cost) == \
        ("lmtp", "", "/run/dovecot/lmtp", 3)
    assert absolute.next_hop == "unix:/run/dovecot/lmtp"
    assert absolute.describe() == "LMTP unix:/run/dovecot/lmtp (route *.example.org)"
    # relative, like every other path in the file: to the config file's folder
    assert relative.path == str(tmp_path / "sockets" / "lmtp")
    assert relative.describe() == f"LMTP unix:{tmp_path}/sockets/lmtp (route example.net)"


def test_the_other_routes_still_describe_themselves_as_before(tmp_path: Path) -> None:
    c = parse(BASE + """
        [[route]]
        match = "*"
        [[route]]
        match = "partner.example"
        via = "smarthost"
        host = "10.0.0.5"
        """, tmp_path)
    mx, smart = c.routes
    assert mx.describe() == "MX lookup (route *)" and mx.path == "" and mx.tls == "opportunistic"
    assert smart.describe() == "smart host 10.0.0.5:25 (route partner.example)"
    assert smart.tls == "opportunistic"


def test_the_default_config_text_shows_an_lmtp_route_that_parses(tmp_path: Path) -> None:
    text = default_config_text("mx.example.test", ["example.org"])
    assert '# via = "lmtp"' in text
    # uncomment the LMTP example (with host, without path): a valid route
    lines = text.splitlines()
    start = lines.index("# Final delivery for a local domain by LMTP, to a mail store such as "
                        "Dovecot or Cyrus,")
    block = []
    for line in lines[start + 2:]:
        if not line.startswith("# "):
            break
        if not line.startswith("# path"):
            block.append(line[2:])
    c = parse_config(tomllib.loads(text + "\n" + "\n".join(block) + "\n"), tmp_path, "t")
    lmtp = c.routes[-1]
    assert (lmtp.match, lmtp.via, lmtp.host, lmtp.port) == ("example.org", "lmtp", "127.0.0.1", 24)
