"""The local agent: final delivery into this server's Maildirs.

Each message is written to each recipient's Maildir in a few worker-thread jobs (``tmp`` → fsync →
link into ``new``), and every ``new`` folder the batch touched is fsync'd once, before any
result is returned: the queue manager records a delivery only after it is durable. A
result whose folder could not be synced is a transient failure (delivered again later: a
possible duplicate, never a loss). Every successful result names its file in
``stored``, so that a caller who cannot record it can take the copy back.

Intake's delivery of a small message (:meth:`LocalDeliveryAgent.deliver_now`) takes the
same steps in the event loop instead, its fsyncs handed to the kernel by ``syncer.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from ..body import strip_cr, to_lf
from ..conversion import CRLF_PARAM, FOLDER_PARAM, delivery_headers, local_delivery_bytes
from ..model import DeliveryResult, Reply
from ..store import MaildirStore, StoreError, sync, sync_async
from ..syncer import Syncer
from . import Destination, OutboundMessage, OutboundRecipient

__all__ = ["LocalDeliveryAgent", "take_back"]

T = TypeVar("T")

log = logging.getLogger("postroom.delivery")

HOP = "local mailbox"
JOBS = 4             # worker-thread jobs a batch is split into


def _failure(folder: str, error: StoreError) -> str:
    """Why ``folder``'s fsync failed (logged)."""
    log.warning("fsync of %s failed: %s", folder, error)
    return error.reason


async def _together(steps: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every step's result, in order. One step (the common case: one recipient, one
    folder) is awaited as it is: a gather makes a task apiece, which cost W1 about 5 %
    of the event loop's CPU."""
    if len(steps) == 1:
        return [await steps[0]]
    return list(await asyncio.gather(*steps))


async def _synced_async(folder: str, syncer: Syncer) -> str | None:
    """:func:`_sync_or_error` from the event loop."""
    try:
        await sync_async(folder, syncer)
    except StoreError as exc:
        return _failure(folder, exc)
    return None


def _sync_or_error(folder: str) -> str | None:
    try:
        sync(folder)
    except StoreError as exc:
        return _failure(folder, exc)
    return None


def _synced(done: list[DeliveryResult]) -> list[DeliveryResult]:
    """``done`` once each Maildir folder it touched is fsync'd (see :func:`_settle`)."""
    folders = {os.path.dirname(r.stored) for r in done if r.stored}
    return _settle(done, {f: _sync_or_error(f) for f in sorted(folders)})


def _settle(done: list[DeliveryResult], failed: dict[str, str | None]
            ) -> list[DeliveryResult]:
    """``done``, where a copy whose folder could not be synced (``failed`` maps each
    folder to why, or None) is taken back and is a transient failure (tried again)."""
    if any(failed.values()):
        for i, res in enumerate(done):
            reason = failed[os.path.dirname(res.stored)] if res.stored else None
            if reason is not None:
                take_back((res,))
                done[i] = DeliveryResult(
                    res.recipient, False, True, Reply(
                        451, "4.3.0", f"Maildir delivery failed: {reason}"), "local", hop=HOP)
    return done


def take_back(results: Iterable[DeliveryResult]) -> None:
    """Remove the copies of deliveries that will not be recorded (they will be made
    again, or were made by whoever holds the claim)."""
    for r in results:
        if r.stored:
            try:
                os.unlink(r.stored)
            except OSError as exc:
                log.warning("could not take back %s: %s", r.stored, exc)


