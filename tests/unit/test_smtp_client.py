"""The SMTP client's pure parts (reply parsing, message data for the wire), and its LMTP
mode against a scripted server on a Unix socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from postroom.model import Reply
from postroom.smtp.client import (
    Client,
    HopError,
    ProtocolError,
    ReplyReader,
    Transaction,
    Transcript,
    prepare_data,
)


@pytest.mark.parametrize("data, expected", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b".leading\r\n", b"..leading\r\n.\r\n"),
    (b"x\r\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
    (b"no final newline", b"no final newline\r\n.\r\n"),
    (b"", b".\r\n"),
    # a bare LF or CR is never passed on: each becomes CRLF
    (b"a\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\n.\nMAIL FROM:<x>\r\n", b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n"),
])
def test_prepare_data_dot_stuffs_and_sends_only_crlf(data: bytes, expected: bytes) -> None:
    out = prepare_data(data)
    assert out == expected
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r")


def test_reply_reader_joins_multiline_replies_and_reads_enhanced_codes() -> None:
    r = ReplyReader()
    assert r.feed(b"250-mx.far.test\r\n250-PIPELI") == []
    replies = r.feed(b"NING\r\n250 SIZE 1000\r\n550 5.7.1 <b@x>: Relay access denied\r\n")
    assert replies == [Reply(250, "", "mx.far.test\nPIPELINING\nSIZE 1000"),
                       Reply(550, "5.7.1", "<b@x>: Relay access denied")]


def test_reply_reader_reads_a_reply_seen_before_the_same_way_in_any_position() -> None:
    """Single-line replies seen lately are not parsed again; a line that is such a reply
    on its own is still the last line of a multi-line reply when one is under way."""
    first = ReplyReader().feed(b"250 2.1.5 Ok\r\n")
    r = ReplyReader()
    again = r.feed(b"250 2.1.5 Ok\r\n250-mx.far.test\r\n250 2.1.5 Ok\r\n250 2.1.5 O")
    assert first == again[:1] == [Reply(250, "2.1.5", "Ok")]
    assert again[1:] == [Reply(250, "", "mx.far.test\n2.1.5 Ok")]
    assert r.feed(b"k\r\n251 2.1.5 Ok\r\n") == [Reply(250, "2.1.5", "Ok"),
                                                  Reply(251, "2.1.5", "Ok")]
    with pytest.raises(ProtocolError):        # seen before, but inside a 250- reply
        r.feed(b"250-a\r\n251 2.1.5 Ok\r\n")


def test_reply_reader_ignores_an_enhanced_code_of_the_wrong_class() -> None:
    [reply] = ReplyReader().feed(b"550 2.0.0 confused\r\n")
    assert reply.code == 550 and reply.enhanced == ""


@pytest.mark.parametrize("garbage", [b"hello\r\n", b"25\r\n", b"250x\r\n",
                                     b"250-a\r\n251 b\r\n", b"2" * 5000])
def test_reply_reader_refuses_what_is_not_smtp(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyReader().feed(garbage)


# --- LMTP mode (RFC 2033) against a scripted server on a Unix socket ------------------------

LHLO_REPLY = b"250-store.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"


def _answers(greeting_reply: bytes = LHLO_REPLY) -> Callable[[str], bytes]:
    def answer(cmd: str) -> bytes:
        if cmd.startswith(("LHLO", "EHLO")):
            return greeting_reply
        if cmd.startswith("MAIL"):
            return b"250 2.1.0 OK\r\n"
        if cmd.startswith("RCPT"):
            if "nobody" in cmd:
                return b"550 5.1.1 <nobody@store.test> User doesn't exist: nobody@store.test\r\n"
            return b"250 2.1.5 OK\r\n"
        if cmd == "DATA":
            return b"354 OK\r\n"
        if cmd == "RSET":
            return b"250 2.0.0 OK\r\n"
        if cmd == "QUIT":
            return b"221 2.0.0 Bye\r\n"
        return b"500 5.5.1 Unknown command\r\n"
    return answer


class FakeStore:
    """A line-at-a-time server: answers commands with ``answer``, and each final dot with
    the next of ``after_dot`` (then hangs up if ``hang_up``). Records every byte."""

    def __init__(self, path: Path, answer: Callable[[str], bytes], after_dot: list[bytes],
                 hang_up: bool = False) -> None:
        self.path, self.answer, self.after_dot, self.hang_up = path, answer, after_dot, hang_up
        self.received = bytearray()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 store.test LMTP ready\r\n")
        in_data = False
        while line := await reader.readline():
            self.received += line
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    writer.write(self.after_dot.pop(0))
                    if self.hang_up:
                        break
                continue
            cmd = line.decode().rstrip("\r\n")
            out = self.answer(cmd)
            in_data = cmd == "DATA" and out.startswith(b"354")
            writer.write(out)
            if cmd == "QUIT":
                break
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> FakeStore:
        self.server = await asyncio.start_unix_server(self.handle, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


RCPTS = [("alice@store.test", ""), ("nobody@store.test", ""), ("bob@store.test", "")]


async def _lmtp_session(store: FakeStore, rcpts: list[tuple[str, str]] = RCPTS,
                        lmtp: bool = True) -> tuple[Client, Transaction]:
    client = Client(helo_name="client.test", command_timeout=5, lmtp=lmtp)
    await client.connect_unix(str(store.path), 5)
    await client.ehlo()
    tx = await client.send("s@x.test", "", rcpts, prepare_data(b"Subject: hi\r\n\r\nbody\r\n"))
    return client, tx


@pytest.mark.parametrize("pipelining", [True, False])
def test_lmtp_says_lhlo_and_reads_one_reply_per_accepted_recipient(
        tmp_path: Path, pipelining: bool) -> None:
    lhlo = LHLO_REPLY if pipelining else LHLO_REPLY.replace(b"250-PIPELINING\r\n", b"")
    saved = b"250 2.0.0 <alice@store.test> Saved\r\n"
    full = b"452 4.2.2 <bob@store.test> Mailbox is full\r\n"

    async def run() -> tuple[Transaction, Transaction, FakeStore, Client]:
        async with FakeStore(tmp_path / "lmtp", _answers(lhlo), [saved + full, saved]) as store:
            client, tx = await _lmtp_session(store)
            # the connection is still in step: the next transaction reads its own replies
            second = await client.send("s@x.test", "", [("alice@store.test", "")],
                                       prepare_data(b"two\r\n"))
            await client.quit()
            return tx, second, store, client

    tx, second, store, client = asyncio.run(run())
    assert [r.code for r in tx.rcpts] == [250, 550, 250]
    assert tx.data_rcpts == [Reply(250, "2.0.0", "<alice@store.test> Saved"), None,
                             Reply(452, "4.2.2", "<bob@store.test> Mailbox is full")]
    assert tx.data == tx.data_rcpts[0] and tx.lost is None
    assert second.data_rcpts == [Reply(250, "2.0.0", "<alice@store.test> Saved")]
    assert client.peer == f"unix:{tmp_path / 'lmtp'}"
    assert bytes(store.received) == (
        b"LHLO client.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<alice@store.test>\r\n"
        b"RCPT TO:<nobody@store.test>\r\nRCPT TO:<bob@store.test>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\nbody\r\n.\r\n"        # RSET: a transaction came before
        b"RSET\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<alice@store.test>\r\nDATA\r\ntwo\r\n.\r\n"
        b"QUIT\r\n")
    text = client.transcript.text()
    assert "C: LHLO client.test" in text and "EHLO" not in text
    assert "S: 452 4.2.2 <bob@store.test> Mailbox is full" in text


def test_the_same_server_in_smtp_mode_gets_ehlo_and_one_reply_for_the_message(
        tmp_path: Path) -> None:
    async def run() -> tuple[Transaction, FakeStore]:
        async with FakeStore(tmp_path / "smtp", _answers(),
                             [b"250 2.0.0 Ok: queued as X\r\n"]) as store:
            client, tx = await _lmtp_session(store, lmtp=False)
            await client.quit()
            return tx, store

    tx, store = asyncio.run(run())
    assert tx.data == Reply(250, "2.0.0", "Ok: queued as X")
    assert tx.data_rcpts == [] and tx.lost is None
    assert bytes(store.received).startswith(b"EHLO client.test\r\nMAIL FROM:<s@x.test>\r\n")


def test_lmtp_has_no_helo_fallback_a_refused_lhlo_is_a_hop_error(tmp_path: Path) -> None:
    async def run() -> tuple[HopError, FakeStore]:
        async with FakeStore(tmp_path / "lmtp", _answers(b"500 5.5.1 Unknown command\r\n"),
                             []) as store:
            client = Client(helo_name="client.test", command_timeout=5, lmtp=True)
            await client.connect_unix(str(store.path), 5)
            with pytest.raises(HopError) as info:
                await client.ehlo()
            await client.quit()
            return info.value, store

    err, store = asyncio.run(run())
    assert err.step == "LHLO" and err.reply is not None and err.reply.code == 500
    assert b"HELO" not in bytes(store.received).replace(b"LHLO", b"")


def test_lmtp_keeps_the_replies_that_came_before_the_connection_broke(tmp_path: Path) -> None:
    rcpts = [("alice@store.test", ""), ("bob@store.test", ""), ("carol@store.test", "")]

    async def run() -> Transaction:
        async with FakeStore(tmp_path / "lmtp", _answers(),
                             [b"250 2.0.0 <alice@store.test> Saved\r\n"], hang_up=True) as store:
            client, tx = await _lmtp_session(store, rcpts)
            client.close()
            return tx

    tx = asyncio.run(run())
    assert tx.data_rcpts == [Reply(250, "2.0.0", "<alice@store.test> Saved"), None, None]
    assert tx.lost is not None and tx.lost.step == "DATA" and tx.lost.transient
    assert "closed the connection during DATA" in tx.lost.detail


def test_lmtp_connection_lost_before_any_reply_to_the_dot_is_a_hop_error(tmp_path: Path) -> None:
    async def run() -> HopError:
        async with FakeStore(tmp_path / "lmtp", _answers(), [b""], hang_up=True) as store:
            with pytest.raises(HopError) as info:
                await _lmtp_session(store)
            return info.value

    err = asyncio.run(run())
    assert err.step == "DATA" and err.transient


def test_connect_unix_to_a_missing_socket_is_a_connect_hop_error(tmp_path: Path) -> None:
    async def run() -> HopError:
        client = Client(helo_name="client.test", lmtp=True)
        with pytest.raises(HopError) as info:
            await client.connect_unix(str(tmp_path / "nothing"), 5)
        return info.value

    err = asyncio.run(run())
    assert err.step == "connect" and err.transient
    assert err.detail == f"cannot connect to unix:{tmp_path / 'nothing'}: No such file or directory"


def test_a_transcript_keeps_the_opening_and_the_message_in_flight_only() -> None:
    t = Transcript()
    t.note("trying mx.far.test [192.0.2.1]:25")
    t.server(Reply(220, "", "mx.far.test ESMTP"))
    t.client("EHLO us.example")
    for n in range(60):                          # more lines in all than the limit
        t.start_message()
        t.client(f"MAIL FROM:<m{n}@us.example>")
        t.server(Reply(250, "2.1.0", "Ok"))
    lines = t.text().splitlines()
    assert lines == ["-- trying mx.far.test [192.0.2.1]:25", "S: 220 mx.far.test ESMTP",
                     "C: EHLO us.example", "-- (59 earlier messages on this connection)",
                     "C: MAIL FROM:<m59@us.example>", "S: 250 2.1.0 Ok"]
    # the connection broke: the next host's results show it, then their own exchange
    t.end_connection()
    t.note("trying mx2.far.test [192.0.2.2]:25")
    t.start_message()
    t.client("MAIL FROM:<m60@us.example>")
    assert t.text().splitlines()[3:] == [
        "-- (59 earlier messages on this connection)", "C: MAIL FROM:<m59@us.example>",
        "S: 250 2.1.0 Ok", "-- trying mx2.far.test [192.0.2.2]:25",
        "C: MAIL FROM:<m60@us.example>"]


def _smtp_store(tmp_path: Path, after_dot: list[bytes], hang_up: bool = False) -> FakeStore:
    ehlo = b"250-store.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    return FakeStore(tmp_path / "smtp", _answers(ehlo), after_dot, hang_up)


def test_send_each_puts_the_next_message_commands_behind_the_final_dot(tmp_path: Path) -> None:
    """RFC 2920 §3.1: message data may open a group, so data, dot, and the next MAIL,
    RCPT and DATA go in one write; each message still gets its own final reply."""
    messages = [("a@x.test", "", [("alice@store.test", "")], prepare_data(f"m{n}\r\n".encode()))
                for n in range(3)]
    finals = [b"250 2.0.0 Ok: queued as A\r\n", b"452 4.3.1 Insufficient storage\r\n",
              b"250 2.0.0 Ok: queued as C\r\n"]

    async def run() -> tuple[list[tuple[int, Transaction, str]], list[bytes], FakeStore]:
        async with _smtp_store(tmp_path, list(finals)) as store:
            client = Client(helo_name="client.test", command_timeout=5)
            await client.connect_unix(str(store.path), 5)
            await client.ehlo()
            assert client.writer is not None
            writes: list[bytes] = []
            real_write = client.writer.write

            def write(data: bytes) -> None:
                writes.append(bytes(data))
                real_write(data)
            client.writer.write = write  # type: ignore[method-assign]
            got = [(i, tx, client.transcript.text())
                   async for i, tx in client.send_each(messages)]
            await client.quit()
            return got, writes, store

    got, writes, store = asyncio.run(run())
    assert [(i, tx.data.code if tx.data else None) for i, tx, _ in got] == \
        [(0, 250), (1, 452), (2, 250)]
    mail = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<alice@store.test>\r\nDATA\r\n"
    # after the first transaction, RSET first: the server may still hold a refused one
    assert writes == [mail, b"m0\r\n.\r\nRSET\r\n" + mail, b"m1\r\n.\r\nRSET\r\n" + mail,
                      b"m2\r\n.\r\n", b"QUIT\r\n"]
    assert bytes(store.received).endswith(b"m2\r\n.\r\nQUIT\r\n")
    # each result's transcript: its own commands and its own final reply, in that order
    assert got[1][2].splitlines()[-12:] == [
        "-- (1 earlier messages on this connection)", "C: RSET", "C: MAIL FROM:<a@x.test>",
        "C: RCPT TO:<alice@store.test>", "C: DATA", "S: 250 2.0.0 OK", "S: 250 2.1.0 OK",
        "S: 250 2.1.5 OK", "S: 354 OK", "C: <message, 7 octets>", "C: .",
        "S: 452 4.3.1 Insufficient storage"]
    assert "m2" not in got[1][2] and "queued as A" not in got[1][2]


def test_send_each_a_lost_connection_fails_the_message_not_yet_given_back(
        tmp_path: Path) -> None:
    messages = [("a@x.test", "", [("alice@store.test", "")], prepare_data(b"m\r\n"))] * 2

    async def run() -> tuple[list[int], HopError | None]:
        got: list[int] = []
        async with _smtp_store(tmp_path, [b"250 2.0.0 Ok\r\n"], hang_up=True) as store:
            client = Client(helo_name="client.test", command_timeout=5)
            await client.connect_unix(str(store.path), 5)
            await client.ehlo()
            try:
                async for i, _ in client.send_each(messages):
                    got.append(i)
            except HopError as exc:
                return got, exc
            return got, None

    got, exc = asyncio.run(run())
    assert got == [0]                         # the first was answered before the hang-up
    # the next message's first reply is its RSET's
    assert exc is not None and exc.step == "RSET" and "closed the connection" in exc.detail


def test_the_command_timeout_runs_per_wait_and_ends_a_silent_connection(tmp_path: Path) -> None:
    """One timer per connection, moved by every read: a slow server whose every answer
    comes within the timeout is never cut off, however long the whole exchange; one
    that stops answering is, about one timeout after the command it left unanswered."""
    path = tmp_path / "slow"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ready\r\n")
        while line := await reader.readline():
            if line.startswith(b"VRFY"):
                continue                              # never answered
            await asyncio.sleep(0.15)
            writer.write(b"250 slow.test\r\n" if line.startswith(b"EHLO")
                         else b"250 2.0.0 OK\r\n")
        writer.close()

    async def run() -> tuple[float, float, HopError, bool]:
        server = await asyncio.start_unix_server(handle, str(path))
        loop = asyncio.get_running_loop()
        try:
            client = Client(helo_name="client.test", command_timeout=0.4)
            await client.connect_unix(str(path), 5)
            start = loop.time()
            await client.ehlo()
            for _ in range(5):
                assert (await client.command("NOOP", "NOOP")).code == 250
            slow_but_alive = loop.time() - start
            start = loop.time()
            with pytest.raises(HopError) as caught:
                await client.command("VRFY alice", "VRFY")
            silent = loop.time() - start
            assert client.writer is not None
            closed = client.writer.is_closing()
            client.close()
            return slow_but_alive, silent, caught.value, closed
        finally:
            server.close()

    slow_but_alive, silent, exc, closed = asyncio.run(run())
    assert slow_but_alive > 0.8                   # twice the timeout, in answers of 0.15 s
    assert 0.35 < silent < 1.2
    assert exc.step == "VRFY" and exc.detail.endswith("did not answer VRFY within 0.4s")
    assert closed
