"""An open-relay scan as administrators run one, on one connection from an untrusted address.

The first sixteen tricks are nmap's smtp-open-relay script's, in its order, each after a
RSET, as it sends them (the issue's scanner: it closed with "failed to receive data" when
the server hung up at 10 errors). Three more are the seed case's own: the percent hack
and a quoted local part at our domain, and an address literal of the host where relayed
mail would go. Every refused recipient is an error, so the scan runs past
[smtp] soft_error_limit (10) and is slowed; it must still end below max_errors (20) with
its connection open, a verdict for every trick and nothing relayed.
"""

from __future__ import annotations

import time

from tests.conftest import UNTRUSTED, RawClient, ServerProcess
from tests.integration.peers import add_loopback_address, sink

SINK_IP = "127.0.0.9"          # where relayed mail would go: the smart host and the MX port
ERROR_SLEEP = 0.3
# the event loop's timers may fire up to a millisecond or so early (libuv counts in ms)
EARLY = 0.95
RELAY = "550 5.7.1 Relaying mail to <{}> is not allowed"
# what Postroom's address parser refuses before any policy: a forward path without a
# domain (RFC 5321 4.1.2), two @, and source routes (not parsed, so never followed)
SYNTAX = "501 5.1.3 Error: bad address syntax"

# (MAIL FROM, RCPT TO, the exact reply to RCPT). The server greets as mx.example.test on
# 127.0.0.1; its local domain is example.test; the scanner wants mail to reach far.test.
OURS = "antispam@[127.0.0.1]"
TRICKS = [
    ("", "relaytest@far.test", RELAY),                                 # the null sender
    ("antispam@far.test", "relaytest@far.test", RELAY),
    ("antispam@mx.example.test", "relaytest@far.test", RELAY),         # our name as sender
    (OURS, "relaytest@far.test", RELAY),                               # our address
    (OURS, "relaytest%far.test@[127.0.0.1]", RELAY),                   # percent hack
    (OURS, "relaytest%far.test@mx.example.test", RELAY),
    (OURS, '"relaytest@far.test"', SYNTAX),                            # quoted, no domain
    (OURS, '"relaytest%far.test"', SYNTAX),
    (OURS, "relaytest@far.test@[127.0.0.1]", SYNTAX),                  # two @
    (OURS, '"relaytest@far.test"@[127.0.0.1]', RELAY),                 # quoted local part
    (OURS, "relaytest@far.test@mx.example.test", SYNTAX),
    (OURS, "@[127.0.0.1]:relaytest@far.test", SYNTAX),                 # source routes
    (OURS, "@mx.example.test:relaytest@far.test", SYNTAX),
    (OURS, "far.test!relaytest", SYNTAX),                              # bang path, no domain
    (OURS, "far.test!relaytest@[127.0.0.1]", RELAY),                   # bang paths
    (OURS, "far.test!relaytest@mx.example.test", RELAY),
    ("postmaster@example.test", "relaytest%far.test@example.test", RELAY),  # at our domain
    ("antispam@example.test", '"relaytest@far.test"@example.test', RELAY),
    ("antispam@example.test", f"relaytest@[{SINK_IP}]", RELAY),        # the [IP] literal
]


