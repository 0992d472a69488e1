"""The benchmark suite: Postroom against Postfix, same machine, same run, same loads.

    bench/run suite [--quick] [--only W1,W3] [--out FILE]

W1 inbound to a Maildir, W1v the same with signed mail that Postroom verifies (SPF, DKIM,
DMARC against a private dnsmasq), W2 relay to smtp-sink, W3 acceptance with the
destination down (latency from the client below), W4 the queue summary with a deep
queue, W5 idle connections (and W3 meanwhile), W6 big messages, W7 two nodes on one
PostgreSQL queue. ``bench/run`` runs it inside a loopback-only network namespace; both
servers listen on their own 127.0.0.1 ports, with no chroot and no DNS (but W1v's).
Writes docs/benchmarks.md and docs/benchmarks.png (with --only:
bench/results/suite-partial.md), and bench/results/suite.json with the raw figures.

Two helper modes run in their own process: ``suite.py _client`` is the W3 load
generator (asyncio, no pipelining, N sessions, one connection per message, timing each
final "." to its reply), ``suite.py _fill`` fills a stopped Postroom's spool (W4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import relay  # noqa: E402 - bench/ is not a package
from common import (  # noqa: E402
    KEEP,
    POSTCONF,
    ROOT,
    Meter,
    PostfixServer,
    PostroomServer,
    Sink,
    children_cpu,
    closed_port,
    count_files,
    count_tree,
    cpu_busy_seconds,
    descendants,
    finish,
    postfix_version,
    postroom_processes_setting,
    pss_of,
    quiet_files,
    quiet_machine,
    raise_nofile,
    rss_of,
    smtp_source,
    smtp_source_command,
    tree_cpu,
    wait_until,
)

SIZES = {   # the --quick figures, then the full ones
    "w1": (1000, 5000), "w2": (1000, 5000), "w3": (1000, 5000), "w4": (10_000, 100_000),
    "w5": (500, 2000), "w5_msgs": (500, 2000), "w6": (3, 10), "w7": (1000, 5000),
    "w1v": (1000, 5000),
}
SIZE = 4096            # message payload, as in `smtp-source -l 4096`
SESSIONS = 20
BIG = 20 * 1024 * 1024
BIG_LIMIT = 30 * 1024 * 1024
DOMAIN, USER = "bench.test", "user"
MAILBOX = f"{USER}@{DOMAIN}"
IDLE_PER_ADDRESS = 25  # W5: idle connections per 127.0.1.x source address
TIMEOUT = 600          # the longest any one wait may last, in seconds


# --- results -------------------------------------------------------------------------
@dataclass
class Run:
    """One server's figures in one workload."""

    server: str
    messages: int = 0
    seconds: float = 0.0        # the timed part
    cpu: float = 0.0            # machine busy CPU seconds in the timed part (/proc/stat)
    server_cpu: float = 0.0     # CPU seconds of the server's own processes
    other_cores: float = 0.0    # busy time nothing measured accounts for, in cores
    rss_mb: float = 0.0         # peak RSS, summed over the server's processes
    pss_mb: float = 0.0         # peak PSS (shared pages divided among the processes)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu / self.messages if self.messages else 0.0

    @property
    def server_cpu_per_1000(self) -> float:
        return 1000 * self.server_cpu / self.messages if self.messages else 0.0

    def metered(self, m: Meter) -> Run:
        self.cpu, self.server_cpu, self.other_cores = m.cpu, m.server_cpu, m.other_cores
        self.rss_mb, self.pss_mb = m.peak_rss, m.peak_pss
        self.extra["bench_cores"] = m.self_cores
        return self


@dataclass
class Headline:
    """One row of the summary: a figure for each server, and the target if any."""

    label: str
    unit: str
    postroom: float | None
    postfix: float | None
    higher_better: bool
    target: str = ""
    met: bool | None = None
    chart: bool = True

    @property
    def ratio(self) -> float | None:
        if self.postroom is None or not self.postfix:
            return None
        return self.postroom / self.postfix


@dataclass
class Workload:
    key: str
    title: str
    commands: list[str]
    runs: list[Run]
    columns: list[tuple[str, str, str]]       # (header, Run attribute or extra key, format)
    headlines: list[Headline]
    notes: list[str] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)

    def run(self, server: str) -> Run:
        return next(r for r in self.runs if r.server == server)


def guarded(server: str, fn: Callable[[], Run]) -> Run:
    """A server's run; a failure is recorded and reported, not raised."""
    busy = quiet_machine(QUIET_WAIT[0])
    create = quiet_files(FILES_WAIT[0], FILES_LIMIT_US)
    FILES_WAIT[0] = FILES_WAIT[1]       # after the first run: the suite itself removed none
    print(f"  {server} (machine busy before: {busy:.2f} cores, a file created in "
          f"{create:.0f} us) ...", flush=True)
    t0 = time.monotonic()
    try:
        run = fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        run = Run(server, error=f"{type(exc).__name__}: {exc}"[:400])
    run.extra["busy_before"] = busy
    run.extra["create_us_before"] = create
    print(f"  {server} done in {time.monotonic() - t0:.1f}s"
          + (f" FAILED: {run.error}" if run.error else ""), flush=True)
    return run


RUN_FIGURES = ("rate", "cpu_per_1000", "rss_mb", "pss_mb", "seconds", "messages", "cpu",
               "server_cpu", "server_cpu_per_1000", "other_cores")
QUIET_WAIT = [5.0]     # seconds to wait for other jobs before each run (set by main)
# seconds to wait for file creation to be cheap again (common.discard): long before the
# first run (another suite's folders removed minutes ago), short later
FILES_WAIT = [420.0, 60.0]      # (before the next run, before the ones after it)
FILES_LIMIT_US = 40.0  # a quiet file system creates one in about 15-30 us here


def figure(run: Run, attr: str) -> float | None:
    if run.error:
        return None
    value = getattr(run, attr, None) if attr in RUN_FIGURES else run.extra.get(attr)
    return float(value) if isinstance(value, int | float) else None


def ratio_target(label: str, wl_runs: list[Run], attr: str, factor: float | None,
                 unit: str = "msgs/s", higher_better: bool = True) -> Headline:
    pr, pf = (figure(next(r for r in wl_runs if r.server == s), attr)
              for s in ("Postroom", "Postfix"))
    h = Headline(label, unit, pr, pf, higher_better)
    if factor is not None:
        h.target = f"≥ {factor:g}× Postfix"
        h.met = None if h.ratio is None else h.ratio >= factor
    return h


def absolute_target(label: str, wl_runs: list[Run], attr: str, unit: str, limit: float | None,
                    higher_better: bool = False) -> Headline:
    pr, pf = (figure(next(r for r in wl_runs if r.server == s), attr)
              for s in ("Postroom", "Postfix"))
    h = Headline(label, unit, pr, pf, higher_better)
    if limit is not None:
        h.target = f"Postroom < {limit:g} {unit}"
        h.met = None if pr is None else pr < limit
    return h


def server_cpu_row(key: str, wl_runs: list[Run]) -> Headline:
    """The server's own CPU per 1,000 messages: steadier than msgs/s on a busy machine."""
    h = absolute_target(f"{key} server CPU", wl_runs, "server_cpu_per_1000", "s / 1000 msgs",
                        None)
    h.chart = False
    return h


# --- shared steps --------------------------------------------------------------------
def postroom_inbound(smtp: dict[str, object] | None = None) -> PostroomServer:
    server = PostroomServer(domains=(DOMAIN,), smtp=smtp)
    server.add_user(MAILBOX)
    return server


def postfix_inbound(size_limit: int) -> PostfixServer:
    server = PostfixServer()
    server.configure(PostfixServer.maildir_settings(server.vmail(), DOMAIN, USER, size_limit))
    return server


