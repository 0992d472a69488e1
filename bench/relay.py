"""Relay throughput, Postroom against Postfix, on this machine, in one run (workload W2).

A trusted client (Postfix's smtp-source, one connection per message, 20 at a time)
hands messages to the server, which relays them to Postfix's smtp-sink. The figure is
messages per second from the first connection until the sink has every message.

    bench/run relay [--messages N] [--size BYTES] [--sessions S]

Runs only on loopback; ``bench/run`` puts it in a loopback-only network namespace.
Prints a Markdown table and writes it to bench/results/. ``bench/run suite`` runs the
same measurement as its W2.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402 - bench/ is not a package
    ROOT,
    Meter,
    PostfixServer,
    PostroomServer,
    Sink,
    finish,
    smtp_source,
)


@dataclass
class Result:
    server: str
    messages: int
    seconds: float
    cpu: float
    rss_mb: float
    pss_mb: float = 0.0
    server_cpu: float = 0.0     # the server's processes
    other_cores: float = 0.0    # busy time nothing measured accounts for (other jobs)
    bench_cores: float = 0.0    # this process (the RSS sampler)
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def run_load(port: int, sink: Sink, n: int, size: int, sessions: int,
             pids: Callable[[], list[int]]) -> tuple[Meter, str]:
    """smtp-source against ``port``; returns when the sink has ``n`` messages (at most
    600 s): the meter (seconds, machine CPU seconds, the server's peak RSS and PSS) and
    smtp-source's complaints."""
    with Meter(pids, others=lambda: [sink.proc.pid]) as m:
        src = smtp_source(port, n, size, sessions)
        deadline = time.monotonic() + 600
        while sink.count() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        m.stop()
    err = finish(src)
    m.reaped()
    if sink.count() < n:
        raise RuntimeError(f"sink got {sink.count()} of {n} messages; smtp-source: {err[-500:]}")
    return m, err


def _bench(name: str, server: PostroomServer | PostfixServer, sink: Sink, n: int, size: int,
           sessions: int, notes: list[str] | None = None) -> Result:
    try:
        server.start()
        m, _ = run_load(server.port, sink, n, size, sessions, server.pids)
    finally:
        server.stop()
        sink.stop()
    return Result(name, n, m.seconds, m.cpu, m.peak_rss, m.peak_pss, m.server_cpu,
                  m.other_cores, m.self_cores, *([notes] if notes is not None else []))


def bench_postroom(n: int, size: int, sessions: int) -> Result:
    sink = Sink()
    server = PostroomServer(smarthost=f"127.0.0.1:{sink.port}")
    return _bench("Postroom", server, sink, n, size, sessions, [server.processes_note])


def bench_postfix(n: int, size: int, sessions: int) -> Result:
    sink = Sink()
    server = PostfixServer({"relayhost": f"[127.0.0.1]:{sink.port}"})
    return _bench("Postfix", server, sink, n, size, sessions)


def table(results: list[Result], args: argparse.Namespace) -> str:
    pf = next(r for r in results if r.server == "Postfix")
    lines = [
        f"## W2 relay: smtp-source -s {args.sessions} -m {args.messages} -l {args.size} "
        "→ server → smtp-sink",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "CPU is the whole machine's busy time during the run (server, load generator and "
        "sink alike, and any other job on the machine), per 1,000 messages; server CPU is "
        "the server's processes only; 'unattributed' is the busy time left over, in "
        "cores (other jobs on a shared machine, kernel work charged to no process). Peak "
        "RSS is the sum over the server's processes (shared pages count once per process); "
        "PSS divides shared pages among them.",
        *(f"Postroom: {n}." for r in results for n in r.notes),
        "",
        "| server | msgs/s | CPU s / 1000 msgs | server CPU s / 1000 | unattributed (cores) "
        "| peak RSS (MB) | peak PSS (MB) | ratio to Postfix |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.server} | {r.rate:.0f} | {1000 * r.cpu / r.messages:.2f} | "
                     f"{1000 * r.server_cpu / r.messages:.2f} | {r.other_cores:.2f} | "
                     f"{r.rss_mb:.0f} | {r.pss_mb:.0f} | {r.rate / pf.rate:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--sessions", type=int, default=20)
    args = p.parse_args()
    results = [bench_postroom(args.messages, args.size, args.sessions),
               bench_postfix(args.messages, args.size, args.sessions)]
    text = table(results, args)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "relay.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
