"""The spool's contract: every backend passes these, through the interface's verbs only.

A backend is one module plus one entry in ``BACKENDS``: SQLite, in memory, and
PostgreSQL (a fresh database per test on the session's private server,
``tests/postgres.py``). Each test's body runs in ONE event loop (``run(main())``): a
PostgreSQL spool's connection pool belongs to the loop that opened it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from postroom.spool import (
    Claim,
    Conversion,
    Direction,
    Filters,
    IllegalMove,
    NewMessage,
    NewRecipient,
    NoticeSent,
    Spool,
    SqliteSpool,
    State,
    Target,
    Transition,
    new_queue_id,
    views,
)
from postroom.spool.memory import MemorySpool

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _sqlite(request: pytest.FixtureRequest, tmp: Path, clock: Clock) -> Spool:
    return SqliteSpool(tmp / "spool.sqlite3", clock=clock)


def _memory(request: pytest.FixtureRequest, tmp: Path, clock: Clock) -> Spool:
    return MemorySpool(tmp / "bodies", clock)


_databases = itertools.count(1)


def postgres_db(request: pytest.FixtureRequest, prefix: str = "contract") -> str:
    """A fresh database on the session's server (dropped when the test ends); its URL."""
    server: Any = request.getfixturevalue("postgres_server")
    name = f"{prefix}_{next(_databases)}"
    url: str = server.create_db(name)
    request.addfinalizer(lambda: server.running and server.psql(
        "postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return url


def _postgres(request: pytest.FixtureRequest, tmp: Path, clock: Clock) -> Spool:
    from postroom.spool.postgres import PostgresSpool
    return PostgresSpool(postgres_db(request), tmp / "bodies", clock=clock, pool_size=4)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path, Clock], Spool]] = {
    "sqlite": _sqlite, "memory": _memory, "postgres": _postgres}


@pytest.fixture
def clock() -> Clock:
    return Clock()


_in_use: list[Spool] = []         # the current test's spool, closed at the end of its loop


@pytest.fixture(params=sorted(BACKENDS))
def spool(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Spool]:
    sp = BACKENDS[request.param](request, tmp_path, clock)
    _in_use.append(sp)
    yield sp
    _in_use.remove(sp)
    sp.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """A test's whole body, in one event loop; the spool's connections (PostgreSQL) are
    closed before the loop ends, as the server does at its stop."""
    async def body() -> T:
        try:
            return await coro
        finally:
            for sp in _in_use:
                aclose = getattr(sp, "aclose", None)
                if aclose is not None:
                    await aclose()
    return asyncio.run(body())


def msg(*rcpts: str, sender: str = "s@far.test", params: dict[str, str] | None = None,
        data: bytes = b"Subject: t\r\n\r\nx\r\n", **kw: Any) -> NewMessage:
    return NewMessage(new_queue_id(), sender, {}, {"peer": "127.0.0.1"}, data, tuple(
        NewRecipient(a, Direction.INBOUND if a.endswith("@here.test") else Direction.OUTBOUND,
                     dict(params or {})) for a in rcpts), **kw)


def queues(spool: Spool) -> dict[str, int]:
    return {q.name: q.recipients for q in spool.summary()}


async def to_delivery(spool: Spool, now: float, destination: str = "") -> list[Claim]:
    """Every recipient in conversion moves on to delivery."""
    items = await spool.pending_conversion(100)
    await spool.convert([Conversion(i.rid, State.DELIVERY, destination) for i in items], now)
    return items


async def claim_all(spool: Spool, direction: str, now: float, owner: str = "a") -> list[Claim]:
    due = await spool.due(direction, now, 100, owner)
    return await spool.claim(due, now, owner, 600)


def delivered(c: Claim) -> Transition:
    return Transition(c, State.DELIVERED, "250 2.0.0 ok", {"status": "2.0.0", "step": "DATA"})


# --- receiving and the four queues ----------------------------------------------------
def test_enqueue_puts_each_recipient_in_conversion_of_its_direction(spool: Spool) -> None:
    async def main() -> None:
        await spool.enqueue(msg("a@here.test", "b@here.test", "c@far.test"))
        assert queues(spool) == {"inbound-conversion": 2, "inbound-delivery": 0,
                                 "outbound-conversion": 1, "outbound-delivery": 0}
        items = await spool.pending_conversion(10)
        assert [(i.address, i.direction) for i in items] == [
            ("a@here.test", "inbound"), ("b@here.test", "inbound"),
            ("c@far.test", "outbound")]
    run(main())


