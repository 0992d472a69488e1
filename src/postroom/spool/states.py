"""The queue's state machine: the states a recipient moves through, and the moves allowed.

::

    conversion ──> delivery ──> delivered | failed
        │  │          ^  │
        │  │          └──┘  deferred: the next attempt moves on
        │  └──> failed      (a mail loop, no route, a failed alias)
        └─────> expanded    (an alias, replaced by its targets)

A recipient enters in conversion, or directly in delivery when intake converted it at
once (``ENTRY``): a local mailbox that is no alias, or a remote address that a route
covers, in a message under the hop limit. Everything else waits for the queue manager.

Only the spool's backends write a state, and only through :func:`check_move`. The four
queues an administrator sees are views: ``<direction>-<state>`` for the two active states.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

__all__ = ["ACTIONS", "ACTIVE", "ENTRY", "MOVES", "QUEUES", "Direction", "IllegalMove", "State",
           "check_entry", "check_move", "queue_name", "wants_notice"]


class State(StrEnum):
    CONVERSION = "conversion"
    DELIVERY = "delivery"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPANDED = "expanded"


class Direction(StrEnum):
    INBOUND = "inbound"          # to a mailbox of this server
    OUTBOUND = "outbound"        # to another host


ACTIVE = (State.CONVERSION, State.DELIVERY)
ENTRY = frozenset({State.CONVERSION, State.DELIVERY})     # where a new recipient may start

# Every allowed move, and nothing else. A final state has no way out: a late result for a
# recipient that an administrator deleted meanwhile is refused, not recorded over it.
MOVES: Mapping[State, frozenset[State]] = {
    State.CONVERSION: frozenset({State.DELIVERY, State.FAILED, State.EXPANDED}),
    State.DELIVERY: frozenset({State.DELIVERY, State.DELIVERED, State.FAILED}),
    State.DELIVERED: frozenset(),
    State.FAILED: frozenset(),
    State.EXPANDED: frozenset(),
}

QUEUES = ("inbound-conversion", "inbound-delivery", "outbound-conversion", "outbound-delivery")
ACTIONS = ("retry", "hold", "release", "delete", "bounce")


class IllegalMove(ValueError):
    """A state change the table does not allow."""


def check_move(old: str, new: str) -> None:
    if State(new) not in MOVES[State(old)]:
        raise IllegalMove(f"a recipient in {old} cannot move to {new}")


def check_entry(state: str) -> None:
    if State(state) not in ENTRY:
        raise IllegalMove(f"a new recipient cannot start in {state}")


def queue_name(direction: str, state: str) -> str:
    return f"{direction}-{state}"


def wants_notice(kind: str, sender: str, params: Mapping[str, str]) -> bool:
    """Whether the sender gets a ``failure``, ``delay`` or ``success`` notice (RFC 3461).

    Never for the null sender (no bounce loops). Without NOTIFY: failures and delays.
    NOTIFY=NEVER: none, whoever asks (the queue manager, or an administrator's bounce).
    """
    if not sender:
        return False
    notify = params.get("NOTIFY")
    if notify is None:
        return kind in ("failure", "delay")
    return kind.upper() in notify.upper().split(",")
