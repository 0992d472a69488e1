"""How the console's pages show times, ages and sizes: the templates' filters.

``when`` and ``age`` are the command line's (``postroom.format``), in the console's
style: UTC times, and ages like '2d 3h'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..format import age, when

__all__ = ["FILTERS", "age", "ago", "size", "until", "when"]


def ago(ts: float | None) -> str:
    """'5m ago'; '-' for no time."""
    return "-" if not ts else age(max(0.0, time.time() - ts)) + " ago"


def until(ts: float | None) -> str:
    """'in 5m', or 'now' when it is due; '-' for no time."""
    if not ts:
        return "-"
    d = ts - time.time()
    return "now" if d <= 0 else "in " + age(d)


def size(n: int | None) -> str:
    """'512 B', '1.5 KB', '2.0 MB'; '-' for None."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1048576:.1f} MB"


# the Jinja2 filters, by the names the templates use
FILTERS: dict[str, Callable[..., Any]] = {"when": when, "age": age, "ago": ago,
                                          "until": until, "size": size}
