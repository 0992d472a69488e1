"""Soak test: kill -9 the server at random moments under load; count every accepted id.

    python3 bench/soak.py [--messages 20000] [--kills 5] [--senders 8] [--seed N]
                          [--timeout 1200] [--keep]

Not part of CI (tests/integration/test_soak.py runs a short version of it). Needs root:
it re-executes itself in a loopback-only network namespace
(``unshare -n sh -c 'ip link set lo up && exec ...'``) unless it is already in one.

What it does:

1. Starts ``postroom serve`` (the tests' ServerProcess) with four local mailboxes and a
   smart-host route for ``relay.test`` to Postfix's smtp-sink on loopback, which writes
   every message it takes to a file (``smtp-sink -d``).
2. ``--senders`` threads send ``--messages`` messages over persistent SMTP connections,
   each with a unique ``X-Soak-Id`` header and a last body line ``soak-end <id>`` (a
   copy without it is partial, never counted). Each message goes to a local mailbox, to
   a relayed address, or to both. An id counts as accepted only once its 250 to the end
   of DATA is in hand; an attempt cut off or refused is counted as refused, and is sent
   again under a new id (so an unacknowledged copy is never taken for a duplicate).
3. ``--kills`` times, at random points of the stream, the server gets SIGKILL. The
   queue manager converts and delivers all along, locally and to the sink; each kill
   waits (at most 3 s) for a moment when the spool shows outbound recipients leased to
   a delivery in flight, so every kill lands during deliveries as well as receptions.
   After each kill it waits a random moment (senders meanwhile see refused
   connections), then starts the server again.
4. After the last restart it waits (bounded) until the spool's queues are empty, then
   reads every Maildir and every sink file. Reported:

   - **lost**: an accepted (id, destination) with no complete copy. Must be 0.
   - **duplicates**: extra copies. Allowed only for deliveries in flight at a kill: the
     first copy must have been written at most ``DUPLICATE_WINDOW`` seconds before a
     kill; any other duplicate is *unexplained*, a failure.
   - **refused during kills**: attempts that got no 250 (connection refused, cut off,
     or a 4xx/5xx), and how many of those were delivered anyway (committed before the
     kill, the 250 never arrived: allowed, SMTP cannot avoid it).

Exit status: 0 when nothing was lost and every duplicate is explained; 1 otherwise;
2 when the harness itself could not run (server would not start, time ran out).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import smtplib
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess  # noqa: E402  (after the path is set)
from tests.integration.peers import Sink  # noqa: E402

LOCAL_BOXES = tuple(f"box{i}@example.test" for i in range(4))
RELAY_DOMAIN = "relay.test"
SENDER = "soak@example.test"
RELAYED = "relay"                  # the destination name for a copy in the sink
DUPLICATE_WINDOW = 30.0            # seconds between a copy written and the kill that
                                   # kept its delivery from being recorded


class HarnessError(Exception):
    """The soak could not run to the end (not a finding about the server)."""


@dataclass
class KillEvent:
    at: float                      # wall clock (file mtimes are compared with it)
    elapsed: float
    accepted: int
    queued: int                    # recipients in conversion or delivery at the kill
    in_flight: int                 # outbound recipients leased to a delivery
    downtime: float


@dataclass
class SoakResult:
    seed: int
    accepted: dict[str, tuple[str, ...]] = field(default_factory=dict)   # id -> destinations
    attempts: int = 0
    refused: Counter[str] = field(default_factory=Counter)              # kind -> count
    unacknowledged: set[str] = field(default_factory=set)               # ids without a 250
    kills: list[KillEvent] = field(default_factory=list)
    copies: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # -> mtimes
    partial_copies: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    unexplained: list[tuple[str, str]] = field(default_factory=list)
    unacknowledged_delivered: int = 0
    left_in_queue: dict[str, int] = field(default_factory=dict)
    tracebacks: int = 0
    send_seconds: float = 0.0
    drain_seconds: float = 0.0
    total_seconds: float = 0.0
    workdir: Path | None = None
    sink_dump: Path | None = None

    @property
    def owed(self) -> int:
        return sum(len(d) for d in self.accepted.values())

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexplained

    def kinds(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for dests in self.accepted.values():
            out["both" if len(dests) == 2 else "local" if dests[0] != RELAYED else "relayed"] += 1
        return out

    def report(self) -> str:
        kinds = self.kinds()
        lines = [
            f"seed {self.seed}: {len(self.accepted)} messages accepted ({kinds['local']} local, "
            f"{kinds['relayed']} relayed, {kinds['both']} both), {self.owed} deliveries owed, "
            f"{self.attempts} attempts",
        ]
        for n, k in enumerate(self.kills, 1):
            lines.append(f"kill {n} at {k.elapsed:6.1f}s: {k.accepted} accepted so far, "
                         f"{k.queued} recipients queued ({k.in_flight} outbound in flight), "
                         f"down {k.downtime:.2f}s")
        refused = sum(self.refused.values())
        kinds_text = ", ".join(f"{kind} {n}" for kind, n in self.refused.most_common())
        lines.append(f"refused during kills: {refused}" + (f" ({kinds_text})" if refused else "")
                     + f"; {self.unacknowledged_delivered} of them delivered anyway "
                     "(committed, the 250 never arrived)")
        local = sum(1 for (_, d) in self.copies if d != RELAYED)
        relayed = sum(1 for (_, d) in self.copies if d == RELAYED)
        lines.append(f"copies found: {local} in mailboxes, {relayed} in the sink; "
                     f"{self.partial_copies} partial sink files (cut off mid-DATA, not counted)")
        lines.append(f"lost: {len(self.lost)}" + (
            f"  e.g. {', '.join(f'{i}->{d}' for i, d in self.lost[:8])}" if self.lost else ""))
        queued = sum(k.queued for k in self.kills)
        lines.append(f"duplicates: {self.duplicates}, of {queued} recipients queued at the kills "
                     f"({len(self.unexplained)} unexplained: "
                     f"first copy not within {DUPLICATE_WINDOW:g}s before a kill)" + (
                         f"  e.g. {', '.join(f'{i}->{d}' for i, d in self.unexplained[:8])}"
                         if self.unexplained else ""))
        if any(self.left_in_queue.values()):
            lines.append(f"still queued at the end: {self.left_in_queue}")
        if self.tracebacks:
            lines.append(f"tracebacks in the server log: {self.tracebacks}")
        lines.append(f"time: sending {self.send_seconds:.1f}s, draining {self.drain_seconds:.1f}s,"
                     f" total {self.total_seconds:.1f}s")
        lines.append("RESULT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


# --- the server and the sink --------------------------------------------------------

def _server(workdir: Path, sink_port: int) -> ServerProcess:
    sp = ServerProcess(workdir, f"""
        [delivery]
        retry = ["1s"]
        connect_timeout = "2s"
        command_timeout = "10s"
        [[route]]
        match = "{RELAY_DOMAIN}"
        via = "smarthost"
        host = "127.0.0.1:{sink_port}"
        tls = "none"
        """)
    for box in LOCAL_BOXES:
        sp.add_user(box)
    return sp


def _spool_counts(sp: ServerProcess) -> tuple[int, int]:
    """(recipients queued, outbound recipients leased), read straight from the spool;
    (-1, -1) when it cannot be read."""
    path = sp.data / "spool.sqlite3"
    for _ in range(3):
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
            try:
                queued, leased = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(lease_until > 0 AND direction = 'outbound'), 0) "
                    "FROM recipients WHERE state IN ('conversion', 'delivery')").fetchone()
            finally:
                conn.close()
            return int(queued), int(leased)
        except sqlite3.Error:
            time.sleep(0.01)
    return -1, -1


# --- senders ------------------------------------------------------------------------

class _Senders:
    def __init__(self, sp: ServerProcess, target: int, count: int, seed: int,
                 result: SoakResult, deadline: float) -> None:
        self.sp = sp
        self.target = target
        self.count = count
        self.seed = seed
        self.result = result
        self.deadline = deadline
        self.lock = threading.Lock()
        self.accepted_count = 0
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), name=f"sender-{n}",
                                         daemon=True) for n in range(count)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _message(self, rng: random.Random, uid: str) -> tuple[list[str], bytes, tuple[str, ...]]:
        kind = rng.random()
        box = rng.choice(LOCAL_BOXES)
        relay = f"r{rng.randrange(20)}@{RELAY_DOMAIN}"
        if kind < 1 / 3:
            rcpts, dests = [box], (box,)
        elif kind < 2 / 3:
            rcpts, dests = [relay], (RELAYED,)
        else:
            rcpts, dests = [box, relay], (box, RELAYED)
        # mostly small; now and then ~100 KB, so some kills land in the middle of a DATA
        filler = rng.choice((0, 2, 10, 40)) if rng.random() > 0.02 else 1300
        body = "".join(f"{uid} line {i:05d} " + "z" * 60 + "\r\n" for i in range(filler))
        data = (f"From: <{SENDER}>\r\nTo: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
                f"Subject: soak {uid}\r\nMessage-ID: <{uid}@soak.test>\r\nX-Soak-Id: {uid}\r\n"
                f"\r\nhello {uid}\r\n{body}soak-end {uid}\r\n").encode()
        return rcpts, data, dests

    def _run(self, n: int) -> None:
        rng = random.Random(f"{self.seed}-{n}")
        client: smtplib.SMTP | None = None
        seq = 0
        try:
            while time.monotonic() < self.deadline:
                with self.lock:
                    if self.accepted_count >= self.target:
                        break
                uid = f"s{n}-{seq}"
                seq += 1
                rcpts, data, dests = self._message(rng, uid)
                with self.lock:
                    self.result.attempts += 1
                try:
                    if client is None:
                        client = smtplib.SMTP("127.0.0.1", self.sp.mx_port,
                                              local_hostname="soak.test", timeout=60)
                    refused = client.sendmail(SENDER, rcpts, data)
                except (smtplib.SMTPException, OSError) as exc:
                    self._refused(uid, exc)
                    if client is not None:
                        try:
                            client.close()
                        except OSError:
                            pass
                    client = None
                    time.sleep(rng.uniform(0.02, 0.1))
                    continue
                kept = tuple(d for d, r in zip(dests, rcpts, strict=True) if r not in refused)
                with self.lock:
                    if kept:
                        self.result.accepted[uid] = kept
                        self.accepted_count += 1
                    if refused:
                        self.result.refused["recipient refused"] += len(refused)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.errors.append(exc)
        finally:
            if client is not None:
                try:
                    client.quit()
                except (smtplib.SMTPException, OSError):
                    client.close()

    def _refused(self, uid: str, exc: BaseException) -> None:
        if isinstance(exc, ConnectionRefusedError):
            kind = "connection refused"
        elif isinstance(exc, smtplib.SMTPResponseException):
            kind = f"{exc.smtp_code} reply"
        elif isinstance(exc, smtplib.SMTPRecipientsRefused):
            codes = {code for code, _ in exc.recipients.values()}
            kind = "RCPT " + "/".join(map(str, sorted(codes)))
        elif isinstance(exc, smtplib.SMTPServerDisconnected | ConnectionResetError |
                        BrokenPipeError):
            kind = "cut off"
        elif isinstance(exc, TimeoutError):
            kind = "timed out"
        else:
            kind = exc.__class__.__name__
        with self.lock:
            self.result.refused[kind] += 1
            self.result.unacknowledged.add(uid)


# --- counting copies ----------------------------------------------------------------

def _parse(data: bytes) -> tuple[str | None, bool]:
    """(X-Soak-Id, complete) of one stored copy."""
    uid = None
    head = data.split(b"\n\n", 1)[0] if b"\n\n" in data else data
    for line in head.split(b"\n"):
        if line.startswith(b"X-Soak-Id: "):
            uid = line[11:].strip().decode()
    if uid is None:
        return None, False
    return uid, f"\nsoak-end {uid}\n".encode() in data


def _count_copies(sp: ServerProcess, sink: Sink, result: SoakResult) -> None:
    copies: dict[tuple[str, str], list[float]] = defaultdict(list)
    for box in LOCAL_BOXES:
        local, _, domain = box.rpartition("@")
        for sub in ("new", "cur"):
            folder = sp.data / "mail" / domain / local / sub
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                uid, complete = _parse(p.read_bytes())
                if uid is not None and complete:
                    copies[(uid, box)].append(p.stat().st_mtime)
    for p in sink.dump.iterdir():
        if not p.is_file():
            continue
        uid, complete = _parse(p.read_bytes())
        if uid is None:
            continue
        if complete:
            copies[(uid, RELAYED)].append(p.stat().st_mtime)
        else:
            result.partial_copies += 1
    result.copies = dict(copies)


def _judge(result: SoakResult) -> None:
    kill_times = [k.at for k in result.kills]
    for uid, dests in result.accepted.items():
        for dest in dests:
            if not result.copies.get((uid, dest)):
                result.lost.append((uid, dest))
    for key, mtimes in result.copies.items():
        if len(mtimes) < 2:
            continue
        result.duplicates += len(mtimes) - 1
        first, *later = sorted(mtimes)
        explained = any(k - DUPLICATE_WINDOW <= first <= k + 0.5 and max(later) >= k - 0.5
                        for k in kill_times)
        if not explained:
            result.unexplained.append(key)
    result.lost.sort()
    result.unexplained.sort()
    result.unacknowledged_delivered = sum(
        1 for uid in result.unacknowledged
        if any((uid, d) in result.copies for d in (*LOCAL_BOXES, RELAYED)))


# --- the run ------------------------------------------------------------------------

def run_soak(workdir: Path, *, messages: int, kills: int, senders: int = 8,
             seed: int | None = None, timeout: float = 1200.0,
             log: Callable[[str], None] = print) -> SoakResult:
    """Run one soak in ``workdir``; return what was counted (``result.ok`` says PASS)."""
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    result = SoakResult(seed)
    started = time.monotonic()
    deadline = started + timeout
    sink = Sink("127.0.0.1").start()
    sp = _server(workdir, sink.port)
    result.workdir, result.sink_dump = workdir, sink.dump
    try:
        sp.start()
        log(f"soak: {messages} messages, {senders} senders, {kills} kills, seed {seed}, "
            f"server {sp.workdir}, sink {sink.dump}")
        # at random points of the stream, each at a moment when the spool shows an
        # outbound delivery in flight (so the kill lands in the middle of deliveries)
        at = sorted(rng.uniform(0.05, 0.95) * messages for _ in range(kills))
        send_deadline = started + timeout * 0.6
        crowd = _Senders(sp, messages, senders, seed, result, send_deadline)
        crowd.start()
        for threshold in at:
            while crowd.accepted_count < threshold and time.monotonic() < send_deadline:
                if not any(t.is_alive() for t in crowd.threads):
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.3))
            busy_until = time.monotonic() + 3.0
            queued, in_flight = _spool_counts(sp)
            while in_flight <= 0 and time.monotonic() < busy_until:
                time.sleep(0.002)
                queued, in_flight = _spool_counts(sp)
            when, elapsed = time.time(), time.monotonic() - started
            sp.kill9()
            down = rng.uniform(0.05, 1.0)
            time.sleep(down)
            result.kills.append(KillEvent(when, elapsed, crowd.accepted_count, queued,
                                          in_flight, down))
            log(f"kill {len(result.kills)} at {elapsed:.1f}s ({crowd.accepted_count} accepted, "
                f"{queued} recipients queued, {in_flight} outbound in flight)")
            try:
                sp.start()
            except AssertionError as exc:
                raise HarnessError(f"the server did not restart: {exc}") from None
        if not crowd.join(max(1.0, send_deadline - time.monotonic() + 60)):
            raise HarnessError("the senders did not finish in time")
        if crowd.errors:
            raise HarnessError(f"a sender thread crashed: {crowd.errors[0]!r}")
        if crowd.accepted_count < messages:
            raise HarnessError(f"only {crowd.accepted_count} of {messages} accepted in time")
        result.send_seconds = time.monotonic() - started
        drained_at = time.monotonic()
        queues = sp.queue()
        while any(q["recipients"] for q in queues.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            queues = sp.queue()
        result.left_in_queue = {name: int(q["recipients"]) for name, q in queues.items()
                                if q["recipients"]}
        result.drain_seconds = time.monotonic() - drained_at
        time.sleep(0.5)                   # the sink closes its files after the 250
        _count_copies(sp, sink, result)
        _judge(result)
        result.tracebacks = sp.log_text().count("Traceback")
    finally:
        sp.stop()
        sink.stop()
    result.total_seconds = time.monotonic() - started
    return result


# --- isolation ----------------------------------------------------------------------

def _loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _reexec_isolated() -> None:
    """Run this script again inside a new, loopback-only network namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        sys.exit("bench/soak.py needs root and unshare to make a loopback-only network "
                 "namespace (or run it inside one)")
    script = 'ip link set lo up && exec "$0" "$@"'
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", script, sys.executable,
                          str(Path(__file__).resolve()), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="upper bound on the whole run, in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not _loopback_only():
        _reexec_isolated()
    for tool in ("smtp-sink",):
        if shutil.which(tool, path="/usr/sbin:/usr/bin") is None:
            sys.exit(f"{tool} is missing (apt-get install postfix)")
    workdir = Path(tempfile.mkdtemp(prefix="postroom-soak-"))
    try:
        result = run_soak(workdir / "server", messages=args.messages, kills=args.kills,
                          senders=args.senders, seed=args.seed, timeout=args.timeout)
    except HarnessError as exc:
        print(f"soak could not finish: {exc}\n(work directory kept: {workdir})",
              file=sys.stderr)
        return 2
    print(result.report())
    if args.keep or not result.ok:
        print(f"work directory kept: {workdir}; sink files: {result.sink_dump}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        if result.sink_dump is not None:
            shutil.rmtree(result.sink_dump, ignore_errors=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