def source_until(server: PostroomServer | PostfixServer, n: int, size: int, sessions: int,
                 to: str, delivered: Callable[[], int], name: str,
                 interval: float = 0.05, sample: float = 0.1) -> Run:
    """smtp-source to ``to``; the timed part ends when ``delivered()`` reaches ``n``
    (polled every ``interval`` s; RSS sampled every ``sample`` s)."""
    with Meter(server.pids, sample) as m:
        src = smtp_source(server.port, n, size, sessions, to=to)
        wait_until(lambda: delivered() >= n, TIMEOUT, interval)
        m.stop()
    err = finish(src)
    m.reaped()
    got = delivered()
    if got < n:
        raise RuntimeError(f"{got} of {n} messages arrived; smtp-source: {err[-300:]}")
    return Run(name, n, m.seconds).metered(m)


def client_command(port: int, messages: int, sessions: int, size: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_client", "--port", str(port),
            "--messages", str(messages), "--sessions", str(sessions), "--size", str(size)]


def w3_load(server: PostroomServer | PostfixServer, messages: int, name: str,
            interval: float = 0.1, pss: bool = True, refresh: float = 0.5) -> Run:
    """The W3 client against ``server``; msgs/s of 250 replies and their latency."""
    with Meter(server.pids, interval, pss, refresh=refresh) as m:
        done = subprocess.run(client_command(server.port, messages, SESSIONS, SIZE),
                              capture_output=True, text=True, timeout=TIMEOUT + 60)
        m.stop()
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stderr.strip()[-400:]}")
    out = json.loads(done.stdout)
    if out["ok"] == 0:
        raise RuntimeError(f"no message accepted: {out['first_errors']}")
    run = Run(name, out["ok"], out["seconds"]).metered(m)
    run.extra.update(p50_ms=1000 * out["p50"], p99_ms=1000 * out["p99"],
                     errors=out["errors"], first_errors=out["first_errors"])
    if out["errors"]:
        run.extra["note"] = f"{out['errors']} sessions failed: {out['first_errors'][:2]}"
    return run


# --- W1 ------------------------------------------------------------------------------
def w1(n: int) -> Workload:
    def postroom() -> Run:
        server = postroom_inbound()
        try:
            server.start()
            new = server.maildir_new(DOMAIN, USER)
            return source_until(server, n, SIZE, SESSIONS, MAILBOX, lambda: count_files(new),
                                "Postroom")
        finally:
            server.stop()

    def postfix() -> Run:
        server = postfix_inbound(51200000)
        try:
            server.start()
            new = server.work / "vmail" / DOMAIN / USER / "new"
            return source_until(server, n, SIZE, SESSIONS, MAILBOX, lambda: count_files(new),
                                "Postfix")
        finally:
            server.stop()

    runs = [guarded("Postroom", postroom), guarded("Postfix", postfix)]
    return Workload(
        "W1", "inbound to a local Maildir",
        [smtp_source_command(n, SIZE, SESSIONS, MAILBOX)], runs, STANDARD_COLUMNS,
        [ratio_target("W1 inbound to Maildir", runs, "rate", 1.5), server_cpu_row("W1", runs)],
        ["Timed from the first connection until every message is a file in the mailbox's "
         "`new/` folder. Postroom: `postroom users add user@bench.test`, Maildir under "
         "`data/mail/bench.test/user/`. Postfix: `virtual_mailbox_domains = bench.test`, "
         "`virtual_mailbox_maps = static:bench.test/user/`, uid/gid `static:65534`."])


# --- W1v -----------------------------------------------------------------------------
SENDER_DOMAIN = "sender.example"
SENDER = f"bounce@{SENDER_DOMAIN}"
SENDER_HELO = f"mail.{SENDER_DOMAIN}"
SELECTOR = "bench"
AUTHSERV = "postroom.bench"       # PostroomServer's hostname: the header's authserv-id
WARM_UP = SESSIONS                # W1v: messages sent before the timed part
SPF_RECORD = "v=spf1 ip4:127.0.0.0/8 -all"
DMARC_RECORD = "v=DMARC1; p=reject"


def txt_option(name: str, text: str) -> str:
    """dnsmasq's ``--txt-record``: the text in strings of at most 250 characters (a DNS
    string holds 255), separated by commas on dnsmasq's command line."""
    if "," in text:
        raise ValueError(f"a comma in {text!r}: dnsmasq would split the string there")
    return f"--txt-record={name}," + ",".join(text[i:i + 250] for i in range(0, len(text), 250))


def signed_message(key: Any) -> bytes:
    """W1v's message: a 4096-byte body as W1's, From: a user of the sender domain,
    signed once by Postroom's own DKIM signer (rsa-sha256, relaxed/relaxed)."""
    from email.utils import formatdate

    from postroom.mailauth.keys import algorithm_of
    from postroom.mailauth.sign import LoadedKey, Signer

    line = b"x" * 76 + b"\r\n"
    body = line * (SIZE // len(line))
    if SIZE - len(body) >= 3:
        body += b"x" * (SIZE - len(body) - 2) + b"\r\n"
    head = (f"From: <user@{SENDER_DOMAIN}>\r\nTo: <{MAILBOX}>\r\nSubject: bench W1v\r\n"
            f"Date: {formatdate()}\r\nMessage-ID: <w1v@{SENDER_DOMAIN}>\r\n").encode()
    signer = Signer([LoadedKey(SENDER_DOMAIN, SELECTOR, key, algorithm_of(key))])
    signature = signer.sign(head, [body], time.time())
    if not signature:
        raise RuntimeError("Postroom's signer made no DKIM-Signature for the W1v message")
    return signature + head + b"\r\n" + body


def _client_result(proc: subprocess.Popen[str], expected: int) -> dict[str, Any]:
    """The client's JSON; an error unless it had ``expected`` 250 replies."""
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError("the client did not finish (waited 120 s)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {stderr.strip()[-400:]}")
    out: dict[str, Any] = json.loads(stdout)
    if out["ok"] != expected:
        raise RuntimeError(f"{out['ok']} of {expected} messages accepted; "
                           f"{out['errors']} failed: {out['first_errors'][:2]}")
    return out


def signed_load(server: PostroomServer | PostfixServer, n: int, name: str, new: Path,
                message: Path, others: Callable[[], list[int]]) -> Run:
    """W1v's load: the suite's client sends ``message`` ``n`` times from 127.0.0.1; the
    timed part runs from the client's first connection until every message is a file in
    ``new``. A warm-up of WARM_UP messages first, untimed."""
    def command(count: int) -> list[str]:
        return client_command(server.port, count, SESSIONS, SIZE) + [
            "--to", MAILBOX, "--sender", SENDER, "--helo", SENDER_HELO,
            "--message", str(message)]

    warm = subprocess.Popen(command(WARM_UP), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _client_result(warm, WARM_UP)
    if not wait_until(lambda: count_files(new) >= WARM_UP, 60):
        raise RuntimeError(f"warm-up: {count_files(new)} of {WARM_UP} messages delivered")
    total = WARM_UP + n
    out: dict[str, Any] | None = None
    proc: subprocess.Popen[str] | None = None
    try:
        with Meter(server.pids, others=others) as m:
            proc = subprocess.Popen(command(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            deadline = time.monotonic() + TIMEOUT
            while count_files(new) < total:
                if out is None and proc.poll() is not None:
                    out = _client_result(proc, n)      # a refused message fails at once
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count_files(new) - WARM_UP} of {n} messages "
                                       f"delivered in {TIMEOUT} s")
                time.sleep(0.05)
            end = time.monotonic()
            m.stop()
        if out is None:
            out = _client_result(proc, n)
        m.reaped()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    run = Run(name, n, end - out["t0"]).metered(m)
    run.extra.update(p50_ms=1000 * out["p50"], p99_ms=1000 * out["p99"],
                     dns_cpu=m.helper_cpu)
    return run


def authentication_results(folder: Path) -> tuple[int, int, str]:
    """(messages in ``folder``, how many carry our Authentication-Results field with
    every spf=, dkim= and dmarc= result a pass, the first field that does not)."""
    total = passed = 0
    other = ""
    field_re = re.compile(rb"^Authentication-Results:[ \t]*(.*?)\r?\n(?![ \t])", re.M | re.S | re.I)
    for entry in os.scandir(folder):
        if not entry.is_file():
            continue
        total += 1
        with open(entry.path, "rb") as f:
            head = f.read(16384)
        end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0),
                  default=len(head))
        fields = [re.sub(rb"\r?\n[ \t]+", b" ", v).decode(errors="replace").strip()
                  for v in field_re.findall(head[:end + 2])]
        ours = [v for v in fields if v.split(";", 1)[0].strip().lower() == AUTHSERV]
        # each result opens a ";"-separated part: "dkim=pass header.d=...", not the
        # "policy.dmarc=none" property inside dmarc's part
        results = re.findall(r"(?:^|;)\s*(spf|dkim|dmarc)=([a-z]+)", ours[0]) if len(ours) == 1 else []
        if {m for m, _ in results} == {"spf", "dkim", "dmarc"} and all(
                r == "pass" for _, r in results):
            passed += 1
        elif not other:
            other = ours[0] if ours else f"{len(fields)} Authentication-Results fields, none ours"
    return total, passed, other


