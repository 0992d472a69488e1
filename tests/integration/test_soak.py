"""A short soak for CI: bench/soak.py with 600 messages and two kill -9s.

Mixed load (local mailboxes and a smart host, smtp-sink, on loopback) from six sender
threads; the server is killed twice while it receives and delivers, and restarted.
Every id that got its 250 must end up in its mailbox or in the sink, and every
duplicate must come from a delivery in flight at a kill. The long run, with its
options, is ``python3 bench/soak.py`` (see its docstring).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("postroom_bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def test_two_kill_9s_under_mixed_load_lose_no_accepted_message(tmp_path: Path) -> None:
    lines: list[str] = []
    result = soak.run_soak(tmp_path / "server", messages=600, kills=2, senders=6,
                           timeout=150, log=lines.append)
    try:
        report = "\n".join(lines) + "\n" + result.report()
        assert len(result.accepted) >= 600, report
        kinds = result.kinds()
        assert kinds["local"] and kinds["relayed"] and kinds["both"], report
        assert len(result.kills) == 2, report
        # the kills cut the stream off: some attempts were refused or dropped
        assert sum(result.refused.values()) > 0, report
        assert result.left_in_queue == {}, report
        assert result.lost == [], report
        assert result.unexplained == [], report
        # a duplicate is a delivery made but not yet recorded at a kill: its recipient was
        # still queued then, so there can be no more of them than were queued at the kills
        queued = sum(k.queued for k in result.kills)
        assert all(k.queued >= 0 for k in result.kills), report
        assert result.duplicates <= queued + 10, report
        assert result.tracebacks == 0, report
    finally:
        if result.sink_dump is not None:
            shutil.rmtree(result.sink_dump, ignore_errors=True)


def test_the_soak_counts_a_lost_copy_and_an_unexplained_duplicate() -> None:
    """The checker itself can fail: a missing copy is lost, a second copy long before
    any kill is unexplained, one just before a kill is not."""
    now = time.time()
    result = soak.SoakResult(seed=1)
    result.accepted = {"a": ("box0@example.test", soak.RELAYED), "b": (soak.RELAYED,),
                       "c": ("box1@example.test",)}
    result.kills = [soak.KillEvent(at=now, elapsed=1.0, accepted=3, queued=3, in_flight=1,
                                   downtime=0.1)]
    result.copies = {
        ("a", "box0@example.test"): [now - 1.0, now + 2.0],   # in flight at the kill
        # ("a", relay) is missing: lost
        ("b", soak.RELAYED): [now - 100.0, now - 99.0],       # long before the kill
        ("c", "box1@example.test"): [now - 5.0],
    }
    soak._judge(result)
    assert result.lost == [("a", soak.RELAYED)]
    assert result.duplicates == 2
    assert result.unexplained == [("b", soak.RELAYED)]
    assert not result.ok
    assert "RESULT: FAIL" in result.report()
