"""Relay throughput, Postroom against Postfix, on this machine, in one run (workload W2).

A trusted client (Postfix's smtp-source, one connection per message, 20 at a time)
hands messages to the server, which relays them to Postfix's smtp-sink. The figure is
messages per second from the first connection until the sink has every message.

    bench/run relay [--messages N] [--size BYTES] [--sessions S]

Runs only on loopback; ``bench/run`` puts it in a loopback-only network namespace.
Prints a Markdown table and writes it to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (all processes), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


class Sink:
    """smtp-sink counting messages; the count is read from its -c output."""

    def __init__(self) -> None:
        self.port = free_port()
        self.out = tempfile.NamedTemporaryFile(prefix="sink-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "256"],
            stdout=self.out, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def count(self) -> int:
        # -c prints "sess=N quit=N mesg=N" after each event, separated by \r
        with open(self.out.name, "rb") as f:
            f.seek(max(0, os.path.getsize(self.out.name) - 200))
            tail = f.read().decode(errors="replace")
        found = re.findall(r"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        os.unlink(self.out.name)


@dataclass
class Result:
    server: str
    messages: int
    seconds: float
    cpu: float
    rss_mb: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def run_load(port: int, sink: Sink, n: int, size: int, sessions: int,
             rss: Callable[[], float]) -> tuple[float, float, float]:
    cpu0 = cpu_busy_seconds()
    t0 = time.monotonic()
    src = subprocess.Popen([SMTP_SOURCE, "-s", str(sessions), "-m", str(n), "-l", str(size),
                            "-f", "sender@example.org", "-t", "rcpt@far.test",
                            f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    peak = 0.0
    deadline = time.monotonic() + 600
    while sink.count() < n and time.monotonic() < deadline:
        peak = max(peak, rss())
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    cpu = cpu_busy_seconds() - cpu0
    src.wait(timeout=60)
    if sink.count() < n:
        raise RuntimeError(f"sink got {sink.count()} of {n} messages")
    return seconds, cpu, peak


def rss_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def postfix_pids(queue: Path) -> list[int]:
    """The instance's master (from its pid file) and every process it started."""
    try:
        master = int((queue / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [master, *(int(p) for p in kids.split())]


def bench_postroom(n: int, size: int, sessions: int) -> Result:
    work = Path(tempfile.mkdtemp(prefix="bench-postroom-"))
    sink = Sink()
    port = free_port()
    (work / "postroom.toml").write_text(textwrap.dedent(f"""\
        hostname = "postroom.bench"
        data_dir = "data"
        [smtp]
        listen = ["127.0.0.1:{port}"]
        submission = []
        max_connections_per_peer = 1000
        [relay]
        trusted_networks = ["127.0.0.0/8"]
        [dns]
        nameservers = ["127.0.0.1:9"]
        [[route]]
        match = "*"
        via = "smarthost"
        host = "127.0.0.1:{sink.port}"
        tls = "none"
        """))
    proc = subprocess.Popen([sys.executable, "-m", "postroom.cli", "serve", "-q", "-c",
                             str(work / "postroom.toml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=work)
    try:
        wait_port(port)
        seconds, cpu, peak = run_load(port, sink, n, size, sessions,
                                      lambda: rss_of([proc.pid]))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    return Result("Postroom", n, seconds, cpu, peak)


def bench_postfix(n: int, size: int, sessions: int) -> Result:
    work = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
    work.chmod(0o755)
    sink = Sink()
    port = free_port()
    etc, queue, data = work / "etc", work / "queue", work / "data"
    for d in (etc, queue, data):
        d.mkdir()
    shutil.chown(data, "postfix")
    shutil.copy("/etc/postfix/master.cf", etc / "master.cf")
    (etc / "main.cf").write_text(textwrap.dedent(f"""\
        compatibility_level = 3.6
        queue_directory = {queue}
        data_directory = {data}
        myhostname = postfix.bench
        mydestination =
        inet_interfaces = 127.0.0.1
        inet_protocols = ipv4
        mynetworks = 127.0.0.0/8
        smtpd_peername_lookup = no
        smtp_dns_support_level = disabled
        relayhost = [127.0.0.1]:{sink.port}
        maillog_file = {work}/maillog
        maillog_file_prefixes = {work}
        alias_maps =
        alias_database =
        biff = no
        default_process_limit = 100
        """))
    pc = [POSTCONF, "-c", str(etc)]
    subprocess.run([*pc, "-F", "*/*/chroot = n"], check=True)
    subprocess.run([*pc, "-M#", "smtp/inet"], check=True)
    subprocess.run([*pc, "-M", f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd"],
                   check=True)
    current = subprocess.run([POSTCONF, "-h", "alternate_config_directories"],
                             capture_output=True, text=True).stdout.split()
    subprocess.run([POSTCONF, "-e", "alternate_config_directories = "
                    + " ".join([*current[-20:], str(etc)])], check=True)
    subprocess.run([POSTFIX, "-c", str(etc), "start"], check=True, capture_output=True)
    try:
        wait_port(port)
        seconds, cpu, peak = run_load(port, sink, n, size, sessions,
                                      lambda: rss_of(postfix_pids(queue)))
    finally:
        subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True)
        sink.stop()
        time.sleep(1)
        shutil.rmtree(work, ignore_errors=True)
    return Result("Postfix", n, seconds, cpu, peak)


def table(results: list[Result], args: argparse.Namespace) -> str:
    pf = next(r for r in results if r.server == "Postfix")
    lines = [
        f"## W2 relay: smtp-source -s {args.sessions} -m {args.messages} -l {args.size} "
        "→ server → smtp-sink",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "CPU is the whole machine's busy time during the run (server, load generator and "
        "sink alike), per 1,000 messages.",
        "",
        "| server | msgs/s | CPU s / 1000 msgs | peak RSS (MB) | ratio to Postfix |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.server} | {r.rate:.0f} | {1000 * r.cpu / r.messages:.2f} | "
                     f"{r.rss_mb:.0f} | {r.rate / pf.rate:.2f}× |")
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
