#!/usr/bin/env python3
"""Refresh the command output in a doc from a run of its demo script.

Usage: scripts/ops-demo.sh > /tmp/ops.txt && scripts/ops-doc.py /tmp/ops.txt
       python3 scripts/seed-demo.py > /tmp/seed.txt &&
           scripts/ops-doc.py /tmp/seed.txt docs/troubleshooting.md
Each fenced block in the doc that starts with "$ <command>" is replaced by the block of
the same command (the same occurrence of it) from the demo's output; the prose stays.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
QUEUE_ID = re.compile(r"[0-9A-F]{18}")


def commands(output: str) -> list[tuple[str, str]]:
    """(command line, whole block) for each "$ " block of the demo's output."""
    out = []
    for chunk in re.split(r"\n(?=\$ )", "\n" + output):
        chunk = chunk.strip("\n")
        if chunk.startswith("$ "):
            lines = [ln for ln in chunk.splitlines() if ln != "reload with a mistake:"]
            out.append((lines[0], "\n".join(lines).rstrip()))
    return out


def key(line: str) -> str:
    """A command line with its queue ids and reason ids blanked, to match runs."""
    line = re.sub(r"127\.0\.0\.20:\d+", "127.0.0.20:PORT", line)    # the seed demo's Postfix
    return re.sub(r"--reason \S+", "--reason R", QUEUE_ID.sub("ID", line))


def main() -> int:
    found = commands(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else DOC
    doc = target.read_text()
    used: dict[str, int] = {}

    def replace(m: re.Match[str]) -> str:
        k = key(m.group(1))
        n = used.get(k, 0)
        matches = [block for line, block in found if key(line) == k]
        if n >= len(matches):
            raise SystemExit(f"the demo's output has no block for {m.group(1)!r}")
        used[k] = n + 1
        return f"```\n{matches[n]}\n```\n"

    target.write_text(re.sub(r"```\n(\$ [^\n]*)\n.*?```\n", replace, doc, flags=re.S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
