"""DKIM signing and ARC sealing end to end, checked by independent verifiers.

Keys are made by ``postroom dkim keygen`` and published in a dnsmasq; a message goes
into Postroom over SMTP, out to smtp-sink, and the copy that arrived is verified by
OpenDKIM (``opendkim -t``, resolving through libunbound pointed at the dnsmasq) and by
dkimpy (its ``dnsfunc`` asks the dnsmasq through dnspython, never the system resolver).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import dns.resolver
import pytest

from tests.conftest import ServerProcess, free_port, wait_until
from tests.integration.dnsmasq import run_dnsmasq
from tests.integration.peers import add_loopback_address, sink

OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/sbin")
MX_IP, LATER_IP = "127.0.0.9", "127.0.0.11"
DOMAIN = "example.test"


def _keygen(sp: ServerProcess) -> tuple[str, list[tuple[str, str]]]:
    """Run keygen; add its [[dkim]] tables to the config; (output, [(name, text)])."""
    out = sp.cli("dkim", "keygen", DOMAIN).stdout
    tables = out[out.index("[[dkim]]"):out.rindex("\n\n")]
    with sp.config.open("a") as f:
        f.write("\n" + tables + "\n")
    records = []
    for m in re.finditer(r"(\S+)\. IN TXT \(\n((?:\s+\"[^\"]*\"\s*)+)\)|(\S+)\. IN TXT (\"[^\"]*\")", out):
        name = m.group(1) or m.group(3)
        text = "".join(re.findall(r"\"([^\"]*)\"", m.group(2) or m.group(4)))
        records.append((name, text))
    return out, records


@pytest.fixture
def signed_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, list[tuple[str, str]], int,
                                                     int]]:
    """A server with an RSA and an Ed25519 key for example.test, published in dnsmasq
    with the MX records of far.test and later.test; (server, records, dns port, mx port)."""
    for ip in (MX_IP, LATER_IP, "127.0.0.66"):
        add_loopback_address(ip)
    mx_port = free_port()
    sp = ServerProcess(tmp_path / "srv")
    sp.add_user("alice@example.test")
    _, records = _keygen(sp)
    assert len(records) == 2
    dns_records = ["--mx-host=far.test,mx.far.test,10", f"--host-record=mx.far.test,{MX_IP}",
                   "--mx-host=later.test,mx.later.test,10",
                   f"--host-record=mx.later.test,{LATER_IP}",
                   *(f"--txt-record={name},{text}" for name, text in records)]
    with run_dnsmasq(dns_records) as dns_port:
        with sp.config.open("a") as f:
            f.write('\n[aliases]\n"fwd@example.test" = ["dave@far.test"]\n')
        text = sp.config.read_text()
        text = re.sub(r"nameservers = \[.*\]", f'nameservers = ["127.0.0.1:{dns_port}"]', text)
        text = text.replace("[dns]", f'[delivery]\nmx_port = {mx_port}\nretry = ["1s"]\n'
                            'connect_timeout = "2s"\n\n[dns]', 1)
        sp.config.write_text(text)
        sp.start()
        try:
            yield sp, records, dns_port, mx_port
        finally:
            sp.stop()


def _dnsfunc(dns_port: int):  # type: ignore[no-untyped-def]
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], dns_port

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)
    return lookup


def _opendkim(message: bytes, dns_port: int, folder: Path) -> str:
    """OpenDKIM's Authentication-Results for ``message`` (test mode, -t)."""
    if OPENDKIM is None:
        pytest.skip("opendkim is not installed (apt-get install opendkim)")
    folder.mkdir(exist_ok=True)
    (folder / "unbound.conf").write_text(
        "server:\n  do-not-query-localhost: no\n  do-ip6: no\n  module-config: \"iterator\"\n"
        # unbound answers .test itself (RFC 6761) unless told not to
        "  local-zone: \"test.\" nodefault\n"
        f"forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{dns_port}\n")
    (folder / "opendkim.conf").write_text(
        f"Mode v\nSyslog no\nAlwaysAddARHeader yes\nAuthservID verifier.test\n"
        f"ResolverConfiguration {folder / 'unbound.conf'}\n")
    (folder / "msg.eml").write_bytes(message.replace(b"\r\n", b"\n"))
    cp = subprocess.run([OPENDKIM, "-x", str(folder / "opendkim.conf"), "-vvv", "-t",
                         str(folder / "msg.eml")], capture_output=True, text=True, timeout=30)
    m = re.search(r"hname='Authentication-Results' hvalue='([^']*)'", cp.stdout + cp.stderr)
    assert m, f"opendkim said: {cp.stdout}{cp.stderr}"
    return m.group(1)


