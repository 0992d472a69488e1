"""This process's id without a system call: read once, and again in a forked child.

``os.getpid()`` is a system call (about 2 us on this VM); code on a hot path that only
needs to notice a fork (Maildir file names, prometheus-client's per-process files, the
syncer's AIO context) reads :func:`process_id` instead.
"""

from __future__ import annotations

import os

__all__ = ["process_id"]

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    return _pid
