#!/usr/bin/env bash
# Install everything the tests need (Python extras, Debian packages of the real peers),
# then run the whole suite inside a loopback-only network namespace.
# Usage: scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v swaks >/dev/null || need_apt+=(swaks)
command -v smtp-source >/dev/null 2>&1 || [ -x /usr/sbin/smtp-source ] || need_apt+=(postfix)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
# final delivery over LMTP is tested against Dovecot's LMTP server, and the imap
# component runs Dovecot's IMAP server, read with curl and mbsync (isync)
[ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/lmtp ] || need_apt+=(dovecot-core dovecot-lmtpd)
[ -x /usr/lib/dovecot/imap-login ] || need_apt+=(dovecot-imapd)
command -v mbsync >/dev/null || need_apt+=(isync)
command -v curl >/dev/null || need_apt+=(curl)
# the PostgreSQL spool's tests start a private server from Debian's package
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# DKIM signatures are checked by an independent verifier, OpenDKIM (issue 14)
command -v opendkim-testmsg >/dev/null || need_apt+=(opendkim opendkim-tools)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v unshare >/dev/null || need_apt+=(util-linux)
# the web console's browser tests drive Debian's Chromium (Playwright never downloads one)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  echo 'postfix postfix/main_mailer_type select Local only' | $SUDO debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian starts a system Postfix on port 25: the tests run their own instances.
  if command -v postfix >/dev/null; then $SUDO postfix stop >/dev/null 2>&1 || true; fi
  # ...and a system Dovecot (IMAP, POP3, LMTP on /run/dovecot): the tests run their own.
  if [ -x /usr/sbin/dovecot ]; then $SUDO /usr/sbin/dovecot stop >/dev/null 2>&1 || true; fi
  # ...and a system OpenDKIM milter: the tests run opendkim-testmsg themselves.
  if command -v opendkim >/dev/null; then $SUDO pkill -x opendkim >/dev/null 2>&1 || true; fi
fi
# ...and a system PostgreSQL cluster (port 5432): the tests start their own. Debian's
# package creates and starts one; stop it and keep it from starting at boot.
if command -v pg_lsclusters >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  pg_lsclusters -h 2>/dev/null | while read -r ver name _port status _rest; do
    conf="/etc/postgresql/$ver/$name/start.conf"
    if [ -f "$conf" ] && ! grep -qx manual "$conf"; then
      echo manual | $SUDO tee "$conf" >/dev/null || true
    fi
    if [ "$status" = "online" ]; then
      $SUDO pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || \
        $SUDO service postgresql stop >/dev/null 2>&1 || true
    fi
  done
fi

echo "== installing postroom with its test extras"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== lint and types"
python3 -m ruff check src tests bench
python3 -m mypy src

echo "== tests (loopback-only network namespace)"
if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec python3 -m pytest "$@"' pytest "$@"
else
  echo "WARNING: cannot create a network namespace (need root); running on the host network" >&2
  exec python3 -m pytest "$@"
fi
