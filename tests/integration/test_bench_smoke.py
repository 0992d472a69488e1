"""CI runs the benchmark suite once, tiny, as a smoke test: it must run end to end
against both servers. No ratio is asserted: a shared machine is too noisy for that, and
the figures are measured by ``bench/run suite``, never by the tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_suite_runs_against_both_servers(tmp_path: Path) -> None:
    out = tmp_path / "smoke.md"
    cp = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--only", "W1,W2,W6",
         "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    assert "FAILED" not in cp.stdout, cp.stdout[-3000:]
    report = out.read_text()
    for workload in ("W1", "W2", "W6"):
        assert f"## {workload}:" in report, workload
    # every run in every table has a measured figure: a server that did not run shows
    # its error instead of numbers
    rows = [line for line in report.splitlines()
            if re.match(r"\| (Postroom|Postfix) \|", line)]
    assert len(rows) == 6, rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"[\d,]+(\.\d+)?", cells[2]), row        # the seconds column
