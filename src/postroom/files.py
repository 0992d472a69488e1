"""Replacing a small file atomically and durably (the config, the IMAP passwd-file)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(target: Path, text: str, mode: int) -> None:
    """Replace ``target`` with ``text`` (UTF-8): written to a temporary file beside it
    (``mode``, made afresh: a crash's leftover is removed first, whatever its mode), made
    durable, renamed over ``target``, and the folder synced. A reader sees the old file
    or the new one, never a part."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w",
                       encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
