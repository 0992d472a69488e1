"""postroom dns, probe and explain against real peers: dnsmasq, Postroom itself, and a
private Postfix playing the seed case's smart host that refuses to relay."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UNTRUSTED, ServerProcess, closed_port
from tests.integration.dnsmasq import run_dnsmasq
from tests.integration.peers import postfix, sink

RECORDS = [
    "--mx-host=far.test,mx1.far.test,10", "--mx-host=far.test,mx2.far.test,20",
    "--host-record=mx1.far.test,127.0.0.9", "--host-record=mx2.far.test,127.0.0.10",
    "--txt-record=far.test,v=spf1 -all", "--txt-record=_dmarc.far.test,v=DMARC1; p=reject",
    "--mx-host=nullmx.test,.,0",
    "--host-record=bare.test,127.0.0.11",
    "--mx-host=noaddr.test,mx.noaddr.test,10",              # an MX host without an address
    # the sender's own records (doctor's step 11): SPF allows loopback, DMARC published
    "--txt-record=example.test,v=spf1 ip4:127.0.0.0/8 -all",
    "--txt-record=_dmarc.example.test,v=DMARC1; p=none",
]


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    with run_dnsmasq(RECORDS) as port:
        yield port


def run_json(sp: ServerProcess, *args: str, code: int = 0, stdin: str | None = None) -> Any:
    cp = sp.cli(*args, "--json", check=False, input=stdin)
    assert cp.returncode == code, cp.stderr
    return json.loads(cp.stdout)


def test_dns_shows_mx_addresses_and_policy_records(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]')
    d = run_json(sp, "dns", "far.test")
    assert [(h["preference"], h["host"], h["addresses"]) for h in d["mx"]] == [
        (10, "mx1.far.test", ["127.0.0.9"]), (20, "mx2.far.test", ["127.0.0.10"])]
    assert d["spf"] == {"present": True, "record": "v=spf1 -all", "error": None}
    assert d["dmarc"]["present"] and not d["mta_sts"]["present"]
    assert run_json(sp, "dns", "nullmx.test")["null_mx"] is True
    bare = run_json(sp, "dns", "bare.test")
    assert bare["implicit"] and bare["mx"][0]["addresses"] == ["127.0.0.11"]
    missing = run_json(sp, "dns", "nosuch.test")
    assert missing["error"]["kind"] == "NXDOMAIN" and missing["mx"] == []
    text = sp.cli("dns", "far.test").stdout
    assert "MX  10 mx1.far.test: 127.0.0.9" in text and "SPF      v=spf1 -all" in text


def test_dns_names_a_dead_server_as_a_timeout_or_failure(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()               # nameservers: a port nobody answers
    d = run_json(sp, "dns", "far.test")
    assert d["error"]["kind"] in ("TIMEOUT", "SERVFAIL")


def test_explain_shows_the_relay_decision_and_the_route(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(f"""
        [dns]
        nameservers = ["127.0.0.1:{dns_port}"]
        [[route]]
        match = "*"
        via = "mx"
        [[route]]
        match = "partner.test"
        via = "smarthost"
        host = "127.0.0.20:2626"
        """)
    # the seed case from the client side: an untrusted client without AUTH
    e = run_json(sp, "explain", "--from", "x@example.test", "--to", "bob@far.test",
                 "--client-ip", UNTRUSTED)
    assert not e["rcpt"]["accept"]
    assert e["rcpt"]["reply"].startswith("550 5.7.1 Relaying mail to <bob@far.test> is not")
    assert UNTRUSTED in e["rcpt"]["reason"]
    assert "submission port" in e["rcpt"]["fix"]              # the shared catalogue's fix
    # the same from a trusted network: the catch-all MX route and its hosts
    e = run_json(sp, "explain", "--from", "alice@example.test", "--to", "bob@far.test")
    assert e["rcpt"]["accept"]
    chosen = [c for c in e["routing"]["candidates"] if c["chosen"]]
    assert [c["match"] for c in chosen] == ["*"]
    (hop,) = e["next_hops"]
    assert hop["kind"] == "mx" and hop["mx"][0]["host"] == "mx1.far.test"
    assert "mx1.far.test" in e["outcome"]
    # an authenticated user to the partner: the smart host wins on specificity
    e = run_json(sp, "explain", "--from", "alice@example.test", "--to", "eve@partner.test",
                 "--client-ip", "192.0.2.1", "--auth", "alice@example.test",
                 "--listener", "submission")
    assert e["rcpt"]["accept"] and e["next_hops"][0]["kind"] == "smarthost"
    assert e["next_hops"][0]["addresses"] == ["127.0.0.20"]
    # a local mailbox
    e = run_json(sp, "explain", "--from", "x@far.test", "--to", "alice@example.test",
                 "--client-ip", UNTRUSTED)
    assert e["next_hops"] == [{"kind": "local", "mailbox": "alice@example.test",
                               "exists": True, "alias_for": None}]
    text = sp.cli("explain", "--from", "a@example.test", "--to", "bob@nullmx.test").stdout
    assert "null MX" in text and "Outcome:" in text


def test_explain_names_the_lmtp_store_that_takes_final_delivery(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("""
        [[route]]
        match = "*"
        via = "mx"
        [[route]]
        match = "example.test"
        via = "lmtp"
        host = "127.0.0.1:2424"
        [[route]]
        match = "store.test"
        via = "lmtp"
        path = "/run/dovecot/lmtp"
        """)
    e = run_json(sp, "explain", "--from", "x@far.test", "--to", "alice@example.test",
                 "--client-ip", UNTRUSTED)
    assert e["next_hops"] == [{"kind": "local", "mailbox": "alice@example.test",
                               "exists": True, "alias_for": None,
                               "store": "LMTP 127.0.0.1:2424 (route example.test)"}]
    assert e["outcome"].endswith("over LMTP 127.0.0.1:2424 (route example.test)")
    # a domain that is not ours, relayed to a store by a trusted client
    e = run_json(sp, "explain", "--from", "alice@example.test", "--to", "bob@store.test")
    assert e["next_hops"] == [{"kind": "lmtp", "route": "store.test",
                               "store": "LMTP unix:/run/dovecot/lmtp (route store.test)"}]
    assert "Next hop: LMTP unix:/run/dovecot/lmtp" in sp.cli(
        "explain", "--from", "alice@example.test", "--to", "bob@store.test").stdout


def test_probe_a_server_that_accepts_with_starttls_and_auth(server_factory) -> None:  # type: ignore[no-untyped-def]
    remote: ServerProcess = server_factory(users=("bob@far.test",), domains=("far.test",))
    sp: ServerProcess = server_factory()
    d = run_json(sp, "probe", f"127.0.0.1:{remote.mx_port}", "--from", "a@example.test",
                 "--to", "bob@far.test", "--starttls")
    assert d["verdict"] == "accepts" and d["rcpt"].startswith("250")
    assert "STARTTLS" in d["extensions"] and d["banner"].startswith("220")
    assert d["tls"]["protocol"].startswith("TLS") and d["tls"]["verified"] is False
    assert "mx.example.test" in d["tls"]["subject"]            # the self-signed certificate
    assert "RSET" in d["transcript"] and "DATA" not in d["transcript"]
    # AUTH on the submission port: wrong, then right
    d = run_json(sp, "probe", f"127.0.0.1:{remote.sub_port}", "--starttls", "--auth",
                 "bob@far.test", "--password-stdin", stdin="wrong\n", code=1)
    assert d["verdict"] == "auth-failed" and "535" in d["reply"]
    d = run_json(sp, "probe", f"127.0.0.1:{remote.sub_port}", "--starttls", "--auth",
                 "bob@far.test", "--password-stdin", "--from", "bob@far.test", "--to",
                 "carol@elsewhere.test", stdin="s3cret\n")
    # authenticated: the remote relays for bob (its catch-all route)
    assert d["auth"].startswith("235") and d["verdict"] == "accepts"
    assert "s3cret" not in d["transcript"]
    d = run_json(sp, "probe", f"127.0.0.1:{remote.sub_port}", "--from", "bob@far.test",
                 code=1)
    assert d["verdict"] == "auth-required" and "530" in d["reply"]


def test_probe_names_the_seed_case_smart_host_that_refuses_to_relay(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    sp: ServerProcess = server_factory()
    with postfix(tmp_path / "isp", "127.0.0.20", """
            mynetworks = 127.0.0.99/32
            smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated reject_unauth_destination
            """) as isp:
        cp = sp.cli("probe", f"{isp.address}:{isp.port}", "--from", "alice@example.test",
                    "--to", "bob@far.test", check=False)
    assert cp.returncode == 1
    assert "Verdict: relay-denied: 554 5.7.1 <bob@far.test>: Relay access denied" in \
        cp.stdout or "Verdict: relay-denied: 550 5.7.1" in cp.stdout, cp.stdout
    assert "RCPT TO:<bob@far.test>" in cp.stdout


def test_probe_of_a_closed_port_and_of_a_missing_host(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]')
    d = run_json(sp, "probe", f"127.0.0.1:{closed_port()}", code=1)
    assert d["verdict"] == "unreachable" and "refused" in d["reply"].lower()
    d = run_json(sp, "probe", "nosuch.test", code=1)
    assert d["verdict"] == "unreachable" and "NXDOMAIN" in d["reply"]
    # STARTTLS asked of a server without it: the sink-like Postroom MX without TLS is not
    # available, so a TLS failure is shown against a port that speaks no TLS at all
    remote: ServerProcess = server_factory(users=("bob@far.test",), domains=("far.test",))
    d = run_json(sp, "probe", f"127.0.0.1:{remote.subs_port}", code=1)
    assert d["verdict"] in ("unreachable", "tls-failed")


def doctor(sp: ServerProcess, *args: str) -> dict[str, Any]:
    cp = sp.cli("doctor", *args, "--json", check=False)
    data = json.loads(cp.stdout)
    assert cp.returncode == (0 if data["verdict"] == "ok" else 1), cp.stderr
    assert [s["step"] for s in data["steps"]] == list(range(1, 12))
    return data  # type: ignore[no-any-return]


def test_doctor_ok_for_a_working_route(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    remote: ServerProcess = server_factory(users=("bob@far.test",), domains=("far.test",))
    sp: ServerProcess = server_factory(f"""
        [dns]
        nameservers = ["127.0.0.1:{dns_port}"]
        [[route]]
        match = "*"
        via = "smarthost"
        host = "127.0.0.1:{remote.mx_port}"
        tls = "none"
        """)
    d = doctor(sp, "--to", "bob@far.test", "--send-test")
    assert d["verdict"] == "ok", d
    assert next(s for s in d["steps"] if s["step"] == 7)["status"] == "ok"
    sender = d["steps"][10]                  # SPF allows the smart host; no DKIM key yet
    assert sender["status"] == "warn" and "smart host" in sender["detail"]["sending"]["why"]
    assert [r["state"] for r in sender["detail"]["records"]] == ["found", "missing", "found"]
    test_step = d["steps"][4]
    assert test_step["status"] == "ok" and "delivered" in test_step["finding"]
    (got,) = remote.wait_messages("bob@far.test", 1)
    assert b"Subject: postroom doctor test message" in got
    assert "Verdict: ok" in sp.cli("doctor", "--to", "bob@far.test").stdout


def test_doctor_names_each_cause(server_factory, dns_port, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dns = f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
    sp: ServerProcess = server_factory(dns + f"""
        [delivery]
        mx_port = {closed_port()}
        """)
    # the sending client is neither trusted nor authenticated: the seed symptom
    d = doctor(sp, "--to", "bob@far.test", "--client-ip", UNTRUSTED)
    assert d["verdict"] == "client-relay-denied"
    assert "trusted_networks" in d["steps"][1]["fix"]
    # DNS verdicts
    assert doctor(sp, "--to", "bob@nosuch.test")["verdict"] == "dns-nxdomain"
    assert doctor(sp, "--to", "bob@nullmx.test")["verdict"] == "null-mx"
    # the MX answers nowhere; the test message waits, and says why
    d = doctor(sp, "--to", "bob@far.test", "--send-test")
    assert d["verdict"] == "nexthop-unreachable"
    assert d["steps"][4]["status"] == "warn" and "deferred" in d["steps"][4]["finding"]
    assert d["steps"][7]["status"] == "warn"                  # step 8: the other way out
    # a stopped component comes first
    sp.cli("stop", "outbound-delivery")
    d = doctor(sp, "--to", "bob@far.test")
    assert d["verdict"] == "service-down" and "outbound-delivery" in d["steps"][0]["finding"]
    sp.cli("start", "outbound-delivery")
    sp.stop()
    assert doctor(sp)["verdict"] == "service-down"


def test_doctor_names_the_seed_case_smart_host(server_factory, dns_port, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with postfix(tmp_path / "isp", "127.0.0.20", """
            mynetworks = 127.0.0.99/32
            smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated reject_unauth_destination
            """) as isp:
        sp: ServerProcess = server_factory(f"""
            [dns]
            nameservers = ["127.0.0.1:{dns_port}"]
            [[route]]
            match = "*"
            via = "smarthost"
            host = "{isp.address}:{isp.port}"
            tls = "none"
            """)
        d = doctor(sp, "--to", "bob@far.test")
        text = sp.cli("doctor", "--to", "bob@far.test", check=False).stdout
    assert d["verdict"] == "nexthop-relay-denied"
    probe_step = d["steps"][6]
    assert "Relay access denied" in probe_step["finding"]
    assert "username" in probe_step["fix"].lower() or "authent" in probe_step["fix"].lower()
    assert "Verdict: nexthop-relay-denied" in text


def test_doctor_finds_no_route_and_an_open_relay(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(f"""
        [dns]
        nameservers = ["127.0.0.1:{dns_port}"]
        [[route]]
        match = "partner.test"
        via = "smarthost"
        host = "127.0.0.20:2626"
        """)
    assert doctor(sp, "--to", "bob@far.test")["verdict"] == "no-route"
    open_relay: ServerProcess = server_factory('[relay]\ntrusted_networks = ["0.0.0.0/0"]')
    d = doctor(open_relay)
    assert d["verdict"] == "open-relay"
    lint = d["steps"][8]
    # the self-test came from an address the config does not list on its own, and relayed
    test = lint["detail"]["relay_self_test"]
    assert test["source"] not in ("127.0.0.1", "this host")
    assert test["verdict"] == "accepts" and "ACCEPTED" in lint["finding"]
    # a safe config refuses the same test (and doctor does not run it)
    assert doctor(sp)["steps"][8]["status"] == "ok"


def test_doctor_tries_the_other_kind_of_route(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    remote: ServerProcess = server_factory(users=("bob@far.test",), domains=("far.test",))
    sp: ServerProcess = server_factory(f"""
        [dns]
        nameservers = ["127.0.0.1:{dns_port}"]
        [delivery]
        mx_port = {closed_port()}
        [[route]]
        match = "*"
        via = "mx"
        [[route]]
        match = "partner.test"
        via = "smarthost"
        host = "127.0.0.1:{remote.mx_port}"
        tls = "none"
        """)
    d = doctor(sp, "--to", "bob@far.test")
    assert d["verdict"] == "nexthop-unreachable"
    alternative = d["steps"][7]
    assert f"127.0.0.1:{remote.mx_port}" in alternative["finding"]
    assert "would work" in alternative["finding"]
    assert "more specific [[route]]" in alternative["fix"]


def smarthost_route(host: str, port: int, extra: str = "") -> str:
    return f"""
        [[route]]
        match = "*"
        via = "smarthost"
        host = "{host}:{port}"
        """ + extra


def test_doctor_names_auth_and_tls_failures_of_the_next_hop(  # type: ignore[no-untyped-def]
        server_factory, dns_port, tmp_path: Path) -> None:
    remote: ServerProcess = server_factory(users=("relay@far.test",), domains=("far.test",))
    dns = f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
    # a submission port without our credentials: AUTH required
    sp = server_factory(dns + smarthost_route("127.0.0.1", remote.sub_port, 'tls = "none"'))
    assert doctor(sp, "--to", "bob@far.test")["verdict"] == "nexthop-auth-required"
    # with a wrong password
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    sp = server_factory(dns + smarthost_route("127.0.0.1", remote.sub_port, f"""
        tls = "required"
        tls_verify = false
        username = "relay@far.test"
        password_file = "{secret}"
        """))
    d = doctor(sp, "--to", "bob@far.test")
    assert d["verdict"] == "nexthop-auth-failed", d["steps"][6]
    assert "535" in d["steps"][6]["finding"]
    # TLS required of a server that offers none (smtp-sink)
    with sink("127.0.0.1") as plain:
        sp = server_factory(dns + smarthost_route("127.0.0.1", plain.port, 'tls = "required"'))
        d = doctor(sp, "--to", "bob@far.test")
    assert d["verdict"] == "nexthop-tls-failed" and "STARTTLS" in d["steps"][6]["finding"]


def test_doctor_names_dns_trouble_and_a_stuck_queue(server_factory, dns_port) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]')
    assert doctor(sp, "--to", "bob@noaddr.test")["verdict"] == "dns-no-address"
    dead: ServerProcess = server_factory()            # nameservers: nobody answers there
    assert doctor(dead, "--to", "bob@far.test")["verdict"] == "dns-failure"
    stuck: ServerProcess = server_factory(smarthost_route("127.0.0.1", closed_port(),
                                                          'tls = "none"'))
    with stuck.smtp() as s:
        s.sendmail("alice@example.test", ["bob@far.test"], b"Subject: stuck\r\n\r\nx\r\n")
    time.sleep(2.5)
    d = doctor(stuck, "--stuck-after", "2s")
    assert d["verdict"] == "queue-stuck"
    assert "outbound-delivery" in d["steps"][3]["finding"]
    assert "127.0.0.1" in d["steps"][3]["finding"]        # the biggest reason, named
