"""The commented config file that the first ``postroom serve`` writes."""

from __future__ import annotations

__all__ = ["default_config_text"]


def default_config_text(hostname: str, domains: list[str], imap: bool = False) -> str:
    """The commented config that the first ``postroom serve`` writes; ``imap``: turn on
    the imap component (the caller found Dovecot installed)."""
    local = ", ".join(f'"{d}"' for d in domains)
    first = domains[-1]
    return f'''# Postroom configuration. Every key is shown with its default; see
# docs/configuration.md for the full reference. Check changes with: postroom check

# The name this server uses in its greeting, in HELO/EHLO and in Received headers.
# Default: the machine's name (no DNS lookup).
hostname = "{hostname}"

# Where the spool, the mailboxes, the users and the TLS certificate live.
# Relative paths are relative to this file.
data_dir = "postroom-data"

[smtp]
# The MX service: mail from the Internet to your domains (port 25 in production).
listen = ["127.0.0.1:2525"]
# Submission (port 587 in production): STARTTLS, then AUTH; relays for your users.
submission = ["127.0.0.1:2587"]
# Submission over implicit TLS (port 465 in production). Empty: off.
submissions = []
# The largest message accepted, in octets (advertised with SIZE).
max_message_size = 26214400
# The most recipients in one transaction; more get "452 4.5.3".
max_recipients = 100
# How long to wait for a client's next command, and for more message data.
command_timeout = "5m"
data_timeout = "10m"
# Caps on simultaneous connections, in total and from one address ("421 4.7.0").
max_connections = 1000
max_connections_per_peer = 50
# Errors a client may make without sending mail (refused recipients count). Past
# soft_error_limit each error reply waits error_sleep; at max_errors the server says
# "421 4.7.0" and hangs up. Postfix's smtpd_soft/hard_error_limit, smtpd_error_sleep_time.
soft_error_limit = 10
error_sleep = "1s"
max_errors = 20
# SMTP front-end processes sharing the listeners (the main one included): "auto" is
# one per core. Connection caps and AUTH throttling count per process.
processes = "auto"
# Offer AUTH on the MX listener too (always only after STARTTLS).
auth_on_mx = false
# Failed AUTH attempts from one address within the window before AUTH is refused.
auth_failure_limit = 5
auth_failure_window = "10m"
# Free space (bytes) the data directory keeps: below it, MAIL gets "452 4.3.1" so that
# queued mail can still be delivered and recorded. Default: 1.5 × max_message_size.
# min_free_space = 39321600

[tls]
# PEM files. Empty: a self-signed certificate is made in data_dir on first start.
cert_file = ""
key_file = ""

[domains]
# Mail to these domains is delivered to local mailboxes (postroom users add ...).
local = [{local}]

[relay]
# Clients in these networks may send mail to any domain without AUTH.
# Everyone else gets "550 5.7.1 Relaying mail to <address> is not allowed".
# Never put 0.0.0.0/0 or ::/0 here: that makes an open relay.
trusted_networks = ["127.0.0.1/32", "::1/128"]

[aliases]
# "address" = ["target", ...]. Targets may be local mailboxes or remote addresses.
# "postmaster@{first}" = ["alice@{first}"]

# Address spaces: where mail for other domains goes. The most specific match wins
# (exact domain, then the longest "*.domain", then "*"); on a tie the lowest cost, and
# equal costs share the load. Without any [[route]], "*" goes by MX lookup.
[[route]]
match = "*"
via = "mx"

# A smart host for one partner (uncomment and adapt):
# [[route]]
# match = "partner.example"         # or "*.partner.example" for its subdomains
# via = "smarthost"
# host = "smtp.partner.example:587" # name or IP, optional :port (default 25)
# tls = "required"                  # none | opportunistic | required
# tls_verify = true                 # with required: check the certificate
# username = "relayuser"            # AUTH to the smart host (only over TLS)
# password_file = "secrets/partner" # the password, alone in a file (mode 0600)
# cost = 1

# Final delivery for a local domain by LMTP, to a mail store such as Dovecot or Cyrus,
# instead of into data_dir's Maildirs (uncomment and adapt):
# [[route]]
# match = "example.org"             # a local domain ("*" for all of them)
# via = "lmtp"
# host = "127.0.0.1:24"             # name or IP, optional :port (default 24); or instead
# path = "/run/dovecot/lmtp"        # the LMTP server's Unix socket

[dns]
# DNS servers for MX lookups, as "address:port". Empty: the system resolver.
nameservers = []

[delivery]
# Retry intervals after a failed delivery attempt; the last one repeats.
retry = ["1m", "5m", "15m", "30m", "1h", "2h", "4h"]
# After this long in the queue, a message that still fails is returned (NDR).
max_queue_lifetime = "5d"
# Tell the sender once when a message has waited this long ("Action: delayed").
delay_warning = "4h"
# The port of remote MX hosts (25 on the Internet; tests point it elsewhere).
mx_port = 25
# Outbound connections in total, and to one destination (domain or smart host).
max_connections = 100
max_connections_per_destination = 10
# Timeouts for outbound connections and for each command's reply.
connect_timeout = "30s"
command_timeout = "5m"
# NDRs return the whole original message up to this size (else its headers).
max_return_size = 1000000

[logging]
# Diagnostic logging: how much each category records in the event log
# (postroom events) and in logs/events.jsonl: none | minimum | medium | maximum.
# Change them at run time with: postroom logging set CATEGORY|all LEVEL
initialization = "minimum"
addressing = "minimum"
message_transfer = "minimum"
smtp_interface = "minimum"
internal_processing = "minimum"
smtp_protocol = "minimum"        # maximum: whole conversations in logs/protocol.jsonl
message_archival = "minimum"     # maximum: a copy of every message in data_dir/archive
# Rotated files kept of each log, and days archived copies are kept.
retention = 5
archive_days = 7

[imap]
# Users read their mail over IMAP through Dovecot, which Postroom runs, configures and
# supervises (Debian: apt-get install dovecot-imapd). Its users and passwords are
# Postroom's. The first start sets this to true when Dovecot is installed.
enabled = {"true" if imap else "false"}
# IMAP with STARTTLS (143 in production); LOGIN only after STARTTLS, except from this
# machine to its own address.
listen = "127.0.0.1:1143"
# IMAPS, TLS from the first byte (993 in production). Empty: off.
listen_tls = ""
# "maildir": Postroom writes the Maildirs and Dovecot reads them. "lmtp": Postroom hands
# local mail to Dovecot over LMTP, which writes it (so that Sieve filters could run).
delivery = "maildir"

[verify]
# Inbound SPF, DKIM, DMARC and ARC checks on the MX listener, for mail from outside
# trusted_networks and without AUTH; the results go in an Authentication-Results
# header (docs/verification.md). Each check: none | tag | quarantine (the recipient's
# Junk folder) | reject ("550 5.7.1"). dmarc = "reject" honours the sender domain's
# own policy (p=reject refused, p=quarantine to Junk).
enabled = true
authserv_id = ""                 # the header's name for this server; empty: hostname
spf = "tag"
dkim = "tag"
dmarc = "reject"
arc = "tag"
dns_timeout = "5s"               # all DNS of one message; slower answers: temperror
on_temperror = "accept"          # accept (and tag) | defer ("451 4.7.0")
dkim_max_size = 16777216         # bigger messages are not DKIM-checked

# DKIM signing of mail that leaves for other servers (docs/signing.md). Make the keys
# and the DNS records to publish with: postroom dkim keygen {first}
# [[dkim]]
# domain = "{first}"
# selector = "rsa202601"
# key_file = "postroom-data/dkim/{first}.rsa202601.pem"

[admin]
# The admin API (JSON over HTTP, and /metrics) that the postroom commands use. It asks
# for the token in data_dir/admin.token (mode 0600, made on first start).
# Keep it on loopback. Empty: no admin API (status, queue and the others then fail).
listen = "127.0.0.1:8025"
'''
