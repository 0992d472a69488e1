"""The user store's mailbox cache stays true to the database other processes change."""

from __future__ import annotations

from pathlib import Path

from postroom.users import UserStore


def test_exists_sees_a_mailbox_removed_by_another_process(tmp_path: Path) -> None:
    server_view = UserStore(tmp_path / "users.sqlite3")
    cli_view = UserStore(tmp_path / "users.sqlite3")
    cli_view.add("bob@example.test", "pw")
    assert server_view.exists("bob@example.test")       # now cached
    cli_view.remove("bob@example.test")
    assert not server_view.exists("bob@example.test")   # the WAL changed: cache dropped
    cli_view.add("bob@example.test", "pw")
    assert server_view.exists("bob@example.test")
