"""What `postroom serve` tunes in the interpreter before it forks its front ends."""

from __future__ import annotations

import gc

from postroom.app import GC_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD, 10, 10)
        assert GC_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 1000      # the imports are out of the collector's way
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
