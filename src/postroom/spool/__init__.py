"""The spool owns the queue: every accepted message and each recipient's state.

- :mod:`.states`: the state machine (states, allowed moves, the four queues);
- :mod:`.records`: the values that go in and out;
- :mod:`.interface`: the backend-neutral verbs (:class:`Spool`);
- :mod:`.sqlite`: the server's backend (SQLite, WAL, group commit); :mod:`.memory`: the
  same verbs in memory, for tests;
- :mod:`.views`: what the admin API shows and does, over any backend.
"""

from __future__ import annotations

from pathlib import Path

from .interface import Spool
from .memory import MemorySpool
from .records import (
    Claim,
    Conversion,
    Filters,
    NewMessage,
    NewRecipient,
    NoticeOwed,
    NoticeSent,
    QueueSummary,
    RecipientView,
    StorageFull,
    Target,
    Transition,
    new_queue_id,
)
from .sqlite import SqliteSpool, is_disk_full
from .states import ACTIONS, QUEUES, Direction, IllegalMove, State, wants_notice

__all__ = ["ACTIONS", "QUEUES", "Claim", "Conversion", "Direction", "Filters", "IllegalMove",
           "NewMessage", "NewRecipient", "NoticeOwed", "NoticeSent", "QueueSummary",
           "RecipientView", "Spool", "SqliteSpool", "State", "StorageFull", "Target",
           "Transition", "is_disk_full", "new_queue_id", "open_spool", "wants_notice"]


def open_spool(data_dir: Path) -> SqliteSpool:
    """The server's spool: SQLite in ``data_dir``."""
    return SqliteSpool(data_dir / "spool.sqlite3")


def _backends_implement_the_interface(sqlite: SqliteSpool, memory: MemorySpool
                                      ) -> tuple[Spool, Spool]:
    """Never called: mypy checks here that both backends have every verb."""
    return sqlite, memory
