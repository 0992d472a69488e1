"""The main process's accept balancing (app.should_pause): a pure rule over CPU shares."""

from __future__ import annotations

import os

import pytest

from postroom.app import _cpu_seconds, should_pause


@pytest.mark.parametrize(("accepting", "share", "busiest", "pause"), [
    (True, 0.9, -1.0, False),    # no live front end: always accept
    (False, 0.9, -1.0, False),
    (True, 0.9, 0.3, True),      # clearly the busier one: stop
    (True, 0.9, 0.7, False),     # busier, but not clearly
    (True, 0.1, 0.0, False),     # idle: never worth stopping for
    (False, 0.8, 0.6, True),     # stopped, still the busier one: stay stopped
    (False, 0.5, 0.6, False),    # stopped, now the lighter one: accept again
])
def test_main_stops_accepting_while_clearly_busier(accepting: bool, share: float, busiest: float,
                                                   pause: bool) -> None:
    assert should_pause(accepting, share, busiest) is pause


def test_cpu_seconds_reads_a_live_process_and_not_a_missing_one() -> None:
    mine = _cpu_seconds(os.getpid())
    assert mine is not None and mine >= 0
    assert _cpu_seconds(2 ** 22 + 12345) is None        # above pid_max's default