def _raw(sink_dir: Path) -> list[bytes]:
    """The messages smtp-sink wrote, with CRLF line ends (the lines it adds on top are
    not signed, so they change no verdict)."""
    return [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            for p in sorted(sink_dir.iterdir()) if p.is_file() and p.stat().st_size]


def _wait_raw(sink_dir: Path, count: int) -> list[bytes]:
    wait_until(lambda: len(_raw(sink_dir)) >= count)
    return _raw(sink_dir)


def _submit(sp: ServerProcess, rcpts: list[str], *, source: str = "127.0.0.1",
            extra: str = "", sender: str = "alice@example.test",
            from_header: str = "Alice <alice@example.test>") -> None:
    with sp.smtp(source=source) as s:
        s.ehlo()
        s.mail(sender)
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, text
        code, text = s.data((f"{extra}From: {from_header}\r\nTo: {', '.join(rcpts)}\r\n"
                             "Subject: signed  by Postroom\r\n"
                             "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
                             "Hello, world.  \r\n\r\nLast line.\r\n\r\n\r\n").encode())
        assert code == 250, text


def _signature_fields(message: bytes) -> list[bytes]:
    return re.findall(rb"(?m)^DKIM-Signature:.*(?:\r\n[ \t].*)*", message)


def test_keygen_makes_private_keys_prints_records_and_refuses_to_overwrite(
        tmp_path: Path) -> None:
    sp = ServerProcess(tmp_path / "srv")
    out, records = _keygen(sp)
    files = sorted((sp.data / "dkim").iterdir())
    assert [f.name for f in files] == sorted(
        f"example.test.{n.split('.')[0]}.pem" for n, _ in records)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert (sp.data / "dkim").stat().st_mode & 0o777 == 0o700
    names = sorted(n for n, _ in records)
    assert names[0].startswith("ed") and names[1].startswith("rsa")
    assert all(n.endswith("._domainkey.example.test") for n in names)
    texts = dict(records)
    assert texts[names[1]].startswith("v=DKIM1; k=rsa; p=MIIBIjAN")     # RSA-2048 SPKI
    assert texts[names[0]].startswith("v=DKIM1; k=ed25519; p=")
    # the RSA record is cut into strings of at most 255 bytes, as a zone file needs
    strings = re.findall(r"\"([^\"]*)\"", out[out.index(names[1]):])
    assert len(strings[0]) == 255 and all(len(s) <= 255 for s in strings)
    assert 'key_file = "data/dkim/' in out
    assert sp.cli("check").returncode == 0                 # the printed tables are valid
    shown = sp.cli("dkim", "show").stdout
    assert all(n in shown for n in names)
    again = sp.cli("dkim", "keygen", DOMAIN, "--selector", names[1].split(".")[0], "--algorithm", "rsa",
                   check=False)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert sorted((sp.data / "dkim").iterdir()) == files


def test_a_key_that_cannot_be_read_fails_check_and_start(tmp_path: Path) -> None:
    sp = ServerProcess(tmp_path / "srv")
    _keygen(sp)
    bad = sorted((sp.data / "dkim").iterdir())[0]
    bad.write_text("not a key\n")
    cp = sp.cli("check", check=False)
    assert cp.returncode == 1 and str(bad) in cp.stderr and "dkim[" in cp.stderr
    serve = subprocess.run([*_serve_argv(sp)], capture_output=True, text=True, timeout=30,
                           cwd=sp.workdir)
    assert serve.returncode == 1 and str(bad) in serve.stderr


def _serve_argv(sp: ServerProcess) -> list[str]:
    return [sys.executable, "-m", "postroom.cli", "serve", "-c", str(sp.config)]


