"""How times and ages read, for the command line (``ctl``) and the web console alike.

Standard library only: the command line imports it without loading the console.
"""

from __future__ import annotations

import datetime
import time

__all__ = ["age", "when"]

_UNITS = (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1))


def age(seconds: float | None, *, compact: bool = False) -> str:
    """A duration in its two largest units: '2d 3h', '5m', '42s' (the second left out when
    it is zero). ``compact``, for the command line's columns: always both, no space
    ('2d3h', '5m0s'). '-' for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    for unit, size, sub_unit, sub in _UNITS:
        if s >= size:
            rest = (s % size) // sub
            if compact:
                return f"{s // size}{unit}{rest}{sub_unit}"
            return f"{s // size}{unit}" + (f" {rest}{sub_unit}" if rest else "")
    return f"{s}s"


def when(ts: float | None, *, local: bool = False) -> str:
    """A Unix time as '2024-05-01 12:00:00Z' in UTC, or with ``local`` (the command line)
    in the local time zone without the Z. '-' for None (in UTC also for 0: never)."""
    if local:
        if ts is None:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