def dnsmasq_pids() -> list[int]:
    """The dnsmasq this process started (W1v's DNS server), to count its CPU apart."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq":
                pids.append(pid)
        except OSError:
            pass
    return pids


def w1v(n: int) -> Workload:
    """W1 with inbound verification: signed messages from an untrusted address."""
    names = ("Postroom", "Postroom, verification off", "Postfix")
    dns_note = ""

    def runs_with_dns() -> list[Run]:
        nonlocal dns_note
        sys.path.insert(0, str(ROOT))
        from postroom.mailauth import keys
        from tests.integration import dnsmasq

        if dnsmasq.DNSMASQ is None:
            raise RuntimeError("dnsmasq is not installed (apt-get install dnsmasq-base)")
        with tempfile.TemporaryDirectory(prefix="bench-w1v-") as tmp:
            key = keys.generate(Path(tmp) / "dkim.key", "rsa")
            message = Path(tmp) / "signed.eml"
            message.write_bytes(signed_message(key))
            records = [f"--local=/{SENDER_DOMAIN}/",   # other names there: NXDOMAIN
                       txt_option(SENDER_DOMAIN, SPF_RECORD),
                       txt_option(SENDER_HELO, SPF_RECORD),
                       txt_option(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}",
                                  keys.txt_record(key)),
                       txt_option(f"_dmarc.{SENDER_DOMAIN}", DMARC_RECORD)]
            with dnsmasq.run_dnsmasq(records, ttl=3600) as port:
                dns = dnsmasq_pids()

                def postroom(verify: bool) -> Run:
                    server = PostroomServer(
                        domains=(DOMAIN,), trusted=("127.0.0.2/32",),
                        nameservers=(f"127.0.0.1:{port}",),
                        extra=("[verify]", f"enabled = {'true' if verify else 'false'}"))
                    server.add_user(MAILBOX)
                    try:
                        server.start()
                        new = server.maildir_new(DOMAIN, USER)
                        run = signed_load(server, n, names[0 if verify else 1], new, message,
                                          lambda: dns)
                        total, passed, other = authentication_results(new)
                        if verify and passed != total:
                            raise RuntimeError(
                                f"{total - passed} of {total} delivered messages lack "
                                f"'{AUTHSERV}; spf=pass dkim=pass dmarc=pass': {other[:300]}")
                        if not verify and passed:
                            raise RuntimeError(f"verification off, yet {passed} messages "
                                               "carry its Authentication-Results")
                        run.extra["ar_pass"] = passed
                        return run
                    finally:
                        server.stop()

                def postfix() -> Run:
                    server = postfix_inbound(51200000)
                    try:
                        server.start()
                        new = server.work / "vmail" / DOMAIN / USER / "new"
                        return signed_load(server, n, "Postfix", new, message, lambda: dns)
                    finally:
                        server.stop()

                runs = [guarded(names[0], lambda: postroom(True)),
                        guarded(names[1], lambda: postroom(False)),
                        guarded(names[2], postfix)]
                if not runs[0].error:
                    dns_cpu = runs[0].extra.get("dns_cpu")
                    if dns_cpu is not None:
                        dns_note = f" dnsmasq used {dns_cpu:.2f} s of CPU in that run."
                return runs

    try:
        runs = runs_with_dns()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        runs = [Run(name, error=f"{type(exc).__name__}: {exc}"[:400]) for name in names]
    on, off = (figure(r, "server_cpu_per_1000") for r in runs[:2])
    cost = Headline("W1v verification cost (server CPU, on − off)", "ms / msg",
                    None if on is None or off is None else on - off, None,
                    higher_better=False, chart=False)
    rate_off = Headline("W1v inbound, verification off", "msgs/s", figure(runs[1], "rate"),
                        figure(runs[2], "rate"), higher_better=True, chart=False)
    cols = [*STANDARD_COLUMNS[:5], ("p99 ms", "p99_ms", "{:.1f}"),
            ("AR pass", "ar_pass", "{:.0f}"), *STANDARD_COLUMNS[5:]]
    client = (f"python3 bench/suite.py _client --port PORT --messages {n} --sessions "
              f"{SESSIONS} --to {MAILBOX} --sender {SENDER} --helo {SENDER_HELO} "
              "--message signed.eml")
    return Workload(
        "W1v", "inbound to a local Maildir, with SPF/DKIM/DMARC verification",
        [client], runs, cols,
        [ratio_target("W1v inbound, verification on", runs, "rate", None),
         rate_off, server_cpu_row("W1v", runs), cost],
        ["W1 with Postroom's inbound verification at work. One message (From: "
         f"user@{SENDER_DOMAIN}, a {SIZE}-byte body, one RSA-2048 DKIM signature made by "
         "Postroom's signer with a key from `postroom.mailauth.keys.generate`) is sent "
         f"{n:,} times by the suite's client (as W3's, {SESSIONS} sessions, one connection "
         f"per message, from 127.0.0.1) with MAIL FROM `{SENDER}` and EHLO `{SENDER_HELO}`. "
         "Timed from the client's first connection until every message is a file in the "
         f"Maildir's `new/`, after an untimed warm-up of {WARM_UP} messages (the first "
         "message of each Postroom front end imports the verifier).",
         "A private dnsmasq on 127.0.0.1 (tests/integration/dnsmasq.py, TTL 3600 s) "
         f"publishes `{SENDER_DOMAIN}` and `{SENDER_HELO}` TXT `{SPF_RECORD}`, "
         f"`{SELECTOR}._domainkey.{SENDER_DOMAIN}` the key's TXT record and "
         f"`_dmarc.{SENDER_DOMAIN}` TXT `{DMARC_RECORD}`; Postroom's resolver caches the "
         "answers, as for a sender that writes more than once a TTL.",
         "Postroom: as W1 but `[relay] trusted_networks = [\"127.0.0.2/32\"]` (the client "
         "is not trusted, so its mail is verified), `[dns] nameservers` the dnsmasq, "
         "`[verify]` with its defaults (row 'Postroom') or `enabled = false` (row 'Postroom, "
         "verification off'). Postfix: W1's configuration, no milter (it verifies nothing). "
         "After each Postroom run every delivered message is read: with verification on, "
         f"each must carry `Authentication-Results: {AUTHSERV};` with spf=pass, dkim=pass "
         "and dmarc=pass ('AR pass' counts them, warm-up included), else the run fails; "
         "with it off, none may.",
         "The verification cost is the difference of the two Postroom runs' server CPU per "
         "message (s / 1000 msgs is ms / msg); bench/verify_cost.py measures the verifier "
         "alone." + dns_note])


# --- W2 ------------------------------------------------------------------------------
def w2(n: int) -> Workload:
    def convert(r: relay.Result) -> Run:
        return Run(r.server, r.messages, r.seconds, r.cpu, r.server_cpu, r.other_cores,
                   r.rss_mb, r.pss_mb, {"bench_cores": r.bench_cores})

    runs = [guarded("Postroom", lambda: convert(relay.bench_postroom(n, SIZE, SESSIONS))),
            guarded("Postfix", lambda: convert(relay.bench_postfix(n, SIZE, SESSIONS)))]
    return Workload(
        "W2", "relay to smtp-sink",
        [smtp_source_command(n, SIZE, SESSIONS, "rcpt@far.test"),
         "smtp-sink -c -u nobody 127.0.0.1:SINKPORT 256"], runs, STANDARD_COLUMNS,
        [ratio_target("W2 relay to smtp-sink", runs, "rate", 2), server_cpu_row("W2", runs)],
        ["bench/relay.py's measurement: timed from the first connection until smtp-sink has "
         "counted every message. Postroom: a `[[route]] match = \"*\"` smart host to the "
         "sink, `tls = \"none\"`. Postfix: `relayhost = [127.0.0.1]:SINKPORT`."])


# --- W7 ------------------------------------------------------------------------------
def w7(n: int) -> Workload:
    """W2's relay, with the queue shared by two nodes in one PostgreSQL."""
    def two_nodes() -> Run:
        sys.path.insert(0, str(ROOT))
        from tests.postgres import start_postgres

        pg = start_postgres()
        sink = Sink()
        nodes: list[PostroomServer] = []
        try:
            url = pg.create_db("bench")
            nodes = [PostroomServer(smarthost=f"127.0.0.1:{sink.port}", extra=(
                "[spool]", f'url = "{url}"', "[node]", f'name = "node-{i}"')) for i in "ab"]
            for node in nodes:
                node.start()
            postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])

            def pids() -> list[int]:
                return [postmaster, *descendants(postmaster)] + [
                    p for node in nodes for p in node.pids()]
            with Meter(pids, others=lambda: [sink.proc.pid]) as m:
                half = n // 2
                sources = [smtp_source(nodes[0].port, half, SIZE, SESSIONS // 2),
                           smtp_source(nodes[1].port, n - half, SIZE, SESSIONS // 2)]
                deadline = time.monotonic() + TIMEOUT
                while sink.count() < n and time.monotonic() < deadline:
                    time.sleep(0.05)
                m.stop()
            for src in sources:
                finish(src)
            m.reaped()
            if sink.count() < n:
                raise RuntimeError(f"sink got {sink.count()} of {n} messages")
            run = Run("Postroom", n, m.seconds).metered(m)
            run.extra["note"] = ("two nodes, one PostgreSQL; server CPU and memory include "
                                 "PostgreSQL's processes")
            return run
        finally:
            for node in nodes:
                node.stop()
            sink.stop()
            pg.destroy()

    def one_node() -> Run:
        r = relay.bench_postroom(n, SIZE, SESSIONS)
        return Run("Postroom, one node (SQLite)", r.messages, r.seconds, r.cpu, r.server_cpu,
                   r.other_cores, r.rss_mb, r.pss_mb, {"bench_cores": r.bench_cores})

    def postfix() -> Run:
        r = relay.bench_postfix(n, SIZE, SESSIONS)
        return Run("Postfix", r.messages, r.seconds, r.cpu, r.server_cpu, r.other_cores,
                   r.rss_mb, r.pss_mb, {"bench_cores": r.bench_cores})

    runs = [guarded("Postroom", two_nodes), guarded("Postroom, one node (SQLite)", one_node),
            guarded("Postfix", postfix)]
    single = figure(runs[1], "rate")
    pair = figure(runs[0], "rate")
    return Workload(
        "W7", "two nodes sharing a PostgreSQL queue, relay to smtp-sink",
        [smtp_source_command(n // 2, SIZE, SESSIONS // 2, "rcpt@far.test") + "   # to each node",
         "smtp-sink -c -u nobody 127.0.0.1:SINKPORT 256"], runs, STANDARD_COLUMNS,
        [ratio_target("W7 two nodes on PostgreSQL, relay", runs, "rate", None),
         server_cpu_row("W7", runs)],
        ["As W2, but the load is split between two Postroom nodes whose queue is one "
         "PostgreSQL database (`[spool] url`, each its own `[node] name`), both relaying to "
         "the same sink. PostgreSQL runs on the same machine with `fsync = on` and "
         "`synchronous_commit = on` (tests/postgres.py), and its processes count as the "
         "server's. The second row is one node on its SQLite spool under the whole load, in "
         "the same run"
         + (f": two nodes on PostgreSQL reach {pair / single:.2f}× its rate." if single and pair
            else "."),
         "On two cores the nodes and PostgreSQL share the same CPUs, so this measures the "
         "cost of the shared queue, not the capacity of two machines."])


# --- W3 ------------------------------------------------------------------------------
def deferring_postroom(smtp: dict[str, object] | None = None) -> PostroomServer:
    return PostroomServer(smarthost=f"127.0.0.1:{closed_port()}", smtp=smtp)


def deferring_postfix(smtpd_maxproc: int | None = None) -> PostfixServer:
    return PostfixServer({"relayhost": f"[127.0.0.1]:{closed_port()}"}, smtpd_maxproc)


def w3(n: int) -> Workload:
    configs: list[str] = []

    def postroom() -> Run:
        server = deferring_postroom()
        configs.append("Postroom's config (W3; W1 and W6 add `[domains] local = "
                       "[\"bench.test\"]` and no route):\n\n```toml\n"
                       + server.config.read_text() + "```\n")
        try:
            server.start()
            return w3_load(server, n, "Postroom")
        finally:
            server.stop()

    def postfix() -> Run:
        server = deferring_postfix()
        master = subprocess.run([POSTCONF, "-c", str(server.etc), "-M"],
                                capture_output=True, text=True).stdout
        inbound = PostfixServer.maildir_settings(Path("WORK/vmail"), DOMAIN, USER, 51200000)
        configs.append(
            "Postfix's main.cf (W3; W1 and W6 have no relayhost and add the lines below it, "
            f"W6 with both limits at {BIG_LIMIT}):\n\n```\n"
            + (server.etc / "main.cf").read_text() + "```\n\n```\n"
            + "".join(f"{k} = {v}\n" for k, v in inbound.items()) + "```\n\n"
            "master.cf after `postconf -F '*/*/chroot = n'` and the listener swap "
            "(W5 sets the listener's maxproc):\n\n```\n" + master + "```\n")
        try:
            server.start()
            return w3_load(server, n, "Postfix")
        finally:
            server.stop()

    runs = [guarded("Postroom", postroom), guarded("Postfix", postfix)]
    cols = STANDARD_COLUMNS[:-2] + [("p50 ms", "p50_ms", "{:.1f}"), ("p99 ms", "p99_ms", "{:.1f}"),
                                    *STANDARD_COLUMNS[-2:]]
    return Workload(
        "W3", "acceptance only, destination down",
        commands=[f"python3 bench/suite.py _client --port PORT --messages {n} "
                  f"--sessions {SESSIONS} --size {SIZE}"],
        runs=runs, columns=cols,
        headlines=[ratio_target("W3 acceptance (250s)", runs, "rate", 3),
                   Headline("W3 p99 end of DATA → 250", "ms", figure(runs[0], "p99_ms"),
                            figure(runs[1], "p99_ms"), higher_better=False),
                   server_cpu_row("W3", runs)],
        notes=["The next hop is a closed loopback port, so every message stays queued. "
               "Postroom: a smart-host route to it; Postfix: "
               "`relayhost = [127.0.0.1]:CLOSEDPORT`.",
               f"The client (this file, `_client`): {SESSIONS} concurrent sessions, one "
               "connection per message, no pipelining; it timestamps the write of the final "
               "`.` and the read of its reply. msgs/s counts 250 replies from the first "
               "connection to the last reply."],
        appendix=configs)


# --- W4 ------------------------------------------------------------------------------
def summary_timings(cmd: Callable[[], subprocess.CompletedProcess[Any]],
                    server: Callable[[], list[int]], tries: int = 3
                    ) -> tuple[list[float], float, float, Any]:
    """Wall seconds of each run of ``cmd``; per run, the machine's busy CPU and the CPU
    of the command plus the server's processes; the last output."""
    times, out = [], None
    cpu0, own0 = cpu_busy_seconds(), children_cpu() + tree_cpu(server())
    for _ in range(tries):
        t0 = time.monotonic()
        out = cmd()
        times.append(time.monotonic() - t0)
        if out.returncode != 0:
            raise RuntimeError(f"summary failed: {out.stderr[-300:]!r}")
    own = children_cpu() + tree_cpu(server()) - own0
    return times, (cpu_busy_seconds() - cpu0) / tries, own / tries, out


def postroom_counts(spool: Path) -> dict[str, int]:
    import sqlite3
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT direction || '-' || state, COUNT(*) FROM recipients "
                            "GROUP BY direction, state").fetchall()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return dict(rows)


def w4(n: int) -> Workload:
    def postroom() -> Run:
        server = deferring_postroom()
        try:
            t0 = time.monotonic()
            filled = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "_fill",
                 str(server.data / "spool.sqlite3"), str(n), str(SIZE)],
                capture_output=True, text=True, timeout=TIMEOUT)
            fill = time.monotonic() - t0
            if filled.returncode != 0:
                raise RuntimeError(f"fill failed: {filled.stderr[-400:]}")
            server.start()
            spool = server.data / "spool.sqlite3"
            with Meter(server.pids, 0.2) as m:
                # the queue manager converts the inserted recipients, tries the closed
                # next hop once and defers the rest with the destination
                settled = wait_until(
                    lambda: postroom_counts(spool).get("outbound-conversion", 0) == 0,
                    TIMEOUT, 0.5)
                settle = time.monotonic() - t0 - fill
                time.sleep(1)
                rss_settled = rss_of(server.pids())
                times, cpu, own, out = summary_timings(lambda: server.cli("queue", "--json"),
                                                       server.pids)
            queued = sum(q["messages"] for q in json.loads(out.stdout)["queues"])
            run = Run("Postroom", n, statistics.median(times), cpu, own,
                      rss_mb=m.peak_rss, pss_mb=m.peak_pss)
            run.extra.update(fill="SqliteSpool.enqueue_sync, server stopped", fill_s=fill,
                             settle_s=settle, settled=settled, queued=queued,
                             first_s=times[0], max_s=max(times), rss_settled=rss_settled,
                             counts=postroom_counts(spool))
            return run
        finally:
            server.stop()

    def postfix() -> Run:
        server = deferring_postfix()
        try:
            server.start()
            t0 = time.monotonic()
            with Meter(server.pids, 0.5) as m:
                src = smtp_source(server.port, n, SIZE, 50, reuse=True)
                err = finish(src, timeout=TIMEOUT * 2)
                fill = time.monotonic() - t0
                deferred = server.queue / "deferred"
                settled = wait_until(lambda: count_tree(deferred) >= n, TIMEOUT, 1.0)
                settle = time.monotonic() - t0 - fill
                time.sleep(1)
                rss_settled = rss_of(server.pids())
                times, cpu, own, out = summary_timings(server.postqueue_json, server.pids)
            queued = sum(1 for line in out.stdout.splitlines() if line.strip())
            run = Run("Postfix", n, statistics.median(times), cpu, own, rss_mb=m.peak_rss,
                      pss_mb=m.peak_pss)
            run.extra.update(fill="smtp-source -s 50 -d", fill_s=fill, settle_s=settle,
                             settled=settled, queued=queued, first_s=times[0], max_s=max(times),
                             rss_settled=rss_settled, in_deferred=count_tree(deferred),
                             source_errors=err[-200:])
            return run
        finally:
            server.stop()

    runs = [guarded("Postroom", postroom), guarded("Postfix", postfix)]
    cols = [("queued (counted by the summary)", "queued", "{:.0f}"),
            ("fill", "fill", "{}"), ("fill s", "fill_s", "{:.1f}"),
            ("settle s", "settle_s", "{:.1f}"),
            ("summary s (median of 3)", "seconds", "{:.3f}"), ("first s", "first_s", "{:.3f}"),
            ("machine CPU s / summary", "cpu", "{:.2f}"),
            ("command + server CPU s / summary", "server_cpu", "{:.2f}"),
            ("peak RSS (MB)", "rss_mb", "{:.0f}"), ("settled RSS (MB)", "rss_settled", "{:.0f}"),
            ("peak PSS (MB)", "pss_mb", "{:.0f}")]
    return Workload(
        "W4", f"queue summary with {n:,} deferred messages",
        [f"postroom queue --json -c CONFIG      # {n:,} messages queued",
         f"postqueue -c CONFIGDIR -j            # {n:,} messages queued",
         f"{smtp_source_command(n, SIZE, 50, 'rcpt@far.test', reuse=True)}   # Postfix fill"],
        runs, cols,
        [absolute_target("W4 queue summary", runs, "seconds", "s", 1.0),
         absolute_target("W4 server peak RSS, deep queue", runs, "rss_mb", "MB", None),
         absolute_target("W4 server peak PSS, deep queue", runs, "pss_mb", "MB", None)],
        ["Both next hops are a closed loopback port (as W3). Postfix is filled over SMTP "
         "(smtp-source, 50 sessions, several messages per connection); the fill ends when "
         "every message is in `deferred/`. Postroom is filled directly: a separate process "
         f"inserts {n:,} messages of {SIZE} bytes with `SqliteSpool.enqueue_sync` "
         "(1,000 per transaction) while the server is stopped, because that is much faster "
         "than SMTP; then the server starts, converts them, tries the closed next hop and "
         "defers them all with the destination. 'settle s' is that time.",
         "Each summary is timed end to end as a command (process start, Python or "
         "postqueue/showq, JSON out), three times; the table shows the median. Peak RSS is "
         "over the settle and the summaries; 'settled' is after the queue is quiet."])


# --- W5 ------------------------------------------------------------------------------
def hold_idle(port: int, n: int, deadline: float) -> list[socket.socket]:
    """``n`` connections that read the greeting and then say nothing, 25 per source
    address 127.0.1.x (under per-peer caps); in batches of 100, bounded in time."""
    held: list[socket.socket] = []
    for start in range(0, n, 100):
        batch = []
        for i in range(start, min(n, start + 100)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(held)} idle connections after the time limit")
            s = socket.socket()
            s.settimeout(30)
            s.bind((f"127.0.{1 + i // (IDLE_PER_ADDRESS * 250)}."
                    f"{1 + (i // IDLE_PER_ADDRESS) % 250}", 0))
            s.connect(("127.0.0.1", port))
            batch.append(s)
        for s in batch:
            greeting = s.recv(512)
            if not greeting.startswith(b"220"):
                s.close()
                raise RuntimeError(f"idle connection {len(held)} got {greeting[:80]!r}")
            held.append(s)
    return held


def warm_up(port: int, count: int = 10) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.recv(512)
            s.sendall(b"QUIT\r\n")
            s.recv(512)


def idle_run(server: PostroomServer | PostfixServer, name: str, n: int, messages: int,
             limits: str) -> Run:
    warm_up(server.port)
    time.sleep(1)
    before, before_pss = rss_of(server.pids()), pss_of(server.pids())
    t0 = time.monotonic()
    held = hold_idle(server.port, n, time.monotonic() + TIMEOUT)
    opened = time.monotonic() - t0
    try:
        time.sleep(1)
        pids = server.pids()
        after, after_pss = rss_of(pids), pss_of(pids)
        # 2,000 Postfix processes: one RSS sample costs ~80 ms of CPU, so sample rarely
        run = w3_load(server, messages, name, interval=1.0, pss=False, refresh=3.0)
        still = sum(1 for s in held if _alive(s))
    finally:
        for s in held:
            s.close()
    run.extra.update(idle=n, before=before, after=after, open_s=opened, still_open=still,
                     kb_per_conn=(after - before) * 1024 / n,
                     pss_kb_per_conn=(after_pss - before_pss) * 1024 / n,
                     processes=len(pids), limits=limits)
    return run


def _alive(s: socket.socket) -> bool:
    """Still open: nothing to read (the server did not send 421 or close)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def w5(n: int, messages: int) -> Workload:
    pr_limits = f"[smtp] max_connections = {n + 200}, max_connections_per_peer = 50 (default)"
    pf_limits = f"smtpd process_limit (master.cf maxproc) = {n + 50}"

    def postroom() -> Run:
        server = deferring_postroom({"max_connections": n + 200, "max_connections_per_peer": 50})
        try:
            server.start()
            return idle_run(server, "Postroom", n, messages, pr_limits)
        finally:
            server.stop()

    def postfix() -> Run:
        server = deferring_postfix(smtpd_maxproc=n + 50)
        try:
            server.start()
            return idle_run(server, "Postfix", n, messages, pf_limits)
        finally:
            server.stop()

    runs = [guarded("Postroom", postroom), guarded("Postfix", postfix)]
    cols = [("idle conns", "idle", "{:.0f}"), ("still open after W3", "still_open", "{:.0f}"),
            ("server processes", "processes", "{:.0f}"),
            ("RSS before (MB)", "before", "{:.0f}"), ("RSS after (MB)", "after", "{:.0f}"),
            ("RSS KB / idle conn", "kb_per_conn", "{:.1f}"),
            ("PSS KB / idle conn", "pss_kb_per_conn", "{:.1f}"),
            ("W3 msgs meanwhile", "messages", "{:.0f}"),
            ("W3 msgs/s meanwhile", "rate", "{:.0f}"),
            ("machine CPU s / 1000 msgs", "cpu_per_1000", "{:.2f}"),
            ("server CPU s / 1000 msgs", "server_cpu_per_1000", "{:.2f}"),
            ("unattributed (cores)", "other_cores", "{:.2f}"),
            ("p99 ms", "p99_ms", "{:.1f}"), ("peak RSS during W3 (MB)", "rss_mb", "{:.0f}")]
    return Workload(
        "W5", f"{n:,} idle connections held open",
        [f"{n:,} TCP connections that read the 220 greeting and stay silent, "
         f"{IDLE_PER_ADDRESS} per source address 127.0.1.x",
         f"python3 bench/suite.py _client --port PORT --messages {messages} --sessions "
         f"{SESSIONS} --size {SIZE}   # W3, while they are held"],
        runs, cols,
        [absolute_target("W5 RSS per idle connection", runs, "kb_per_conn", "KB", 50.0),
         absolute_target("W5 PSS per idle connection", runs, "pss_kb_per_conn", "KB", None),
         ratio_target(f"W5 W3 acceptance with {n:,} idle", runs, "rate", None)],
        [f"Server limits: Postroom {pr_limits}; Postfix {pf_limits} (each idle "
         "connection holds one smtpd process; the cap leaves room for W3's sessions). "
         "The client raises its RLIMIT_NOFILE to the hard limit, and the servers inherit it.",
         "RSS per connection is (RSS with the connections held − RSS before) ÷ N, after ten "
         "warm-up connections. RSS sums every process, so for Postfix each smtpd's shared "
         "pages count again; the PSS column divides shared pages among processes."])


# --- W6 ------------------------------------------------------------------------------
def w6(n: int) -> Workload:
    def postroom() -> Run:
        server = postroom_inbound({"max_message_size": BIG_LIMIT})
        try:
            server.start()
            new = server.maildir_new(DOMAIN, USER)
            return source_until(server, n, BIG, 1, MAILBOX, lambda: count_files(new),
                                "Postroom", interval=0.02, sample=0.05)
        finally:
            server.stop()

    def postfix() -> Run:
        server = postfix_inbound(BIG_LIMIT)
        try:
            server.start()
            new = server.work / "vmail" / DOMAIN / USER / "new"
            return source_until(server, n, BIG, 1, MAILBOX, lambda: count_files(new),
                                "Postfix", interval=0.02, sample=0.05)
        finally:
            server.stop()

    runs = [guarded("Postroom", postroom), guarded("Postfix", postfix)]
    for run in runs:
        if run.messages:
            run.extra["s_per_msg"] = run.seconds / run.messages
    return Workload(
        "W6", f"{n} messages of 20 MB to a Maildir",
        [smtp_source_command(n, BIG, 1, MAILBOX)], runs,
        [("messages", "messages", "{:.0f}"), ("seconds", "seconds", "{:.2f}"),
         ("s / message", "s_per_msg", "{:.2f}"), ("machine CPU s", "cpu", "{:.2f}"),
         ("server CPU s", "server_cpu", "{:.2f}"), ("unattributed (cores)", "other_cores", "{:.2f}"),
         ("peak RSS (MB)", "rss_mb", "{:.0f}"), ("peak PSS (MB)", "pss_mb", "{:.0f}")],
        [absolute_target("W6 big messages, time", runs, "seconds", "s", None),
         absolute_target("W6 big messages, peak RSS", runs, "rss_mb", "MB", 100.0)],
        [f"One session, messages one after another, {BIG:,}-byte payload each, delivered "
         f"into the Maildir as in W1. Postroom `[smtp] max_message_size = {BIG_LIMIT}`; "
         f"Postfix `message_size_limit` and `virtual_mailbox_limit = {BIG_LIMIT}`. RSS "
         "sampled every 50 ms."])


STANDARD_COLUMNS = [
    ("messages", "messages", "{:.0f}"), ("seconds", "seconds", "{:.2f}"),
    ("msgs/s", "rate", "{:.0f}"), ("machine CPU s / 1000 msgs", "cpu_per_1000", "{:.2f}"),
    ("server CPU s / 1000 msgs", "server_cpu_per_1000", "{:.2f}"),
    ("unattributed (cores)", "other_cores", "{:.2f}"),
    ("peak RSS (MB)", "rss_mb", "{:.0f}"), ("peak PSS (MB)", "pss_mb", "{:.0f}"),
]


# --- the report ----------------------------------------------------------------------
def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")).resolve()
    fs = "?"
    best = -1
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, point, kind = line.split()[:3]
        if str(tmp).startswith(point) and len(point) > best:
            best, fs = len(point), f"{kind} ({dev} on {point})"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    from postroom import __version__
    soft, hard = raise_nofile()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem / 1024 / 1024:.0f} GiB; "
        f"Linux {platform.release()} ({platform.machine()})",
        f"- Work folders: {tmp}, {fs}; both servers fsync there",
        f"- Python {platform.python_version()}; Postfix {postfix_version()}; Postroom "
        f"{__version__} at commit {commit}"
        + (" with uncommitted changes under src/" if dirty else ""),
        f"- RLIMIT_NOFILE {soft}/{hard} (raised for the suite; the servers inherit it)",
        "- Network: a loopback-only namespace (`unshare -n`); every address is in "
        "127.0.0.0/8; Postroom `[dns] nameservers = [\"127.0.0.1:9\"]`, Postfix "
        "`smtp_dns_support_level = disabled`, `smtpd_peername_lookup = no`",
    ]


def fmt(value: float | None, spec: str = "{:.2f}") -> str:
    if value is None:
        return "—"
    return spec.format(value)


def num(value: float | None) -> str:
    """A figure for the summary: three significant digits, no exponent."""
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def times(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def cell(run: Run, attr: str, spec: str) -> str:
    if attr in ("fill", "limits"):
        return str(run.extra.get(attr, "—"))
    return fmt(figure(run, attr), spec)


NO_RATIO = {"messages", "idle", "queued", "fill_s", "settle_s", "still_open", "processes"}


def workload_md(wl: Workload) -> str:
    heads = [h for h, _, _ in wl.columns]
    lines = [f"## {wl.key}: {wl.title}", "", "```", *wl.commands, "```", "",
             "| server | " + " | ".join(heads) + " |",
             "|---|" + "---:|" * len(heads)]
    for run in wl.runs:
        if run.error:
            lines.append(f"| {run.server} | failed: {run.error.replace('|', '/')} |"
                         + " |" * (len(heads) - 1))
        else:
            lines.append(f"| {run.server} | "
                         + " | ".join(cell(run, a, s) for _, a, s in wl.columns) + " |")
    pr, pf = wl.run("Postroom"), wl.run("Postfix")
    ratios = []
    for _, attr, _ in wl.columns:
        a, b = figure(pr, attr), figure(pf, attr)
        ratios.append("—" if a is None or not b or attr in NO_RATIO else times(a / b))
    lines.append("| Postroom/Postfix | " + " | ".join(ratios) + " |")
    lines.append("")
    lines += [f"{note}" for note in wl.notes]
    for run in wl.runs:
        if run.extra.get("note"):
            lines.append(f"{run.server}: {run.extra['note']}")
    return "\n".join(lines) + "\n"


def summary_md(workloads: list[Workload]) -> str:
    lines = ["| workload | unit | Postroom | Postfix | Postroom/Postfix | target | met |",
             "|---|---|---:|---:|---:|---|---|"]
    for wl in workloads:
        for h in wl.headlines:
            better = "higher is better" if h.higher_better else "lower is better"
            met = {True: "**yes**", False: "**no**", None: "—" if not h.target else "n/a"}[h.met]
            lines.append(f"| {h.label} | {h.unit} ({better}) | {num(h.postroom)} | "
                         f"{num(h.postfix)} | {times(h.ratio)} | "
                         f"{h.target or '—'} | {met} |")
    return "\n".join(lines) + "\n"


def chart(workloads: list[Workload], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:          # bench/run installs it; the CI smoke run goes without
        print(f"no chart ({path.name}): matplotlib is not installed", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [h for wl in workloads for h in wl.headlines if h.chart]
    cols = min(4, len(heads))
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.5 * rows), squeeze=False)
    for ax, h in zip(axes.flat, heads, strict=False):
        values = [h.postroom or 0.0, h.postfix or 0.0]
        bars = ax.bar(["Postroom", "Postfix"], values, color=["#2b7bba", "#9a9a9a"])
        for bar, v, raw in zip(bars, values, (h.postroom, h.postfix), strict=True):
            ax.annotate("failed" if raw is None else num(v),
                        (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                        fontsize=9)
        level = None
        if h.target.startswith("≥") and h.postfix:
            level = float(h.target.split("×")[0][1:]) * h.postfix
        elif h.target.startswith("Postroom <"):
            level = float(h.target.split()[2])
        if level is not None:
            ax.axhline(level, color="#d62728", linestyle="--", linewidth=1)
            ax.annotate(f"target {h.target}", (1.45, level), ha="right", va="bottom",
                        fontsize=8, color="#d62728")
        ax.set_title(h.label, fontsize=9)
        ax.set_ylabel(f"{h.unit} ({'higher' if h.higher_better else 'lower'} is better)",
                      fontsize=8)
        top = max([*values, level or 0]) or 1.0
        low = min(v for v in [*values, level or top] if v > 0) if any(values) else top
        if top / low > 50:          # W5: a thousandfold gap; a log axis shows both bars
            ax.set_yscale("log")
            ax.set_ylim(low / 3, top * 4)
        else:
            ax.set_ylim(0, top * 1.18)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(workloads: list[Workload], args: argparse.Namespace, started: float,
           machine_lines: list[str], processes_note: str, png: Path) -> str:
    mode = "--smoke" if args.smoke else "--quick" if args.quick else "full"
    elapsed = time.monotonic() - started
    others = [r.other_cores for wl in workloads for r in wl.runs
              if not r.error and r.seconds and wl.key != "W4"]
    load = (f"- Unattributed CPU during the timed parts: {statistics.mean(others):.2f} "
            f"cores on average, {max(others):.2f} at most, of {os.cpu_count()} (see each "
            "table's 'unattributed' column)" if others else "")
    noisy = bool(others) and statistics.mean(others) > 0.2
    bench_max = max((r.extra.get("bench_cores", 0.0) for wl in workloads for r in wl.runs),
                    default=0.0)
    lines = [
        "# Benchmarks: Postroom against Postfix",
        "",
        "Generated by `bench/run suite"
        + (" --quick" if args.quick else "") + "` (bench/suite.py); do not edit by hand. "
        "Both servers ran on this machine in the same run, each on its own loopback port "
        "with the same load generators: Postfix's `smtp-source` (no pipelining, one "
        "connection per message unless noted) and `smtp-sink` as the remote server.",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {mode} sizes, "
        f"{elapsed:.0f} s in all.",
        "",
        "## Machine",
        "",
        *machine_lines,
        f"- Postroom: {processes_note}",
        *([load] if load else []),
        "",
        *(["**The machine was not quiet during this run** (see 'unattributed'; other "
           "sessions' jobs share this machine): throughput and latency figures are lower "
           "and noisier than on a quiet machine, "
           "and the two servers did not always meet the same background load. Memory "
           "figures and the server-only CPU figures are much less affected. Rerun on a "
           "quiet machine before quoting a ratio.", ""] if noisy else []),
        "## How to read this",
        "",
        "- **machine CPU s / 1000 msgs** is the whole machine's busy time (from /proc/stat: "
        "server, load generator and sink alike) during the timed part, per 1,000 messages, "
        "as bench/relay.py measures it. Both servers share the cores with the load "
        "generator. **server CPU** counts the server's own processes only (utime + stime of "
        "its process tree, children it reaped included). **unattributed (cores)** is the "
        "machine's busy time that neither the server, the load generator, the sink nor "
        "this suite used: other jobs on the machine (on this shared machine, other "
        "sessions' tests and fuzzers) and kernel work no process is charged for (softirq "
        "for loopback TCP and disk completions, journaling threads). Other jobs slow both "
        "servers and inflate the machine figure. Before each server's run the suite waits "
        f"(up to {QUIET_WAIT[0]:.0f} s) for the machine to go quiet, and (up to "
        f"{FILES_WAIT[1]:.0f} s, 420 s before the first) until creating a file costs under "
        f"{FILES_LIMIT_US:.0f} us: on this machine's "
        "ext4 without a journal, creating files right after thousands were removed costs "
        "0.5-1 ms each (see bench/common.py's `discard`), so the runs' folders are removed "
        "when the suite ends, not between runs.",
        "- **Peak RSS** is the highest sum of VmRSS over the server's processes (Postfix: "
        "the master and every process it started; Postroom: the serve process and its "
        "front ends), sampled every 100 ms (PSS every second) unless noted. Shared pages "
        "count once per process, which inflates multi-process servers; **PSS** divides "
        "them.",
        "- Measuring costs CPU too, and more for Postfix (one /proc scan per process): the "
        "sampler re-lists the server's processes every 0.5 s and reads PSS once a second. "
        "Its cost (this process's own CPU) is left out of 'unattributed'; it was at most "
        f"{bench_max:.2f} cores in this run.",
        "- Ratios are Postroom ÷ Postfix; whether higher is better depends on the row.",
        "- Private Postfix instance as in bench/relay.py: its own config dir and queue, "
        "`chroot = n` for every service, `inet_interfaces = 127.0.0.1`, "
        "`default_process_limit = 100` unless noted.",
        "",
        "## Summary",
        "",
        summary_md(workloads),
        f"![Postroom and Postfix, workload by workload]({png.name})",
        "",
        "Targets are the project's goals; a **no** is a measured miss, not a rounding.",
        "",
        "## Commands",
        "",
        "```",
        f"bench/run suite{' --quick' if args.quick else ''}",
        "```",
        "",
        "PORT, SINKPORT and CLOSEDPORT are free loopback ports picked at run time.",
        "",
        *(workload_md(wl) for wl in workloads),
        *(["## Appendix: configurations", ""] if any(wl.appendix for wl in workloads) else []),
        *(text for wl in workloads for text in wl.appendix),
    ]
    return "\n".join(lines)


# --- helper mode: the W3 client ------------------------------------------------------
def message_body(size: int) -> bytes:
    head = (b"From: <sender@example.org>\r\nTo: <user@bench.test>\r\nSubject: bench\r\n"
            b"Message-ID: <bench@client.bench>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line) + 1)
    return head + body[:size - size % len(line)]


async def client_main(a: argparse.Namespace) -> dict[str, Any]:
    body = Path(a.message).read_bytes() if a.message else message_body(a.size)
    remaining = [a.messages]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + a.time_limit

    async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                break
        if not line.startswith(code):
            raise RuntimeError(line.decode(errors="replace").strip())

    async def session() -> None:
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            writer = None
            try:
                async with asyncio.timeout(60):
                    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
                    await expect(reader, b"220")
                    writer.write(f"EHLO {a.helo}\r\n".encode())
                    await expect(reader, b"250")
                    writer.write(f"MAIL FROM:<{a.sender}>\r\n".encode())
                    await expect(reader, b"250")
                    writer.write(f"RCPT TO:<{a.to}>\r\n".encode())
                    await expect(reader, b"250")
                    writer.write(b"DATA\r\n")
                    await expect(reader, b"354")
                    writer.write(body)
                    await writer.drain()
                    t0 = time.perf_counter()
                    writer.write(b".\r\n")
                    await expect(reader, b"250")
                    latencies.append(time.perf_counter() - t0)
                    writer.write(b"QUIT\r\n")
                    await expect(reader, b"221")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            finally:
                if writer is not None:
                    writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(session() for _ in range(a.sessions)))
    seconds = time.monotonic() - t0
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0

    return {"ok": len(latencies), "errors": len(errors), "first_errors": errors[:5],
            "seconds": seconds, "p50": pct(0.50), "p99": pct(0.99),
            "t0": t0}      # time.monotonic() is the machine's clock: the caller's too


def client(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="suite.py _client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=SESSIONS)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--to", default="rcpt@far.test")
    p.add_argument("--sender", default="sender@example.org")
    p.add_argument("--helo", default="client.bench")
    p.add_argument("--message", default="",
                   help="send this file (a whole message: CRLF lines, none starting with a "
                   "dot) instead of a generated one of --size bytes")
    p.add_argument("--time-limit", type=float, default=TIMEOUT)
    a = p.parse_args(argv)
    raise_nofile()
    print(json.dumps(asyncio.run(client_main(a))))
    return 0


# --- helper mode: fill a stopped Postroom's spool ------------------------------------
def fill(argv: list[str]) -> int:
    from postroom.spool import NewMessage, NewRecipient, SqliteSpool, new_queue_id

    path, n, size = Path(argv[0]), int(argv[1]), int(argv[2])
    data = (b"Received: from client.bench ([127.0.0.1]) by postroom.bench with ESMTP\r\n"
            + message_body(size))
    client_info = {"peer": "127.0.0.1", "helo": "client.bench", "listener": "mx",
                   "session": "bench-fill"}
    spool = SqliteSpool(path)
    try:
        for start in range(0, n, 1000):
            spool.enqueue_sync([NewMessage(new_queue_id(), "sender@example.org", {}, client_info,
                                           data, (NewRecipient("rcpt@far.test", "outbound", {}),))
                                for _ in range(min(1000, n - start))])
    finally:
        spool.close()
    return 0


# --- main ----------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_fill":
        return fill(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts: about 2 minutes")
    p.add_argument("--smoke", action="store_true",
                   help="tiny counts, to check that the suite runs (CI): no figure means much")
    p.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W4")
    p.add_argument("--out", default="", help="the Markdown report (default: docs/benchmarks.md; "
                   "with --only: bench/results/suite-partial.md)")
    p.add_argument("--keep", action="store_true",
                   help="leave the run folders in /tmp: removing their thousands of files "
                   "slows creating files for minutes after (bench/README.md); for suites "
                   "run back to back; remove /tmp/bench-* by hand once done")
    args = p.parse_args()
    KEEP[0] = args.keep
    started = time.monotonic()
    machine_lines = machine()            # raises RLIMIT_NOFILE too
    _, processes_note = postroom_processes_setting()
    k = 0 if args.quick or args.smoke else 1
    QUIET_WAIT[0] = 0.0 if args.smoke else 3.0 if args.quick else 30.0
    if args.smoke:                 # CI: right after the tests removed their folders
        FILES_WAIT[:] = [0.0, 0.0]
    n = {name: v[k] for name, v in SIZES.items()}
    if args.smoke:
        n = {name: max(1, v // 10) for name, v in n.items()}     # a tenth of --quick
    plan: list[tuple[str, Callable[[], Workload]]] = [
        ("W1", lambda: w1(n["w1"])), ("W1v", lambda: w1v(n["w1v"])), ("W2", lambda: w2(n["w2"])),
        ("W3", lambda: w3(n["w3"])),
        ("W4", lambda: w4(n["w4"])), ("W5", lambda: w5(n["w5"], n["w5_msgs"])),
        ("W6", lambda: w6(n["w6"])), ("W7", lambda: w7(n["w7"])),
    ]
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    workloads = []
    for key, fn in plan:
        if only and key.upper() not in only:
            continue
        print(f"{key} ...", flush=True)
        workloads.append(fn())
    if args.out:
        out = Path(args.out)
    elif only:
        out = ROOT / "bench" / "results" / "suite-partial.md"
    else:
        out = ROOT / "docs" / "benchmarks.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    chart(workloads, png, f"Postroom vs Postfix, bench/run suite{' --quick' if args.quick else ''}"
          f" ({time.strftime('%Y-%m-%d')})")
    text = report(workloads, args, started, machine_lines, processes_note, png)
    out.write_text(text)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / ("suite.json" if not only else "suite-partial.json")).write_text(json.dumps(
        {"quick": args.quick, "processes": processes_note,
         "workloads": [{"key": wl.key, "title": wl.title,
                        "runs": [asdict(r) for r in wl.runs],
                        "headlines": [asdict(h) for h in wl.headlines]} for wl in workloads]},
        indent=1, default=str))
    print(summary_md(workloads))
    print(f"wrote {out} and {png} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
