"""Operating a running server through its admin API, from the command line: status,
stop/start/restart, reload, the queues and their actions, stats and /metrics."""

from __future__ import annotations

import json
import os
import smtplib
import stat
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import UNTRUSTED, ServerProcess, closed_port, wait_until
from tests.integration.peers import sink

COMPONENTS = ["smtp", "submission", "conversion", "queue-manager", "local-delivery",
              "outbound-delivery", "admin"]


def cli_json(sp: ServerProcess, *args: str) -> Any:
    return json.loads(sp.cli(*args, "--json").stdout)


def send(sp: ServerProcess, rcpt: str, subject: str, source: str = "127.0.0.1") -> str:
    with sp.smtp(source) as s:
        s.ehlo()
        s.mail("alice@example.test")
        code, text = s.rcpt(rcpt)
        assert code == 250, text
        code, text = s.data(f"Subject: {subject}\r\nFrom: alice@example.test\r\n\r\n"
                            f"body of {subject}\r\n".encode())
    assert code == 250, text
    return text.decode().split("queued as ")[1].split()[0]


def smarthost(port: int) -> str:
    return f"""
        [delivery]
        retry = ["1h"]
        [[route]]
        match = "far.test"
        via = "smarthost"
        host = "127.0.0.1:{port}"
        tls = "none"
        """


