"""The tools administrators check a mail server with, run against a real server as they
would run them: swaks (--tls, --auth, --tls-on-connect, --pipe), openssl s_client
-starttls smtp, postroom queue list as mailq, and what stops the server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import UNTRUSTED, ServerProcess, closed_port, wait_until

PASSWORD = "Tool-Check-4471"


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """alice, added with 'postroom users add', on a server with all three listeners."""
    sp = ServerProcess(tmp_path_factory.mktemp("tools"))
    sp.add_user("alice@example.test", PASSWORD)
    sp.start()
    yield sp  # type: ignore[misc]
    sp.stop()


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--timeout", "15", "--helo", "client.test", *args],
                          capture_output=True, text=True, timeout=60)


def auth(mechanism: str | None = None, password: str = PASSWORD) -> list[str]:
    return ["--auth", *([mechanism] if mechanism else []), "--auth-user", "alice@example.test",
            "--auth-password", password]


def delivered(sp: ServerProcess, before: int, header: str) -> bool:
    msgs = sp.wait_messages("alice@example.test", before + 1)
    # any of them: Maildir names do not sort by arrival within one second (M<usec>
    # is not zero-padded), so the newest need not be the last
    return len(msgs) == before + 1 and any(header.encode() in m for m in msgs)


# --- swaks ----------------------------------------------------------------------------
def test_swaks_tls_and_auth_of_the_mechanism_swaks_picks(tools_server: ServerProcess) -> None:
    sp = tools_server
    before = len(sp.messages("alice@example.test"))
    cp = swaks("--server", f"127.0.0.1:{sp.sub_port}", "--local-interface", UNTRUSTED,
               "-tls", *auth(), "--from", "alice@example.test", "--to", "alice@example.test",
               "--header", "X-Check: swaks-auth")
    assert cp.returncode == 0, cp.stdout
    assert "<-  250-STARTTLS" in cp.stdout and "<~  250-AUTH PLAIN LOGIN" in cp.stdout
    assert "<~  235 2.7.0 Authentication successful" in cp.stdout
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-F]+", cp.stdout)
    assert delivered(sp, before, "X-Check: swaks-auth")
    assert PASSWORD not in sp.log_text()


def test_swaks_auth_with_a_wrong_password_is_535_and_a_failure(tools_server: ServerProcess
                                                                ) -> None:
    cp = swaks("--server", f"127.0.0.1:{tools_server.sub_port}", "--local-interface",
               "127.0.0.91", "-tls", *auth("PLAIN", "not-the-password"),
               "--to", "alice@example.test")
    assert cp.returncode != 0
    assert "<~* 535 5.7.8" in cp.stdout


def test_swaks_cram_md5_is_not_offered_because_passwords_are_hashed(
        tools_server: ServerProcess) -> None:
    cp = swaks("--server", f"127.0.0.1:{tools_server.sub_port}", "-tls", *auth("CRAM-MD5"),
               "--to", "alice@example.test")
    assert cp.returncode != 0
    assert "requested type not available" in cp.stdout + cp.stderr


def test_swaks_tls_on_connect_to_the_submissions_listener(tools_server: ServerProcess) -> None:
    sp = tools_server
    before = len(sp.messages("alice@example.test"))
    cp = swaks("--server", f"127.0.0.1:{sp.subs_port}", "--tls-on-connect", *auth("PLAIN"),
               "--from", "alice@example.test", "--to", "alice@example.test",
               "--header", "X-Check: tls-on-connect")
    assert cp.returncode == 0, cp.stdout
    assert "=== TLS started" in cp.stdout
    assert "<~  220 mx.example.test ESMTP Postroom" in cp.stdout      # the greeting in TLS
    assert "250-STARTTLS" not in cp.stdout
    assert "<~  235 2.7.0 Authentication successful" in cp.stdout
    assert delivered(sp, before, "X-Check: tls-on-connect")


def test_swaks_pipe_through_openssl_s_client_to_the_submissions_listener(
        tools_server: ServerProcess) -> None:
    sp = tools_server
    before = len(sp.messages("alice@example.test"))
    cp = swaks("--pipe", f"openssl s_client -quiet -connect 127.0.0.1:{sp.subs_port}",
               *auth("PLAIN"), "--from", "alice@example.test", "--to", "alice@example.test",
               "--header", "X-Check: swaks-pipe")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "=== Connected to openssl s_client" in cp.stdout
    assert "<-  235 2.7.0 Authentication successful" in cp.stdout
    assert "<-  221 2.0.0 mx.example.test closing connection" in cp.stdout
    assert delivered(sp, before, "X-Check: swaks-pipe")


def test_sendmail_bs_for_swaks_pipe_says_it_is_not_supported_and_what_to_use(
        tools_server: ServerProcess) -> None:
    cp = subprocess.run([sys.executable, "-m", "postroom.cli", "sendmail", "-bs", "-c",
                         str(tools_server.config)], input="EHLO x\r\nQUIT\r\n",
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 64 and cp.stdout == ""
    assert "-bs" in cp.stderr and "not supported" in cp.stderr and "swaks" in cp.stderr


# --- openssl s_client -------------------------------------------------------------------
@pytest.mark.parametrize("listener", ["mx", "submission"])
def test_openssl_s_client_starttls_smtp(tools_server: ServerProcess, listener: str) -> None:
    sp = tools_server
    port = sp.mx_port if listener == "mx" else sp.sub_port
    cp = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect",
                         f"127.0.0.1:{port}", "-crlf", "-ign_eof"],
                        input="EHLO probe.test\nQUIT\n", capture_output=True, text=True,
                        timeout=30)
    out = cp.stdout
    assert cp.returncode == 0, out + cp.stderr
    assert "CN = mx.example.test" in out                     # the self-signed certificate
    assert re.search(r"New, TLSv1\.[23], Cipher is", out), out
    ehlo = [line for line in out.splitlines() if line.startswith("250")]
    assert "250-mx.example.test" in ehlo and "250 DSN" in ehlo
    assert not any("STARTTLS" in line for line in ehlo)      # not offered again inside TLS
    assert any(line.startswith("250-AUTH PLAIN LOGIN") for line in ehlo) is \
        (listener == "submission")
    assert "221 2.0.0 mx.example.test closing connection" in out


# --- postroom queue list as mailq -------------------------------------------------------
# Postfix 3.7's postqueue -p, measured here, with its 11-character queue ids:
#   -Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------
#   B4D4C20CE9B     288 Sun Dec  6 00:02:30  MAILER-DAEMON
#                      (connect to 127.0.0.1[127.0.0.1]:60219: Connection refused)
#                                            bob@far.example
#   (blank line, the next message, ...)
#   -- 0 Kbytes in 2 Requests.
# The id column is wider for Postroom's 18-character ids; the rest is the same.
MAILQ_HEADER = "-Queue ID-         --Size-- ----Arrival Time---- -Sender/Recipient-------"
MAILQ_MESSAGE = re.compile(
    r"([0-9A-F]{18})([ !]) *(\d+) (\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d)  (\S+)")


def test_queue_list_looks_like_mailq(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory(f"""
        [[route]]
        match = "*"
        via = "smarthost"
        host = "127.0.0.1:{closed_port()}"
        """)
    sp.cli("stop", "local-delivery")               # local mail waits in inbound-delivery
    with sp.smtp() as s:
        s.sendmail("", ["bob@far.example", "carol@far.example"],
                   b"Subject: out\r\n\r\n" + (b"x" * 75 + b"\r\n") * 20)
        s.sendmail("zed@far.example", ["alice@example.test"], b"Subject: in\r\n\r\nhi\r\n")

    def tried() -> bool:
        out = json.loads(sp.cli("queue", "list", "outbound-delivery", "--json").stdout)
        return bool(out["messages"]) and all(r["attempts"] >= 1 and r["last_reply"]
                                             for r in out["messages"][0]["recipients"])
    assert wait_until(tried)
    out_id = json.loads(sp.cli("queue", "list", "outbound-delivery", "--json").stdout
                        )["messages"][0]["id"]
    in_id = json.loads(sp.cli("queue", "list", "inbound-delivery", "--json").stdout
                       )["messages"][0]["id"]

    lines = sp.cli("queue", "list").stdout.splitlines()     # no queue: all four, as mailq
    assert lines[0] == MAILQ_HEADER
    heads = [(i, m) for i, line in enumerate(lines) if (m := MAILQ_MESSAGE.fullmatch(line))]
    assert [m.group(1) for _, m in heads] == [out_id, in_id]      # in order of arrival
    (i, out), (j, inb) = heads
    assert out.group(2) == " " and out.group(5) == "MAILER-DAEMON"
    assert lines[i].index(out.group(3)) + len(out.group(3)) == 18 + 8   # right-aligned size
    sender_column = lines[i].index("MAILER-DAEMON")
    assert sender_column == 18 + 30 == lines[0].index("-Sender") - 1
    # the reason, in parentheses, then the recipients that wait for it, under the sender
    assert re.fullmatch(r" {26}\(451 4\.4\.1 .*Connection refused; \d+ attempts?, "
                        r"next try in \S+\)", lines[i + 1]), lines[i + 1]
    assert lines[i + 2:i + 5] == [" " * sender_column + "bob@far.example",
                                  " " * sender_column + "carol@far.example", ""]
    assert inb.group(5) == "zed@far.example"
    assert lines[j + 1] == " " * sender_column + "alice@example.test"
    total = int(out.group(3)) + int(inb.group(3))
    assert lines[-1] == f"-- {total // 1024} Kbytes in 2 Requests."

    sp.cli("queue", "hold", out_id)
    lines = sp.cli("queue", "list", "outbound-delivery").stdout.splitlines()
    held = MAILQ_MESSAGE.fullmatch(lines[1])
    assert held is not None and held.group(1, 2) == (out_id, "!")
    assert lines[2].strip().startswith("(451 4.4.1 ")
    assert lines[2].endswith("; held by the administrator: postroom queue release ID)")
    assert lines[-1] == f"-- {int(held.group(3)) // 1024} Kbytes in 1 Request."
    assert sp.cli("queue", "list", "inbound-conversion").stdout.strip() == \
        "inbound-conversion: no messages match"


def test_queue_list_of_an_empty_queue_says_so_as_mailq(server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()
    assert sp.cli("queue", "list").stdout.strip() == "Mail queue is empty"
    got = json.loads(sp.cli("queue", "list", "--json").stdout)
    assert got == {"queue": "all", "truncated": False, "messages": []}


# --- stopping the server through the API ------------------------------------------------
def test_the_stop_endpoint_needs_the_token(tools_server: ServerProcess) -> None:
    sp = tools_server
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        req = urllib.request.Request(f"http://127.0.0.1:{sp.admin_port}/api/stop", data=b"{}",
                                     method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
    assert sp.proc is not None and sp.proc.poll() is None
    assert sp.cli("status").returncode == 0