def test_enqueue_wakes_the_listeners(spool: Spool) -> None:
    woken: list[int] = []
    spool.on_commit(lambda: woken.append(1))

    async def main() -> None:
        await spool.enqueue(msg("a@here.test"))
        assert woken == [1]
    run(main())


# --- conversion -----------------------------------------------------------------------
def test_conversion_moves_recipients_and_leaves_others_alone(spool: Spool, clock: Clock
                                                             ) -> None:
    async def main() -> None:
        await spool.enqueue(msg("a@here.test", "c@far.test"))
        a, c = await spool.pending_conversion(10)
        await spool.convert([Conversion(a.rid, State.DELIVERY),
                             Conversion(c.rid, State.FAILED, last_reply="550 5.4.4 no route",
                                        detail={"status": "5.4.4"}, notice="failure")], clock.now)
        # a second decision for a recipient already converted changes nothing
        await spool.convert([Conversion(a.rid, State.FAILED, last_reply="late")], clock.now)
        assert queues(spool)["inbound-delivery"] == 1
        owed = await spool.owed_notices(10)
        assert [(n.address, n.kind, n.last_reply) for n in owed] == [
            ("c@far.test", "failure", "550 5.4.4 no route")]
    run(main())


def test_an_alias_expands_into_targets_and_a_present_target_gets_one_copy(
        spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        await spool.enqueue(msg("team@here.test", "a@here.test"))
        team, a = await spool.pending_conversion(10)
        await spool.convert([
            Conversion(a.rid, State.DELIVERY),
            Conversion(team.rid, State.EXPANDED, last_reply="alias: a, b, x", targets=(
                Target("a@here.test", Direction.INBOUND, {}, Conversion(0, State.DELIVERY)),
                Target("b@here.test", Direction.INBOUND, {}, Conversion(0, State.DELIVERY)),
                Target("x@far.test", Direction.OUTBOUND, {"ORCPT": "rfc822;team@here.test"},
                       Conversion(0, State.DELIVERY, "0|far.test"))))], clock.now)
        rows = await spool.recipients(Filters(), clock.now)
        assert sorted((r.address, r.direction, r.state) for r in rows) == [
            ("a@here.test", "inbound", "delivery"), ("b@here.test", "inbound", "delivery"),
            ("x@far.test", "outbound", "delivery")]
        x = next(r for r in rows if r.address == "x@far.test")
        assert x.params == {"ORCPT": "rfc822;team@here.test"} and x.parent is not None
        due = await spool.due(Direction.OUTBOUND, clock.now, 10)
        assert [d.destination for d in due] == ["0|far.test"]
    run(main())


def test_a_recipient_moves_only_as_the_table_allows(spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        await spool.enqueue(msg("a@here.test"))
        await to_delivery(spool, clock.now)
        (c,) = await claim_all(spool, Direction.INBOUND, clock.now)
        with pytest.raises(IllegalMove):
            await spool.record([Transition(c, State.CONVERSION, "", {})], clock.now)
    run(main())


# --- claims, leases and fencing -------------------------------------------------------
def test_a_claim_keeps_other_owners_off_until_its_lease_ends(spool: Spool, clock: Clock) -> None:
    m = msg("a@here.test")

    async def main() -> None:
        await spool.enqueue(m)
        await to_delivery(spool, clock.now)
        (c,) = await claim_all(spool, Direction.INBOUND, clock.now, "a")
        assert c.token > 0 and c.address == "a@here.test" and c.sender == "s@far.test"
        shown = await views.show(spool, m.queue_id, clock.now)
        assert shown["recipients"][0]["claimed_by"] == "a"
        assert "claimed_by" not in (await views.show(spool, m.queue_id, clock.now + 601)
                                    )["recipients"][0]
        assert await spool.due(Direction.INBOUND, clock.now, 10, "b") == []
        assert await spool.claim([c], clock.now, "b", 600) == []
        clock.now += 601                               # the lease ended: b takes over
        (b,) = await claim_all(spool, Direction.INBOUND, clock.now, "b")
        assert b.token > c.token
        # a's late result is refused: a stale worker cannot overwrite b's
        assert await spool.record([delivered(c)], clock.now) == [c.rid]
        assert queues(spool)["inbound-delivery"] == 1
        assert await spool.record([delivered(b)], clock.now) == []
        assert queues(spool)["inbound-delivery"] == 0
    run(main())


def test_an_owner_may_claim_its_own_leased_work_again(spool: Spool, clock: Clock) -> None:
    """A result that could not be recorded (a full disk) is tried again at once by its
    owner, not after the lease; the old claim's token is then stale."""
    async def main() -> None:
        await spool.enqueue(msg("a@here.test"))
        await to_delivery(spool, clock.now)
        (first,) = await claim_all(spool, Direction.INBOUND, clock.now, "a")
        (again,) = await claim_all(spool, Direction.INBOUND, clock.now, "a")
        assert again.token > first.token
        assert await spool.record([delivered(first)], clock.now) == [first.rid]
    run(main())


def test_release_leases_frees_only_that_owners_claims(spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        await spool.enqueue(msg("a@here.test", "b@here.test"))
        await to_delivery(spool, clock.now)
        a, b = await spool.due(Direction.INBOUND, clock.now, 10)
        await spool.claim([a], clock.now, "node-1", 600)
        await spool.claim([b], clock.now, "node-2", 600)
        await spool.release_leases("node-1")
        assert [d.address for d in await spool.due(Direction.INBOUND, clock.now, 10, "x")] == [
            "a@here.test"]
    run(main())


def test_renew_extends_only_the_owners_current_claims(spool: Spool, clock: Clock) -> None:
    """A long delivery keeps its claims; a claim that expired and was taken by another
    owner, or that was finished meanwhile, is reported lost."""
    async def main() -> None:
        await spool.enqueue(msg("a@here.test", "b@here.test", "c@here.test"))
        await to_delivery(spool, clock.now)
        a, b, c = await spool.claim(await spool.due(Direction.INBOUND, clock.now, 10),
                                    clock.now, "n1", 60)
        clock.now += 50
        assert await spool.renew([a, b, c], clock.now, "n1", 60) == []
        clock.now += 50                  # past the first lease, within the renewed one
        assert await spool.due(Direction.INBOUND, clock.now, 10, "n2") == []
        assert await spool.claim([a], clock.now, "n2", 60) == []
        await spool.record([delivered(c)], clock.now)          # c finished meanwhile
        clock.now += 61                  # the renewed leases end: n2 takes b
        (b2,) = await spool.claim([b], clock.now, "n2", 60)
        assert b2.token > b.token
        assert sorted(await spool.renew([a, b, c], clock.now, "n1", 60)) == [b.rid, c.rid]
        assert await spool.renew([b], clock.now, "n1", 60) == [b.rid]
        assert await spool.renew([b2], clock.now, "n2", 60) == []
        assert await spool.renew([], clock.now, "n2", 60) == []
    run(main())


def test_a_deferral_waits_for_its_time_and_is_kept_in_the_attempt_log(
        spool: Spool, clock: Clock) -> None:
    m = msg("a@here.test")

    async def main() -> None:
        await spool.enqueue(m)
        await to_delivery(spool, clock.now)
        (c,) = await claim_all(spool, Direction.INBOUND, clock.now)
        await spool.record([Transition(c, State.DELIVERY, "451 4.3.0 try later",
                                       {"status": "4.3.0", "step": "local"}, attempts=1,
                                       next_attempt=clock.now + 60, warn=True,
                                       log_attempt=True)], clock.now)
        assert await spool.due(Direction.INBOUND, clock.now + 59, 10, "a") == []
        (again,) = await spool.due(Direction.INBOUND, clock.now + 60, 10, "a")
        assert again.attempts == 1
        view = await spool.message(m.queue_id)
        assert view is not None
        assert [(a.reply, a.detail["status"]) for a in view.attempts] == [
            ("451 4.3.0 try later", "4.3.0")]
        assert [n.kind for n in await spool.owed_notices(10)] == ["delay"]
    run(main())


def test_a_destination_that_failed_as_a_whole_waits_with_its_reason(
        spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        await spool.enqueue(msg("a@far.test", "b@far.test", "c@other.test"))
        items = await spool.pending_conversion(10)
        await spool.convert([Conversion(i.rid, State.DELIVERY, "0|" + i.address.split("@")[1])
                             for i in items], clock.now)
        a = (await spool.due(Direction.OUTBOUND, clock.now, 10))[0]
        await spool.claim([a], clock.now, "other", 600)          # in flight elsewhere
        n = await spool.defer_destination("0|far.test", clock.now + 300, "451 4.4.1 refused",
                                          '{"status": "4.4.1", "hop": "MX of far.test"}',
                                          clock.now, "me")
        assert n == 1
        rows = await spool.recipients(Filters(), clock.now)
        b = next(r for r in rows if r.address == "b@far.test")
        assert b.next_attempt == clock.now + 300 and b.last_reply == "451 4.4.1 refused"
        assert b.detail["hop"] == "MX of far.test"
        c = next(r for r in rows if r.address == "c@other.test")
        assert c.next_attempt == clock.now and c.last_reply == ""
    run(main())


# --- notices --------------------------------------------------------------------------
def test_a_notice_is_sent_once_and_then_the_message_is_finished(spool: Spool, clock: Clock
                                                               ) -> None:
    m = msg("a@here.test")

    async def main() -> None:
        await spool.enqueue(m)
        (a,) = await spool.pending_conversion(10)
        await spool.convert([Conversion(a.rid, State.FAILED, last_reply="550 5.1.1 gone",
                                        notice="failure")], clock.now)
        assert await spool.message(m.queue_id) is not None          # kept for its NDR
        (owed,) = await spool.owed_notices(10)
        report = NewMessage(new_queue_id(), "", {}, {"listener": "internal"}, b"report",
                            (NewRecipient("s@far.test", Direction.OUTBOUND, {}),))
        sent = NoticeSent(m.queue_id, "failure", (owed.rid,), report)
        assert await spool.notices_sent([sent], clock.now) == [sent]
        assert await spool.notices_sent([sent], clock.now) == []     # not twice
        assert await spool.owed_notices(10) == []
        assert await spool.message(m.queue_id) is None               # finished
        assert queues(spool)["outbound-conversion"] == 1             # the report
    run(main())


# --- nodes ----------------------------------------------------------------------------
def test_heartbeats_name_each_node_with_its_live_claims(spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        assert await spool.nodes(clock.now) == []
        await spool.heartbeat("node-1", {"pid": 42, "version": "0.1.0"}, clock.now)
        await spool.enqueue(msg("a@here.test", "b@here.test"))
        await to_delivery(spool, clock.now)
        a, b = await spool.due(Direction.INBOUND, clock.now, 10)
        await spool.claim([a, b], clock.now, "node-1", 60)
        clock.now += 5
        await spool.heartbeat("node-0", {"pid": 7}, clock.now)
        (n0, n1) = await spool.nodes(clock.now + 1)
        assert (n0["name"], n0["info"], n0["claims"]) == ("node-0", {"pid": 7}, 0)
        assert (n1["name"], n1["info"], n1["claims"]) == (
            "node-1", {"pid": 42, "version": "0.1.0"}, 2)
        assert n1["last_seen"] == clock.now - 5
        assert n1["seconds_since"] == pytest.approx(6.0)
        # a later heartbeat replaces the node's info; expired leases are not live claims
        await spool.heartbeat("node-1", {"pid": 43}, clock.now)
        (_, n1) = await spool.nodes(clock.now + 100)
        assert (n1["info"], n1["claims"], n1["seconds_since"]) == ({"pid": 43}, 0,
                                                                   pytest.approx(100.0))
    run(main())


def test_start_is_harmless_and_the_spool_works_after_it(spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        await spool.start()
        await spool.enqueue(msg("a@here.test"))
        assert len(await spool.pending_conversion(10)) == 1
    run(main())


# --- views and actions ----------------------------------------------------------------
def test_filters_select_the_same_recipients_on_every_backend(spool: Spool, clock: Clock
                                                             ) -> None:
    async def main() -> None:
        old = msg("a@here.test", "b@far.test", sender="")
        await spool.enqueue(old)
        clock.now += 3600
        new = msg("c@far.test", sender="Someone@Far.test")
        await spool.enqueue(new)

        async def sel(**kw: Any) -> list[str]:
            return [r.address for r in await spool.recipients(Filters(**kw), clock.now)]
        assert await sel() == ["a@here.test", "b@far.test", "c@far.test"]
        assert await sel(domain="FAR.test.") == ["b@far.test", "c@far.test"]
        assert await sel(sender="<>") == ["a@here.test", "b@far.test"]
        assert await sel(sender="someone@far.test") == ["c@far.test"]
        assert await sel(rcpt="A@here.test") == ["a@here.test"]
        assert await sel(older_than=1800) == ["a@here.test", "b@far.test"]
        assert await sel(queue="outbound-conversion") == ["b@far.test", "c@far.test"]
        assert await sel(ids=(new.queue_id,)) == ["c@far.test"]
        assert await sel(held=True) == []
        with pytest.raises(ValueError):
            await sel(queue="nowhere")
    run(main())


def test_hold_release_and_retry(spool: Spool, clock: Clock) -> None:
    m = msg("a@here.test")

    async def main() -> None:
        await spool.enqueue(m)
        await to_delivery(spool, clock.now)
        assert (await views.act(spool, "hold", Filters(ids=(m.queue_id,)), clock.now)
                )["recipients"] == 1
        assert await spool.due(Direction.INBOUND, clock.now, 10) == []
        assert [q.held for q in spool.summary()] == [0, 1, 0, 0]
        await views.act(spool, "release", Filters(ids=(m.queue_id,)), clock.now)
        (c,) = await claim_all(spool, Direction.INBOUND, clock.now)
        await spool.record([Transition(c, State.DELIVERY, "451 later", {}, attempts=1,
                                       next_attempt=clock.now + 999)], clock.now)
        assert await spool.due(Direction.INBOUND, clock.now, 10, "a") == []
        await views.act(spool, "retry", Filters(ids=(m.queue_id,)), clock.now)
        assert len(await spool.due(Direction.INBOUND, clock.now, 10, "a")) == 1
    run(main())


def test_delete_finishes_the_message_without_a_report(spool: Spool, clock: Clock) -> None:
    m = msg("a@here.test")

    async def main() -> None:
        await spool.enqueue(m)
        result = await views.act(spool, "delete", Filters(ids=(m.queue_id,)), clock.now, "ops")
        assert result == {"action": "delete", "recipients": 1, "messages": 1,
                          "finished": [(m.queue_id, "a@here.test", "inbound")]}
        assert await spool.message(m.queue_id) is None
        assert await spool.owed_notices(10) == []
    run(main())


@pytest.mark.parametrize("sender, notify, owed", [
    ("s@far.test", None, True),
    ("s@far.test", "FAILURE,DELAY", True),
    ("s@far.test", "NEVER", False),           # the bug: queue bounce ignored NOTIFY=NEVER
    ("s@far.test", "SUCCESS", False),
    ("", None, False),                        # never a report to the null sender
])
def test_bounce_owes_a_report_only_where_the_sender_wants_one(
        spool: Spool, clock: Clock, sender: str, notify: str | None, owed: bool) -> None:
    m = msg("a@here.test", sender=sender, params={"NOTIFY": notify} if notify else {})

    async def main() -> None:
        await spool.enqueue(m)
        result = await views.act(spool, "bounce", Filters(ids=(m.queue_id,)), clock.now, "ops")
        assert result["recipients"] == 1
        notices = await spool.owed_notices(10)
        assert [(n.kind, n.last_reply) for n in notices] == (
            [("failure", "554 5.3.0 returned to the sender by ops before delivery")]
            if owed else [])
        assert (await spool.message(m.queue_id) is None) == (not owed)
    run(main())


def test_an_action_on_no_recipient_changes_nothing(spool: Spool, clock: Clock) -> None:
    async def main() -> None:
        for action in ("retry", "hold", "release", "delete", "bounce"):
            assert await spool.act(action, [], clock.now, "ops") == {
                "action": action, "recipients": 0, "messages": 0, "finished": []}
    run(main())


def test_a_late_result_for_a_deleted_recipient_is_refused(spool: Spool, clock: Clock) -> None:
    m = msg("a@here.test")

    async def main() -> None:
        await spool.enqueue(m)
        await to_delivery(spool, clock.now)
        (c,) = await claim_all(spool, Direction.INBOUND, clock.now)
        await views.act(spool, "delete", Filters(ids=(m.queue_id,)), clock.now)
        assert await spool.record([delivered(c)], clock.now) == [c.rid]
    run(main())


def test_a_message_goes_with_its_last_final_recipient_and_not_while_owed(
        spool: Spool, clock: Clock) -> None:
    """Recorded results finish a message only when none of its recipients is waiting
    or owed a notice, whether they come in one batch or several."""
    one_by_one, together, warned = (msg("a@here.test", "b@here.test"),
                                    msg("c@here.test", "d@here.test"), msg("e@here.test"))

    async def main() -> None:
        for m in (one_by_one, together, warned):
            await spool.enqueue(m)
        await to_delivery(spool, clock.now)
        claims = {c.address: c for c in await claim_all(spool, Direction.INBOUND, clock.now)}
        await spool.record([Transition(claims["e@here.test"], State.DELIVERY, "451 4.3.0 later",
                                       {"status": "4.3.0"}, attempts=1,
                                       next_attempt=clock.now, warn=True)], clock.now)
        (e,) = await spool.claim([d for d in await spool.due(Direction.INBOUND, clock.now, 10, "a")
                                  if d.address == "e@here.test"], clock.now, "a", 600)
        stale = claims["e@here.test"]                          # its claim before the retry
        assert await spool.record([delivered(claims["a@here.test"]), delivered(stale)],
                                  clock.now) == [stale.rid]
        shown = await views.show(spool, one_by_one.queue_id)
        assert [(r["address"], r["state"]) for r in shown["recipients"]] == [
            ("a@here.test", "delivered"), ("b@here.test", "delivery")]
        assert await spool.record([delivered(claims["b@here.test"]),
                                   delivered(claims["c@here.test"]),
                                   delivered(claims["d@here.test"]), delivered(e)],
                                  clock.now) == []
        assert await spool.message(one_by_one.queue_id) is None
        assert await spool.message(together.queue_id) is None
        assert await spool.message(warned.queue_id) is not None    # its delay notice is owed
        assert [n.kind for n in await spool.owed_notices(10)] == ["delay"]
    run(main())


def test_views_show_a_message_and_group_reasons(spool: Spool, clock: Clock) -> None:
    m = msg("a@far.test", "b@far.test")

    async def main() -> None:
        await spool.enqueue(m)
        await to_delivery(spool, clock.now, "0|far.test")
        claims = await claim_all(spool, Direction.OUTBOUND, clock.now)
        await spool.record([Transition(c, State.DELIVERY, f"451 4.7.1 <{c.address}> later",
                                       {"status": "4.7.1", "hop": "MX of far.test"},
                                       attempts=1, next_attempt=clock.now + 60,
                                       log_attempt=True) for c in claims], clock.now)
        shown = await views.show(spool, m.queue_id)
        assert [r["address"] for r in shown["recipients"]] == ["a@far.test", "b@far.test"]
        assert shown["headers"].startswith("Subject: t")
        assert [len(r["attempt_log"]) for r in shown["recipients"]] == [1, 1]
        (group,) = await views.reasons(spool, clock.now)
        assert group["recipients"] == 2 and group["reply"] == "451 4.7.1 … later"
        listed = await views.list_queue(spool, "outbound-delivery", Filters(), clock.now)
        assert [x["id"] for x in listed["messages"]] == [m.queue_id]
        with pytest.raises(views.QueueError):
            await views.show(spool, "nope")
    run(main())


def test_a_remote_reply_with_odd_characters_is_kept(spool: Spool, clock: Clock) -> None:
    """Whatever a remote server says is recorded (a NUL, which PostgreSQL's text cannot
    hold, becomes U+FFFD there) and comes back in the views."""
    m = msg("a@far.test")

    async def main() -> None:
        await spool.enqueue(m)
        await to_delivery(spool, clock.now, "0|far.test")
        (c,) = await claim_all(spool, Direction.OUTBOUND, clock.now)
        reply = "451 4.3.0 sp\u00e4ter \u2603 \x00 bye"
        assert await spool.record([Transition(c, State.DELIVERY, reply,
                                              {"transcript": "S: " + reply}, attempts=1,
                                              next_attempt=clock.now + 60, log_attempt=True)],
                                  clock.now) == []
        (r,) = await spool.recipients(Filters(), clock.now)
        assert r.last_reply.replace("\ufffd", "\x00") == reply
        assert r.detail == {"transcript": "S: " + reply}
    run(main())


def test_a_big_body_is_read_back_and_its_file_removed_after_the_message(
        spool: Spool, clock: Clock) -> None:
    spool.bodies.mkdir(parents=True, exist_ok=True)
    (spool.bodies / "big1").write_bytes(b"y" * 5000)
    m = msg("a@here.test", data=b"Received: x\r\n", body_file="big1", body_size=5000)

    async def main() -> None:
        await spool.enqueue(m)
        bodies = await spool.message_bodies([m.queue_id])
        body, _ = bodies[m.queue_id]
        assert body.size == len(b"Received: x\r\n") + 5000
        assert body.read() == b"Received: x\r\n" + b"y" * 5000
        got = await spool.body(m.queue_id)
        assert got is not None and got.read() == body.read()
        await to_delivery(spool, clock.now)
        (c,) = await claim_all(spool, Direction.INBOUND, clock.now)
        await spool.record([delivered(c)], clock.now)
        assert await spool.sweep_bodies() == 1
        assert await spool.body(m.queue_id) is None
    run(main())
    assert not (spool.bodies / "big1").exists()