def test_status_lists_every_component_running(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    data = cli_json(sp, "status")
    assert [c["name"] for c in data["components"]] == COMPONENTS
    assert all(c["state"] == "running" for c in data["components"])
    assert all(isinstance(c["since"], float) for c in data["components"])
    text = sp.cli("status").stdout
    assert "outbound-delivery" in text and "running" in text


def test_the_api_needs_the_token_and_the_token_file_is_private(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    token_file = sp.data / "admin.token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        req = urllib.request.Request(f"http://127.0.0.1:{sp.admin_port}/api/status",
                                     headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
    token = token_file.read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{sp.admin_port}/metrics",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert b"postroom_queue_messages" in resp.read()


def test_stopping_outbound_delivery_piles_mail_up_and_starting_drains_it(server_factory) -> None:  # type: ignore[no-untyped-def]
    with sink("127.0.0.1") as remote:
        sp: ServerProcess = server_factory(smarthost(remote.port))
        assert sp.cli("stop", "outbound-delivery").stdout.strip() == \
            "outbound-delivery: stopped"
        ids = [send(sp, "bob@far.test", f"pile {i}") for i in range(5)]
        assert wait_until(lambda: sp.queue()["outbound-delivery"]["messages"] == 5)
        time.sleep(1.5)                                       # a few queue rounds
        assert remote.messages() == []
        states = {c["name"]: c["state"] for c in cli_json(sp, "status")["components"]}
        assert states["outbound-delivery"] == "stopped" and states["smtp"] == "running"
        listed = cli_json(sp, "queue", "list", "outbound-delivery")
        assert sorted(m["id"] for m in listed["messages"]) == sorted(ids)
        sp.cli("start", "outbound-delivery")
        got = remote.wait(5)
        assert sorted(m["Subject"] for m in got) == [f"pile {i}" for i in range(5)]
        assert wait_until(lambda: sp.queue()["outbound-delivery"]["messages"] == 0)


def test_stopping_smtp_answers_421_with_the_reason_and_start_restores_it(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    sp.cli("stop", "smtp")
    for _ in range(6):                    # whichever process takes the connection
        with pytest.raises(smtplib.SMTPConnectError) as err:
            smtplib.SMTP("127.0.0.1", sp.mx_port, timeout=10)
        assert err.value.smtp_code == 421
        assert b"smtp component is stopped by the administrator" in err.value.smtp_error
    states = {c["name"]: c["state"] for c in cli_json(sp, "status")["components"]}
    assert states["smtp"] == "stopped" and states["submission"] == "running"
    sp.cli("start", "smtp")
    for i in range(6):
        send(sp, "alice@example.test", f"after start {i}")
    assert len(sp.wait_messages("alice@example.test", 6)) == 6


def test_a_component_that_is_not_there_is_refused_by_name(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    cp = sp.cli("stop", "mta", check=False)
    assert cp.returncode == 1 and "no component 'mta'" in cp.stderr
    cp = sp.cli("stop", "admin", check=False)
    assert cp.returncode == 1 and "cannot stop itself" in cp.stderr


def test_reload_applies_a_new_domain_and_refuses_a_broken_config(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(users=("alice@example.test", "carol@new.test"))
    with sp.smtp(UNTRUSTED) as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt("carol@new.test")[0] == 550           # not ours yet: relay refused
    text = sp.config.read_text()
    sp.config.write_text(text.replace('"example.test", "localhost"',
                                      '"example.test", "localhost", "new.test"'))
    out = cli_json(sp, "reload")
    assert out["needs_restart"] == []
    send(sp, "carol@new.test", "after reload", source=UNTRUSTED)
    assert len(sp.wait_messages("carol@new.test", 1)) == 1
    # a broken config is refused with the key named, and the running one stays
    sp.config.write_text(text.replace("[relay]", "[relay]\nmax_hops = 3"))
    cp = sp.cli("reload", check=False)
    assert cp.returncode == 1 and "relay.max_hops" in cp.stderr
    send(sp, "carol@new.test", "still works", source=UNTRUSTED)
    assert len(sp.wait_messages("carol@new.test", 2)) == 2


def test_reload_under_load_loses_nothing(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    accepted: list[str] = []
    lock = threading.Lock()

    def sender(n: int) -> None:
        for i in range(25):
            qid = send(sp, "alice@example.test", f"load {n}-{i}")
            with lock:
                accepted.append(qid)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        sp.cli("reload")
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(accepted) == 100
    got = sp.wait_messages("alice@example.test", 100, timeout=30)
    subjects = {line for m in got for line in m.split(b"\n") if line.startswith(b"Subject: ")}
    assert len(got) == 100 and len(subjects) == 100


def test_queue_reasons_show_and_actions_on_deferred_mail(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(smarthost(closed_port()))
    ids = [send(sp, f"user{i}@far.test", f"stuck {i}") for i in range(3)]
    assert wait_until(lambda: sum(g["recipients"] for g in
                                  cli_json(sp, "queue", "reasons")["reasons"]) == 3)
    (group,) = cli_json(sp, "queue", "reasons")["reasons"]
    assert group["messages"] == 3 and group["hop"].startswith("smart host")
    assert "127.0.0.1" in group["reply"] or "connect" in group["reply"].lower()
    summary = sp.queue()["outbound-delivery"]
    assert summary["messages"] == 3 and summary["next_retry"] is not None

    shown = cli_json(sp, "queue", "show", ids[0])
    assert shown["sender"] == "alice@example.test"
    assert "Subject: stuck 0" in shown["headers"]
    (r,) = shown["recipients"]
    assert r["address"] == "user0@far.test" and r["state"] == "delivery"
    assert r["attempt_log"] and r["attempt_log"][0]["reply"] == r["last_reply"]
    assert "queue id" in sp.cli("queue", "show", ids[0]).stdout.lower()

    # hold one, list the held ones, release it
    assert cli_json(sp, "queue", "hold", ids[0])["recipients"] == 1
    held = cli_json(sp, "queue", "list", "outbound-delivery", "--held")
    assert [m["id"] for m in held["messages"]] == [ids[0]]
    assert sp.queue()["outbound-delivery"]["held"] == 1
    sp.cli("queue", "release", ids[0])
    assert sp.queue()["outbound-delivery"]["held"] == 0

    # filters without --all are refused; delete one without an NDR
    cp = sp.cli("queue", "delete", "--domain", "far.test", check=False)
    assert cp.returncode == 1 and "--all" in cp.stderr.replace("all (", "--all (")
    assert cli_json(sp, "queue", "delete", ids[1])["recipients"] == 1
    # bounce the rest of the reason group: the sender gets NDRs
    out = cli_json(sp, "queue", "bounce", "--reason", group["id"], "--all")
    assert out["recipients"] == 2
    ndrs = sp.wait_messages("alice@example.test", 2)
    assert len(ndrs) == 2
    assert all(b"returned to the sender by the administrator" in m for m in ndrs)
    assert wait_until(lambda: sp.queue()["outbound-delivery"]["messages"] == 0)
    time.sleep(0.5)
    assert len(sp.messages("alice@example.test")) == 2         # none for the deleted one


def test_stats_and_metrics_count_what_happened(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    send(sp, "alice@example.test", "counted")
    with sp.smtp(UNTRUSTED) as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt("bob@far.example")[0] == 550
    assert len(sp.wait_messages("alice@example.test", 1)) == 1

    def value(name: str, **labels: str) -> float:
        metrics = cli_json(sp, "stats")["metrics"]
        return sum(s["value"] for s in metrics.get(name, [])
                   if all(s["labels"].get(k) == v for k, v in labels.items()))
    assert wait_until(lambda: value("postroom_recipients_delivered_total",
                                    direction="inbound") == 1)
    assert value("postroom_messages_received_total", listener="mx") == 1
    assert value("postroom_relay_refusals_total") == 1
    assert value("postroom_connections_total", listener="mx") >= 2
    assert value("postroom_acceptance_seconds_count") == 1
    assert "postroom_messages_received_total" in sp.cli("stats").stdout


def test_commands_say_clearly_when_the_server_is_not_running(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    sp.stop()
    cp = sp.cli("status", check=False)
    assert cp.returncode == 1
    assert "cannot reach the admin API" in cp.stderr and "Traceback" not in cp.stderr


def test_a_logging_level_change_takes_effect_without_a_restart(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 2")
    levels = cli_json(sp, "logging")
    assert levels["categories"]["smtp_protocol"] == "minimum"
    send(sp, "alice@example.test", "before")
    protocol = sp.data / "logs" / "protocol.jsonl"
    time.sleep(0.5)
    assert not protocol.exists() or protocol.read_text() == ""
    out = cli_json(sp, "logging", "set", "smtp_protocol", "maximum")
    assert out["categories"]["smtp_protocol"] == "maximum"
    # every process logs the conversation now, AUTH secrets excepted
    for i in range(4):
        send(sp, "alice@example.test", f"after {i}")
    with smtplib.SMTP("127.0.0.1", sp.sub_port, timeout=10) as s:
        s.starttls(context=__import__("ssl")._create_unverified_context())
        s.ehlo()
        s.login("alice@example.test", "s3cret")
    def sessions() -> set[str]:
        if not protocol.exists():
            return set()
        return {json.loads(line)["session"] for line in protocol.read_text().splitlines()}
    # each process writes its lines a batch at a time (every 0.2 s)
    assert wait_until(lambda: len(sessions()) >= 5)
    assert wait_until(lambda: "AUTH PLAIN ****" in protocol.read_text(), timeout=5)
    lines = [json.loads(line) for line in protocol.read_text().splitlines()]
    said = [line["line"] for line in lines]
    assert any(t.upper().startswith("MAIL FROM:<ALICE@EXAMPLE.TEST>") for t in said)
    assert any(t.startswith("250 2.0.0 Ok: queued as") for t in said)
    assert "<message data" in " ".join(said)
    assert not any("czNjcmV0" in t or "s3cret" in t for t in said)   # never the password
    sp.cli("logging", "set", "all", "minimum")
    assert cli_json(sp, "logging")["categories"]["smtp_protocol"] == "minimum"


def test_events_are_recorded_and_filtered(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    qid = send(sp, "alice@example.test", "evented")
    with sp.smtp(UNTRUSTED) as s:
        s.ehlo()
        s.mail("x@far.example")
        assert s.rcpt("bob@far.example")[0] == 550

    def events(*args: str) -> list[dict[str, Any]]:
        return cli_json(sp, "events", *args)["events"]  # type: ignore[no-any-return]
    assert wait_until(lambda: any(e["id"] == 3002 for e in events()))
    ids = [e["id"] for e in events()]
    assert 1001 in ids and 3001 in ids and 2001 in ids
    mine = events("--queue-id", qid)
    assert [e["id"] for e in mine] == [3001, 3002]          # routing a local: at medium
    assert mine[0]["fields"]["sender"] == "alice@example.test"
    warnings = events("--severity", "warning")
    assert warnings and all(e["severity"] in ("warning", "error") for e in warnings)
    assert [e["id"] for e in events("--category", "addressing")] == [2001]
    relay = next(e for e in events() if e["id"] == 2001)
    assert relay["peer"] == UNTRUSTED and "bob@far.example" in relay["text"]
    jsonl = (sp.data / "logs" / "events.jsonl").read_text().splitlines()
    assert any(json.loads(line)["id"] == 2001 for line in jsonl)
    text = sp.cli("events", "--since", "5m").stdout
    assert "3001 message_transfer" in text


def test_trace_tells_the_story_of_a_relayed_deferred_then_bounced_message(server_factory) -> None:  # type: ignore[no-untyped-def]
    port = closed_port()
    sp: ServerProcess = server_factory(smarthost(port))
    with sp.smtp() as s:
        s.ehlo()
        s.mail("alice@example.test")
        s.rcpt("bob@far.test")
        code, text = s.data(b"Subject: traced\r\nMessage-ID: <trace-me@example.test>\r\n\r\nx\r\n")
    qid = text.decode().split("queued as ")[1].split()[0]
    assert wait_until(lambda: sp.queue()["outbound-delivery"]["recipients"] == 1 and
                      cli_json(sp, "queue", "show", qid)["recipients"][0]["attempts"] >= 1)
    # the smart host comes back, refusing the recipient for good (smtp-sink -f RCPT: 5xx)
    with sink("127.0.0.1", port, options=("-f", "RCPT")):
        sp.cli("queue", "retry", qid)
        assert len(sp.wait_messages("alice@example.test", 1)) == 1
    for how in ((qid,), ("--message-id", "trace-me@example.test"),
                ("--sender", "alice@example.test"), ("--rcpt", "bob@far.test")):
        found = cli_json(sp, "trace", *how)["messages"]
        assert found and found[0]["queue_id"] == qid, how
    (story,) = [m for m in cli_json(sp, "trace", qid)["messages"]]
    kinds = [e["id"] for e in story["events"]]
    assert kinds[:3] == [3001, 2004, 3003], kinds           # received, routed, deferred
    assert 3004 in kinds and 3005 in kinds                  # refused, with an NDR
    assert story["state"] == "failed"
    failed = next(e for e in story["events"] if e["id"] == 3004)
    assert failed["text"].startswith("<bob@far.test> failed at RCPT") and " 5" in failed["text"]
    received = story["events"][0]["fields"]
    assert received["tls"] is False and received["decisions"]
    deferred = next(e for e in story["events"] if e["id"] == 3003)
    assert "127.0.0.1" in deferred["text"] and "smart host" in deferred["text"]
    ndr = next(e for e in story["events"] if e["id"] == 3005)["fields"]["notice_id"]
    assert cli_json(sp, "trace", ndr)["messages"][0]["state"] == "delivered"
    text = sp.cli("trace", qid).stdout
    assert f"Message {qid}: failed" in text and "accepted <bob@far.test>" in text


def test_sendmail_queues_a_message_from_a_local_program(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(users=("alice@example.test", "bob@example.test"))
    import subprocess
    import sys

    def sendmail(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "postroom.cli", "sendmail",
                               "-c", str(sp.config), *args], input=data,
                              capture_output=True, timeout=60, cwd=sp.workdir)
    cp = sendmail("-oi", "-f", "cron@example.test", "alice@example.test",
                  data=b"Subject: from cron\n\nline one\n.\nline after a dot\n")
    assert cp.returncode == 0, cp.stderr
    (got,) = sp.wait_messages("alice@example.test", 1)
    assert b"Return-Path: <cron@example.test>" in got
    assert b"\n.\nline after a dot\n" in got and b"Message-ID:" in got
    # -t: recipients from the headers, Bcc removed
    cp = sendmail("-t", data=b"To: alice@example.test\nBcc: bob@example.test\n"
                             b"Subject: t\n\nbody\n")
    assert cp.returncode == 0, cp.stderr
    assert len(sp.wait_messages("alice@example.test", 2)) == 2
    (bcc,) = sp.wait_messages("bob@example.test", 1)
    assert b"Bcc:" not in bcc and b"Subject: t" in bcc
    # without -i, a lone dot ends the message
    sendmail("alice@example.test", data=b"Subject: dots\n\nkept\n.\ndropped\n")
    msgs = sp.wait_messages("alice@example.test", 3)
    last = next(m for m in msgs if b"Subject: dots" in m)
    assert b"kept" in last and b"dropped" not in last
    # clear errors, non-zero exits
    cp = sendmail("nobody@example.test", data=b"Subject: x\n\nx\n")
    assert cp.returncode != 0 and b"nobody@example.test" in cp.stderr
    cp = sendmail(data=b"Subject: x\n\nx\n")
    assert cp.returncode == 64 and b"no recipients" in cp.stderr
    sp.stop()
    cp = sendmail("alice@example.test", data=b"Subject: x\n\nx\n")
    assert cp.returncode == 75 and b"cannot reach the admin API" in cp.stderr


def test_counters_add_up_every_front_end(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory("[smtp]\nprocesses = 3")
    for i in range(12):                   # separate connections: the kernel spreads them
        send(sp, "alice@example.test", f"counted {i}")
    assert len(sp.wait_messages("alice@example.test", 12)) == 12

    def value(name: str) -> float:
        samples = cli_json(sp, "stats")["metrics"].get(name, [])
        return sum(s["value"] for s in samples if s["labels"].get("listener") in (None, "mx"))
    assert value("postroom_messages_received_total") == 12
    assert value("postroom_connections_total") == 13      # and the start-up port probe
    assert value("postroom_connections_current") == 0
    pids = {f.stem.rsplit("_", 1)[1] for f in (sp.data / "metrics").glob("counter_*.db")}
    assert len(pids) >= 2, pids                              # more than one process counted
    assert wait_until(lambda: value("postroom_recipients_delivered_total") == 12)
    log = sp.log_text()
    assert "postroom front end started" in log


def test_message_archival_at_maximum_keeps_a_copy_for_one_peer_only(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    sp.cli("logging", "set", "message_archival", "maximum", "--peer", UNTRUSTED)
    kept = send(sp, "alice@example.test", "archived", source=UNTRUSTED)
    not_kept = send(sp, "alice@example.test", "not archived")
    assert wait_until(lambda: any((sp.data / "archive").glob(f"*/{kept}.eml")))
    (copy,) = (sp.data / "archive").glob(f"*/{kept}.eml")
    assert b"Subject: archived" in copy.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert not any((sp.data / "archive").glob(f"*/{not_kept}.eml"))
    levels = cli_json(sp, "logging")
    assert levels["peers"][UNTRUSTED]["message_archival"] == "maximum"
    assert levels["categories"]["message_archival"] == "minimum"