class LocalDeliveryAgent:
    def __init__(self, store: MaildirStore, mailbox_exists: Callable[[str], bool],
                 aliases: Mapping[str, tuple[str, ...]], executor: Executor,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.mailbox_exists = mailbox_exists
        self.aliases = aliases                    # replaced on reload
        self.executor = executor
        self.clock = clock

    async def deliver(self, dest: Destination, messages: Sequence[OutboundMessage]
                      ) -> list[DeliveryResult]:
        loop = asyncio.get_running_loop()
        work = [(m, r) for m in messages for r in m.recipients]
        # A few jobs of many deliveries each, not a job apiece: each hand-off to a
        # thread and back costs more CPU (GIL and wake-ups) than a small file's write;
        # a few jobs still overlap their fsyncs.
        jobs = min(JOBS, len(work)) or 1
        parts = await asyncio.gather(*(
            loop.run_in_executor(self.executor, self._some, work[i::jobs])
            for i in range(jobs)))
        results: list[DeliveryResult | None] = [None] * len(work)
        for i, part in enumerate(parts):
            results[i::jobs] = part
        # One fsync per Maildir folder for the whole batch, before anything is returned.
        return await loop.run_in_executor(self.executor, _synced,
                                          [r for r in results if r is not None])

    async def deliver_now(self, message: OutboundMessage, syncer: Syncer
                          ) -> list[DeliveryResult]:
        """:meth:`deliver` of one small message from the event loop, without a thread
        (intake's delivery, ``direct.py``): the copies are written in the loop's thread
        and fsync'd by ``syncer``, and every folder they went into is synced before it
        returns."""
        assert message.data.path is None
        copies = await _together([self._now(message, r, syncer) for r in message.recipients])
        folders = sorted({os.path.dirname(r.stored) for r in copies if r.stored})
        failed = await _together([_synced_async(f, syncer) for f in folders])
        return _settle(copies, dict(zip(folders, failed, strict=True)))

    async def _now(self, message: OutboundMessage, r: OutboundRecipient, syncer: Syncer
                   ) -> DeliveryResult:
        local, _, domain = r.address.rpartition("@")
        if not self._known(local, r.address):
            return self._gone(r)
        try:
            path = await self.store.deliver_async(
                local, domain, local_delivery_bytes(message.data.prefix, message.sender,
                                                    r.address),
                syncer, message.mail_params.get(FOLDER_PARAM, ""))
        except StoreError as exc:
            return self._failed(message, r, exc)
        return self._stored(r, path)

    def _some(self, work: Sequence[tuple[OutboundMessage, OutboundRecipient]]
              ) -> list[DeliveryResult]:
        return [self._one(m, r) for m, r in work]

    def _one(self, message: OutboundMessage, r: OutboundRecipient) -> DeliveryResult:
        local, _, domain = r.address.rpartition("@")
        if not self._known(local, r.address):
            return self._gone(r)
        body = message.data
        try:
            if body.path is None:      # the common case: one write
                content: bytes | Iterator[bytes] = local_delivery_bytes(
                    body.prefix, message.sender, r.address)
            else:
                lf = strip_cr if message.mail_params.get(CRLF_PARAM) else to_lf
                content = lf(itertools.chain(
                    (delivery_headers(message.sender, r.address),), body.chunks()))
            folder = message.mail_params.get(FOLDER_PARAM, "")
            path = self.store.deliver(local, domain, content, sync_dir=False, folder=folder) \
                if folder else self.store.deliver(local, domain, content, sync_dir=False)
        except StoreError as exc:
            return self._failed(message, r, exc)
        return self._stored(r, str(path))

    def _known(self, local: str, address: str) -> bool:
        return local == "postmaster" or self.mailbox_exists(address) or \
            address in self.aliases

    @staticmethod
    def _gone(r: OutboundRecipient) -> DeliveryResult:
        return DeliveryResult(r.id, False, False, Reply(550, "5.1.1", f"Mailbox {r.address} "
                                                        "no longer exists"), "local", hop=HOP)

    @staticmethod
    def _failed(message: OutboundMessage, r: OutboundRecipient, exc: StoreError
                ) -> DeliveryResult:
        log.warning("queue_id=%s to=<%s> Maildir delivery failed: %s", message.queue_id,
                    r.address, exc)
        reply = Reply(451, "4.3.0", f"Maildir delivery failed: {exc.reason}") \
            if exc.transient else \
            Reply(550, "5.2.0", f"Maildir delivery failed: {exc.reason}")
        return DeliveryResult(r.id, False, exc.transient, reply, "local", hop=HOP)

    @staticmethod
    def _stored(r: OutboundRecipient, path: str) -> DeliveryResult:
        return DeliveryResult(r.id, True, False, Reply(
            250, "2.0.0", f"delivered to maildir as {os.path.basename(path)}"), "local",
            hop=HOP, stored=path)
