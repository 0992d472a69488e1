"""Shared pieces of the benchmarks: ports, smtp-sink, a private Postfix, a Postroom
process, and CPU / memory measurement.

Everything listens on 127.0.0.0/8 only; ``bench/run`` puts the benchmarks in a
loopback-only network namespace, so a mistake fails instead of leaving the machine.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
NOBODY = 65534


# --- ports ---------------------------------------------------------------------------
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: the kernel may
    give the same ephemeral port to two binds in a row once the first is closed (a
    suite's Postroom once got its SMTP and admin ports equal, and did not start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def closed_port() -> int:
    """A loopback port with nothing listening (connections to it are refused)."""
    return free_port()


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def wait_greeting(port: int, timeout: float = 30.0) -> None:
    """Wait until a server on ``port`` answers with its 220 greeting: a listening socket
    alone may be bound before the server is ready (Postroom binds, then starts)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = greeting[:80].decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"no 220 greeting on port {port}: {last}")


def raise_nofile() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit (children
    inherit it). Returns the new (soft, hard)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- CPU and memory ------------------------------------------------------------------
def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (all processes), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc (no pgrep)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        rest = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 100_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_of(pids: Iterable[int]) -> float:
    """Sum of VmRSS in MB (pages shared between processes count once per process)."""
    return sum(_status_kb(pid, "VmRSS:") for pid in pids) / 1024


def pss_of(pids: Iterable[int]) -> float:
    """Sum of PSS in MB: shared pages divided among the processes that share them."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            pass
    return total / 1024


class RssSampler:
    """Samples the summed RSS (and, with ``pss``, PSS) of ``pids()`` in a thread;
    ``peak`` and ``peak_pss`` are the highest seen, in MB.

    Sampling costs CPU that the servers would otherwise have (a /proc scan for a
    60-process Postfix takes about 2.5 ms, its PSS about 11 ms), so the process list is
    refreshed every ``refresh`` seconds and PSS read every ``pss_every`` seconds only.
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1,
                 pss: bool = True, refresh: float = 0.5, pss_every: float = 1.0) -> None:
        self.pids = pids
        self.interval = interval
        self.pss = pss
        self.refresh = max(refresh, interval)
        self.pss_every = max(pss_every, interval)
        self.peak = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, pids: list[int] | None = None, pss: bool = True) -> None:
        pids = self.pids() if pids is None else pids
        self.peak = max(self.peak, rss_of(pids))
        if self.pss and pss:
            self.peak_pss = max(self.peak_pss, pss_of(pids))

    def _run(self) -> None:
        listed = pss_at = 0.0
        pids: list[int] = []
        while not self._stop.is_set():
            now = time.monotonic()
            if now - listed >= self.refresh:
                pids, listed = self.pids(), now
            with_pss = now - pss_at >= self.pss_every
            if with_pss:
                pss_at = now
            self.sample(pids, with_pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children that it has reaped
    (utime + stime + cutime + cstime); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    rest = stat[stat.rfind(b")") + 2:].split()
    return sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pids: Iterable[int]) -> float:
    """CPU seconds of a process tree. The difference of two readings is the tree's CPU
    in between, processes that ended meanwhile included, as long as a process of the
    tree reaped them (their time moves into its parent's cutime/cstime)."""
    return sum(process_cpu(pid) for pid in pids)


