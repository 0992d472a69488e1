"""The outbound connection cache against a real smtp-sink: batches to one server share
a connection, an idle one is ended with QUIT, and one the server has closed is never
used for mail (a new connection carries it instead)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.body import Body
from postroom.config.schema import DeliveryConfig, Route
from postroom.delivery import Destination, OutboundMessage, OutboundRecipient
from postroom.delivery.smtp import SmtpDeliveryAgent
from postroom.dns import Resolver
from tests.conftest import free_port, wait_port
from tests.integration.peers import SMTP_SINK


class CountingSink:
    """smtp-sink -c: counts sessions ended, QUITs and messages on its stdout."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.out = Path(tempfile.mkstemp(prefix="sink-count-")[1])
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen([SMTP_SINK, "-c", "-u", "nobody", *options,
                                          f"127.0.0.1:{self.port}", "10"],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port)
        deadline = time.monotonic() + 5
        while "sess=1" not in self.out.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)                      # the probe, counted

    def counts(self) -> dict[str, int]:
        """Since the start, less the start-up probe's session (wait_port)."""
        found = re.findall(r"sess=(\d+) quit=(\d+) mesg=(\d+)", self.out.read_text())
        sess, quit, mesg = found[-1] if found else ("0", "0", "0")
        return {"sess": int(sess) - 1, "quit": int(quit), "mesg": int(mesg)}

    def wait_for(self, key: str, value: int, timeout: float = 5.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while self.counts()[key] < value and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.counts()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.out.unlink()


@pytest.fixture
def sink_factory() -> Iterator[type[CountingSink]]:
    made: list[CountingSink] = []

    class Made(CountingSink):
        def __init__(self, *options: str) -> None:
            super().__init__(*options)
            made.append(self)
    yield Made
    for s in made:
        s.stop()


def _agent_and_destination(port: int) -> tuple[SmtpDeliveryAgent, Destination]:
    agent = SmtpDeliveryAgent(Resolver(["127.0.0.1:9"]), "mx.example.test",
                              DeliveryConfig(connect_timeout=5.0, command_timeout=10.0))
    return agent, Destination(Route("*", "smarthost", "127.0.0.1", port, "none"), "")


def _batch(first: int, count: int = 3) -> list[OutboundMessage]:
    body = Body(b"Subject: cached\r\n\r\nbody\r\n")
    return [OutboundMessage(f"Q{i}", "s@example.test", {}, body,
                            [OutboundRecipient(i, f"r{i}@far.test", {})])
            for i in range(first, first + count)]


def test_batches_to_one_server_share_a_connection_that_ends_with_quit_when_idle(
        sink_factory: type[CountingSink]) -> None:
    sink = sink_factory()
    agent, dest = _agent_and_destination(sink.port)
    agent.IDLE = 0.5

    async def run() -> tuple[dict[str, int], list[str]]:
        notes = []
        for n in range(3):
            results = await agent.deliver(dest, _batch(10 * n))
            assert [r.ok for r in results] == [True] * 3
            notes.append(results[0].transcript)
        await asyncio.sleep(0.1)
        during = sink.counts()
        await asyncio.sleep(0.8)                  # past IDLE: the agent says QUIT
        return during, notes

    during, notes = asyncio.run(run())
    assert during == {"sess": 0, "quit": 0, "mesg": 9}     # one session, still open
    assert sink.wait_for("quit", 1) == {"sess": 1, "quit": 1, "mesg": 9}
    assert "trying 127.0.0.1 [127.0.0.1]" in notes[0]
    assert "reusing the connection to 127.0.0.1 [127.0.0.1]" in notes[2]
    assert "(6 messages sent on it before)" in notes[2]


def test_an_idle_connection_the_server_closed_is_not_used(
        sink_factory: type[CountingSink]) -> None:
    sink = sink_factory("-t", "1")                # smtp-sink drops a session idle 1 s
    agent, dest = _agent_and_destination(sink.port)

    async def run() -> list[bool]:
        first = await agent.deliver(dest, _batch(0))
        await asyncio.sleep(1.5)                  # still in the cache, closed by the sink
        second = await agent.deliver(dest, _batch(10))
        await agent.close()
        return [r.ok for r in first + second]

    assert asyncio.run(run()) == [True] * 6
    assert sink.wait_for("sess", 2) == {"sess": 2, "quit": 1, "mesg": 6}
