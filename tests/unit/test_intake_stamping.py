"""Intake's signing hook when the signer fails: the mail is queued unsigned, counted and
told (event 3103), never refused or lost. The spool and the signer are fakes: this is the
hook's own logic; signing itself is tested against OpenDKIM in test_dkim.py."""

from __future__ import annotations

import asyncio
from typing import Any

from postroom.address import parse_path
from postroom.intake import Intake, Stamping, Submission
from postroom.metrics import Metrics


class FakeSpool:
    bodies = None

    def __init__(self) -> None:
        self.stored: list[Any] = []

    async def enqueue(self, message: Any) -> None:
        self.stored.append(message)


class BrokenSigner:
    def __bool__(self) -> bool:
        return True

    def sign(self, header: bytes, body: Any, now: float) -> bytes:
        raise ValueError("the key went away")


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[int, str]] = []

    def emit(self, kind: int, text: str, **fields: Any) -> None:
        self.got.append((kind, text))

    def enabled(self, *args: Any, **kwargs: Any) -> bool:
        return False


def test_a_signing_error_queues_the_mail_unsigned_counts_it_and_says_so() -> None:
    spool, events, metrics = FakeSpool(), Events(), Metrics()
    intake = Intake(spool, "mx.example.org", {"example.org"}, metrics, events)  # type: ignore[arg-type]
    intake.stamping = Stamping(BrokenSigner(), None, lambda peer: False, {})  # type: ignore[arg-type]
    data = b"From: alice@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
    sub = Submission(parse_path("<alice@example.org>", allow_null=False),
                     [(parse_path("<bob@far.test>", allow_null=False), {})], data,
                     "127.0.0.1", "client.example.org", "submission", "ESMTPA",
                     auth="alice@example.org")
    message = asyncio.run(intake.queue(sub))
    assert spool.stored == [message]
    assert message.data.endswith(data) and b"DKIM-Signature" not in message.data
    assert [k for k, _ in events.got] == [3103]
    assert "queued unsigned: ValueError: the key went away" in events.got[0][1]
    assert metrics.registry.get_sample_value("postroom_outbound_stamps_total",
                                             {"kind": "failed"}) == 1
