"""The outbound agent's reuse of an idle connection, against a scripted server: a
server that ends the idle session just as it is reused (421, or a close) costs a new
connection, never a deferral."""

from __future__ import annotations

import asyncio

from postroom.body import Body
from postroom.config.schema import DeliveryConfig, Route
from postroom.delivery import Destination, OutboundMessage, OutboundRecipient
from postroom.delivery.smtp import SmtpDeliveryAgent
from postroom.dns import Resolver


class Scripted:
    """SMTP over TCP on 127.0.0.1; the n-th connection's first command after its first
    message (the reused connection's RSET) gets ``after_first[n]`` (b"" to hang up
    without a word; None: answered as usual)."""

    def __init__(self, after_first: list[bytes | None]) -> None:
        self.after_first = after_first
        self.connections = 0
        self.delivered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n, self.connections = self.connections, self.connections + 1
        writer.write(b"220 scripted.test ESMTP\r\n")
        messages, in_data, answered = 0, False, False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data, messages = False, messages + 1
                    self.delivered += 1
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            cmd = line.decode().strip().upper()
            if messages == 1 and not answered and n < len(self.after_first):
                answered = True
                answer = self.after_first[n]
                if answer is not None:
                    if answer:
                        writer.write(answer)
                    await writer.drain()
                    break
            if cmd.startswith("EHLO"):
                writer.write(b"250-scripted.test\r\n250 PIPELINING\r\n")
            elif cmd == "DATA":
                in_data = True
                writer.write(b"354 go ahead\r\n")
            elif cmd == "QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()


def _message(i: int) -> OutboundMessage:
    return OutboundMessage(f"Q{i}", "s@example.test", {}, Body(b"Subject: x\r\n\r\ny\r\n"),
                           [OutboundRecipient(i, f"r{i}@far.test", {})])


async def _two_batches(script: Scripted) -> tuple[list[bool], list[bool], str]:
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    agent = SmtpDeliveryAgent(Resolver(["127.0.0.1:9"]), "mx.example.test",
                              DeliveryConfig(connect_timeout=5.0, command_timeout=5.0))
    dest = Destination(Route("*", "smarthost", "127.0.0.1", port, "none"), "")
    try:
        first = await agent.deliver(dest, [_message(1)])
        second = await agent.deliver(dest, [_message(2), _message(3)])
        await agent.close()
    finally:
        server.close()
    return [r.ok for r in first], [r.ok for r in second], second[0].transcript


def test_a_421_at_the_first_reply_on_a_reused_connection_means_a_new_connection() -> None:
    script = Scripted([b"421 4.4.2 scripted.test idle too long\r\n"])
    first, second, transcript = asyncio.run(_two_batches(script))
    assert first == [True] and second == [True, True]
    assert script.connections == 2 and script.delivered == 3
    assert "reusing the connection" in transcript
    assert "the reused connection failed at once" in transcript and "421 4.4.2" in transcript


def test_a_close_at_the_first_reply_on_a_reused_connection_means_a_new_connection() -> None:
    script = Scripted([b""])
    first, second, _ = asyncio.run(_two_batches(script))
    assert first == [True] and second == [True, True]
    assert script.connections == 2 and script.delivered == 3


def test_a_healthy_server_gets_both_batches_on_one_connection() -> None:
    script = Scripted([None])
    first, second, _ = asyncio.run(_two_batches(script))
    assert first == [True] and second == [True, True]
    assert script.connections == 1 and script.delivered == 3
