"""The spool owns the queue: every accepted message and each recipient's state.

- :mod:`.states`: the state machine (states, allowed moves, the four queues);
- :mod:`.records`: the values that go in and out;
- :mod:`.interface`: the backend-neutral verbs (:class:`Spool`);
- :mod:`.sqlite`: the server's backend (SQLite, WAL, group commit); :mod:`.postgres`:
  one queue shared by several nodes (PostgreSQL; loaded only when ``[spool] url`` is
  set); :mod:`.memory`: the same verbs in memory, for tests;
- :mod:`.views`: what the admin API shows and does, over any backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
    StorageUnavailable,
    Target,
    Transition,
    new_queue_id,
)
from .sqlite import SqliteSpool, is_disk_full
from .states import ACTIONS, QUEUES, Direction, IllegalMove, State, wants_notice

__all__ = ["ACTIONS", "QUEUES", "Claim", "Conversion", "Direction", "Filters", "IllegalMove",
           "NewMessage", "NewRecipient", "NoticeOwed", "NoticeSent", "QueueSummary",
           "RecipientView", "Spool", "SqliteSpool", "State", "StorageFull",
           "StorageUnavailable", "Target", "Transition", "is_disk_full", "new_queue_id",
           "open_spool", "wants_notice"]


if TYPE_CHECKING:
    from .postgres import PostgresSpool


def open_spool(data_dir: Path, url: str = "") -> Spool:
    """The server's spool: the shared queue in PostgreSQL when ``url`` is set (big
    messages' cache files in ``data_dir/bodies``), else SQLite in ``data_dir``.

    psycopg is imported only here, only for a URL: the default install never loads it.
    """
    if url:
        from .postgres import PostgresSpool
        return PostgresSpool(url, data_dir / "bodies")
    return SqliteSpool(data_dir / "spool.sqlite3")


def _backends_implement_the_interface(sqlite: SqliteSpool, memory: MemorySpool,
                                      postgres: PostgresSpool) -> tuple[Spool, Spool, Spool]:
    """Never called: mypy checks here that every backend has every verb."""
    return sqlite, memory, postgres
