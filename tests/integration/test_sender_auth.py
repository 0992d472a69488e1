"""Doctor, the NDR and the console on sender authentication, against real peers: a
private Postfix smart host that refuses after DATA under the sender's DMARC policy, and
dnsmasq publishing (or not) the sender's SPF, DKIM and DMARC records."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from postroom.mailauth import keys
from tests.conftest import ServerProcess, wait_until
from tests.integration.dnsmasq import free_udp_tcp_port, run_dnsmasq
from tests.integration.peers import postfix

DMARC_REFUSAL = ("550 5.7.26 Unauthenticated email from example.org is not accepted due to "
                 "domain's DMARC policy")


def doctor(sp: ServerProcess, *args: str) -> dict[str, Any]:
    cp = sp.cli("doctor", *args, "--json", check=False)
    data: dict[str, Any] = json.loads(cp.stdout)
    assert cp.returncode == (0 if data["verdict"] == "ok" else 1), cp.stderr
    assert [s["step"] for s in data["steps"]] == list(range(1, 12))
    return data


def step(d: dict[str, Any], n: int) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in d["steps"] if s["step"] == n)
    return found


def test_a_smart_host_refusing_after_data_for_dmarc(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The bug of issue 14: step 5 failed, step 7 ok, and the verdict was ok."""
    refusals = tmp_path / "end-of-data"
    refusals.write_text(f"/./ {DMARC_REFUSAL}\n")
    refusals.chmod(0o644)
    with run_dnsmasq(["--txt-record=example.test,v=spf1 ip4:192.0.2.1 -all"]) as dns, \
            postfix(tmp_path / "isp", "127.0.0.20", f"""
                mynetworks = 127.0.0.0/8
                smtpd_relay_restrictions = permit_mynetworks reject_unauth_destination
                smtpd_end_of_data_restrictions = check_sender_access regexp:{refusals}
                """) as isp:
        sp: ServerProcess = server_factory(f"""
            [dns]
            nameservers = ["127.0.0.1:{dns}"]
            [[route]]
            match = "*"
            via = "smarthost"
            host = "{isp.address}:{isp.port}"
            tls = "none"
            """)
        d = doctor(sp, "--to", "bob@far.test", "--send-test")
        text = sp.cli("doctor", "--to", "bob@far.test", "--send-test", check=False).stdout
        # without a test message, only the records show: step 11 names them
        assert doctor(sp, "--to", "bob@far.test")["verdict"] == "sender-auth-missing"
        # a message from a user comes back as an NDR that names the records
        with sp.smtp() as s:
            s.sendmail("alice@example.test", ["bob@far.test"],
                       b"From: <alice@example.test>\r\nTo: <bob@far.test>\r\n"
                       b"Subject: figures\r\n\r\nHello\r\n")
        assert wait_until(lambda: len(sp.messages("alice@example.test")) >= 1, 30)
    assert d["verdict"] == "nexthop-auth-policy", d
    test_message = step(d, 5)
    assert test_message["status"] == "fail" and "5.7.26" in test_message["finding"]
    assert "failed at DATA" in test_message["finding"]
    assert "_dmarc.example.test" in test_message["fix"]
    assert step(d, 7)["status"] == "ok"                      # RCPT was accepted
    assert step(d, 8)["status"] == "warn" and "step 11" in step(d, 8)["fix"]
    sender = step(d, 11)                                     # the records, checked
    assert sender["status"] == "fail"
    records = {r["kind"]: r for r in sender["detail"]["records"]}
    assert records["spf"]["state"] == "different"            # allows 192.0.2.1 only
    assert "smart host 127.0.0.20" in records["spf"]["finding"]
    assert "v=spf1 ip4:127.0.0.20 ip4:192.0.2.1 -all" in records["spf"]["fix"]
    assert records["dmarc"]["state"] == "missing"
    assert "Verdict: nexthop-auth-policy" in text
    assert "5. test message       [FAIL]" in text and "7. probe              [ok  ]" in text
    (ndr,) = sp.messages("alice@example.test")[:1]
    body = ndr.decode()
    assert "Undeliverable: figures" in body and "5.7.26" in body
    assert "DATA (sending the message itself)" in body
    assert "the DMARC record at _dmarc.example.test" in " ".join(body.split())
    # the same words as doctor's fix
    assert "DMARC policy of example.test" in " ".join(body.split())
    assert "DMARC policy of example.test" in test_message["fix"]


def _records(key_record: str | None, spf: str | None, dmarc: str | None) -> list[str]:
    out = ["--host-record=mx.example.test,127.0.0.1"]
    if spf is not None:
        out.append(f"--txt-record=example.test,{spf}")
    if key_record is not None:
        out.append(f"--txt-record=sel._domainkey.example.test,{key_record}")
    if dmarc is not None:
        out.append(f"--txt-record=_dmarc.example.test,{dmarc}")
    return out