def _scan_server(server_factory, sink_port: int) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A server that would relay everything to the sink: any domain by smart host, any
    address literal by the MX port. Only 127.0.0.1 is trusted."""
    return server_factory(f"""
        [smtp]
        error_sleep = "{ERROR_SLEEP}s"
        [delivery]
        mx_port = {sink_port}
        retry = ["1s"]
        [[route]]
        match = "*"
        via = "smarthost"
        host = "{SINK_IP}:{sink_port}"
        tls = "none"
        """)


def test_an_open_relay_scan_on_one_connection_ends_with_every_trick_refused(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    add_loopback_address(SINK_IP)
    with sink(SINK_IP) as remote:
        sp = _scan_server(server_factory, remote.port)
        c = RawClient(sp.mx_port, source=UNTRUSTED, timeout=30)
        assert c.reply()[0] == 220
        assert c.cmd("EHLO scanner.test")[0] == 250
        took = []
        for number, (sender, rcpt, expected) in enumerate(TRICKS, 1):
            assert c.cmd("RSET") == (250, "250 2.0.0 Ok: reset"), number
            code, text = c.cmd(f"MAIL FROM:<{sender}>")
            assert (code, text) == (250, "250 2.1.0 Ok: sender accepted"), (number, text)
            started = time.monotonic()
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            took.append(time.monotonic() - started)
            assert text == expected.format(rcpt), f"trick {number} <{rcpt}>: {text}"
        # the scan ran to its end on the same connection, and the server says goodbye
        assert c.cmd("QUIT") == (221, "221 2.0.0 mx.example.test closing connection")
        assert c.closed()
        c.close()
        # each refusal past the soft limit (the 11th on) waited error_sleep first
        assert len(TRICKS) > 10 and all(t >= ERROR_SLEEP * EARLY for t in took[10:]), took
        # nothing was queued for another host, so nothing can ever reach the sink
        queues = sp.queue()
        assert queues["outbound-conversion"]["messages"] == 0
        assert queues["outbound-delivery"]["messages"] == 0
        # the sink works: mail from the trusted network does reach it, and only that
        with sp.smtp() as s:
            s.sendmail("alice@example.test", ["relaytest@far.test"],
                       b"Subject: the only one\r\n\r\nfrom a trusted client\r\n")
        got = remote.wait(1)
        assert [m["Subject"] for m in got] == ["the only one"]
        log = sp.log_text()
        assert "Traceback" not in log and "too many errors" not in log


def test_the_default_limits_slow_the_eleventh_error_by_a_second(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory()          # soft_error_limit 10, error_sleep 1s
    c = RawClient(sp.mx_port, source=UNTRUSTED, timeout=30)
    c.reply()
    c.cmd("EHLO scanner.test")
    c.cmd("MAIL FROM:<scan@far.test>")
    for i in range(10):
        assert c.cmd(f"RCPT TO:<r{i}@far.test>")[0] == 550
    started = time.monotonic()
    code, text = c.cmd("RCPT TO:<eleven@far.test>")
    assert time.monotonic() - started >= 1.0 * EARLY
    assert text == RELAY.format("eleven@far.test")
    assert c.cmd("QUIT")[0] == 221
    c.close()


def test_a_session_waiting_out_its_errors_holds_up_no_other_session(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory('[smtp]\nsoft_error_limit = 1\nerror_sleep = "4s"')
    slow = RawClient(sp.mx_port, source=UNTRUSTED, timeout=30)
    slow.reply()
    assert slow.cmd("FROB")[0] == 502
    slow.send(b"FROB\r\n")                        # the second error: its reply waits 4 s
    other = RawClient(sp.mx_port, source="127.0.0.67")
    assert other.reply()[0] == 220
    assert other.cmd("EHLO other.test")[0] == 250
    assert other.cmd("NOOP")[0] == 250
    assert other.cmd("QUIT")[0] == 221
    other.close()
    # the other session was served while the slow one's reply was still held back
    slow.sock.setblocking(False)
    try:
        early = slow.sock.recv(100)
    except BlockingIOError:
        early = b""
    slow.sock.setblocking(True)
    slow.sock.settimeout(30)
    assert early == b""
    assert slow.reply()[0] == 502
    slow.close()


def test_shutdown_ends_an_error_wait_with_the_shutdown_reply(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    sp: ServerProcess = server_factory('[smtp]\nsoft_error_limit = 1\nerror_sleep = "4m"')
    c = RawClient(sp.mx_port, source=UNTRUSTED, timeout=30)
    c.reply()
    assert c.cmd("FROB")[0] == 502
    c.send(b"FROB\r\n")                       # its reply would wait four minutes
    time.sleep(0.5)                            # the server has read it and waits
    assert sp.stop() == 0
    # the waiting reply is sent at once, then the shutdown's 421: the session was told
    assert c.reply()[0] == 502
    code, text = c.reply()
    assert code == 421 and "4.3.2" in text, text
    c.close()
    assert "Traceback" not in sp.log_text()



def test_pipelined_errors_past_the_soft_limit_are_answered_one_by_one(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    """As from Postfix: each delayed reply comes error_sleep after the one before it, not
    all of them together after the sum (a client reading with a timeout keeps hearing)."""
    sp: ServerProcess = server_factory('[smtp]\nsoft_error_limit = 1\nerror_sleep = "0.6s"')
    c = RawClient(sp.mx_port, source=UNTRUSTED, timeout=30)
    c.reply()
    assert c.cmd("FROB")[0] == 502
    started = time.monotonic()
    c.send(b"FROB\r\nFROB\r\nFROB\r\nNOOP\r\n")
    arrived = []
    for _ in range(3):
        assert c.reply()[0] == 502
        arrived.append(time.monotonic() - started)
    assert c.reply()[0] == 250
    # the three waits add up, and each reply came on its own (all together, the gaps
    # would be close to nothing; the margin is the client's own reading)
    assert arrived[2] >= 1.8 * EARLY, arrived
    assert arrived[1] - arrived[0] >= 0.5 and arrived[2] - arrived[1] >= 0.5, arrived
    assert c.cmd("QUIT")[0] == 221
    c.close()