def own_cpu() -> float:
    """CPU seconds of this process, all threads (the RSS sampler included)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Meter:
    """Over a ``with`` block: wall time, the machine's busy CPU time (/proc/stat), the
    server's own CPU time (its process tree), the CPU of helpers still running (``others``,
    such as smtp-sink), and the server's peak RSS and PSS.

    The load generator's CPU is this process's waited-for children: call
    :meth:`reaped` after waiting for it. ``other_cores`` is what is left of the machine's
    busy time once the server, the helpers, the load generator and this process are
    taken out: other jobs on the machine and kernel work charged to no process, in
    cores.
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1,
                 pss: bool = True, others: Callable[[], list[int]] = list,
                 refresh: float = 0.5) -> None:
        self.pids = pids
        self.others = others
        self.sampler = RssSampler(pids, interval, pss, refresh)
        self.seconds = self.cpu = self.server_cpu = self.helper_cpu = self.client_cpu = 0.0
        self.self_cpu = 0.0

    def __enter__(self) -> Meter:
        self.sampler.__enter__()
        self._children0 = children_cpu()
        self._server0 = tree_cpu(self.pids())
        self._helper0 = tree_cpu(self.others())
        self._self0 = own_cpu()
        self._cpu0 = cpu_busy_seconds()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> None:
        """End the timed part now (the ``with`` block may go on cleaning up)."""
        if not self.seconds:
            self.seconds = time.monotonic() - self._t0
            self.cpu = cpu_busy_seconds() - self._cpu0
            self.server_cpu = tree_cpu(self.pids()) - self._server0
            self.helper_cpu = tree_cpu(self.others()) - self._helper0
            self.self_cpu = own_cpu() - self._self0
            self.reaped()

    def reaped(self) -> None:
        """Count the load generators waited for so far."""
        self.client_cpu = children_cpu() - self._children0

    @property
    def other_cores(self) -> float:
        if not self.seconds:
            return 0.0
        used = self.server_cpu + self.helper_cpu + self.client_cpu + self.self_cpu
        return max(0.0, self.cpu - used) / self.seconds

    @property
    def self_cores(self) -> float:
        """What the measuring itself (this process: the sampler, the polling) cost."""
        return self.self_cpu / self.seconds if self.seconds else 0.0

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.sampler.__exit__()

    @property
    def peak_rss(self) -> float:
        return self.sampler.peak

    @property
    def peak_pss(self) -> float:
        return self.sampler.peak_pss