def test_doctor_from_checks_spf_dkim_and_dmarc(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "dkim" / "sel.pem"
    key = keys.generate(key_file, "ed25519")
    other = keys.generate(tmp_path / "dkim" / "other.pem", "ed25519")
    right = keys.txt_record(key)
    port = free_udp_tcp_port()
    sp: ServerProcess = server_factory(f"""
        [dns]
        nameservers = ["127.0.0.1:{port}"]
        [[dkim]]
        domain = "example.test"
        selector = "sel"
        key_file = "{key_file}"
        """)
    spf_ok, dmarc_ok = "v=spf1 a:mx.example.test -all", "v=DMARC1; p=quarantine"
    cases = {
        "ok": (right, spf_ok, dmarc_ok, None, ""),
        "spf missing": (right, None, dmarc_ok, "spf",
                        "publish a TXT record at example.test: v=spf1 ip4:127.0.0.1 -all"),
        "spf not allowing": (right, "v=spf1 ip4:192.0.2.1 ~all", dmarc_ok, "spf",
                             "change the TXT record at example.test to: "
                             "v=spf1 ip4:127.0.0.1 ip4:192.0.2.1 ~all"),
        "dkim missing": (None, spf_ok, dmarc_ok, "dkim",
                         f"publish a TXT record at sel._domainkey.example.test: {right}"),
        "dkim another key": (keys.txt_record(other), spf_ok, dmarc_ok, "dkim",
                             f"replace the TXT record at sel._domainkey.example.test with: "
                             f"{right}"),
        "dmarc missing": (right, spf_ok, None, "dmarc",
                          "publish a TXT record at _dmarc.example.test: v=DMARC1; p=none; "
                          "rua=mailto:postmaster@example.test"),
    }
    for case, (dkim, spf, dmarc, wrong, fix) in cases.items():
        with run_dnsmasq(_records(dkim, spf, dmarc), port=port):
            d = doctor(sp, "--from", "alice@example.test")
        sender = step(d, 11)
        states = {r["kind"]: r["state"] for r in sender["detail"]["records"]}
        if wrong is None:
            assert d["verdict"] == "ok", (case, sender)
            assert set(states.values()) == {"found"}, (case, states)
            assert "p=quarantine" in sender["detail"]["records"][2]["finding"]
            continue
        assert d["verdict"] == "sender-auth-missing", (case, d["verdict"])
        assert sender["status"] == "fail"
        assert [k for k, v in states.items() if v != "found"] == [wrong], (case, states)
        assert fix in sender["fix"], (case, sender["fix"])


def test_the_console_domain_page_shows_the_records(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    key = keys.generate(tmp_path / "k.pem", "ed25519")
    with run_dnsmasq(["--host-record=mx.example.test,127.0.0.1",
                      "--mx-host=example.test,mx.example.test,10",
                      "--txt-record=example.test,v=spf1 mx -all"]) as dns:
        sp: ServerProcess = server_factory(textwrap.dedent(f"""
            [dns]
            nameservers = ["127.0.0.1:{dns}"]
            [[dkim]]
            domain = "example.test"
            selector = "sel"
            key_file = "{tmp_path / 'k.pem'}"
            """))
        sp.cli("users", "add", "admin@example.test", "--admin", "--password-stdin",
               input="a long passphrase\n")
        token = (sp.data / "admin.token").read_text().strip()
        base = f"http://127.0.0.1:{sp.admin_port}"
        api = httpx.get(f"{base}/api/domains/example.test/records",
                        headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        assert api["status"] == "fail"
        states = {r["kind"]: r["state"] for r in api["records"]}
        assert states == {"spf": "found", "dkim": "missing", "dmarc": "missing", "mx": "found"}
        with httpx.Client(base_url=base, timeout=30) as web:
            login = web.get("/login")              # its cookie stays in the client
            nonce = login.text.split('name="nonce" value="')[1].split('"')[0]
            r = web.post("/login", data={"address": "admin@example.test", "nonce": nonce,
                                         "password": "a long passphrase", "next": "/"})
            assert r.status_code == 303, r.text
            listing = web.get("/domains")
            page = web.get("/domains/example.test")
    assert listing.status_code == 200 and 'href="/domains/example.test"' in listing.text
    assert page.status_code == 200
    text = page.text
    assert "sel._domainkey.example.test" in text and keys.txt_record(key) in text
    assert "v=DMARC1; p=none; rua=mailto:postmaster@example.test" in text
    assert "missing" in text and "found" in text
    assert "_dmarc.example.test" in text
