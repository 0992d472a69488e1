"""Broken next hops, with real peers: a remote that stalls mid-DATA, one that drops the
connection, one that answers 421, and a DNS server that never answers.

In every case the mail is deferred (``status=deferred`` in the log, the recipient still
in ``outbound-delivery``), no NDR goes to the sender, and once the peer is fixed the
message arrives once, byte for byte as it was sent, and the queue empties.

The remote is Postfix's smtp-sink (its ``-w``, ``-H``, ``-q`` and ``-Q`` options break
it on purpose); the DNS is dnsmasq, started on the port where a silent socket sat.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, free_port
from tests.integration.dnsmasq import free_udp_tcp_port, run_dnsmasq
from tests.integration.peers import Sink, sink

SENDER = "alice@example.test"        # a local mailbox: an NDR would land there
MX_IP = "127.0.0.9"


def _config(remote_port: int, extra: str = "", command_timeout: str = "2s") -> str:
    """Everything for far.test goes to the smart host 127.0.0.1:remote_port."""
    return f"""
        [delivery]
        retry = ["1s"]
        connect_timeout = "2s"
        command_timeout = "{command_timeout}"
        [[route]]
        match = "far.test"
        via = "smarthost"
        host = "127.0.0.1:{remote_port}"
        """ + extra


def _message(tag: str, filler_lines: int = 0) -> bytes:
    """A message whose every byte is checked at the far end, with what a careless
    resend could damage: lines that start with a dot (dot stuffing), a lone dot,
    trailing spaces, a line of 998 octets."""
    lines = [
        f"From: Alice <{SENDER}>",
        "To: Carol <carol@far.test>",
        f"Subject: broken peer {tag}",
        f"Message-ID: <{tag}@example.test>",
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        f"X-Test-Id: {tag}",
        "",
        f"first line of {tag}",
        ".a line that starts with a dot",
        ".",
        "..two dots",
        "trailing spaces   ",
        "x" * 998,
    ]
    lines += [f"filler {i:08d} " + "y" * 60 for i in range(filler_lines)]
    lines.append(f"last line of {tag}")
    return ("\r\n".join(lines) + "\r\n").encode()


def _send(sp: ServerProcess, message: bytes, rcpt: str = "carol@far.test") -> None:
    with sp.smtp() as s:
        refused = s.sendmail(SENDER, [rcpt], message)
    assert refused == {}


def _dumps(remote: Sink) -> list[bytes]:
    return [p.read_bytes() for p in sorted(remote.dump.iterdir())
            if p.is_file() and p.stat().st_size]


def _wait_dumps(remote: Sink, count: int, timeout: float = 20.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _dumps(remote)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    return _dumps(remote)


def _as_received(dump: bytes) -> bytes:
    """The message as the sink received it: smtp-sink writes its own X-* and Received
    lines, then the message (LF line ends), then an empty line; Postroom added one
    Received field of its own in front of the original."""
    assert dump.endswith(b"\n\n"), dump[-200:]
    text = dump[:-1]
    # skip the sink's headers: its Received field is the last of them (three lines)
    marker = text.index(b"(smtp-sink)")
    after_sink = text.index(b"\n", text.index(b"\n", marker) + 1) + 1
    rest = text[after_sink:]
    assert rest.startswith(b"Received: from client.test"), rest[:200]
    # Postroom's Received field: its first line and folded continuation lines
    lines = rest.split(b"\n")
    i = 1
    while lines[i].startswith((b" ", b"\t")):
        i += 1
    return b"\n".join(lines[i:])


def _assert_arrived_intact(remote: Sink, sent: list[bytes]) -> None:
    """Each sent message arrived exactly once, exactly as sent."""
    dumps = _wait_dumps(remote, len(sent))
    time.sleep(0.5)                    # a duplicate would come right behind
    dumps = _dumps(remote)
    received = sorted(_as_received(d) for d in dumps)
    expected = sorted(m.replace(b"\r\n", b"\n") for m in sent)
    assert len(received) == len(expected), \
        f"{len(received)} copies arrived for {len(expected)} messages"
    assert received == expected


def _wait_log(sp: ServerProcess, needle: str, count: int = 1, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    text = sp.log_text()
    while text.count(needle) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        text = sp.log_text()
    return text


def _wait_queue_empty(sp: ServerProcess, timeout: float = 20.0) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    queues = sp.queue()
    while time.monotonic() < deadline and any(q["recipients"] for q in queues.values()):
        time.sleep(0.2)
        queues = sp.queue()
    return queues


def _assert_deferred(sp: ServerProcess, recipients: int, reason: str | tuple[str, ...]) -> str:
    """At least one deferral per recipient was logged, the log says why, and every
    recipient still waits in outbound-delivery."""
    log = _wait_log(sp, "status=deferred", recipients)
    assert log.count("status=deferred") >= recipients, log[-3000:]
    reasons = (reason,) if isinstance(reason, str) else reason
    deferred = [line for line in log.splitlines() if "status=deferred" in line]
    assert any(r in line for line in deferred for r in reasons), "\n".join(deferred[-5:])
    queues = sp.queue()
    assert queues["outbound-delivery"]["recipients"] == recipients, queues
    assert "status=bounced" not in log and "status=failed" not in log
    assert "Traceback" not in log
    return log


def _break_then_fix(sp_factory, options: tuple[str, ...], reason: str | tuple[str, ...],  # type: ignore[no-untyped-def]
                    *, messages: int = 3, filler_lines: int = 0,
                    command_timeout: str = "2s") -> ServerProcess:
    """Send ``messages`` to a sink broken with ``options``; check they are deferred, not
    lost; start a working sink on the same port; check they all arrive intact."""
    port = free_port()
    sent = [_message(f"m{i}-{'-'.join(options).strip('-') or 'plain'}", filler_lines)
            for i in range(messages)]
    with sink("127.0.0.1", port, options):
        sp = sp_factory(_config(port, command_timeout=command_timeout))
        for m in sent:
            _send(sp, m)
        _assert_deferred(sp, messages, reason)
        # the broken sink's own files do not count: it never said 250 to the end of
        # DATA (with -q/-Q "." it may have kept a copy, which SMTP cannot prevent)
    with sink("127.0.0.1", port) as fixed:
        _assert_arrived_intact(fixed, sent)
    queues = _wait_queue_empty(sp)
    assert all(q["recipients"] == 0 for q in queues.values()), queues
    assert sp.messages(SENDER) == [], "the sender got a notice for a deferred message"
    return sp


# --- a remote that stalls ----------------------------------------------------------

@pytest.mark.parametrize("options, reasons, messages, filler_lines", [
    # no greeting for 30 s
    pytest.param(("-W", "CONNECT:30"), ("did not answer greeting within 2s",), 3, 0,
                 id="greeting"),
    # no reply to DATA for 30 s. With PIPELINING, MAIL, RCPT and DATA go in one write and
    # smtp-sink holds back the whole group's replies, so the wait that times out may be
    # the one for the MAIL reply.
    pytest.param(("-w", "30"), ("did not answer MAIL within 2s",
                                "did not answer DATA within 2s"), 3, 0, id="DATA-command"),
    # after DATA, nothing read for 30 s through a 4 KB TCP window: an 8.5 MB message
    # fills every buffer and our write blocks in the middle of the message
    pytest.param(("-H", "30", "-T", "4096"), ("stopped reading during DATA",), 1, 110_000,
                 id="mid-DATA"),
])
def test_a_remote_that_stalls_is_timed_out_and_retried(  # type: ignore[no-untyped-def]
        server_factory, options: tuple[str, ...], reasons: tuple[str, ...], messages: int,
        filler_lines: int) -> None:
    started = time.monotonic()
    _break_then_fix(server_factory, options, reasons, messages=messages,
                    filler_lines=filler_lines)
    assert time.monotonic() - started < 30, "the stall was waited out, not timed out"


# --- a remote that drops the connection -------------------------------------------

@pytest.mark.parametrize("command", ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_a_remote_that_drops_the_connection_is_retried(server_factory, command: str) -> None:  # type: ignore[no-untyped-def]
    """smtp-sink -q CMD: close without a reply right after CMD."""
    _break_then_fix(server_factory, ("-q", command), "closed the connection during")


# --- a remote that answers 421 ----------------------------------------------------

@pytest.mark.parametrize("command", ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_a_remote_that_answers_421_is_retried(server_factory, command: str) -> None:  # type: ignore[no-untyped-def]
    """smtp-sink -Q CMD: "421" and close right after CMD."""
    _break_then_fix(server_factory, ("-Q", command), ("421", "closed the connection during"))


# With PIPELINING a 421 to MAIL or RCPT arrives before the socket closes; the client
# must report that reply, not the closed connection after it.
@pytest.mark.parametrize("command", ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_a_deferral_for_a_421_quotes_the_remote(server_factory, command: str) -> None:  # type: ignore[no-untyped-def]
    """The reason recorded for the retry is the remote's own 421 reply, as it said it."""
    with sink("127.0.0.1", options=("-Q", command)) as broken:
        sp = server_factory(_config(broken.port))
        _send(sp, _message(f"quote-{command}"))
        log = _wait_log(sp, "status=deferred")
    deferred = [ln for ln in log.splitlines() if "status=deferred" in ln]
    assert deferred, log[-2000:]
    assert all("(421 " in ln for ln in deferred), "\n".join(deferred)