def quiet_machine(max_wait: float, busy_cores: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until the machine's busy time over half a second is
    under ``busy_cores``; returns the last reading, in cores. Other jobs on a shared
    machine skew every figure: this lets a short one finish first."""
    deadline = time.monotonic() + max_wait
    while True:
        c0 = cpu_busy_seconds()
        time.sleep(0.5)
        busy = (cpu_busy_seconds() - c0) / 0.5
        if busy < busy_cores or time.monotonic() >= deadline:
            return busy


# A run's folders are removed when the benchmark exits, not when the run ends. On an
# ext4 without a journal (this machine's root file system), allocating an inode skips
# every inode freed in the last 60 s (longer while its inode-table block is dirty), one
# buffer-cache look-up each: right after a run's thousands of files were removed,
# creating a file cost 0.5-1 ms instead of about 15 us (perf: find_get_block_common and
# recently_deleted on top), and the next server's run paid for it (W1 then fell from
# about 800 to 500 msgs/s in back-to-back suites). A server that removes files as it
# works (Postfix's queue files) still pays for its own.
_DISCARDED: list[Path] = []
_PROBES = [0]


KEEP = [False]      # --keep: leave the run folders (back-to-back suites; see bench/README)


def discard(folder: Path) -> None:
    """Remove ``folder`` when this process exits (unless --keep)."""
    _DISCARDED.append(folder)


@atexit.register
def _remove_discarded() -> None:
    for folder in [] if KEEP[0] else _DISCARDED:
        shutil.rmtree(folder, ignore_errors=True)


def file_create_us(folder: Path, files: int = 200) -> float:
    """Microseconds to create one empty file in ``folder``, over ``files`` new files
    (kept: removing them would slow the next creations)."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for _ in range(files):
        _PROBES[0] += 1
        os.close(os.open(folder / f"probe-{_PROBES[0]}", os.O_WRONLY | os.O_CREAT, 0o600))
    return (time.perf_counter() - t0) / files * 1e6


def quiet_files(max_wait: float, limit_us: float = 100.0) -> float:
    """Wait (at most ``max_wait`` s) until creating a file costs under ``limit_us``
    microseconds (see :func:`discard`); returns the last reading."""
    folder = Path(tempfile.gettempdir()) / f"bench-probe-{os.getpid()}"
    if folder not in _DISCARDED:
        discard(folder)
    deadline = time.monotonic() + max_wait
    while True:
        cost = file_create_us(folder)
        if cost < limit_us or time.monotonic() >= deadline:
            return cost
        time.sleep(2)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def count_files(directory: Path) -> int:
    try:
        return sum(1 for e in os.scandir(directory) if e.is_file())
    except FileNotFoundError:
        return 0


def count_tree(directory: Path) -> int:
    """Files anywhere below ``directory`` (Postfix's hashed queue folders)."""
    return sum(len(files) for _, _, files in os.walk(directory))


# --- load generator ------------------------------------------------------------------
def smtp_source(port: int, messages: int, size: int, sessions: int, *,
                to: str = "rcpt@far.test", sender: str = "sender@example.org",
                reuse: bool = False) -> subprocess.Popen[bytes]:
    """Postfix's smtp-source: ``sessions`` parallel sessions, one connection per message
    unless ``reuse`` (-d). It does not pipeline."""
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", sender, "-t", to, *(["-d"] if reuse else []), f"127.0.0.1:{port}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def smtp_source_command(messages: int, size: int, sessions: int, to: str,
                        reuse: bool = False) -> str:
    return (f"smtp-source -s {sessions} -m {messages} -l {size} -f sender@example.org "
            f"-t {to}{' -d' if reuse else ''} 127.0.0.1:PORT")


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    """Wait for a load generator; its stderr (smtp-source reports failures there)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return (err or b"").decode(errors="replace").strip()


# --- smtp-sink -----------------------------------------------------------------------
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


# --- Postroom ------------------------------------------------------------------------
def postroom_smtp_keys() -> set[str]:
    """The ``[smtp]`` keys the installed Postroom accepts, read now (another developer
    may be adding one): a fresh interpreter, so a change since this process started
    counts."""
    out = subprocess.run([sys.executable, "-c",
                          "import json; from postroom.config import SMTP_KEYS; "
                          "print(json.dumps(sorted(SMTP_KEYS)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout))


def postroom_processes_setting() -> tuple[int | None, str]:
    """(value to write for ``[smtp] processes`` or None, a sentence for the report)."""
    if "processes" in postroom_smtp_keys():
        return 2, "`[smtp] processes = 2` (the key exists in `config.SMTP_KEYS` at run time)"
    return None, ("no `[smtp] processes` setting: the key is not in `config.SMTP_KEYS` at "
                  "run time, so Postroom ran as one process")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


class PostroomServer:
    """A Postroom process in its own folder, on a free loopback port.

    ``smtp`` adds or overrides ``[smtp]`` keys; ``smarthost`` ("127.0.0.1:PORT") routes
    every remote domain there without TLS; ``domains`` are the local domains;
    ``trusted`` is ``[relay] trusted_networks`` and ``nameservers`` ``[dns] nameservers``
    (by default a closed port: no DNS).
    """

    def __init__(self, *, smtp: dict[str, object] | None = None, smarthost: str = "",
                 domains: tuple[str, ...] = ("localhost",),
                 delivery: dict[str, object] | None = None,
                 extra: tuple[str, ...] = (),
                 trusted: tuple[str, ...] = ("127.0.0.0/8",),
                 nameservers: tuple[str, ...] = ("127.0.0.1:9",)) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="bench-postroom-"))
        self.port = free_port()
        self.processes, self.processes_note = postroom_processes_setting()
        keys: dict[str, object] = {"listen": [f"127.0.0.1:{self.port}"], "submission": [],
                                   "max_connections_per_peer": 1000}
        if self.processes is not None:
            keys["processes"] = self.processes
        keys.update(smtp or {})
        lines = ['hostname = "postroom.bench"', 'data_dir = "data"', "[smtp]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
        lines += ["[domains]", f"local = {_toml_value(list(domains))}",
                  "[relay]", f"trusted_networks = {_toml_value(list(trusted))}",
                  "[dns]", f"nameservers = {_toml_value(list(nameservers))}",
                  "[admin]", f'listen = "127.0.0.1:{free_port()}"']
        if delivery:
            lines += ["[delivery]", *(f"{k} = {_toml_value(v)}" for k, v in delivery.items())]
        lines += list(extra)              # more tables, such as [spool] and [node]
        if smarthost:
            lines += ["[[route]]", 'match = "*"', 'via = "smarthost"', f'host = "{smarthost}"',
                      'tls = "none"']
        self.config = self.work / "postroom.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.data = self.work / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "postroom.cli", *args, "-c", str(self.config)],
                              input=stdin, capture_output=True, text=True, cwd=self.work,
                              timeout=120)

    def add_user(self, address: str) -> None:
        done = self.cli("users", "add", address, "--password-stdin", stdin="bench-password\n")
        if done.returncode != 0:
            raise RuntimeError(f"postroom users add {address}: {done.stderr.strip()}")

    def maildir_new(self, domain: str, user: str) -> Path:
        return self.data / "mail" / domain / user / "new"

    def start(self) -> PostroomServer:
        self.log = open(self.work / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postroom.cli", "serve", "-q", "-c", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.work)
        try:
            wait_greeting(self.port)
        except TimeoutError:
            log = (self.work / "serve.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"Postroom did not start: {log}") from None
        time.sleep(0.5)        # let every front end finish starting (RSS settles)
        return self

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self, *, keep: bool = False) -> None:
        if self.proc is not None:
            tree = self.pids()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in tree:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(timeout=10)
            self.proc = None
            self.log.close()
        if not keep:
            discard(self.work)


# --- Postfix -------------------------------------------------------------------------
def postfix_version() -> str:
    return subprocess.run([POSTCONF, "-dh", "mail_version"], capture_output=True,
                          text=True).stdout.strip()


class PostfixServer:
    """A private Postfix instance: its own config dir and queue, no chroot, no DNS,
    listening on one loopback port (PEERS.md). ``main`` adds or overrides main.cf
    settings; ``smtpd_maxproc`` caps the smtpd processes of the listener."""

    def __init__(self, main: dict[str, str] | None = None, smtpd_maxproc: int | None = None
                 ) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
        self.work.chmod(0o755)
        self.port = free_port()
        self.etc, self.queue, data = self.work / "etc", self.work / "queue", self.work / "data"
        for d in (self.etc, self.queue, data):
            d.mkdir()
        shutil.chown(data, "postfix")
        shutil.copy("/etc/postfix/master.cf", self.etc / "master.cf")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(data),
            "myhostname": "postfix.bench",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "maillog_file": f"{self.work}/maillog",
            "maillog_file_prefixes": str(self.work),
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "default_process_limit": "100",
        }
        settings.update(main or {})
        (self.etc / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.smtpd_maxproc = smtpd_maxproc
        pc = [POSTCONF, "-c", str(self.etc)]
        subprocess.run([*pc, "-F", "*/*/chroot = n"], check=True)
        subprocess.run([*pc, "-M#", "smtp/inet"], check=True)
        maxproc = "-" if smtpd_maxproc is None else str(smtpd_maxproc)
        subprocess.run([*pc, "-M", f"127.0.0.1:{self.port}/inet = 127.0.0.1:{self.port} inet n - n "
                        f"- {maxproc} smtpd"], check=True)
        current = subprocess.run([POSTCONF, "-h", "alternate_config_directories"],
                                 capture_output=True, text=True).stdout.split()
        subprocess.run([POSTCONF, "-e", "alternate_config_directories = "
                        + " ".join([*current[-20:], str(self.etc)])], check=True)

    def vmail(self) -> Path:
        """A virtual_mailbox_base writable by uid/gid 65534 (PEERS.md)."""
        base = self.work / "vmail"
        base.mkdir(exist_ok=True)
        os.chown(base, NOBODY, NOBODY)
        return base

    @staticmethod
    def maildir_settings(base: Path, domain: str, user: str, size_limit: int) -> dict[str, str]:
        return {
            "virtual_mailbox_domains": domain,
            "virtual_mailbox_base": str(base),
            "virtual_mailbox_maps": f"static:{domain}/{user}/",
            "virtual_uid_maps": f"static:{NOBODY}",
            "virtual_gid_maps": f"static:{NOBODY}",
            "virtual_mailbox_limit": str(size_limit),
            "message_size_limit": str(size_limit),
        }

    def start(self) -> PostfixServer:
        done = subprocess.run([POSTFIX, "-c", str(self.etc), "start"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"postfix start: {done.stderr.strip()} {self.maillog()}")
        wait_greeting(self.port)
        time.sleep(0.5)
        return self

    def maillog(self) -> str:
        try:
            return (self.work / "maillog").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        """The instance's master (from its pid file) and every process below it."""
        master = self.master_pid()
        return descendants(master) if master is not None else []

    def postqueue_json(self) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([POSTQUEUE, "-c", str(self.etc), "-j"], capture_output=True,
                              timeout=600)

    def configure(self, settings: dict[str, str]) -> None:
        """Add or change main.cf settings (before :meth:`start`)."""
        subprocess.run([POSTCONF, "-c", str(self.etc), "-e",
                        *(f"{k} = {v}" for k, v in settings.items())], check=True)

    def stop(self) -> None:
        master = self.master_pid()
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True)
        if master is not None:
            wait_until(lambda: not Path(f"/proc/{master}").exists(), timeout=30, interval=0.1)
        discard(self.work)