def test_relayed_mail_is_dual_signed_and_opendkim_and_dkimpy_verify_both(
        signed_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sp, records, dns_port, mx_port = signed_server
    with sink(MX_IP, mx_port) as remote:
        _submit(sp, ["bob@far.test"])
        [message] = _wait_raw(remote.dump, 1)
    sigs = _signature_fields(message)
    assert len(sigs) == 2
    assert b"a=rsa-sha256" in sigs[0] + sigs[1] and b"a=ed25519-sha256" in sigs[0] + sigs[1]
    stamps = json.loads(sp.cli("stats", "--json").stdout)["metrics"]["postroom_outbound_stamps_total"]
    assert {s["labels"]["kind"]: s["value"] for s in stamps}.get("dkim", 0) >= 1
    results = _opendkim(message, dns_port, tmp_path / "odk")
    for name, _ in records:
        selector = name.split(".")[0]
        assert re.search(rf"dkim=pass[^\n]*header\.s={selector} ", results), results
    d = dkim.DKIM(message)
    assert d.verify(idx=0, dnsfunc=_dnsfunc(dns_port))
    assert d.verify(idx=1, dnsfunc=_dnsfunc(dns_port))
    # the independent verifier is not a rubber stamp: a changed body fails
    tampered = message.replace(b"Hello, world.", b"Hello, World.")
    assert "dkim=pass" not in _opendkim(tampered, dns_port, tmp_path / "odk2")


def test_a_retry_sends_the_very_signature_stored_at_intake(signed_server) -> None:  # type: ignore[no-untyped-def]
    sp, _, dns_port, mx_port = signed_server
    with sink(MX_IP, mx_port) as now, sink(LATER_IP, mx_port, ("-r", "RCPT")):
        _submit(sp, ["bob@far.test", "carol@later.test"])
        [first] = _wait_raw(now.dump, 1)
        wait_until(lambda: "status=deferred" in sp.log_text(), timeout=10)
        assert "status=deferred" in sp.log_text()
    time.sleep(1.1)            # a signature made again now would carry another t=
    with sink(LATER_IP, mx_port) as later:
        [second] = _wait_raw(later.dump, 1)
    assert _signature_fields(first) == _signature_fields(second)
    assert len(_signature_fields(second)) == 2
    assert dkim.verify(second, dnsfunc=_dnsfunc(dns_port))


def test_mail_from_a_domain_without_a_key_and_local_mail_are_not_signed(signed_server) -> None:  # type: ignore[no-untyped-def]
    sp, _, _, mx_port = signed_server
    with sink(MX_IP, mx_port) as remote:
        _submit(sp, ["bob@far.test"], sender="x@elsewhere.test",
                from_header="x@elsewhere.test")
        [message] = _wait_raw(remote.dump, 1)
    assert _signature_fields(message) == []
    _submit(sp, ["alice@example.test"])
    [local] = sp.wait_messages("alice@example.test", 1)
    assert b"DKIM-Signature" not in local and b"ARC-Seal" not in local


def test_a_forwarded_message_gets_an_arc_set_that_dkimpy_accepts(signed_server) -> None:  # type: ignore[no-untyped-def]
    sp, records, dns_port, mx_port = signed_server
    results = ("Authentication-Results: mx.example.test; dkim=none;\r\n"
               " spf=pass smtp.mailfrom=zoe@outside.test; dmarc=none header.from=outside.test\r\n")
    with sink(MX_IP, mx_port) as remote:
        _submit(sp, ["fwd@example.test"], source="127.0.0.66", extra=results,
                sender="zoe@outside.test", from_header="Zoe <zoe@outside.test>")
        _submit(sp, ["fwd@example.test"], source="127.0.0.66",
                sender="zoe@outside.test", from_header="Zoe <zoe@outside.test>")
        sealed, plain = _wait_raw(remote.dump, 2)
    if b"ARC-Seal" not in sealed:
        sealed, plain = plain, sealed
    assert b"ARC-Seal" not in plain and b"DKIM-Signature" not in plain   # no A-R of ours
    assert b"DKIM-Signature" not in sealed          # not our user's mail: sealed, not signed
    assert re.search(rb"ARC-Seal: i=1; [^\r]*cv=none", sealed.replace(b"\r\n ", b" ")), sealed
    assert b"ARC-Authentication-Results: i=1; mx.example.test" in sealed
    rsa_selector = next(n for n, t in records if "k=rsa" in t).split(".")[0]
    assert f"s={rsa_selector}".encode() in sealed
    cv, _, reason = dkim.arc_verify(sealed, dnsfunc=_dnsfunc(dns_port))
    assert cv == dkim.CV_Pass, reason
    broken = sealed.replace(b"Hello, world.", b"Hello, World.")
    assert dkim.arc_verify(broken, dnsfunc=_dnsfunc(dns_port))[0] != dkim.CV_Pass
