"""Conversion at intake: which recipients enter the spool already in delivery, with the
destination the queue manager would choose, and which wait in conversion for it. The
spool is a fake (this is intake's decision only); the queue manager's side is in
tests/component/test_spool_qmgr.py, and the whole path runs in the integration tests."""

from __future__ import annotations

import asyncio
from typing import Any

from postroom.address import parse_path
from postroom.config import Route
from postroom.intake import EarlyConversion, Intake, Submission
from tests.unit.test_intake_stamping import FakeSpool

ROUTES = (Route("*", "mx", index=0), Route("partner.test", "smarthost", host="10.0.0.1",
                                           index=1))


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[int, str, str | None]] = []

    def emit(self, kind: int, text: str, level: str | None = None, **fields: Any) -> None:
        self.got.append((kind, text, level))

    def enabled(self, *args: Any, **kwargs: Any) -> bool:
        return True


def queue(rcpts: list[str], *, data: bytes = b"Subject: hi\r\n\r\nhello\r\n",
          routes: tuple[Route, ...] = ROUTES, converting: bool = True, inbound: bool = True,
          aliases: dict[str, tuple[str, ...]] | None = None) -> tuple[Any, Events]:
    spool, events = FakeSpool(), Events()
    intake = Intake(spool, "mx.example.org", frozenset({"example.org"}), None, events)  # type: ignore[arg-type]
    intake.early = EarlyConversion(routes, aliases or {}, inbound)
    intake.converting = converting
    sub = Submission(parse_path("<alice@far.test>", allow_null=False),
                     [(parse_path(f"<{r}>", allow_null=False), {}) for r in rcpts], data,
                     "192.0.2.1", "client.far.test", "mx", "ESMTP")
    message = asyncio.run(intake.queue(sub))
    assert spool.stored == [message]
    return message, events


def placed(message: Any) -> list[tuple[str, str, str]]:
    return [(r.address, r.state, r.destination) for r in message.recipients]


def test_plain_recipients_enter_in_delivery_with_their_destination() -> None:
    message, events = queue(["bob@example.org", "carol@elsewhere.test", "dan@partner.test"])
    assert placed(message) == [("bob@example.org", "delivery", ""),
                               ("carol@elsewhere.test", "delivery", "0|elsewhere.test"),
                               ("dan@partner.test", "delivery", "1|")]
    # the receipt first, then each routing decision as the queue manager words it
    assert [k for k, _, _ in events.got] == [3001, 2004, 2004, 2004]
    assert events.got[1][1:] == ("<bob@example.org>: local mailbox", "medium")
    assert events.got[2][1] == "<carol@elsewhere.test>: MX of elsewhere.test (route *)"
    assert events.got[3][1] == "<dan@partner.test>: smart host 10.0.0.1:25 (route partner.test)"


def test_aliases_and_unroutable_addresses_wait_for_the_queue_manager() -> None:
    message, events = queue(["list@example.org", "bob@example.org", "x@nowhere.test"],
                            routes=(Route("partner.test", "smarthost", host="10.0.0.1"),),
                            aliases={"list@example.org": ("bob@example.org",)})
    assert placed(message) == [("list@example.org", "conversion", ""),
                               ("bob@example.org", "delivery", ""),
                               ("x@nowhere.test", "conversion", "")]
    assert [k for k, _, _ in events.got] == [3001, 2004]


def test_a_message_at_the_hop_limit_waits_whole_for_its_loop_verdict() -> None:
    data = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 99 + \
        b"Subject: loop\r\n\r\nx\r\n"
    message, _ = queue(["bob@example.org", "carol@elsewhere.test"], data=data)
    assert {r.state for r in message.recipients} == {"conversion"}     # ours is the 100th
    message, _ = queue(["bob@example.org"], data=data[57:])            # 98 + ours
    assert {r.state for r in message.recipients} == {"delivery"}


def test_nothing_is_converted_while_conversion_is_stopped_or_the_store_has_routes() -> None:
    message, events = queue(["bob@example.org", "carol@elsewhere.test"], converting=False)
    assert {r.state for r in message.recipients} == {"conversion"}
    assert [k for k, _, _ in events.got] == [3001]
    message, _ = queue(["bob@example.org", "carol@elsewhere.test"], inbound=False)
    assert placed(message) == [("bob@example.org", "conversion", ""),
                               ("carol@elsewhere.test", "delivery", "0|elsewhere.test")]


def test_an_lmtp_route_for_a_local_domain_is_its_destination() -> None:
    routes = ROUTES + (Route("example.org", "lmtp", host="127.0.0.1", port=24, index=2),)
    message, _ = queue(["bob@example.org"], routes=routes)
    assert placed(message) == [("bob@example.org", "delivery", "2|")]