# --- a DNS server that never answers ----------------------------------------------

@pytest.fixture
def silent_dns() -> Iterator[tuple[int, socket.socket]]:
    """A UDP socket bound on a port free for UDP and TCP, which never answers."""
    port = free_udp_tcp_port()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    try:
        yield port, s
    finally:
        s.close()


def test_a_dns_server_that_never_answers_defers_until_dns_is_back(  # type: ignore[no-untyped-def]
        server_factory, silent_dns, tmp_path: Path) -> None:
    dns_port, blackhole = silent_dns
    sent = [_message(f"dns{i}") for i in range(2)]
    with sink(MX_IP) as remote:
        sp = server_factory(f"""
            [dns]
            nameservers = ["127.0.0.1:{dns_port}"]
            [delivery]
            mx_port = {remote.port}
            retry = ["1s"]
            connect_timeout = "2s"
            command_timeout = "2s"
            """)
        for m in sent:
            _send(sp, m)
        log = _assert_deferred(sp, len(sent), "timed out")
        assert "the DNS lookup of far.test timed out" in log
        # the questions did reach the silent server: it is the one that failed
        blackhole.settimeout(1)
        assert blackhole.recv(512)
        assert _dumps(remote) == []
        blackhole.close()
        with run_dnsmasq(["--mx-host=far.test,mx.far.test,10",
                          f"--host-record=mx.far.test,{MX_IP}"], port=dns_port):
            _assert_arrived_intact(remote, sent)
            queues = _wait_queue_empty(sp)
    assert all(q["recipients"] == 0 for q in queues.values()), queues
    assert sp.messages(SENDER) == []
