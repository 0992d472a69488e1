"""What every fuzz target shares: the command line, seeds and dictionary for libFuzzer,
and the hypothesis fallback used when atheris is not installed.

A target module defines its checks and calls :func:`main` with them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def write_seeds(corpus: Path, seeds: Iterable[bytes]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for data in seeds:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


def write_dict(path: Path, tokens: Iterable[bytes]) -> None:
    lines = ['"' + "".join(f"\\x{c:02x}" for c in t) + '"' for t in tokens]
    path.write_text("\n".join(lines) + "\n")


def run_fallback(name: str, seconds: float, corpus: Path | None, crashes: Path, *,
                 test_one_input: Callable[[bytes], None], strategy: Any,
                 check: Callable[[Any], None], dump: Callable[[Any], bytes],
                 max_examples: int) -> int:
    """Replay the corpus, then hypothesis-generated inputs until the time is up."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    if corpus is not None and corpus.is_dir():
        for f in sorted(corpus.iterdir()):
            if f.is_file():
                test_one_input(f.read_bytes())
    crashes.mkdir(parents=True, exist_ok=True)
    db = DirectoryBasedExampleDatabase(str(crashes / f".hypothesis-{name}"))

    @settings(max_examples=max_examples, deadline=None, database=db,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(value: Any) -> None:
        try:
            check(value)
        except Exception:
            (crashes / f"{name}-hypothesis-crash").write_bytes(dump(value))  # the last is shrunk
            raise

    end = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < end:
        fuzz()
        runs += max_examples
    print(f"fuzz_{name} (hypothesis): {runs} inputs, no violation")
    return 0


def main(argv: list[str], *, name: str, atheris: Any, test_one_input: Callable[[bytes], None],
         seeds: Callable[[], Iterable[bytes]], tokens: Iterable[bytes],
         fallback: Callable[[float, Path | None, Path], int]) -> int:
    """``--prepare CORPUS DICT``, ``--replay FILE...``, ``--hypothesis [SECONDS]``, or
    libFuzzer's own arguments when atheris is installed."""
    if "--prepare" in argv:
        i = argv.index("--prepare")
        corpus, dict_file = Path(argv[i + 1]), Path(argv[i + 2])
        if not corpus.is_dir() or not any(corpus.iterdir()):
            write_seeds(corpus, seeds())
        write_dict(dict_file, tokens)
        return 0
    if "--replay" in argv:
        for file in argv[argv.index("--replay") + 1:]:
            test_one_input(Path(file).read_bytes())
            print(f"{file}: ok")
        return 0
    if "--hypothesis" in argv or atheris is None:
        if atheris is None and "--hypothesis" not in argv:
            print("atheris is not installed: using the hypothesis fallback", file=sys.stderr)
        seconds = 600.0
        if "--hypothesis" in argv and argv.index("--hypothesis") + 1 < len(argv):
            seconds = float(argv[argv.index("--hypothesis") + 1])
        corpus_dir = Path(argv[argv.index("--corpus") + 1]) if "--corpus" in argv else None
        crashes = Path(os.environ.get("FUZZ_CRASHES", ROOT / "fuzz" / "corpus" / "crashes"))
        return fallback(seconds, corpus_dir, crashes)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0
